"""Block streaming (SPEC §3, Engine): quantize a causal LM one decoder block at a time, the paper's
outer loop.

The embeddings run once on the calibration batch to capture the first block's inputs and keyword
arguments. Then, per block: load its weights; per sequential group, collect its Hessians
(calibration.py, which owns the passes and the hooks), solve, and put the quantized weights in place
(so the next group's inputs see them); advance the calibration inputs through the block to the next
block's inputs; release the block. Peak memory is about one block, its Hessians and the calibration
activations.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gptq_cli import kernels
from gptq_cli.errors import GptqError
from gptq_cli.format.config import QuantConfig
from gptq_cli.format.quantized import QuantizedWeight
from gptq_cli.model.arch import (
    Arch,
    StopForward,
    block_groups,
    block_linears,
    linear_weight,
    set_linear_weight,
)
from gptq_cli.model.modelio import StreamingModel, activations_in_heap
from gptq_cli.quantization import distributed
from gptq_cli.quantization.activation_pool import BufferPool
from gptq_cli.quantization.calibration import BlockPasses, Calibration, Hessians, advance
from gptq_cli.quantization.distributed import Ranks
from gptq_cli.quantization.fp_stream import FullPrecisionPasses
from gptq_cli.quantization.gptaq import GPTAQ_ALPHA, least_squares_target
from gptq_cli.quantization.phases import phase
from gptq_cli.quantization.solver import (
    ColumnBlockFn,
    IndefiniteHessian,
    NonFiniteHessian,
    quantize_column_block,
    quantize_weight,
)


@dataclass
class ModuleResult:
    name: str  # full module name in the model, e.g. model.layers.3.self_attn.q_proj
    # its checkpoint tensors (qweight, qzeros, scales, g_idx) on the CPU
    tensors: dict[str, torch.Tensor]
    loss: float  # GPTQ loss (QuantizedWeight.loss)
    damp: float  # damping fraction finally used
    seconds: float  # time spent solving this module
    tokens: int  # calibration tokens its Hessian saw


def capture_inputs(
    sm: StreamingModel,
    layers_path: str,
    batches: list[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    pool: BufferPool | None = None,
) -> Calibration:
    """Run everything before the first block on the calibration batches and record what block 0
    receives (with `pool`, what the passes keep goes in its buffers: calibration.py)."""
    # Not the output head: nothing before block 0 uses it (dropping it here leaves a tied one
    # alone).
    head = sm.model.get_output_embeddings()
    head_names = (
        tuple(n + "." for n, m in sm.model.named_modules() if m is head and n)
        if head is not None
        else ()
    )
    with phase("load"):
        sm.materialize("", device, dtype, exclude=(layers_path + ".", *head_names))
    layers = sm.model.get_submodule(layers_path)
    first = layers[0]
    calib = Calibration([], [], pool)

    class Catcher(nn.Module):
        def forward(self, hidden, *args, **kwargs):
            calib.hidden.append(calib.keep(hidden))
            # a few architectures pass the mask positionally
            kwargs.update(zip(("attention_mask",), args))
            calib.kwargs.append(
                {
                    k: v
                    for k, v in kwargs.items()
                    if k not in ("past_key_values", "cache", "past_key_value", "layer_past")
                }
            )
            raise StopForward

    layers[0] = Catcher()
    try:
        for ids in batches:
            try:
                with phase("forward"), activations_in_heap(calib.kept_bytes):
                    sm.model(input_ids=ids.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        layers[0] = first
    sm.release_outside(layers_path + ".")  # the embeddings are not needed again while quantizing
    for kw in calib.kwargs:
        kw["use_cache"] = False
    return calib


def quantize_decoder_block(
    sm: StreamingModel,
    layers_path: str,
    index: int,
    arch: Arch | None,
    calib: Calibration,
    quant: QuantConfig,
    device: torch.device,
    dtype: torch.dtype,
    on_module: Callable[[ModuleResult], None] | None = None,
    ranks: Ranks = Ranks(),
    fp: Calibration | None = None,
) -> list[ModuleResult]:
    """Quantize block `index` (`calib` holds its inputs), leaving `calib` advanced to the next
    block's inputs. GPTAQ (quant.meta["method"]): `fp` holds the full-precision model's inputs to
    the block, advanced too."""
    block, prefix = sm.model.get_submodule(layers_path)[index], f"{layers_path}.{index}."
    with phase("load"):
        sm.materialize(prefix, device, dtype)
    with torch.no_grad(), phase("forward"):
        results = _quantize_block(
            block, prefix, arch, calib, quant, device, dtype, on_module, ranks, fp
        )
    sm.release(block)
    return results


def _quantize_block(
    block: nn.Module,
    prefix: str,
    arch: Arch | None,
    calib: Calibration,
    quant: QuantConfig,
    device: torch.device,
    dtype: torch.dtype,
    on_module: Callable[[ModuleResult], None] | None,
    ranks: Ranks,
    fp: Calibration | None = None,
) -> list[ModuleResult]:
    """quantize_decoder_block's work: per sequential group its Hessians, solve, swap; then
    `calib` advanced to the next block's inputs."""
    linears = block_linears(block)
    groups = block_groups(
        block, arch, lambda: block(calib.hidden[0], **calib.kwargs[0]), quant.true_sequential
    )
    results: list[ModuleResult] = []
    fp_passes = FullPrecisionPasses(block, linears, fp, device) if fp is not None else None
    with BlockPasses(block, linears, groups, calib, device, fp_passes) as passes:
        for k in range(len(groups)):
            hessians = distributed.reduce_hessians(ranks, passes.hessians(k), passes.crosses)
            results += _solve_group(
                hessians, linears, quant, prefix, dtype, ranks, on_module, passes.cross
            )
            del hessians  # before the next group's are collected
            passes.quantized()
        passes.advance()
    return results


