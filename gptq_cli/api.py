"""The plain Python API under the CLI: `quantize(...)`, with `evaluate(...)` (evaluate.py) and
`pack_workdir(...)` (export.py, `gptq pack WORKDIR`) re-exported.

    from gptq_cli.api import QuantConfig, evaluate, quantize
    result = quantize("smollm2-135m", QuantConfig(bits=4, group_size=128), dataset="builtin",
                      nsamples=128, seqlen=512, output="smollm2-gptq")
    print(evaluate(str(result.output), dataset="wikitext2", limit=40)["ppl"])
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from gptq_cli import __version__, kernels
from gptq_cli.errors import Interrupted, UsageError, noting_interrupts
from gptq_cli.evaluate import evaluate  # noqa: F401  (re-exported: the API is quantize + evaluate)
from gptq_cli.export import claim_output, pack_workdir, write_kept_blocks  # noqa: F401  (pack_workdir: `gptq pack`'s API)
from gptq_cli.format.config import QuantConfig
from gptq_cli.model.arch import Arch, quantized_shapes, resolve_arch
from gptq_cli.model.modelio import (
    ModelRef,
    StreamingModel,
    bound_allocator,
    load_streaming,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model,
    storage_dtype,
)
from gptq_cli.preflight import (
    act_order_notes,
    calibration_notes,
    group_size_notes,
)
from gptq_cli.quantization import distributed, mixed, phases
from gptq_cli.quantization.activation_pool import BufferPool
from gptq_cli.quantization.allocate import Candidate, check_target, parse_candidates
from gptq_cli.quantization.calibration import Calibration
from gptq_cli.quantization.engine import (
    ModuleResult,
    capture_inputs,
    quantize_decoder_block,
    replay_block,
)
from gptq_cli.quantization.solver import DAMP_STEP
from gptq_cli.quantization.workdir import (
    WorkDir,
    calibration_fingerprint,
    check_new_directory,
    default_work_dir,
    model_fingerprint,
    plan_identity,
    stored_weights,
)
from gptq_cli.settings import (
    BATCH_SIZE,
    DATASET,
    NSAMPLES,
    SEED,
    RunSettings,
    run_settings,
)

# Progress events: ("resume", finished blocks, total, work dir), ("block", done, total), ("module",
# ModuleResult), ("note", text): a setting that could not be applied as asked, and what is done
# instead
ProgressFn = Callable[..., None]


@dataclass
class QuantizeResult:
    output: Path
    modules: list[dict] = field(default_factory=list)  # quant_log.json's per-module rows
    seconds: float = 0.0
    plan: dict = field(default_factory=dict)
    # settings not applied as asked, and what was done instead
    notes: list[str] = field(default_factory=list)
    writer: bool = True  # False on the ranks of a torchrun other than 0: they wrote nothing
    # seconds per phase of this process (phases.py)
    phases: dict[str, float] = field(default_factory=dict)


def default_output(model: str, quant: QuantConfig, target_bits: float | None = None) -> Path:
    name = Path(model).stem if model.endswith(".gguf") else Path(model.rstrip("/")).name
    if target_bits is not None:
        return Path(f"{name}-gptq-mixed-{target_bits:g}bit")
    return Path(f"{name}-gptq-{quant.bits}bit-g{quant.group_size}")


def batch_samples(samples: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Stack equal-length samples into batches (samples of another length go in their own
    batches)."""
    batches, current = [], []
    for s in samples:
        if current and (len(current) == batch_size or current[0].shape[-1] != s.shape[-1]):
            batches.append(torch.cat(current))
            current = []
        current.append(s.reshape(1, -1))
    if current:
        batches.append(torch.cat(current))
    return batches


