"""`quantize --target-bits B`: measure what every candidate setting costs each quantized linear,
choose one per linear under the size budget (allocate.py), and hand the engine a QuantConfig whose
`dynamic` holds the choice.

Measurement (one pass over the model before the real, sequential quantization): each block runs on
the calibration inputs in full precision, every linear's Hessian is collected (linears reading one
input share it), and GPTQ is solved for every candidate on that Hessian, recording the loss of every
output row. Then one backward pass (sensitivity.py) gives, per output channel, how much the model's
loss cares about an error there. Costs: one extra calibration pass, (candidates) solves per linear,
and one streamed backward pass over a few batches. The Hessians are the full-precision model's, not
the partly quantized one's: the allocation must be global (a linear's setting depends on every
other's loss), so it is made before any linear is quantized; the real run that follows is the
ordinary sequential one, where each linear sees the already-quantized earlier ones.

Loss measure: the expected increase of the model's loss, Σ_i F_i·loss_i over a linear's output rows,
where loss_i = ½·ΔW_i H ΔW_iᵀ is row i's GPTQ loss (the mean squared error it adds to output i over
the calibration tokens) and F_i the mean squared gradient of the next-token loss on output i (the
diagonal Fisher). The GPTQ loss alone, or divided by the output's energy, ranks modules by how much
their outputs change, not by what that costs the model: on SmolLM2-135M at 3.2 bits the
energy-relative measure gave perplexity 155 where uniform 3-bit g128 gave 91
(bench/mixed_smollm2_*). The allocation minimises the sum over linears.

The measurement is a JSON file (kept in the work dir while quantizing, and beside the checkpoint as
measurements.json); `--measurements FILE` reuses it for another budget, and `--dry-run` prints the
allocation from it without touching the model. The file is written once the whole model is measured:
a run interrupted while measuring measures again when resumed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from gptq_cli.errors import UsageError
from gptq_cli.format.config import QuantConfig
from gptq_cli.format.dynamic import encode
from gptq_cli.model.arch import block_linears, linear_weight
from gptq_cli.model.modelio import StreamingModel
from gptq_cli.quantization.allocate import (
    Candidate,
    allocate,
    average_bits,
    budget_range,
    check_target,
    inward,
    parse_candidates,
    stored_bits,
)
from gptq_cli.quantization.calibration import BlockPasses, Calibration
from gptq_cli.quantization.checksums import (
    CHECKSUM_KEY,
    Damaged,
    checked_json_bytes,
    read_checked_json,
    verified_json,
    write_atomic,
)
from gptq_cli.quantization.engine import capture_inputs, solve_weight, stack_rows
from gptq_cli.quantization.sensitivity import fisher_batches, output_fisher
from gptq_cli.quantization.workdir import MEASUREMENTS_FILE, WorkDir

# Which loss measure a measurement file holds: files of another measure are refused, not mixed up.
MEASURE = "fisher-weighted GPTQ row loss"
# QuantConfig fields every candidate shares: a measurement made with other values does not apply.
SHARED_SETTINGS = ("sym", "desc_act", "static_groups", "act_group_aware", "damp_percent", "mse")


def measure(
    sm: StreamingModel,
    layers_path: str,
    calib: Calibration,
    input_ids: list[torch.Tensor],
    quant: QuantConfig,
    candidates: list[Candidate],
    device: torch.device,
    dtype: torch.dtype,
    on_block: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Per linear, in model order: {"name", "in", "out", "losses": [expected loss increase per
    candidate]}. Advances `calib` (the batches of `input_ids` at block 0) through every block, in
    full precision, then measures the loss's sensitivity to every linear's outputs
    (sensitivity.py) and weighs the rows' losses."""
    layers = sm.model.get_submodule(layers_path)
    n_kept = fisher_batches(calib.hidden, len(layers))
    kept: list[list[torch.Tensor]] = []
    row_losses: dict[str, list[torch.Tensor]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for i, block in enumerate(layers):
        prefix = f"{layers_path}.{i}."
        kept.append(calib.hidden[:n_kept])
        sm.materialize(prefix, device, dtype)
        linears = block_linears(block)
        # the engine's passes, with every linear in one group: nothing is quantized in between
        with torch.no_grad(), BlockPasses(block, linears, [list(linears)], calib, device) as passes:
            for names, H, _tokens in passes.hessians(0):
                weights = [linear_weight(linears[n]) for n in names]
                for name, w, rows in zip(
                    names, weights, _row_losses(weights, H, quant, candidates)
                ):
                    row_losses[prefix + name], shapes[prefix + name] = (
                        rows,
                        (w.shape[1], w.shape[0]),
                    )
            passes.advance()
        sm.release(block)
        if on_block:
            on_block(i + 1, len(layers))
    fisher = output_fisher(
        sm, layers_path, kept, calib.hidden[:n_kept], calib.kwargs, input_ids[:n_kept], device
    )
    return [
        {
            "name": name,
            "in": k,
            "out": n,
            "losses": [float((fisher[name] * r).sum()) for r in row_losses[name]],
        }
        for name, (k, n) in shapes.items()
    ]


def _row_losses(
    weights: list[torch.Tensor], H: torch.Tensor, quant: QuantConfig, candidates: list[Candidate]
) -> list[list[torch.Tensor]]:
    """Per linear sharing Hessian H (solved stacked: rows are independent given H⁻¹): the GPTQ
    loss of each output row [out] for every candidate, on the CPU."""
    W, sizes = stack_rows(weights), [w.shape[0] for w in weights]
    per_linear: list[list[torch.Tensor]] = [[] for _ in weights]
    for c in candidates:
        qw = solve_weight(W, H, quant, c.bits, c.group_size)
        for m, part in enumerate(qw.split_rows(sizes)):
            per_linear[m].append(part.row_loss.cpu())
    return per_linear


def identity(quant: QuantConfig, plan: dict) -> dict:
    """What a measurement depends on besides the candidate list: the model, the calibration
    tokens, the activation dtype (from the work dir's plan), the settings every candidate shares
    and the loss measure."""
    return {
        "measure": MEASURE,
        **{k: plan[k] for k in ("model_fingerprint", "calibration_fingerprint", "dtype")},
        **{k: getattr(quant, k) for k in SHARED_SETTINGS},
    }


def measurement_doc(
    ident: dict, candidates: list[Candidate], rows: list[dict], seconds: float
) -> dict:
    return {
        "kind": "gptq_cli target-bits measurement",
        "identity": ident,
        "seconds": round(seconds, 1),
        "candidates": [c.name for c in candidates],
        "modules": rows,
    }


def read_measurements(path: str | Path, ident: dict | None, candidates: list[Candidate]) -> dict:
    """A measurement file, checked against what this run needs (ident None: not checked, e.g.
    dry-run); UsageError saying what differs."""
    try:
        doc = json.loads(Path(path).read_text())
        doc["modules"], doc["candidates"], doc["identity"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(
            f"--measurements {path}: not a measurement file that quantize --target-bits wrote ({e})"
        ) from None
    if CHECKSUM_KEY in doc:  # files of versions before checksums have none
        try:
            verified_json(doc)
        except Damaged as e:
            raise UsageError(
                f"--measurements {path} {e}; measure again (leave out --measurements)"
            ) from e
    if ident is not None:
        diffs = [k for k in ident if doc["identity"].get(k) != ident[k]]
        if diffs:
            raise UsageError(
                f"--measurements {path} was made with another {', '.join(diffs)}; measure again "
                f"(leave out --measurements) or pass the matching settings"
            )
    missing = [c.name for c in candidates if c.name not in doc["candidates"]]
    if missing:
        raise UsageError(
            f"--measurements {path} has no losses for {', '.join(missing)} (it measured "
            f"{','.join(doc['candidates'])}); narrow --candidates to those or measure again"
        )
    return doc


def choose(
    doc: dict, candidates: list[Candidate], target_bits: float
) -> dict[str, tuple[int, int]]:
    """(bits, group_size) per linear: least total expected loss with average stored bits <=
    target_bits."""
    columns = [doc["candidates"].index(c.name) for c in candidates]
    mods = doc["modules"]
    shapes = [(m["in"], m["out"]) for m in mods]
    check_target(target_bits, shapes, candidates)
    sizes = [[stored_bits(k, n, c) for c in candidates] for k, n in shapes]
    losses = [[m["losses"][j] for j in columns] for m in mods]
    budget = int(target_bits * sum(k * n for k, n in shapes))
    try:
        picks = allocate(sizes, losses, budget)
    except ValueError as e:
        low, high = inward(*budget_range(shapes, candidates))
        raise UsageError(
            f"--target-bits {target_bits}: {e} (reachable {low:.4f} to {high:.4f})"
        ) from None
    return {m["name"]: (candidates[p].bits, candidates[p].group_size) for m, p in zip(mods, picks)}


def allocate_run(
    wd: WorkDir,
    plan: dict,
    sm: StreamingModel,
    layers_path: str,
    batches: list[torch.Tensor],
    quant: QuantConfig,
    device: torch.device,
    dtype: torch.dtype,
    measurements: str | Path | None,
    on_block: Callable[[int, int], None] | None,
    note: Callable[[str], None],
) -> QuantConfig:
    """quantize --target-bits: the measurement (the work dir's, the given file, or made now on
    `batches` and kept in the work dir), then the allocation; returns the mixed QuantConfig, also
    set as plan["config"]."""
    stored = wd.path / MEASUREMENTS_FILE
    if stored.is_file():
        try:
            read_checked_json(stored)
        except Damaged as e:
            note(f"{stored} {e}; measuring again")
            stored.unlink()
    if not stored.is_file():
        ident = identity(quant, plan)
        candidates = parse_candidates(",".join(quant.meta["candidates"]))
        if measurements is not None:
            doc = read_measurements(measurements, ident, candidates)
        else:
            t0 = time.perf_counter()
            calib = capture_inputs(sm, layers_path, batches, device, dtype)
            rows = measure(
                sm, layers_path, calib, batches, quant, candidates, device, dtype, on_block
            )
            doc = measurement_doc(ident, candidates, rows, time.perf_counter() - t0)
        write_atomic(stored, checked_json_bytes(doc, indent=1))
    mixed_quant = allocated_config(wd, plan, quant, check=True)
    plan["config"] = mixed_quant.to_hf_dict()
    return mixed_quant


def allocated_config(wd: WorkDir, plan: dict, quant: QuantConfig, check: bool) -> QuantConfig:
    """The allocation for quant.meta's target_bits/candidates from the work dir's measurements
    (deterministic, so `gptq pack WORKDIR` recomputes it rather than storing it twice); check:
    that they fit this run."""
    candidates = parse_candidates(",".join(quant.meta["candidates"]))
    doc = read_measurements(
        wd.path / MEASUREMENTS_FILE, identity(quant, plan) if check else None, candidates
    )
    return mixed_config(quant, choose(doc, candidates, quant.meta["target_bits"]))


def mixed_config(quant: QuantConfig, settings: dict[str, tuple[int, int]]) -> QuantConfig:
    """`quant` with the most common setting at the top level and every other module in `dynamic`."""
    (bits, group_size), dynamic = encode(settings)
    return replace(
        quant, bits=bits, group_size=group_size, dynamic=dynamic or None, meta=dict(quant.meta)
    )


def summary(settings: dict[str, tuple[int, int]], shapes: dict[str, tuple[int, int]]) -> dict:
    """Counts per setting, the average stored bits per weight and the quantized linears' bytes."""
    names = list(settings)
    choices = [Candidate(*settings[n]) for n in names]
    counts: dict[str, int] = {}
    for c in choices:
        counts[c.name] = counts.get(c.name, 0) + 1
    total = sum(stored_bits(*shapes[n], c) for n, c in zip(names, choices))
    return {
        "modules_per_setting": dict(sorted(counts.items())),
        "bits_per_weight": round(average_bits([shapes[n] for n in names], choices), 4),
        "quantized_linears_bytes": total // 8,
    }


def dry_run(
    shapes: dict[str, tuple[int, int]],
    candidates: list[Candidate],
    target_bits: float,
    measurements: str | Path | None,
) -> dict:
    """`quantize --dry-run --target-bits`: the reachable range, every uniform candidate's size
    and, given a measurement file, the allocation itself."""
    shape_list = list(shapes.values())
    check_target(target_bits, shape_list, candidates)
    low, high = inward(*budget_range(shape_list, candidates))
    out = {
        "target_bits": target_bits,
        "candidates": [c.name for c in candidates],
        "reachable_bits_per_weight": [low, high],
        "uniform_bits_per_weight": {
            c.name: round(average_bits(shape_list, [c] * len(shape_list)), 4) for c in candidates
        },
        "target_quantized_linears_bytes": int(target_bits * sum(k * n for k, n in shape_list)) // 8,
    }
    if measurements is None:
        out["allocation"] = (
            f"needs the measurement: one full-precision calibration pass plus {len(candidates)} "
            "GPTQ solves per linear; quantize without --dry-run makes it (and leaves "
            f"{MEASUREMENTS_FILE} beside the checkpoint for --measurements)"
        )
        return out
    doc = read_measurements(measurements, None, candidates)
    settings = choose(doc, candidates, target_bits)
    out["allocation"] = {
        **summary(settings, {m["name"]: (m["in"], m["out"]) for m in doc["modules"]}),
        "modules": {n: Candidate(*s).name for n, s in settings.items()},
    }
    return out
