"""The calibration passes through a decoder block: where GPTQ's Hessians come from (SPEC §3, Engine).

A block's inputs are a `Calibration` (engine.capture_inputs makes block 0's); advance replaces them by the
block's outputs. In between, BlockPasses runs each sequential group's passes and saves what the
block's structure allows, exactly (the same ops on the same values, hence the same bytes):
- early stop: a pass ends (StopForward) once every linear of the group has seen its input; after the first pass,
  which shows who reads the very same tensor (q/k/v, gate/up), once every distinct input has been seen;
- replay: group k+1 only needs to run from the smallest submodule holding it and group k (`mlp` for down_proj
  after gate/up); that submodule's inputs do not depend on group k's weights: recorded in group k's passes;
- tails: attention and MLP submodules usually return their last linear's output (o_proj, down_proj, fc2 ...).
  Once it is quantized, the submodule's other linears (in earlier groups) are final too, so calling it again on
  the same arguments computes exactly that linear on the input it saw in its own pass: one matmul instead of
  attention or gate/up. Those inputs are recorded in that pass and answer later passes (next groups, advance),
  guarded by a fingerprint of the submodule's arguments. Tails are found by letting the block's first pass run
  to its end under a probe (its Hessian hooks go quiet instead of stopping it): no pass of their own.
Hook order is explicit: one pre-hook per linear of the group records the tail's input, then folds the input
into the Hessian, then stops the pass, so a stop never comes before the recording.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from gptq_cli.arch import StopForward, linear_weight
from gptq_cli.modelio import activations_in_heap
from gptq_cli.phases import phase
from gptq_cli.solver import accumulate_hessian, complete_hessian

MEMORY_SHARE = 0.25   # recorded tail inputs take at most this share of their device's free memory, else no tail
# On a GPU also at most this much per submodule: recomputing attention or an MLP there is cheap, and a 7B
# quantize at 128 x 2048 tokens must stay under 8 GiB (down_proj's inputs alone would be 5.4 GiB in fp16).
CUDA_RECORD_LIMIT = 1 << 30

Pass = Callable[[], object]   # runs one calibration batch through the block (or a part of it)
Hessians = list[tuple[list[str], torch.Tensor, int]]   # (linears sharing it, H, tokens)


@dataclass
class Calibration:
    """The current block's inputs: one hidden-state tensor and one kwargs dict per calibration batch."""
    hidden: list[torch.Tensor]
    kwargs: list[dict]

    def passes(self, block: nn.Module) -> list[Pass]:
        return [lambda x=x, kw=kw: block(x, **kw) for x, kw in zip(self.hidden, self.kwargs)]


def advance(calib: Calibration, block: nn.Module) -> None:
    """Replace the block's inputs by its outputs, the next block's inputs, one batch at a time (so that at most
    one batch is held twice)."""
    with activations_in_heap():
        for b, run_pass in enumerate(calib.passes(block)):
            out = run_pass()
            calib.hidden[b] = out[0] if isinstance(out, tuple) else out


@dataclass
class Tail:
    """A child of the block whose return value is its last linear's output, alone (extra = -1) or followed by
    `extra` Nones (attention modules return (output, None))."""
    scope: nn.Module
    last: nn.Module
    extra: int
    inputs: list[torch.Tensor] = field(default_factory=list)        # last's input, per calibration batch
    fingerprints: list[list] = field(default_factory=list)          # of the scope's arguments, per batch


