"""Not recomputing what a block already computed: the tail-linear shortcut of engine.quantize_blocks.

Attention and MLP submodules usually end in one linear whose output is what the submodule returns (o_proj,
down_proj, c_proj, fc2 ...). Once that linear is quantized, every other linear of the submodule is final too
(they come in earlier sequential groups), so calling the submodule again on the same arguments computes
exactly `last(the input last saw in its own calibration pass)`: one matmul instead of the q/k/v projections
and attention, or the gate/up projections. Those inputs are recorded during the last linear's own pass, and
the block's later passes (the next groups' calibration, and the one that makes the next block's inputs) take
the shortcut. It is exact, not an approximation: the same matmul on the same values. A fingerprint of the
submodule's arguments guards every use; a call with other arguments runs the submodule for real.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

# Recorded inputs may take at most this share of the memory free on their device (else no shortcut).
MEMORY_SHARE = 0.25
# On a GPU also at most this much per submodule: recomputing attention or an MLP there is cheap, and a 7B
# quantize at 128 x 2048 tokens must stay under 8 GiB (down_proj's inputs alone would be 5.4 GiB in fp16,
# o_proj's 2 GiB). Smaller models and calibration sets still take the shortcut.
CUDA_RECORD_LIMIT = 1 << 30


@dataclass
class Tail:
    """A child of the block whose return value is its last linear's output, alone (extra = -1) or followed by
    `extra` Nones (attention modules return (output, None))."""
    scope: nn.Module
    last: nn.Module
    extra: int
    inputs: list[torch.Tensor] = field(default_factory=list)        # last's input, per calibration batch
    fingerprints: list[tuple] = field(default_factory=list)         # of the scope's arguments, per batch


def find_tails(block: nn.Module, linears: dict[str, nn.Module], groups: list[list[str]],
               run_once: Callable[[], object]) -> dict[str, Tail]:
    """Probe one forward of the block (`run_once`) for the children that qualify, by their last linear's name.

    A child qualifies when it ran once, its value is its last-called linear's output object, that linear is a
    sequential group of its own, and the child's other linears are all in earlier groups."""
    group_of = {n: k for k, g in enumerate(groups) for n in g}
    scopes = {name: child for name, child in block.named_children()
              if any(n.startswith(name + ".") for n in linears)}
    called: list[tuple[str, object]] = []            # (linear name, its output), in call order
    returned: dict[str, list] = {name: [] for name in scopes}
    handles = [m.register_forward_hook(lambda _m, _a, out, n=n: called.append((n, out))) for n, m in linears.items()]
    handles += [m.register_forward_hook(lambda _m, _a, out, n=n: returned[n].append(out)) for n, m in scopes.items()]
    try:
        with torch.no_grad():
            run_once()
    finally:
        for h in handles:
            h.remove()
    tails = {}
    for scope, outs in returned.items():
        inside = [(n, out) for n, out in called if n.startswith(scope + ".")]
        if len(outs) != 1 or not inside:
            continue
        last, last_out = inside[-1]
        value = outs[0]
        if value is last_out:
            extra = -1
        elif isinstance(value, tuple) and value and value[0] is last_out and all(v is None for v in value[1:]):
            extra = len(value) - 1
        else:
            continue
        others = [n for n in linears if n.startswith(scope + ".") and n != last]
        if [n for n, _ in inside].count(last) == 1 and groups[group_of[last]] == [last] and all(
                group_of[n] < group_of[last] for n in others):
            tails[last] = Tail(scopes[scope], linears[last], extra)
    return tails


def fits_in_memory(nbytes: int, device: torch.device) -> bool:
    """Whether `nbytes` more stay within MEMORY_SHARE of what is free on `device` now (and, on a GPU, within
    CUDA_RECORD_LIMIT)."""
    if device.type == "cuda":
        free = min(torch.cuda.mem_get_info(device)[0], CUDA_RECORD_LIMIT / MEMORY_SHARE)
    else:
        try:
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            return False
    return nbytes <= MEMORY_SHARE * free


def fingerprint(args: tuple, kwargs: dict) -> tuple:
    """Shape, dtype, sum and norm (float64) of every tensor among the arguments: equal for the same values."""
    flat: list = []

    def visit(v) -> None:
        if isinstance(v, torch.Tensor):
            w = v if v.is_floating_point() else v.double()   # ids and masks: small
            flat.append((tuple(v.shape), v.dtype, float(w.sum(dtype=torch.float64)),
                         float(torch.linalg.vector_norm(w, dtype=torch.float64))))
        elif isinstance(v, (tuple, list)):
            for x in v:
                visit(x)
    visit(args)
    for key in sorted(kwargs):
        visit(kwargs[key])
    return tuple(flat)


def record(tail: Tail) -> list:
    """Hooks that record the tail's inputs and its scope's argument fingerprints during its own pass."""
    return [tail.scope.register_forward_pre_hook(lambda _m, a, kw: tail.fingerprints.append(fingerprint(a, kw)),
                                                 with_kwargs=True),
            tail.last.register_forward_pre_hook(lambda _m, a: tail.inputs.append(a[0]))]


def activate(tail: Tail, batches: int) -> None:
    """From now on the scope's calls are answered from the recorded inputs (in batch order, once per batch
    in every pass); a call whose arguments do not match the recording runs the real forward instead. Nothing
    changes unless the tail's pass recorded every one of the `batches`."""
    if not len(tail.inputs) == len(tail.fingerprints) == batches:
        return
    real = tail.scope.forward
    calls = itertools.count()

    def forward(*args, **kwargs):
        i = next(calls) % batches
        if fingerprint(args, kwargs) != tail.fingerprints[i]:
            return real(*args, **kwargs)
        out = tail.last(tail.inputs[i])
        return out if tail.extra < 0 else (out, *([None] * tail.extra))

    tail.scope.forward = forward


def deactivate(tails: dict[str, Tail]) -> None:
    """Give every scope its own forward back and free the recorded inputs."""
    for tail in tails.values():
        if "forward" in vars(tail.scope):
            del tail.scope.forward
        tail.inputs.clear()
        tail.fingerprints.clear()
