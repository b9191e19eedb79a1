"""The calibration passes through a decoder block: where GPTQ's Hessians come from (SPEC §3,
Engine).

A block's inputs are a `Calibration` (engine.capture_inputs makes block 0's); advance replaces them
by the block's outputs. In between, BlockPasses runs each sequential group's passes and saves what
the block's structure allows, exactly (the same ops on the same values, hence the same bytes):
- early stop: a pass ends (StopForward) once every linear of the group has seen its input; after the
  first pass, which shows who reads the very same tensor (q/k/v, gate/up), once every distinct input
  has been seen;
- replay: group k+1 only needs to run from the smallest submodule holding it and group k (`mlp` for
  down_proj after gate/up); that submodule's inputs do not depend on group k's weights: recorded in
  group k's passes;
- tails: attention and MLP submodules usually return their last linear's output (o_proj, down_proj,
  fc2 ...). Once it is quantized, the submodule's other linears (in earlier groups) are final too,
  so calling it again on the same arguments computes exactly that linear on the input it saw in its
  own pass. Those inputs are recorded in that pass; once the linear is quantized, its outputs on
  them are computed once and answer every later pass (next groups, advance): no attention, gate/up
  or last linear again. Guarded by a fingerprint of the submodule's arguments and the output's
  version counter (a caller that changed it in place gets the real forward). Tails are found by
  letting the first block's first pass run to its end under a probe (its Hessian hooks go quiet
  instead of stopping it): no pass of their own; blocks of the same structure reuse the finding.
- pre-norms: a child of the block with no linear, called with the block's own input (Llama's
  input_layernorm), computes its output once per batch; the passes before the last group's get it
  (prenorms.py).
What is kept between passes lives in the run's BufferPool (activation_pool.py) and goes back to it
after its last reader: a replayed call after its pass, a tail's outputs after advance's pass of
their batch. Hook order is explicit: one pre-hook per linear of the group records the tail's input,
then folds the input into the Hessian, then stops the pass, so a stop never comes before the
recording.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from gptq_cli.model.arch import StopForward, linear_weight
from gptq_cli.model.modelio import activations_in_heap
from gptq_cli.quantization.activation_pool import BufferPool
from gptq_cli.quantization.gptaq import accumulate_cross, cross_term
from gptq_cli.quantization.phases import phase
from gptq_cli.quantization.prenorms import PreNorms, linear_free_children
from gptq_cli.quantization.solver import accumulate_hessian, complete_hessian

if TYPE_CHECKING:
    from gptq_cli.quantization.fp_stream import FullPrecisionPasses

# recorded tail inputs take at most this share of their device's free memory, else no tail
MEMORY_SHARE = 0.25
# On a GPU also at most this much per submodule: recomputing attention or an MLP there is cheap, and
# a 7B quantize at 128 x 2048 tokens must stay under 8 GiB (down_proj's inputs alone would be 5.4
# GiB in fp16).
CUDA_RECORD_LIMIT = 1 << 30

Pass = Callable[[], object]  # runs one calibration batch through the block (or a part of it)
Hessians = list[tuple[list[str], torch.Tensor, int]]  # (linears sharing it, H, tokens)
Call = tuple[tuple, dict]  # a submodule's (args, kwargs)
# a block's tails: last linear's name -> (child's name, Tail.extra)
Structure = dict[str, tuple[str, int]]


@dataclass
class Calibration:
    """The current block's inputs: one hidden-state tensor and one kwargs dict per calibration
    batch. With a pool, what the passes keep goes in its buffers (the engine's runs); without,
    tensors are kept as made."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    pool: BufferPool | None = None
    # tails found, by block structure
    structures: dict[tuple, Structure] = field(default_factory=dict)

    def passes(self, block: nn.Module) -> list[Pass]:
        return [lambda x=x, kw=kw: block(x, **kw) for x, kw in zip(self.hidden, self.kwargs)]

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        return self.pool.keep(t) if self.pool is not None else t

    def give(self, t: torch.Tensor | None) -> None:
        if self.pool is not None and t is not None:
            self.pool.give(t)

    def kept_bytes(self) -> int:
        """Bytes in the pool's buffers (mappings of their own, not the heap:
        modelio.activations_in_heap)."""
        return self.pool.host_bytes() if self.pool is not None else 0


def advance(
    calib: Calibration, block: nn.Module, after: Callable[[int], None] | None = None
) -> None:
    """Replace the block's inputs by its outputs, the next block's inputs, one batch at a time
    (so that at most one batch is held twice); after(b) once batch b's pass is done."""
    for b, run_pass in enumerate(calib.passes(block)):
        with activations_in_heap(calib.kept_bytes):
            out = run_pass()
            calib.give(calib.hidden[b])
            calib.hidden[b] = calib.keep(out[0] if isinstance(out, tuple) else out)
            if after is not None:
                after(b)


@dataclass
class Tail:
    """A child of the block whose return value is its last linear's output, alone (extra = -1) or
    followed by `extra` Nones (attention modules return (output, None))."""

    scope: nn.Module
    last: nn.Module
    extra: int
    # last's input, per calibration batch
    inputs: list[torch.Tensor] = field(default_factory=list)
    # of the scope's arguments, per batch
    fingerprints: list[list] = field(default_factory=list)
    # last's (quantized) output, per batch
    outputs: list[torch.Tensor | None] = field(default_factory=list)
    # each output's version counter when made
    versions: list[int] = field(default_factory=list)


def collect_hessians(
    modules: dict[str, nn.Module],
    passes: list[Pass],
    capture: nn.Module | None = None,
    tail: Tail | None = None,
    probe: Callable[[Pass], object] | None = None,
    keep: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    kept_bytes: Callable[[], int] | None = None,
    fp_inputs: list[dict[str, torch.Tensor]] | None = None,
    crosses: dict[str, torch.Tensor] | None = None,
) -> tuple[Hessians, list[Call] | None]:
    """The Hessians 2/n ΣxxT of the modules' inputs over the passes, as (module names, H, n):
    modules that read the very same input tensor share one. Each pass stops early (module doc).
    With `capture`, also returns that submodule's (args, kwargs) of each pass (None unless it ran
    exactly once per pass). With `tail`, records its inputs and fingerprints. With `probe`, the
    first pass runs as probe(pass), to the end. What is recorded or captured is kept through
    `keep` (a tensor's copy, or itself); kept_bytes says how much of it lives outside the heap
    (modelio.activations_in_heap). GPTAQ: with fp_inputs (per pass, each module's full-precision
    input), `crosses` gets each Hessian owner's ΔX X̃ᵀ (gptaq.accumulate_cross, cross_term), by
    the owner's name."""
    acc: dict[str, tuple[torch.Tensor | None, int]] = {}
    current = 0  # the pass running now
    shares: dict[str, str] = {}
    seen: list[tuple[str, torch.Tensor]] = []
    captured: list[list[Call]] = []
    # the modules whose inputs a pass must reach: all of them at first
    owners: set[str] = set(modules)
    asymmetric: set[str] = set()  # GPTAQ: the owners whose two inputs differed in some batch
    # this pass has what it needs / runs to the end anyway (the probe's)
    done = through = False

    def hook_for(name: str, module: nn.Module):
        def hook(_module, args):
            nonlocal done
            if done:
                return
            x = args[0]
            if tail is not None and module is tail.last:
                tail.inputs.append(keep(x))
            earlier = next((n for n, t in seen if t is x), None)
            seen.append((name, x))
            if earlier is not None:
                shares[name] = shares.get(earlier, earlier)
            else:
                with phase("hessian"):
                    H, n = acc.get(name, (None, 0))
                    if fp_inputs is not None:
                        if name not in fp_inputs[current]:
                            raise RuntimeError(
                                f"GPTAQ: {name} saw calibration batch {current} in the quantized "
                                "model but not in the full-precision one"
                            )
                        x_fp = fp_inputs[current][name]
                        if name not in asymmetric and not torch.equal(x_fp, x):
                            asymmetric.add(name)
                        crosses[name] = accumulate_cross(crosses.get(name), n, x_fp, x)
                    acc[name] = accumulate_hessian(H, n, x)
            if owners <= {n for n, _ in seen}:
                done = True
                if not through:
                    raise StopForward

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n, m)) for n, m in modules.items()]
    if capture is not None:
        handles.append(
            capture.register_forward_pre_hook(
                lambda _m, args, kwargs: (
                    None if done else captured[-1].append(map_tensors((args, kwargs), keep))
                ),
                with_kwargs=True,
            )
        )
    if tail is not None:
        handles.append(
            tail.scope.register_forward_pre_hook(
                lambda _m, a, kw: tail.fingerprints.append(fingerprint(a, kw)), with_kwargs=True
            )
        )
    try:
        for i, run_pass in enumerate(passes):
            current = i
            seen.clear()
            captured.append([])
            done, through = False, probe is not None and i == 0
            try:
                with activations_in_heap(kept_bytes):
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
        hessians = [
            ([n for n in modules if shares.get(n, n) == owner], complete_hessian(H), count)
            for owner, (H, count) in acc.items()
        ]
        for owner, (H, _count) in acc.items() if fp_inputs is not None else ():
            crosses[owner] = cross_term(crosses[owner], H, owner in asymmetric)
    once = capture is not None and all(len(c) == 1 for c in captured)
    return hessians, [c[0] for c in captured] if once else None