def quantize(
    model: str,
    quant: QuantConfig | None = None,
    *,
    dataset: str = DATASET,
    dataset_path: str | None = None,
    nsamples: int = NSAMPLES,
    seqlen: int | None = None,
    seed: int = SEED,
    batch_size: int = BATCH_SIZE,
    device: str | None = None,
    dtype: str = "auto",
    output: str | Path | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    command: str | None = None,
    progress: ProgressFn | None = None,
    target_bits: float | None = None,
    candidates: list[Candidate] | None = None,
    measurements: str | Path | None = None,
    trust_remote_code: bool = False,
    method: str | None = None,
    gptaq_alpha: float | None = None,
) -> QuantizeResult:
    """Quantize `model` (Hub id, local dir, .gguf or built-in name) with GPTQ and write a GPTQ
    checkpoint.

    Each finished block is stored in `work_dir` (default `<output>.work`); a call that finds a work
    dir made with the same settings continues after its last finished block (resume=True insists on
    one), and the work dir is removed once the checkpoint is written. `command` is recorded in
    quant_log.json. seqlen None: settings.SEQLEN, or the model's context if that is shorter; a
    seqlen beyond the context is refused.
    target_bits: choose each linear's bits and group size among `candidates` (default bits 2/3/4/8 x
    groups 32/64/128) within that average of stored bits per weight (mixed.py); quant's
    bits/group_size are then ignored. `measurements`: a measurements.json of an earlier such run
    with the same model, calibration and shared settings, instead of measuring again.
    trust_remote_code: a model whose config.json names its own code (auto_map) may run it; refused
    otherwise.
    method: "gptq"; "gptaq" (Li et al. 2025: each layer aims at the full-precision model's output
    on full-precision inputs; gptaq_alpha weighs that correction); or "gptaq-ls" (the same aim,
    by GPTQ run on the least-squares fit of that output, gptaq.least_squares_target). None:
    DEFAULT_METHOD (resolve_method: its alpha differs with target_bits). Recorded in
    quantization_config's meta (GPTAQ's; plain GPTQ adds nothing)."""
    from gptq_cli.data.textdata import calibration_samples

    run = run_settings(
        quant,
        dataset=dataset,
        nsamples=nsamples,
        seqlen=seqlen,
        batch_size=batch_size,
        seed=seed,
        method=method,
        gptaq_alpha=gptaq_alpha,
        target_bits=target_bits,
    )
    out = Path(output) if output else default_output(model, run.quant, run.target_bits)
    check_new_directory(out, "--output")
    wd = WorkDir(work_dir if work_dir else default_work_dir(out))
    if not wd.path.exists():
        check_new_directory(wd.path, "--work-dir")
    if resume and not wd.has_plan():
        raise UsageError(
            f"--resume: there is no work dir {wd.path} to continue; run without --resume to start, "
            f"or pass the --work-dir an interrupted run left"
        )
    dev = resolve_device(device)
    resolve_dtype(dtype, dev)  # a bad --dtype is refused before the model is looked for
    kernels.initialize_cpu_math()
    bound_allocator()
    ranks = distributed.init(dev)  # under torchrun: this process's share of the batches and solves
    progress = progress if ranks.writer else None
    torch.manual_seed(run.seed)
    t_start = time.perf_counter()
    phases.restart()
    # the output is held from now on: a second run writing it is refused at once, not after all its
    # work
    with claim_output(out) if ranks.writer else nullcontext():
        with phases.phase("load"):
            ref = resolve_model(model, trust_remote_code)
            cdtype = resolve_dtype(dtype, dev, storage_dtype(ref))
            tokenizer = load_tokenizer(ref)
            sm = load_streaming(ref, cdtype)
            run = run.for_model(sm.model.config)
            samples = calibration_samples(
                tokenizer,
                run.dataset,
                nsamples=run.nsamples,
                seqlen=run.seqlen,
                seed=run.seed,
                dataset_path=dataset_path,
            )
        layers_path, arch = resolve_arch(sm.model)
        n_blocks = len(sm.model.get_submodule(layers_path))
        shapes = quantized_shapes(sm.model, layers_path)
        notes = (
            calibration_notes(samples, run.nsamples, run.seqlen)
            + group_size_notes(shapes, run.quant.group_size)
            + act_order_notes(run.quant)
        )
        say = (lambda text: progress("note", text)) if progress else (lambda text: None)
        for note in notes:
            say(note)
        # recorded in quantization_config's meta; a copy: the caller's config stays as it was given
        meta = {
            **run.quant.meta,
            "damp_auto_increment": DAMP_STEP,
            "static_groups": run.quant.static_groups,
            **run.quantization_meta(),
        }
        if run.target_bits is not None:
            candidates = candidates or parse_candidates(None)
            check_target(run.target_bits, list(shapes.values()), candidates)
            meta.update(candidates=[c.name for c in candidates])
        run = replace(run, quant=replace(run.quant, meta=meta))
        quant = run.quant
        plan = _work_plan(
            model,
            ref,
            run,
            samples,
            device=dev,
            dtype=cdtype,
            blocks=n_blocks,
            command=command,
            notes=notes,
        )
        for note in wd.open(plan) if ranks.writer else ():  # rank 0 alone writes
            say(note)
        with noting_interrupts() as interrupted:
            try:
                if target_bits is not None:
                    on_measure = (lambda i, n: progress("measure", i, n)) if progress else None
                    quant = mixed.allocate_run(
                        wd,
                        plan,
                        sm,
                        layers_path,
                        batch_samples(samples, run.batch_size),
                        quant,
                        dev,
                        cdtype,
                        measurements,
                        on_measure,
                        say,
                    )
                # with --target-bits, of the allocated configuration
                identity = plan_identity(plan)
                stored, damaged = (
                    wd.check_blocks(n_blocks, identity)
                    if ranks.writer
                    else ([False] * n_blocks, [])
                )
                for note in damaged:
                    say(note)
                # inside the try: a rank lost here leaves no empty work dir
                stored = [
                    bool(s) for s in distributed.broadcast_ints(ranks, [int(s) for s in stored])
                ]
                if not all(stored):
                    if any(stored) and progress:
                        progress("resume", sum(stored), n_blocks, wd.path)
                    _solve_into(
                        wd,
                        sm,
                        layers_path,
                        arch,
                        samples,
                        run.batch_size,
                        quant,
                        dev,
                        cdtype,
                        stored,
                        identity,
                        progress,
                        ranks,
                    )
                if not ranks.writer:
                    return QuantizeResult(
                        out, [], time.perf_counter() - t_start, plan, notes, writer=False
                    )
                with phases.phase("write"):
                    rows = write_kept_blocks(
                        wd, plan, out, sm, ref, tokenizer, command=command, phases=phases.report
                    )
            except Exception as e:
                if not interrupted():
                    if ranks.writer:
                        wd.remove_if_unfinished()
                    raise
                raise _interrupted(wd, n_blocks) from e
            except KeyboardInterrupt:
                raise _interrupted(wd, n_blocks) from None
            finally:
                if ranks.writer:
                    wd.close()
        wd.remove()
        return QuantizeResult(
            out, rows, time.perf_counter() - t_start, plan, notes, phases=phases.report()
        )


