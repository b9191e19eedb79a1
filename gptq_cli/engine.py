"""Block streaming (SPEC §3, Engine): quantize a causal LM one decoder block at a time.

The embeddings run once on the calibration batch to capture the first block's inputs and keyword arguments.
Then, per block: load its weights, hook its linears, collect each sequential group's Hessian (quantizing a
group before the next group's inputs are collected), solve, put the quantized weights in place, re-run the
block to get the next block's inputs, and drop the block again. Peak memory is about one block, its
Hessians and the calibration activations.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from gptq_cli import distributed
from gptq_cli.arch import Arch, block_groups, block_linears, linear_weight, set_linear_weight
from gptq_cli.distributed import Ranks
from gptq_cli.errors import GptqError
from gptq_cli.format.config import QuantConfig
from gptq_cli.format.quantized import QuantizedWeight
from gptq_cli.kernels import gptq_block
from gptq_cli.modelio import StreamingModel
from gptq_cli.shortcuts import activate, deactivate, find_tails, fits_in_memory, record
from gptq_cli.solver import accumulate_hessian, quantize_weight


class _StopForward(Exception):
    """Raised by a hook once it has what it needs, so the rest of the forward pass is skipped."""


@dataclass
class ModuleResult:
    name: str              # full module name in the model, e.g. model.layers.3.self_attn.q_proj
    tensors: dict[str, torch.Tensor]   # its checkpoint tensors (qweight, qzeros, scales, g_idx) on the CPU
    loss: float            # GPTQ loss (QuantizedWeight.loss)
    damp: float            # damping fraction finally used
    seconds: float         # time spent solving this module
    tokens: int            # calibration tokens its Hessian saw


@dataclass
class Calibration:
    """The current block's inputs: one hidden-state tensor and one kwargs dict per calibration batch."""
    hidden: list[torch.Tensor]
    kwargs: list[dict]

    def run(self, block: nn.Module) -> Iterator:
        for x, kw in zip(self.hidden, self.kwargs):
            yield block(x, **kw)


def capture_inputs(sm: StreamingModel, layers_path: str, batches: list[torch.Tensor],
                   device: torch.device, dtype: torch.dtype) -> Calibration:
    """Run everything before the first block on the calibration batches and record what block 0 receives."""
    # Not the output head: nothing before block 0 uses it (dropping it here leaves a tied one alone).
    head = sm.model.get_output_embeddings()
    head_names = tuple(n + "." for n, m in sm.model.named_modules() if m is head and n) if head is not None else ()
    sm.materialize("", device, dtype, exclude=(layers_path + ".", *head_names))
    layers = sm.model.get_submodule(layers_path)
    first = layers[0]
    calib = Calibration([], [])

    class Catcher(nn.Module):
        def forward(self, hidden, *args, **kwargs):
            calib.hidden.append(hidden)
            kwargs.update(zip(("attention_mask",), args))  # a few architectures pass the mask positionally
            calib.kwargs.append({k: v for k, v in kwargs.items()
                                 if k not in ("past_key_values", "cache", "past_key_value", "layer_past")})
            raise _StopForward

    layers[0] = Catcher()
    try:
        for ids in batches:
            try:
                sm.model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        layers[0] = first
    sm.release_outside(layers_path + ".")   # the embeddings are not needed again while quantizing
    for kw in calib.kwargs:
        kw["use_cache"] = False
    return calib


Pass = Callable[[], object]   # runs one calibration batch through the block (or a part of it)


def collect_hessians(modules: dict[str, nn.Module], passes: list[Pass], capture: nn.Module | None = None
                     ) -> tuple[list[tuple[list[str], torch.Tensor, int]], list[tuple[tuple, dict]] | None]:
    """The Hessians 2/n ΣxxT of the modules' inputs over the calibration passes, as (module names, H, n):
    modules that read the very same input tensor (q/k/v, gate/up) share one. Each pass is cut short once
    every module has been seen; after the first pass, which shows who shares, once every distinct input has
    been seen (so q and k, run only to reach v, and gate, run only to reach up, are not computed again). With `capture`,
    also returns that submodule's (args, kwargs) of each pass (None unless it ran exactly once per pass)."""
    acc: dict[str, tuple[torch.Tensor | None, int]] = {}
    shares: dict[str, str] = {}
    seen: list[tuple[str, torch.Tensor]] = []
    captured: list[list[tuple[tuple, dict]]] = []
    owners: set[str] = set(modules)   # the modules whose inputs a pass must reach: all of them at first

    def hook_for(name: str):
        def hook(_module, args):
            x = args[0]
            earlier = next((n for n, t in seen if t is x), None)
            seen.append((name, x))
            if earlier is not None:
                shares[name] = shares.get(earlier, earlier)
            else:
                acc[name] = accumulate_hessian(*acc.get(name, (None, 0)), x)
            if owners <= {n for n, _ in seen}:
                raise _StopForward
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    if capture is not None:
        handles.append(capture.register_forward_pre_hook(
            lambda _m, args, kwargs: captured[-1].append((args, kwargs)), with_kwargs=True))
    try:
        for run_pass in passes:
            seen.clear()
            captured.append([])
            try:
                run_pass()
            except _StopForward:
                pass
            owners = set(acc) if len(acc) + len(shares) == len(modules) else owners
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in modules if shares.get(n, n) not in acc]
    if missing:
        raise RuntimeError(f"calibration never reached {missing}; cannot build their Hessians")
    hessians = [([n for n in modules if shares.get(n, n) == owner], H, count) for owner, (H, count) in acc.items()]
    once = capture is not None and all(len(c) == 1 for c in captured)
    return hessians, [c[0] for c in captured] if once else None