def collect_hessians(modules: dict[str, nn.Module], passes: list[Pass], capture: nn.Module | None = None,
                     tail: Tail | None = None, probe: Callable[[Pass], object] | None = None
                     ) -> tuple[Hessians, list[tuple[tuple, dict]] | None]:
    """The Hessians 2/n ΣxxT of the modules' inputs over the passes, as (module names, H, n): modules that read
    the very same input tensor share one. Each pass stops early (module doc). With `capture`, also returns that
    submodule's (args, kwargs) of each pass (None unless it ran exactly once per pass). With `tail`, records its
    inputs and fingerprints. With `probe`, the first pass runs as probe(pass), to the end."""
    acc: dict[str, tuple[torch.Tensor | None, int]] = {}
    shares: dict[str, str] = {}
    seen: list[tuple[str, torch.Tensor]] = []
    captured: list[list[tuple[tuple, dict]]] = []
    owners: set[str] = set(modules)   # the modules whose inputs a pass must reach: all of them at first
    done = through = False            # this pass has what it needs / runs to the end anyway (the probe's)

    def hook_for(name: str, module: nn.Module):
        def hook(_module, args):
            nonlocal done
            if done:
                return
            x = args[0]
            if tail is not None and module is tail.last:
                tail.inputs.append(x)
            earlier = next((n for n, t in seen if t is x), None)
            seen.append((name, x))
            if earlier is not None:
                shares[name] = shares.get(earlier, earlier)
            else:
                with phase("hessian"):
                    acc[name] = accumulate_hessian(*acc.get(name, (None, 0)), x)
            if owners <= {n for n, _ in seen}:
                done = True
                if not through:
                    raise StopForward
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n, m)) for n, m in modules.items()]
    if capture is not None:
        handles.append(capture.register_forward_pre_hook(
            lambda _m, args, kwargs: None if done else captured[-1].append((args, kwargs)), with_kwargs=True))
    if tail is not None:
        handles.append(tail.scope.register_forward_pre_hook(
            lambda _m, a, kw: tail.fingerprints.append(fingerprint(a, kw)), with_kwargs=True))
    try:
        for i, run_pass in enumerate(passes):
            seen.clear()
            captured.append([])
            done, through = False, probe is not None and i == 0
            try:
                with activations_in_heap():
                    probe(run_pass) if through else run_pass()
            except StopForward:
                pass
            owners = set(acc) if len(acc) + len(shares) == len(modules) else owners
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in modules if shares.get(n, n) not in acc]
    if missing:
        raise RuntimeError(f"calibration never reached {missing}; cannot build their Hessians")
    with phase("hessian"):
        hessians = [([n for n in modules if shares.get(n, n) == owner], complete_hessian(H), count)
                    for owner, (H, count) in acc.items()]
    once = capture is not None and all(len(c) == 1 for c in captured)
    return hessians, [c[0] for c in captured] if once else None


class TailProbe:
    """Watches one whole forward of the block (the first pass of its first group) for its tails: a child
    qualifies when it ran once, its value is its last-called linear's output object (alone or followed by
    Nones), that linear ran once, is a sequential group of its own (not the first: its inputs are recorded in
    its own group's passes, which start before the probe's pass ends), and the child's other linears are all in
    earlier groups."""

    def __init__(self, block: nn.Module, linears: dict[str, nn.Module], groups: list[list[str]]) -> None:
        self.linears, self.groups = linears, groups
        self.scopes = {name: child for name, child in block.named_children()
                       if any(n.startswith(name + ".") for n in linears)}
        self.called: list[tuple[str, object]] = []            # (linear name, its output), in call order
        self.returned: dict[str, list] = {name: [] for name in self.scopes}

    def __call__(self, run_pass: Pass) -> object:
        handles = [m.register_forward_hook(lambda _m, _a, out, n=n: self.called.append((n, out)))
                   for n, m in self.linears.items()]
        handles += [m.register_forward_hook(lambda _m, _a, out, n=n: self.returned[n].append(out))
                    for n, m in self.scopes.items()]
        try:
            return run_pass()
        finally:
            for h in handles:
                h.remove()

    def tails(self) -> dict[str, Tail]:
        """The qualifying children, by their last linear's name (the watched outputs are released)."""
        group_of = {n: k for k, g in enumerate(self.groups) for n in g}
        tails = {}
        for scope, outs in self.returned.items():
            inside = [(n, out) for n, out in self.called if n.startswith(scope + ".")]
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
            others = [n for n in self.linears if n.startswith(scope + ".") and n != last]
            if [n for n, _ in inside].count(last) == 1 and group_of[last] > 0 and self.groups[group_of[last]] == [
                    last] and all(group_of[n] < group_of[last] for n in others):
                tails[last] = Tail(self.scopes[scope], self.linears[last], extra)
        self.called.clear()
        self.returned.clear()
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


GUARD_SAMPLES = 1024   # values of each tensor argument a fingerprint keeps