def _work_plan(
    model: str,
    ref: ModelRef,
    run: RunSettings,
    samples: list[torch.Tensor],
    *,
    device: torch.device,
    dtype: torch.dtype,
    blocks: int,
    command: str | None,
    notes: list[str],
) -> dict:
    """plan.json: what decides the result (workdir.IDENTITY_FIELDS) and what describes the run.
    nsamples and seqlen are what was used, not what was asked: a short corpus gives fewer or
    shorter samples (the notes say so)."""
    import transformers

    return {
        "model": model,
        "model_path": str(ref.path.resolve()),
        "gguf_file": ref.gguf_file,
        "model_fingerprint": model_fingerprint(ref),
        "blocks": blocks,
        "config": run.quant.to_hf_dict(),
        "dataset": run.dataset,
        "calibration_fingerprint": calibration_fingerprint(samples),
        "nsamples": len(samples),
        "seqlen": max(s.shape[-1] for s in samples),
        "seed": run.seed,
        "batch_size": run.batch_size,
        "tokens": int(sum(s.numel() for s in samples)),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "device_type": device.type,
        "versions": {
            "gptq_cli": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "command": command,
        "notes": notes,
        "trust_remote_code": ref.trust_remote_code,
    }


def _solve_into(
    wd: WorkDir,
    sm: StreamingModel,
    layers_path: str,
    arch: Arch | None,
    samples: list[torch.Tensor],
    batch_size: int,
    quant: QuantConfig,
    dev: torch.device,
    cdtype: torch.dtype,
    stored: list[bool],
    identity: str,
    progress: ProgressFn | None,
    ranks: distributed.Ranks,
) -> None:
    """Replay each stored block, quantize the others, in model order, storing each as it finishes
    (rank 0; each rank calibrates on its share of the batches)."""
    n_blocks = len(stored)
    calib = capture_inputs(
        sm, layers_path, ranks.share(batch_samples(samples, batch_size)), dev, cdtype, BufferPool()
    )
    # GPTAQ: the full-precision model's block inputs beside the quantized model's (the same at block
    # 0)
    fp = (
        Calibration([calib.keep(h) for h in calib.hidden], calib.kwargs, calib.pool)
        if quant.meta.get("method", "gptq") != "gptq"
        else None
    )
    on_module = (lambda r: progress("module", r)) if progress else None
    for i in range(n_blocks):
        t_block = time.perf_counter()
        if stored[i]:
            weights = stored_weights(wd.read_block(i, identity)[0], quant)
            replay_block(sm, layers_path, i, calib, weights, dev, cdtype, fp)
        else:
            results = quantize_decoder_block(
                sm, layers_path, i, arch, calib, quant, dev, cdtype, on_module, ranks, fp
            )
            if ranks.writer:
                tensors = {
                    f"{r.name}.{key}": value for r in results for key, value in r.tensors.items()
                }
                with phases.phase("write"):
                    wd.write_block(
                        i,
                        tensors,
                        [_log_row(r, len(samples)) for r in results],
                        time.perf_counter() - t_block,
                        identity,
                    )
        if progress:
            progress("block", i + 1, n_blocks)


def _interrupted(wd: WorkDir, n_blocks: int) -> Interrupted:
    """Ctrl-C during quantize: the work dir keeps the finished blocks and the same call continues
    from there."""
    finished = wd.finished_blocks()
    return Interrupted(
        f"interrupted after block {finished} of {n_blocks}; rerun the same command to continue "
        f"(work dir {wd.path})",
        finished=finished,
        total=n_blocks,
    )


def _log_row(r: ModuleResult, nsamples: int) -> dict:
    return {
        "name": r.name,
        "loss": float(r.loss),
        "damp": float(r.damp),
        "seconds": round(r.seconds, 4),
        "samples": nsamples,
        "tokens": r.tokens,
    }