def scope_of(names: list[str]) -> str:
    """The deepest submodule of the block that contains all the named linears ("" = the block itself)."""
    common: list[str] = []
    for parts in zip(*(n.split(".")[:-1] for n in names)):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def quantize_blocks(sm: StreamingModel, layers_path: str, arch: Arch | None, calib: Calibration,
                    quant: QuantConfig, device: torch.device, dtype: torch.dtype,
                    start: int = 0, on_module: Callable[[ModuleResult], None] | None = None,
                    ranks: Ranks = Ranks()) -> Iterator[tuple[int, list[ModuleResult]]]:
    """Quantize blocks start.. in order, yielding (block index, its module results) as each one finishes.

    Passes are saved where the block's structure allows: group k+1 only needs to run from the smallest
    submodule holding it and group k (e.g. `mlp` for down_proj after gate/up). That submodule's inputs do not
    depend on group k's weights, so they are recorded during group k's pass and replayed. And once the last
    linear of an attention or MLP submodule is quantized, later passes compute that submodule as one matmul on
    the inputs recorded in that linear's pass (shortcuts.py)."""
    layers = sm.model.get_submodule(layers_path)
    for i in range(start, len(layers)):
        block, prefix = layers[i], f"{layers_path}.{i}."
        sm.materialize(prefix, device, dtype)
        with torch.no_grad():
            results = _quantize_block(block, prefix, arch, calib, quant, device, dtype, on_module, ranks)
        sm.release(block)
        yield i, results


def _quantize_block(block: nn.Module, prefix: str, arch: Arch | None, calib: Calibration, quant: QuantConfig,
                    device: torch.device, dtype: torch.dtype, on_module: Callable[[ModuleResult], None] | None,
                    ranks: Ranks) -> list[ModuleResult]:
    """One block of quantize_blocks: its groups in order, then `calib` advanced to the next block's inputs."""
    linears = block_linears(block)
    results: list[ModuleResult] = []
    run_first = lambda: block(calib.hidden[0], **calib.kwargs[0])  # noqa: E731
    groups = block_groups(block, arch, run_first, quant.true_sequential)
    replay = None   # (submodule, its recorded inputs) for the current group, if any
    tails = find_tails(block, linears, groups, run_first)
    try:
        for k, group in enumerate(groups):
            nxt = scope_of(group + groups[k + 1]) if k + 1 < len(groups) else ""
            capture = block.get_submodule(nxt) if nxt and all(n.startswith(nxt + ".") for n in group) else None
            if replay is None:
                passes = [lambda x=x, kw=kw: block(x, **kw) for x, kw in zip(calib.hidden, calib.kwargs)]
            else:
                passes = [lambda a=a, kw=kw, m=replay[0]: m(*a, **kw) for a, kw in replay[1]]
            tail = tails.get(group[0])
            recording = record(tail) if tail and _inputs_fit(calib, tail.last, device) else []
            try:
                hessians, recorded = collect_hessians({n: linears[n] for n in group}, passes, capture)
            finally:
                for h in recording:
                    h.remove()
            replay = (capture, recorded) if recorded is not None else None
            hessians = distributed.reduce_hessians(ranks, hessians)
            solver_ranks = distributed.owners(ranks, [(sum(linear_weight(linears[n]).shape[0] for n in names),
                                                       H.shape[0]) for names, H, _ in hessians])
            for (names, H, n_tokens), solver_rank in zip(hessians, solver_ranks):
                # mixed precision: linears sharing H with different settings are solved apart (same owner)
                solved = [res for part in _by_setting(names, quant, prefix)
                          for res in _solve(part, [linears[n] for n in part], H, n_tokens, quant, prefix, dtype,
                                            ranks, solver_rank)]
                results += solved
                for r in solved if on_module else ():
                    on_module(r)
            del hessians, passes
            if recording:
                activate(tail, len(calib.hidden))
        del replay
        advance(calib, block)
    finally:
        deactivate(tails)
    return results


