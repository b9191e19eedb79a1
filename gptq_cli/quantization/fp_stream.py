"""GPTAQ's second calibration stream: the full-precision model's inputs to a block, beside the
quantized model's.

GPTAQ (gptaq.py) needs, token for token with each linear's input in the partly quantized model, that
linear's input in the full-precision model. calibration.BlockPasses holds the quantized stream;
FullPrecisionPasses holds this one for the same block: before each sequential group's Hessian pass,
one pass per batch through the block as the full-precision model has it (the block's own weights
from before quantization, none of the quantized stream's shortcuts) records the group's inputs, each
pass stopped once all of them are seen; after the block, the stream advances through it the same
way.

Tails, as in calibration.py: once a group holding a tail's last linear (o_proj, down_proj ...) has
its full-precision inputs, that linear's full-precision outputs on them are computed once and answer
the full-precision passes that follow (later groups, advance), guarded by a fingerprint of the tail
submodule's arguments and the output's version counter; so attention and the MLP each run twice per
batch in this stream (for their own groups' inputs), not once per later group and again to advance.
Same ops on the same values as the passes they replace, hence the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from gptq_cli.model.arch import StopForward, linear_weight
from gptq_cli.model.modelio import activations_in_heap
from gptq_cli.quantization.calibration import (
    Calibration,
    Tail,
    advance,
    fingerprint,
    recorded_forward,
    records_fit,
)

__all__ = ["FullPrecisionPasses"]


@dataclass
class _Outputs:
    """A tail's full-precision outputs and the fingerprints of its submodule's arguments, per
    batch."""

    tail: Tail
    fingerprints: list[list] = field(default_factory=list)
    outputs: list[torch.Tensor | None] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)


class FullPrecisionPasses:
    """The full-precision stream through one block: inputs(group, tails) before each group's
    Hessian pass, advance() after the block, close() at the end (what it kept goes back to the
    pool)."""

    def __init__(
        self, block: nn.Module, linears: dict[str, nn.Module], fp: Calibration, device: torch.device
    ) -> None:
        self.block, self.linears, self.fp, self.device = block, linears, fp, device
        self.originals = {n: m.weight.data for n, m in linears.items()}  # before any is quantized
        self.tails: dict[str, _Outputs] = {}  # by the tail's last linear's name

    def inputs(self, group: list[str], tails: dict[str, Tail]) -> list[dict[str, torch.Tensor]]:
        """Per calibration batch, the group's linears' inputs in the full-precision model (kept in
        the pool).
        `tails`: the block's (the quantized stream's, BlockPasses.tails); one whose last linear
        is in the group gets its full-precision outputs here, when they fit in memory."""
        inputs: list[dict[str, torch.Tensor]] = []
        seen: dict[str, torch.Tensor] = {}
        recording = {
            last: _Outputs(tails[last])
            for last in group
            if last in tails and self._outputs_fit(last)
        }

        def hook_for(name: str):
            def hook(_module, args):
                x = args[0]
                kept = next((t for n, t in inputs[-1].items() if seen[n] is x), None)
                seen[name] = x
                inputs[-1][name] = kept if kept is not None else self.fp.keep(x)
                if len(inputs[-1]) == len(group):
                    raise StopForward

            return hook

        with self._full_precision(tails):
            handles = [self.linears[n].register_forward_pre_hook(hook_for(n)) for n in group]
            handles += [
                r.tail.scope.register_forward_pre_hook(
                    lambda _m, a, kw, r=r: r.fingerprints.append(fingerprint(a, kw)),
                    with_kwargs=True,
                )
                for r in recording.values()
            ]
            try:
                for run_pass in self.fp.passes(self.block):
                    inputs.append({})
                    seen.clear()
                    try:
                        with activations_in_heap(self.fp.kept_bytes):
                            run_pass()
                    except StopForward:
                        pass
            finally:
                for h in handles:
                    h.remove()
            for last, r in recording.items():
                if len(r.fingerprints) == len(inputs):  # the submodule ran once in every pass
                    r.outputs = [self.fp.keep(r.tail.last(batch[last])) for batch in inputs]
                    r.versions = [out._version for out in r.outputs]
                    self.tails[last] = r
        return inputs

    def advance(self, tails: dict[str, Tail]) -> None:
        """Replace the stream's inputs by the block's full-precision outputs (`tails`: the
        quantized stream's, set aside meanwhile); each tail output goes back to the pool once its
        batch has passed."""

        def release(b: int) -> None:
            for r in self.tails.values():
                self.fp.give(r.outputs[b])
                r.outputs[b] = None

        with self._full_precision(tails):
            advance(self.fp, self.block, release)

    def close(self) -> None:
        for r in self.tails.values():
            for out in r.outputs:
                self.fp.give(out)
        self.tails.clear()

    @contextmanager
    def _full_precision(self, tails: dict[str, Tail]) -> Iterator[None]:
        """The block as the full-precision model has it: its weights before quantization, and in
        place of the quantized stream's shortcuts (`tails`, calibration.BlockPasses.quantized)
        this stream's own; all as it was afterwards."""
        current = {n: m.weight.data for n, m in self.linears.items()}
        quantized = {
            id(t.scope): (t.scope, vars(t.scope).pop("forward"))
            for t in tails.values()
            if "forward" in vars(t.scope)
        }
        try:
            for n, m in self.linears.items():
                m.weight.data = self.originals[n]
            for r in self.tails.values():
                r.tail.scope.forward = recorded_forward(
                    r.outputs, r.versions, r.fingerprints, r.tail.extra, r.tail.scope.forward
                )
            yield
        finally:
            for n, m in self.linears.items():
                m.weight.data = current[n]
            for r in self.tails.values():
                vars(r.tail.scope).pop("forward", None)
            for scope, forward in quantized.values():
                scope.forward = forward

    def _outputs_fit(self, last: str) -> bool:
        """Whether recording `last`'s full-precision outputs for every calibration batch fits in
        memory."""
        return records_fit(self.fp.hidden, linear_weight(self.linears[last]).shape[0], self.device)
