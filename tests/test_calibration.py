"""The recorded-input guard of calibration.py's tails: a call with the recorded arguments is
answered from the recording (one matmul), any other call runs the submodule's real forward."""

from __future__ import annotations

import torch
from torch import nn

from gptq_cli.quantization.calibration import (
    BlockPasses,
    Calibration,
    Tail,
    fingerprint,
    same_arguments,
)


class Scope(nn.Module):
    """Returns its last linear's output, like an attention or MLP submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.last = nn.Linear(12, 12), nn.Linear(12, 12)
        self.real_calls = 0

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        self.real_calls += 1
        return self.last(torch.relu(self.first(x)) * scale)


def recorded_scope(x: torch.Tensor) -> tuple[Scope, BlockPasses]:
    torch.manual_seed(0)
    scope = Scope()
    block = nn.ModuleDict({"scope": scope})
    tail = Tail(scope, scope.last, extra=-1)
    tail.inputs.append(torch.relu(scope.first(x)))
    tail.fingerprints.append(fingerprint((x,), {}))
    passes = BlockPasses(
        block,
        {"scope.first": scope.first, "scope.last": scope.last},
        [["scope.first"], ["scope.last"]],
        Calibration([x], [{}]),
        torch.device("cpu"),
    )
    passes.tails, passes.recording = {"scope.last": tail}, tail
    passes.quantized()
    scope.real_calls = 0
    return scope, passes


@torch.no_grad()
def test_recorded_arguments_are_answered_from_the_recording() -> None:
    x = torch.randn(2, 5, 12)
    scope, passes = recorded_scope(x)
    with passes:
        # equal values, another tensor: the recording answers
        out = scope(x.clone())
        assert scope.real_calls == 0
        torch.testing.assert_close(out, scope.last(torch.relu(scope.first(x))))


@torch.no_grad()
def test_a_changed_argument_runs_the_real_forward() -> None:
    x = torch.randn(2, 5, 12)
    scope, passes = recorded_scope(x)
    changed = {
        "one element": x.clone().index_put_(
            (torch.tensor(1), torch.tensor(3), torch.tensor(7)), torch.tensor(9.0)
        ),
        "scaled": x * 1.5,
        "other shape": x[:, :4],
        "NaN": x.clone().fill_(float("nan")),
    }
    with passes:
        for i, (what, y) in enumerate(changed.items()):
            out = scope(y)
            assert scope.real_calls == i + 1, what
            expected = scope.last(torch.relu(scope.first(y)))
            torch.testing.assert_close(out, expected, equal_nan=True)
        scope(x, scale=2.0)  # same tensor, another keyword argument
        assert scope.real_calls == len(changed) + 1
    assert "forward" not in vars(scope)  # the real forward is back after the block


@torch.no_grad()
def test_an_output_changed_in_place_is_not_served_again() -> None:
    """The recorded output is handed out as it is; a caller that changes it in place (its version
    counter moves) gets the real forward next time."""
    x = torch.randn(2, 5, 12)
    scope, passes = recorded_scope(x)
    with passes:
        out = scope(x)
        assert scope.real_calls == 0
        out.mul_(2)
        again = scope(x)
        assert scope.real_calls == 1
        torch.testing.assert_close(again, scope.last(torch.relu(scope.first(x))))


def test_fingerprints_sample_every_column() -> None:
    """A change confined to any one column of a [tokens, hidden] activation is seen: the samples'
    step shares no factor with the width."""
    x = torch.randn(4096, 576)
    base = fingerprint((x,), {})
    for column in (0, 1, 300, 575):
        y = x.clone()
        y[:, column] += 1
        assert not same_arguments(base, fingerprint((y,), {})), column
    assert same_arguments(base, fingerprint((x.clone(),), {}))