class TailProbe:
    """Watches one whole forward of the block (the first pass of its first group) for its tails:
    a child qualifies when it ran once, its value is its last-called linear's output object
    (alone or followed by Nones), that linear ran once, is a sequential group of its own (not the
    first: its inputs are recorded in its own group's passes, which start before the probe's pass
    ends), and the child's other linears are all in earlier groups."""

    def __init__(
        self, block: nn.Module, linears: dict[str, nn.Module], groups: list[list[str]]
    ) -> None:
        self.linears, self.groups = linears, groups
        self.scopes = {
            name: child
            for name, child in block.named_children()
            if any(n.startswith(name + ".") for n in linears)
        }
        # (linear name, its output), in call order
        self.called: list[tuple[str, object]] = []
        self.returned: dict[str, list] = {name: [] for name in self.scopes}

    def __call__(self, run_pass: Pass) -> object:
        handles = [
            m.register_forward_hook(lambda _m, _a, out, n=n: self.called.append((n, out)))
            for n, m in self.linears.items()
        ]
        handles += [
            m.register_forward_hook(lambda _m, _a, out, n=n: self.returned[n].append(out))
            for n, m in self.scopes.items()
        ]
        try:
            return run_pass()
        finally:
            for h in handles:
                h.remove()

    def structure(self) -> Structure:
        """The qualifying children, by their last linear's name (the watched outputs are
        released)."""
        group_of = {n: k for k, g in enumerate(self.groups) for n in g}
        found: Structure = {}
        for scope, outs in self.returned.items():
            inside = [(n, out) for n, out in self.called if n.startswith(scope + ".")]
            if len(outs) != 1 or not inside:
                continue
            last, last_out = inside[-1]
            value = outs[0]
            if value is last_out:
                extra = -1
            elif (
                isinstance(value, tuple)
                and value
                and value[0] is last_out
                and all(v is None for v in value[1:])
            ):
                extra = len(value) - 1
            else:
                continue
            others = [n for n in self.linears if n.startswith(scope + ".") and n != last]
            if (
                [n for n, _ in inside].count(last) == 1
                and group_of[last] > 0
                and self.groups[group_of[last]] == [last]
                and all(group_of[n] < group_of[last] for n in others)
            ):
                found[last] = (scope, extra)
        self.called.clear()
        self.returned.clear()
        return found