def fingerprint(args: tuple, kwargs: dict) -> list:
    """What identifies a call's arguments, cheaply: the plain values, and of every tensor its shape, dtype,
    device and GUARD_SAMPLES of its values at evenly spaced positions (compared exactly by same_arguments).
    A full checksum of every argument cost 15% of a run; this is a few thousand element reads per call. The
    step is odd and shares no factor with the last dimension, so the samples fall in every column, not one."""
    flat: list = []

    def visit(v) -> None:
        if isinstance(v, torch.Tensor):
            values = v.reshape(-1)   # a view for the contiguous activations passed here
            step = max(1, values.numel() // GUARD_SAMPLES) | 1
            while v.dim() and math.gcd(step, v.shape[-1]) != 1:
                step += 2
            flat.append((tuple(v.shape), v.dtype, v.device, values[::step].clone()))
        elif isinstance(v, (tuple, list)):
            for x in v:
                visit(x)
        elif v is None or isinstance(v, (bool, int, float, str)):
            flat.append(v)
    visit(args)
    for key in sorted(kwargs):
        flat.append(key)
        visit(kwargs[key])
    return flat


def same_arguments(a: list, b: list) -> bool:
    """Whether two fingerprints agree: same structure, shapes, dtypes, devices and sampled values (NaN never
    agrees, so a call with NaNs runs the real forward)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, tuple) and isinstance(y, tuple) and len(x) == len(y) == 4:
            if x[:3] != y[:3] or not torch.equal(x[3], y[3]):
                return False
        elif isinstance(x, tuple) or isinstance(y, tuple) or x != y:
            return False
    return True


def scope_of(names: list[str]) -> str:
    """The deepest submodule of the block that contains all the named linears ("" = the block itself)."""
    common: list[str] = []
    for parts in zip(*(n.split(".")[:-1] for n in names)):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


class BlockPasses:
    """The calibration passes through one block: hessians(k) for each sequential group k in order, quantized()
    once that group's weights are in place, advance() at the end. As a context manager: on exit every
    submodule a tail answered gets its own forward back, and the recorded inputs are freed."""

    def __init__(self, block: nn.Module, linears: dict[str, nn.Module], groups: list[list[str]],
                 calib: Calibration, device: torch.device) -> None:
        self.block, self.linears, self.groups, self.calib, self.device = block, linears, groups, calib, device
        self.tails: dict[str, Tail] = {}
        self.replay: tuple[nn.Module, list[tuple[tuple, dict]]] | None = None   # for the next group's passes
        self.recording: Tail | None = None   # the tail the last group's passes recorded

    def __enter__(self) -> "BlockPasses":
        return self

    def __exit__(self, *_exc) -> None:
        for tail in self.tails.values():
            if "forward" in vars(tail.scope):
                del tail.scope.forward
            tail.inputs.clear()
            tail.fingerprints.clear()

    def hessians(self, k: int) -> Hessians:
        """Group k's Hessians (collect_hessians), from the smallest submodule that must run."""
        group, groups = self.groups[k], self.groups
        nxt = scope_of(group + groups[k + 1]) if k + 1 < len(groups) else ""
        capture = self.block.get_submodule(nxt) if nxt and all(n.startswith(nxt + ".") for n in group) else None
        if self.replay is None:
            passes = self.calib.passes(self.block)
        else:
            passes = [lambda a=a, kw=kw, m=self.replay[0]: m(*a, **kw) for a, kw in self.replay[1]]
        tail = self.tails.get(group[0])
        self.recording = tail if tail is not None and self._inputs_fit(tail.last) else None
        probe = TailProbe(self.block, self.linears, groups) if k == 0 and len(groups) > 1 else None
        hessians, recorded = collect_hessians({n: self.linears[n] for n in group}, passes, capture,
                                              self.recording, probe)
        if probe is not None:
            self.tails = probe.tails()
        self.replay = (capture, recorded) if recorded is not None else None
        return hessians

    def quantized(self) -> None:
        """The last group's quantized weights are in place: a tail it recorded answers the later passes (in
        batch order, once per batch in every pass; a call whose arguments do not match the recording runs the
        real forward). Nothing changes unless its pass recorded every batch."""
        tail, self.recording, batches = self.recording, None, len(self.calib.hidden)
        if tail is None or not len(tail.inputs) == len(tail.fingerprints) == batches:
            return
        real = tail.scope.forward
        calls = itertools.count()

        def forward(*args, **kwargs):
            i = next(calls) % batches
            if not same_arguments(fingerprint(args, kwargs), tail.fingerprints[i]):
                return real(*args, **kwargs)
            out = tail.last(tail.inputs[i])
            return out if tail.extra < 0 else (out, *([None] * tail.extra))

        tail.scope.forward = forward

    def advance(self) -> None:
        """Replace the calibration inputs by the block's outputs (advance)."""
        self.replay = None
        advance(self.calib, self.block)

    def _inputs_fit(self, last: nn.Module) -> bool:
        """Whether recording `last`'s inputs for every calibration batch fits in memory (fits_in_memory)."""
        tokens = sum(x.shape[:-1].numel() for x in self.calib.hidden)
        return fits_in_memory(tokens * linear_weight(last).shape[1] * self.calib.hidden[0].element_size(),
                              self.device)
