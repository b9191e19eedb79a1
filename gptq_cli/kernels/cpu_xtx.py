"""XᵀY of bf16 activations with float32 products and sums on CPUs with AVX512-BF16 and no AMX
(csrc/cpu_xtx.c), for the Hessian and GPTAQ's cross term where MKL's bf16 GEMM (cpu_gemm.py) runs
no faster than float32.

setup.py compiles csrc/cpu_xtx.c into gptq_cli/_cpu_xtx (a plain shared library, no Python
module, called here through ctypes, which releases the GIL: the rows of the result are split
across threads, each element computed by one thread in one order, so the bytes do not depend on
the thread count). Where it was not built, the CPU lacks AVX512-BF16, or it fails a check on a
known product at load, `available()` is False. `preferred()` adds: the CPU has no AMX, on which
MKL's GEMM is the faster one (bench/hessian_*.json: this kernel 1.8-3.3x MKL's panels at K =
576-11008 on the AMD EPYC, AVX512-BF16 only; on the AMX Xeon MKL's panels took 1.7 ms at K = 576,
about a third of this kernel's time on the EPYC; the kernel was not timed on the Xeon).
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from gptq_cli.kernels.c_library import load_function

__all__ = ["available", "preferred", "xty"]

# token pairs per chunk of the sums: with this the error matches MKL's blocked sums (bench)
CHUNK_PAIRS = 64
MIN_ROWS_PER_THREAD = 64  # below this a thread's start costs more than its share of the rows


@dataclass(frozen=True)
class _Library:
    pack_pairs: ctypes._CFuncPtr
    xty: ctypes._CFuncPtr


@cache
def _library() -> _Library | None:
    p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    supported = load_function("_cpu_xtx", "gptq_xty_supported", [], ctypes.c_int)
    if supported is None or not supported():  # the CPU lacks AVX512-BF16
        return None
    lib = _Library(
        load_function("_cpu_xtx", "gptq_pack_pairs", [p, p, i, i, i, i]),
        load_function(
            "_cpu_xtx", "gptq_xty_bf16", [p, p, i, i, p, i, i, i, i, i, f, f, i, ctypes.c_int]
        ),
    )
    return lib if None not in (lib.pack_pairs, lib.xty) and _passes_check(lib) else None


def _passes_check(lib: _Library) -> bool:
    """A known small product, exact in bf16 and float32: 70 tokens (an odd count, so the last is
    paired with zero) of width 70 (tile edges in both directions), full and lower."""
    X = (torch.arange(70 * 70).reshape(70, 70) % 7 - 3).to(torch.bfloat16)
    expected = X.float().t() @ X.float()
    C = torch.full((70, 70), 7.0)
    _run(lib, X, X, C, 1.0, 0.0, lower=False, threads=1)
    lower = torch.full((70, 70), 7.0)
    _run(lib, X, X, lower, 2.0, 0.5, lower=True, threads=1)
    return torch.equal(C, expected) and torch.equal(lower.tril(), (2 * expected + 3.5).tril())


def available() -> bool:
    return _library() is not None


@cache
def _has_amx() -> bool:
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if check is not None:
        return bool(check())
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def preferred() -> bool:
    """Whether this kernel, not MKL's bf16 GEMM, should compute bf16 XᵀY here."""
    return available() and not _has_amx()


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="gptq-xtx")


# The packed operands' storage, kept from call to call (slot 0: X, 1: Y) and grown when too small:
# a batch's activations are megabytes, and a fresh buffer of that size is a fresh mapping whose
# pages fault in on every call (as long as the packing itself). Calls are not reentrant.
_PACKED: list[Tensor] = [torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int32)]


def _pack(lib: _Library, X: Tensor, slot: int) -> Tensor:
    """X [m, K] bf16 as [ceil(m/2), K] 32-bit words of token pairs (the layout VDPBF16PS reads),
    in slot's kept storage."""
    m, K = X.shape
    words = (m + 1) // 2 * K
    if _PACKED[slot].numel() < words:
        _PACKED[slot] = torch.empty(words, dtype=torch.int32)
    P = _PACKED[slot][:words].view((m + 1) // 2, K)
    lib.pack_pairs(X.data_ptr(), P.data_ptr(), m, K, 0, P.shape[0])
    return P


def _row_cuts(K: int, parts: int, lower: bool) -> list[int]:
    """Row bounds giving each thread about the same work: equal rows, or equal areas of the
    lower triangle (rows near the bottom are longer)."""
    if not lower:
        return [K * t // parts for t in range(parts + 1)]
    return [round(K * (t / parts) ** 0.5) for t in range(parts + 1)]


def _run(
    lib: _Library,
    X: Tensor,
    Y: Tensor,
    C: Tensor,
    alpha: float,
    beta: float,
    lower: bool,
    threads: int,
) -> None:
    m, K = X.shape
    if m == 0:
        C.mul_(beta)
        return
    A = _pack(lib, X, 0)
    B = A if Y is X else _pack(lib, Y, 1)
    args = (A.data_ptr(), B.data_ptr(), K, A.shape[0], C.data_ptr(), K)
    parts = max(1, min(threads, K // MIN_ROWS_PER_THREAD))
    cuts = _row_cuts(K, parts, lower)
    calls = [(lo, hi, 0, K, alpha, beta, CHUNK_PAIRS, int(lower)) for lo, hi in zip(cuts, cuts[1:])]
    if parts == 1:
        lib.xty(*args, *calls[0])
        return
    # the calling thread takes the first share itself: it would only wait
    futures = [_pool(parts - 1).submit(lib.xty, *args, *call) for call in calls[1:]]
    lib.xty(*args, *calls[0])
    for future in futures:
        future.result()


def xty(X: Tensor, Y: Tensor, C: Tensor, alpha: float, beta: float, lower: bool = False) -> None:
    """C = beta · C + alpha · XᵀY, in place: X, Y [m, K] contiguous bf16 on the CPU, C [K, K]
    contiguous float32 on the CPU. lower (Y the same tensor as X: the Hessian): only the lower
    triangle i >= j is computed (and entries above it near the diagonal; the rest of the upper
    triangle is left as it was: solver.complete_hessian mirrors the lower one). Threads:
    torch.get_num_threads()."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the bf16 XᵀY kernel is not available here (cpu_xtx.available())")
    m, K = X.shape
    if not (
        X.dtype == Y.dtype == torch.bfloat16
        and C.dtype == torch.float32
        and X.shape == Y.shape
        and C.shape == (K, K)
        and all(t.is_contiguous() and t.device.type == "cpu" for t in (X, Y, C))
        and (Y is X or not lower)
    ):
        raise ValueError(
            f"cpu_xtx.xty: X {tuple(X.shape)} {X.dtype}, Y {tuple(Y.shape)} {Y.dtype}, "
            f"C {tuple(C.shape)} {C.dtype}, lower={lower} not supported"
        )
    _run(lib, X, Y, C, alpha, beta, lower, torch.get_num_threads())