def fits_in_memory(nbytes: int, device: torch.device) -> bool:
    """Whether `nbytes` more stay within MEMORY_SHARE of what is free on `device` now (and, on a
    GPU, within CUDA_RECORD_LIMIT)."""
    if device.type == "cuda":
        free = min(torch.cuda.mem_get_info(device)[0], CUDA_RECORD_LIMIT / MEMORY_SHARE)
    else:
        try:
            with open("/proc/meminfo") as f:
                free = next(
                    int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")
                )
        except (OSError, StopIteration):
            return False
    return nbytes <= MEMORY_SHARE * free


def records_fit(hidden: list[torch.Tensor], width: int, device: torch.device) -> bool:
    """Whether one `width`-wide activation per token of every calibration batch (`hidden`) fits
    in memory."""
    tokens = sum(x.shape[:-1].numel() for x in hidden)
    return fits_in_memory(tokens * width * hidden[0].element_size(), device)


GUARD_SAMPLES = 1024  # values of each tensor argument a fingerprint reads


def fingerprint(args: tuple, kwargs: dict) -> list:
    """What identifies a call's arguments, cheaply: the plain values, and of every tensor its
    shape, dtype, device and the SHA-256 of the bits of GUARD_SAMPLES of its values at evenly
    spaced positions (compared by same_arguments). A full checksum of every argument cost 15% of
    a run; this is a few thousand element reads per call. The step is odd and shares no factor
    with the last dimension, so the samples fall in every column, not one. A digest, not the
    samples: a fingerprint lives as long as its block, and small tensors kept that long, made
    between a pass's large temporaries, split the C heap's free space so that it grew by one
    activation per batch (issue 29)."""
    flat: list = []

    def visit(v) -> None:
        if isinstance(v, torch.Tensor):
            values = v.reshape(-1)  # a view for the contiguous activations passed here
            step = max(1, values.numel() // GUARD_SAMPLES) | 1
            while v.dim() and math.gcd(step, v.shape[-1]) != 1:
                step += 2
            sample = values[::step].detach().contiguous().view(torch.uint8).cpu()
            flat.append(
                (tuple(v.shape), v.dtype, v.device, hashlib.sha256(sample.numpy()).digest())
            )
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


def recorded_forward(
    outputs: list[torch.Tensor | None],
    versions: list[int],
    fingerprints: list[list],
    extra: int,
    real: Callable,
) -> Callable:
    """A tail submodule's forward: its i-th call (counted modulo the batches: every later pass
    calls it once, in batch order) returns outputs[i] (followed by `extra` Nones when extra >=
    0), unless that output was released or changed in place or the call's arguments do not match
    fingerprints[i]: then the real forward runs."""
    calls, batches = itertools.count(), len(outputs)

    def forward(*args, **kwargs):
        i = next(calls) % batches
        out = outputs[i]
        if (
            out is None
            or out._version != versions[i]
            or not same_arguments(fingerprint(args, kwargs), fingerprints[i])
        ):
            return real(*args, **kwargs)
        return out if extra < 0 else (out, *([None] * extra))

    return forward


def same_arguments(a: list, b: list) -> bool:
    """Whether two fingerprints agree: same structure, plain values, shapes, dtypes, devices and
    sampled bits."""
    return a == b


def map_tensors(value, fn: Callable[[torch.Tensor], object]):
    """value with every tensor inside its tuples, lists and dict values replaced by fn(tensor)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(map_tensors(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def scope_of(names: list[str]) -> str:
    """The deepest submodule of the block that contains all the named linears ("" = the block
    itself)."""
    common: list[str] = []
    for parts in zip(*(n.split(".")[:-1] for n in names)):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


class BlockPasses:
    """The calibration passes through one block: hessians(k) for each sequential group k in
    order, quantized() once that group's weights are in place, advance() at the end. As a context
    manager: on exit every submodule a tail answered gets its own forward back, and what was kept
    goes back to the pool."""

    def __init__(
        self,
        block: nn.Module,
        linears: dict[str, nn.Module],
        groups: list[list[str]],
        calib: Calibration,
        device: torch.device,
        fp: FullPrecisionPasses | None = None,
    ) -> None:
        self.block, self.linears, self.groups, self.calib, self.device = (
            block,
            linears,
            groups,
            calib,
            device,
        )
        self.fp = fp  # GPTAQ: the full-precision model's stream through this block (fp_stream.py)
        # GPTAQ: the last group's ΔX X̃ᵀ, by Hessian owner
        self.crosses: dict[str, torch.Tensor] = {}
        self.tails: dict[str, Tail] = {}
        self.replay: tuple[nn.Module, list[Call]] | None = None  # for the next group's passes
        self.recording: Tail | None = None  # the tail the last group's passes recorded
        self.prenorms: PreNorms | None = None

    def __enter__(self) -> BlockPasses:
        children = linear_free_children(self.block, self.linears)
        if children and records_fit(
            self.calib.hidden, self.calib.hidden[0].shape[-1] * len(children), self.device
        ):
            self.prenorms = PreNorms(
                children, lambda: self.calib.hidden, self.calib.keep, self.calib.give
            )
        return self

    def __exit__(self, *_exc) -> None:
        if self.prenorms is not None:
            self.prenorms.close()
        if self.fp is not None:
            self.fp.close()
        for tail in self.tails.values():
            if "forward" in vars(tail.scope):
                del tail.scope.forward
            for t in tail.inputs + tail.outputs:
                self.calib.give(t)
            tail.inputs.clear()
            tail.outputs.clear()
            tail.fingerprints.clear()
        if self.replay is not None:
            for call in self.replay[1]:
                map_tensors(call, self.calib.give)
            self.replay = None

    def hessians(self, k: int) -> Hessians:
        """Group k's Hessians (collect_hessians), from the smallest submodule that must run."""
        group, groups = self.groups[k], self.groups
        nxt = scope_of(group + groups[k + 1]) if k + 1 < len(groups) else ""
        capture = (
            self.block.get_submodule(nxt)
            if nxt and all(n.startswith(nxt + ".") for n in group)
            else None
        )
        if k == len(groups) - 1 and self.prenorms is not None:
            # the last group records the widest inputs (down_proj's): the pre-norms' answers go
            # back first, so they do not add to the block's peak; advance computes them once more
            self.prenorms.close()
            self.prenorms = None
        passes = self.calib.passes(self.block) if self.replay is None else self._replayed()
        tail = self.tails.get(group[0])
        self.recording = tail if tail is not None and self._inputs_fit(tail.last) else None
        probe = None
        if k == 0 and len(groups) > 1:
            signature = (type(self.block), tuple(self.linears), tuple(map(tuple, groups)))
            known = self.calib.structures.get(signature)
            if known is None:
                probe = TailProbe(self.block, self.linears, groups)
            else:
                self._set_tails(known)
        fp_inputs = self.fp.inputs(group, self.tails) if self.fp is not None else None
        self.crosses = {}
        try:
            hessians, recorded = collect_hessians(
                {n: self.linears[n] for n in group},
                passes,
                capture,
                self.recording,
                probe,
                self._keeper(),
                self.calib.kept_bytes,
                fp_inputs,
                self.crosses,
            )
        finally:
            for inputs in fp_inputs or ():
                for t in {id(t): t for t in inputs.values()}.values():
                    self.calib.give(t)
        if probe is not None:
            self.calib.structures[signature] = probe.structure()
            self._set_tails(self.calib.structures[signature])
        self.replay = (capture, recorded) if recorded is not None else None
        return hessians

    def quantized(self) -> None:
        """The last group's quantized weights are in place: a tail it recorded computes its
        outputs now, once, and they answer the later passes (in batch order, once per batch in
        every pass; a call whose arguments do not match the recording, or whose output was
        changed in place, runs the real forward). Nothing changes unless its pass recorded every
        batch."""
        tail, self.recording, batches = self.recording, None, len(self.calib.hidden)
        if tail is None or not len(tail.inputs) == len(tail.fingerprints) == batches:
            return
        for x in tail.inputs:
            tail.outputs.append(self.calib.keep(tail.last(x)))
            tail.versions.append(tail.outputs[-1]._version)
            self.calib.give(x)
        tail.inputs.clear()
        tail.scope.forward = recorded_forward(
            tail.outputs, tail.versions, tail.fingerprints, tail.extra, tail.scope.forward
        )

    def advance(self) -> None:
        """Replace the calibration inputs by the block's outputs (advance); each tail output goes
        back to the pool once its batch has passed (advance is its last reader)."""

        def release(b: int) -> None:
            for tail in self.tails.values():
                if b < len(tail.outputs):
                    self.calib.give(tail.outputs[b])
                    tail.outputs[b] = None

        advance(self.calib, self.block, release)
        if self.fp is not None:
            self.fp.advance(self.tails)

    def cross(self, names: list[str]) -> torch.Tensor | None:
        """GPTAQ: ΔX X̃ᵀ of the Hessian these linears share (from the last hessians()), None
        without GPTAQ."""
        return next((D for owner, D in self.crosses.items() if owner in names), None)

    def _set_tails(self, structure: Structure) -> None:
        self.tails = {
            last: Tail(self.block.get_submodule(scope), self.linears[last], extra)
            for last, (scope, extra) in structure.items()
        }

    def _keeper(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """What keeps a recorded tensor: a pooled copy, except for tensors the calibration holds
        anyway (the blocks' inputs, their keyword arguments: masks, position embeddings)."""
        held = {id(x) for x in self.calib.hidden}
        for kw in self.calib.kwargs:
            map_tensors(kw, lambda t: held.add(id(t)))
        return lambda t: t if id(t) in held else self.calib.keep(t)

    def _replayed(self) -> list[Pass]:
        """The next group's passes from the captured calls; each call's kept tensors go back
        after its pass."""
        module, calls = self.replay
        self.replay = None

        def run(call: Call) -> object:
            try:
                return module(*call[0], **call[1])
            finally:
                map_tensors(call, self.calib.give)

        return [lambda c=c: run(c) for c in calls]

    def _inputs_fit(self, last: nn.Module) -> bool:
        """Whether recording `last`'s inputs for every calibration batch fits in memory."""
        return records_fit(self.calib.hidden, linear_weight(last).shape[1], self.device)
