"""GPTQ's column loop on a CPU in C (csrc/cpu_columns.c), the twin of the torch loop in
solver.quantize_column_block.

setup.py compiles csrc/cpu_columns.c into gptq_cli/_cpu_columns (a plain shared library, no Python
module: it needs only a C compiler at install time, not torch); it is called here through ctypes.
Where it was not built (no compiler) or does not pass a check on a known block at load,
`available()` is False and the solver runs its torch loop, which computes the same bits
(tests/test_cpu_columns.py).

ctypes releases the GIL during the call, so `run_columns` splits the rows (independent in GPTQ)
across threads; each row's arithmetic is the same whichever thread runs it, so the result does not
depend on them.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch
from torch import Tensor

from gptq_cli.kernels.c_library import load_function

__all__ = ["available", "run_columns"]

MIN_ROWS_PER_THREAD = 64  # below this a thread's start costs more than its share of the rows


@cache
def _function() -> ctypes._CFuncPtr | None:
    p, i = ctypes.c_void_p, ctypes.c_int64
    fn = load_function(
        "_cpu_columns",
        "gptq_columns_f32",
        [p, p, p, p, p, p, p, p, i, i, i, i, i, i, ctypes.c_float],
    )
    return fn if fn is not None and _passes_check(fn) else None


def _passes_check(fn: ctypes._CFuncPtr) -> bool:
    """A 1×2 block worked by hand: w = [1.3, 0.5], scale 0.5, zero 2, maxq 3, Hinv = [[2, 0.5],
    [0, 1]]: q0 = round(2.6) + 2 = 5, clamped to 3; err0 = (1.3 - 0.5·(3 - 2)) / 2 = 0.4; w1 =
    0.5 - 0.4·0.5 = 0.3; q1 = round(0.6) + 2 = 3; err1 = (0.3 - 0.5) / 1 = -0.2 (each step
    rounded to float32, as torch does)."""
    W = torch.tensor([[1.3, 0.5]])
    Hinv = torch.tensor([[2.0, 0.5], [0.0, 1.0]])
    scales, zeros = torch.tensor([[0.5]]), torch.tensor([[2.0]])
    codes, errs = torch.zeros(1, 2), torch.zeros(1, 2)
    group_of = torch.zeros(2, dtype=torch.int64)
    w0, w1 = W[0].clone()
    fn(
        W.data_ptr(),
        Hinv.data_ptr(),
        scales.data_ptr(),
        zeros.data_ptr(),
        group_of.data_ptr(),
        codes.data_ptr(),
        errs.data_ptr(),
        None,
        0,
        1,
        2,
        1,
        0,
        2,
        3.0,
    )
    err0 = (w0 - 0.5) / 2
    err1 = (w1 - err0 * 0.5) - 0.5
    return torch.equal(codes, torch.tensor([[3.0, 3.0]])) and torch.equal(
        errs[0], torch.stack([err0, err1])
    )


def available() -> bool:
    return _function() is not None


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="gptq-columns")


def run_columns(
    W: Tensor,
    Hinv: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_of: Tensor,
    codes: Tensor,
    errs: Tensor,
    c0: int,
    c1: int,
    maxq: int,
    threads: int = 1,
    P: Tensor | None = None,
) -> None:
    """Columns [c0, c1) of the block W [N, B] (updated in place), writing codes and errs [N, B];
    Hinv [B, B], scales and zeros [N, G], group_of [B] int64, GPTAQ's P [B, B] or None: all
    contiguous float32 CPU tensors (group_of int64)."""
    fn = _function()
    if fn is None:
        raise RuntimeError(
            "the C column loop is not built (gptq_cli._cpu_columns); use "
            "solver.quantize_column_block"
        )
    N, B = W.shape
    tensors = (W, Hinv, scales, zeros, group_of, codes, errs) + (() if P is None else (P,))
    if (
        not all(t.is_contiguous() and t.device.type == "cpu" for t in tensors)
        or any(t.dtype != torch.float32 for t in tensors if t is not group_of)
        or group_of.dtype != torch.int64
        or (P is not None and P.shape != Hinv.shape)
    ):
        raise ValueError(
            "run_columns takes contiguous float32 CPU tensors (group_of int64, P shaped as Hinv)"
        )
    pointers = [t.data_ptr() for t in tensors[:7]] + [None if P is None else P.data_ptr()]
    parts = max(1, min(threads, N // MIN_ROWS_PER_THREAD))
    bounds = [N * k // parts for k in range(parts + 1)]
    calls = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    if parts == 1:
        fn(*pointers, 0, N, B, scales.shape[1], c0, c1, float(maxq))
        return
    futures = [
        _pool(parts).submit(fn, *pointers, lo, hi, B, scales.shape[1], c0, c1, float(maxq))
        for lo, hi in calls
    ]
    for future in futures:
        future.result()