def _solve_group(
    hessians: Hessians,
    linears: dict[str, nn.Module],
    quant: QuantConfig,
    prefix: str,
    dtype: torch.dtype,
    ranks: Ranks,
    on_module: Callable[[ModuleResult], None] | None,
    cross: Callable[[list[str]], torch.Tensor | None] = lambda names: None,
) -> list[ModuleResult]:
    """Solve every Hessian's linears and put their quantized weights in place; with several
    ranks, each solve on the rank distributed.owners gives it."""
    solver_ranks = distributed.owners(
        ranks,
        [
            (sum(linear_weight(linears[n]).shape[0] for n in names), H.shape[0])
            for names, H, _ in hessians
        ],
    )
    results: list[ModuleResult] = []
    for (names, H, n_tokens), solver_rank in zip(hessians, solver_ranks):
        # mixed precision: linears sharing H with different settings are solved apart (same owner)
        dXXT = cross(names)
        solved = [
            res
            for part in _by_setting(names, quant, prefix)
            for res in _solve(
                part,
                [linears[n] for n in part],
                H,
                n_tokens,
                quant,
                prefix,
                dtype,
                ranks,
                solver_rank,
                dXXT,
            )
        ]
        results += solved
        for r in solved if on_module else ():
            on_module(r)
    return results


def replay_block(
    sm: StreamingModel,
    layers_path: str,
    index: int,
    calib: Calibration,
    weights: dict[str, QuantizedWeight],
    device: torch.device,
    dtype: torch.dtype,
    fp: Calibration | None = None,
) -> None:
    """Advance `calib` past block `index` as quantizing it did, without solving anything: every
    quantized linear gets the dequantization of its stored weight (what _solve put there), then
    the calibration batches run through the block. Same ops, dtype and batches as the original
    run, hence the same activations bit for bit (this is how a run resumes; see workdir.py for
    why activations are not stored instead). `weights` holds every linear of the block, by full
    module name. GPTAQ: `fp` (the full-precision model's inputs) advances through the block's own
    weights first."""
    block, prefix = sm.model.get_submodule(layers_path)[index], f"{layers_path}.{index}."
    linears = block_linears(block)
    stored = {name.removeprefix(prefix): qw for name, qw in weights.items()}
    if set(stored) != set(linears):
        raise GptqError(
            f"the stored results of block {index} do not match the model's linears "
            f"({sorted(set(stored) ^ set(linears))[:3]}); remove the work dir and quantize again"
        )
    with phase("load"):
        sm.materialize(prefix, device, dtype)
    with torch.no_grad(), phase("forward"):
        if fp is not None:
            advance(fp, block)
        for name, module in linears.items():
            set_linear_weight(module, stored[name].to(device).dequantize(dtype))
        advance(calib, block)
    sm.release(block)


def _by_setting(names: list[str], quant: QuantConfig, prefix: str) -> list[list[str]]:
    """Linears that share a Hessian, split into runs of one (bits, group size) each (mixed
    precision can give q, k and v different settings; each run is solved separately), in their
    first module's order."""
    runs: dict[tuple[int, int], list[str]] = {}
    for n in names:
        runs.setdefault(quant.module_setting(prefix + n), []).append(n)
    return list(runs.values())


