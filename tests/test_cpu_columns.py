"""The C column loop (csrc/cpu_columns.c) against the solver's torch loop: the same bits for
every setting."""

from __future__ import annotations

import shutil

import pytest
import torch

from gptq_cli.kernels import cpu_columns
from gptq_cli.quantization import solver
from tests.test_solver import correlated_problem

SETTINGS = [
    {},
    {"bits": 3, "group_size": 64},
    {"bits": 2, "sym": False, "group_size": 32},
    {"bits": 8, "group_size": -1, "desc_act": True},
    {"desc_act": True},
    # the group changes at almost every column
    {"desc_act": True, "static_groups": True, "group_size": 32},
    {"act_group_aware": True},
    {"mse": True, "group_size": -1},
    {"group_size": 48, "block_size": 32},  # groups that straddle blocks: found at a block's start
]


@pytest.fixture(scope="module")
def built() -> None:
    if not cpu_columns.available():
        if shutil.which("cc") or shutil.which("gcc"):
            pytest.fail(
                "a C compiler is here but gptq_cli._cpu_columns is not built: `pip install "
                "-e .` builds it"
            )
        pytest.skip("no C compiler: the solver runs its torch loop only")


def solve_in_torch(monkeypatch: pytest.MonkeyPatch, W: torch.Tensor, H: torch.Tensor, **kwargs):
    with monkeypatch.context() as patch:
        patch.setattr(cpu_columns, "available", lambda: False)
        return solver.quantize_weight(W, H, **kwargs)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "4g128"
)
def test_c_loop_gives_the_torch_loops_bits(built, monkeypatch, setting, threads):
    W, H = correlated_problem(N=160, K=300, seed=7)
    previous = torch.get_num_threads()
    # C splits the rows across threads: its bits must not depend on them
    torch.set_num_threads(threads)
    try:  # (the lazy update's GEMM is the same in both runs, at the same thread count)
        in_c = solver.quantize_weight(W, H, **setting)
        in_torch = solve_in_torch(monkeypatch, W, H, **setting)
    finally:
        torch.set_num_threads(previous)
    for field in ("codes", "scales", "zeros", "g_idx", "row_loss"):
        assert torch.equal(getattr(in_c, field), getattr(in_torch, field)), field
    assert in_c.loss == in_torch.loss


@pytest.mark.parametrize(
    "setting",
    [
        {},
        {"bits": 3, "group_size": 64, "act_group_aware": True},
        {"desc_act": True, "block_size": 32},
    ],
    ids=["4g128", "3g64-gar", "act-b32"],
)
def test_c_loop_gives_the_torch_loops_bits_with_gptaq(built, monkeypatch, setting):
    from tests.test_gptaq import asymmetric_problem

    W, H, dXXT, _, _ = asymmetric_problem(N=96, K=200, seed=3)
    in_c = solver.quantize_weight(W, H, dXXT=dXXT, **setting)
    in_torch = solve_in_torch(monkeypatch, W, H, dXXT=dXXT, **setting)
    for field in ("codes", "scales", "zeros", "g_idx", "row_loss"):
        assert torch.equal(getattr(in_c, field), getattr(in_torch, field)), field


def test_the_c_loop_is_what_runs(built, monkeypatch):
    """quantize_column_block on a CPU goes through run_columns (else the comparison above would
    compare torch with itself), once per run of columns between group starts."""
    calls = []
    original = cpu_columns.run_columns
    monkeypatch.setattr(
        cpu_columns, "run_columns", lambda *a, **k: calls.append(a[7:9]) or original(*a, **k)
    )
    W, H = correlated_problem(N=32, K=256, seed=1)
    solver.quantize_weight(W, H, group_size=64, block_size=128)
    assert calls == [(0, 64), (64, 128), (0, 64), (64, 128)]


def test_run_columns_refuses_what_it_cannot_read(built):
    W = torch.zeros(4, 8)
    args = (
        torch.eye(8),
        torch.ones(4, 1),
        torch.zeros(4, 1),
        torch.zeros(8, dtype=torch.int64),
        torch.empty(4, 8),
        torch.empty(4, 8),
        0,
        8,
        15,
    )
    with pytest.raises(ValueError, match="contiguous float32"):
        cpu_columns.run_columns(W.double(), *args)
    with pytest.raises(ValueError, match="contiguous float32"):
        cpu_columns.run_columns(W.t().contiguous().t(), *args)