def replay_block(sm: StreamingModel, layers_path: str, index: int, calib: Calibration,
                 weights: dict[str, QuantizedWeight], device: torch.device, dtype: torch.dtype) -> None:
    """Advance `calib` past block `index` as quantizing it did, without solving anything: every quantized
    linear gets the dequantization of its stored weight (what _solve put there), then the calibration batches
    run through the block. Same ops, dtype and batches as the original run, hence the same activations bit for
    bit (this is how a run resumes; see workdir.py for why activations are not stored instead).
    `weights` holds every linear of the block, by full module name."""
    block, prefix = sm.model.get_submodule(layers_path)[index], f"{layers_path}.{index}."
    linears = block_linears(block)
    stored = {name.removeprefix(prefix): qw for name, qw in weights.items()}
    if set(stored) != set(linears):
        raise GptqError(f"the stored results of block {index} do not match the model's linears "
                        f"({sorted(set(stored) ^ set(linears))[:3]}); remove the work dir and quantize again")
    sm.materialize(prefix, device, dtype)
    with torch.no_grad():
        for name, module in linears.items():
            set_linear_weight(module, stored[name].to(device).dequantize(dtype))
        advance(calib, block)
    sm.release(block)


def advance(calib: Calibration, block: nn.Module) -> None:
    """Replace the block's inputs by its outputs, the next block's inputs, one batch at a time (so that at most
    one batch is held twice)."""
    for b, out in enumerate(calib.run(block)):
        calib.hidden[b] = out[0] if isinstance(out, tuple) else out


def _inputs_fit(calib: Calibration, last: nn.Module, device: torch.device) -> bool:
    """Whether recording `last`'s inputs for every calibration batch fits in memory (shortcuts.fits_in_memory)."""
    tokens = sum(x.shape[:-1].numel() for x in calib.hidden)
    return fits_in_memory(tokens * linear_weight(last).shape[1] * calib.hidden[0].element_size(), device)


def _by_setting(names: list[str], quant: QuantConfig, prefix: str) -> list[list[str]]:
    """Linears that share a Hessian, split into runs of one (bits, group size) each (mixed precision can give
    q, k and v different settings; each run is solved separately), in their first module's order."""
    runs: dict[tuple[int, int], list[str]] = {}
    for n in names:
        runs.setdefault(quant.module_setting(prefix + n), []).append(n)
    return list(runs.values())


def solve_weight(W: torch.Tensor, H: torch.Tensor, quant: QuantConfig, bits: int, group_size: int
                 ) -> QuantizedWeight:
    """GPTQ of W [N, K] on H with `quant`'s settings that every module shares and this module's bits and group
    size; each block through kernels.gptq_block (the fused CUDA kernel where it runs, else the torch loop)."""
    return quantize_weight(W, H, bits=bits, group_size=group_size, sym=quant.sym, desc_act=quant.desc_act,
                           static_groups=quant.static_groups, act_group_aware=quant.act_group_aware,
                           damp_percent=quant.damp_percent, mse=quant.mse, block_fn=gptq_block)


def _solve(names: list[str], modules: list[nn.Module], H: torch.Tensor, n_tokens: int, quant: QuantConfig,
           prefix: str, dtype: torch.dtype, ranks: Ranks = Ranks(), owner: int = 0) -> list[ModuleResult]:
    """GPTQ for linears that share one Hessian and one setting, stacked into one matrix (rows are independent
    given H⁻¹, so this is exactly the per-module result, with one column loop instead of several). With several
    ranks, rank `owner` solves and the others receive its result."""
    t0 = time.perf_counter()
    weights = [linear_weight(m) for m in modules]
    rows = [w.shape[0] for w in weights]
    bits, group_size = quant.module_setting(prefix + names[0])
    qw = None
    if ranks.rank == owner:
        # Stacked in the model's dtype: quantize_weight makes the one float32 copy it works on.
        stacked = torch.cat(weights) if len(weights) > 1 else weights[0]
        qw = solve_weight(stacked, H, quant, bits, group_size)
        del stacked
    qw, seconds = distributed.broadcast_result(ranks, qw, time.perf_counter() - t0, owner, (sum(rows), H.shape[0]),
                                               bits, group_size, H.device)
    parts = qw.split_rows(rows)
    results = []
    for name, module, part in zip(names, modules, parts):
        # Later groups and blocks must see what the quantized model will compute.
        set_linear_weight(module, part.dequantize(dtype))
        # Packed where it was solved: only the packed words (1/8 of the codes for 4-bit) cross to the host.
        packed = {key: t.to("cpu") for key, t in part.to_tensors(quant.checkpoint_format).items()}
        results.append(ModuleResult(prefix + name, packed, part.loss, part.damp,
                                    seconds * part.codes.shape[0] / sum(rows), n_tokens))
    return results