def column_block_function(device: torch.device) -> ColumnBlockFn:
    """The solver's block step for tensors on `device`: the fused CUDA kernel where it runs, else
    the torch loop (same contract, same results)."""
    return (
        kernels.gptq_block if kernels.backend_name(device) == "cuda-ext" else quantize_column_block
    )


def solve_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    quant: QuantConfig,
    bits: int,
    group_size: int,
    dXXT: torch.Tensor | None = None,
) -> QuantizedWeight:
    """GPTQ of W [N, K] on H with `quant`'s settings that every module shares and this module's bits
    and group size, each block through column_block_function; a Hessian the solver cannot use
    becomes a GptqError saying why.
    dXXT: GPTAQ's asymmetry term (with quant.meta's gptaq_alpha), solved by quantize_column_block
    (the CUDA kernel has no GPTAQ term)."""
    gptaq, alpha = {}, quant.meta.get("gptaq_alpha", GPTAQ_ALPHA)
    # GPTQ aimed at the least-squares target
    if dXXT is not None and quant.meta.get("method") == "gptaq-ls":
        W, dXXT = least_squares_target(W, H, dXXT, alpha, quant.damp_percent), None
    elif dXXT is not None:
        gptaq = {"dXXT": dXXT, "alpha": alpha}
    try:
        return quantize_weight(
            W,
            H,
            bits=bits,
            group_size=group_size,
            sym=quant.sym,
            desc_act=quant.desc_act,
            static_groups=quant.static_groups,
            act_group_aware=quant.act_group_aware,
            damp_percent=quant.damp_percent,
            mse=quant.mse,
            column_block_fn=column_block_function(W.device)
            if dXXT is None
            else quantize_column_block,
            **gptaq,
        )
    except NonFiniteHessian as e:
        raise GptqError(
            f"{e}: the calibration activations overflowed; try --dtype float32 or check the "
            "calibration data"
        ) from e
    except IndefiniteHessian as e:
        raise GptqError(
            f"{e}; the layer's calibration inputs are degenerate: use more or "
            "different calibration samples"
        ) from e


def stack_rows(weights: list[torch.Tensor]) -> torch.Tensor:
    """Weights [N_i, K] that share one Hessian as one [ΣN_i, K] matrix for solve_weight: rows are
    independent given H⁻¹, so its result is exactly each weight's own, with one column loop instead
    of several (QuantizedWeight.split_rows parts it again). In the model's dtype: quantize_weight
    makes the one float32 copy it works on."""
    return torch.cat(weights) if len(weights) > 1 else weights[0]


def _solve(
    names: list[str],
    modules: list[nn.Module],
    H: torch.Tensor,
    n_tokens: int,
    quant: QuantConfig,
    prefix: str,
    dtype: torch.dtype,
    ranks: Ranks = Ranks(),
    owner: int = 0,
    dXXT: torch.Tensor | None = None,
) -> list[ModuleResult]:
    """GPTQ for linears that share one Hessian and one setting (stack_rows), put in place and
    packed. With several ranks, rank `owner` solves and the others receive its result."""
    t0 = time.perf_counter()
    weights = [linear_weight(m) for m in modules]
    rows = [w.shape[0] for w in weights]
    bits, group_size = quant.module_setting(prefix + names[0])
    qw = None
    if ranks.rank == owner:
        with phase("solve"):
            qw = solve_weight(stack_rows(weights), H, quant, bits, group_size, dXXT)
    qw, seconds = distributed.broadcast_result(
        ranks,
        qw,
        time.perf_counter() - t0,
        owner,
        (sum(rows), H.shape[0]),
        bits,
        group_size,
        H.device,
    )
    parts = qw.split_rows(rows)
    results = []
    for name, module, part in zip(names, modules, parts):
        # later groups and blocks must see what the quantized model will compute
        with phase("solve"):
            set_linear_weight(module, part.dequantize(dtype))
        # where it was solved: only the packed words (1/8 of 4-bit codes) cross to the host
        with phase("pack"):
            packed = {
                key: t.to("cpu") for key, t in part.to_tensors(quant.checkpoint_format).items()
            }
        results.append(
            ModuleResult(
                prefix + name,
                packed,
                part.loss,
                part.damp,
                seconds * part.codes.shape[0] / sum(rows),
                n_tokens,
            )
        )
    return results
