"""XᵀY of bf16 or float32 activations with float32 sums on CPUs with AVX512-BF16 (csrc/cpu_xtx.c),
for the Hessian and GPTAQ's cross term where MKL (cpu_gemm.py) runs slowly: bf16 on CPUs without
AMX, float32 on CPUs not made by Intel (`preferred`).

setup.py compiles csrc/cpu_xtx.c into gptq_cli/_cpu_xtx (a plain shared library, no Python
module, called here through ctypes, which releases the GIL). It runs on torch's OpenMP threads
(c_library.torch_openmp: a parallel region of the runtime torch's operators use), each packing its
share of the activations, then computing its share of the result's rows; each element is computed
by one thread in one order, so the bytes do not depend on the thread count. Without that runtime
the calling thread does all of it.

Where it was not built, the CPU lacks AVX512-BF16, or it fails a check on a known product at load,
`available()` is False. `preferred(bfloat16)` adds: the CPU has no AMX, on which MKL's GEMM is the
faster one (bench/hessian_*.json: this kernel 1.8-3.3x MKL's panels at K = 576-11008 on the AMD
EPYC, AVX512-BF16 only; on the AMX Xeon MKL's panels took 1.7 ms at K = 576, about a third of this
kernel's time on the EPYC; the kernel was not timed on the Xeon).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from gptq_cli.kernels.c_library import load_function, torch_openmp

__all__ = ["available", "preferred", "xty"]

# tokens per chunk of the sums: with this the error matches MKL's blocked sums (bench)
CHUNK_TOKENS = 128
MIN_ROWS_PER_THREAD = 64  # below this a thread's start costs more than its share of the rows


class _Job(ctypes.Structure):
    """csrc/cpu_xtx.c's gptq_xty_job_t: one call's operands and the team's thread functions."""

    _fields_ = [
        ("X", ctypes.c_void_p),
        ("Y", ctypes.c_void_p),
        ("A", ctypes.c_void_p),
        ("B", ctypes.c_void_p),
        ("m", ctypes.c_int64),
        ("K", ctypes.c_int64),
        ("C", ctypes.c_void_p),
        ("alpha", ctypes.c_float),
        ("beta", ctypes.c_float),
        ("kc", ctypes.c_int64),
        ("lower", ctypes.c_int64),
        ("fp32", ctypes.c_int64),
        ("parts", ctypes.c_int64),
        ("cuts", ctypes.POINTER(ctypes.c_int64)),
        ("thread_num", ctypes.c_void_p),
        ("num_threads", ctypes.c_void_p),
        ("barrier", ctypes.c_void_p),
    ]


@dataclass(frozen=True)
class _Library:
    job: ctypes._CFuncPtr  # gptq_xty_job(job*): the body of a parallel region
    job_address: int  # the same function, for GOMP_parallel


@cache
def _library() -> _Library | None:
    supported = load_function("_cpu_xtx", "gptq_xty_supported", [], ctypes.c_int)
    if supported is None or not supported():  # the CPU lacks AVX512-BF16
        return None
    job = load_function("_cpu_xtx", "gptq_xty_job", [ctypes.POINTER(_Job)])
    if job is None:
        return None
    lib = _Library(job, ctypes.cast(job, ctypes.c_void_p).value)
    return lib if _passes_check(lib) else None


def _passes_check(lib: _Library) -> bool:
    """A known small product, exact in bf16 and float32: 70 tokens (an odd count, so in bf16 the
    last is paired with zero) of width 70 (tile edges in both directions), full and lower, in
    both dtypes."""
    X = (torch.arange(70 * 70).reshape(70, 70) % 7 - 3).float()
    expected = X.t() @ X
    good = True
    for dtype in (torch.bfloat16, torch.float32):
        Xd = X.to(dtype)
        C = torch.full((70, 70), 7.0)
        _run(lib, Xd, Xd, C, 1.0, 0.0, lower=False, threads=1)
        lower = torch.full((70, 70), 7.0)
        _run(lib, Xd, Xd, lower, 2.0, 0.5, lower=True, threads=1)
        good &= torch.equal(C, expected) and torch.equal(lower.tril(), (2 * expected + 3.5).tril())
    return good


def available() -> bool:
    return _library() is not None


@cache
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


@cache
def _has_amx() -> bool:
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check()) if check is not None else "amx_bf16" in _cpuinfo()


def _intel() -> bool:
    return "GenuineIntel" in _cpuinfo()


def preferred(dtype: torch.dtype) -> bool:
    """Whether this kernel, not MKL, should compute XᵀY of `dtype` activations here: bf16 where
    the CPU has no AMX (MKL's bf16 GEMM uses AMX, and AVX512-BF16 on Intel CPUs only); float32 on
    CPUs not made by Intel (MKL's SSYRK ran at about half the FMA rate on the AMD EPYC, 123-131
    GFLOP/s on 2 cores at K = 576-1536; this kernel's rate there: bench/hessian_*.json)."""
    if dtype == torch.bfloat16:
        return available() and not _has_amx()
    return dtype == torch.float32 and available() and not _intel()


# The packed operands' storage, kept from call to call (slot 0: X, 1: Y) and grown when too small:
# a batch's activations are megabytes, and a fresh buffer of that size is a fresh mapping whose
# pages fault in on every call (as long as the packing itself). Calls are not reentrant.
_PACKED: list[Tensor] = [torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int32)]


def _packed(slot: int, m: int, K: int) -> Tensor:
    """Room for [ceil(m/2), K] 32-bit words of token pairs (the layout VDPBF16PS reads), in slot's
    kept storage."""
    words = (m + 1) // 2 * K
    if _PACKED[slot].numel() < words:
        _PACKED[slot] = torch.empty(words, dtype=torch.int32)
    return _PACKED[slot][:words]


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
    fp32 = X.dtype == torch.float32
    if fp32:  # the kernel reads the activations themselves
        A, B = X, Y
    else:  # room for the packed pairs
        A = _packed(0, m, K)
        B = A if Y is X else _packed(1, m, K)
    parts = max(1, min(threads, K // MIN_ROWS_PER_THREAD))
    cuts = (ctypes.c_int64 * (parts + 1))(*_row_cuts(K, parts, lower))
    team = torch_openmp() if parts > 1 else None
    job = _Job(
        X.data_ptr(),
        Y.data_ptr(),
        A.data_ptr(),
        B.data_ptr(),
        m,
        K,
        C.data_ptr(),
        alpha,
        beta,
        CHUNK_TOKENS if fp32 else CHUNK_TOKENS // 2,
        int(lower),
        int(fp32),
        parts,
        cuts,
        *((team.thread_num, team.num_threads, team.barrier) if team else (None, None, None)),
    )
    if team is None:  # the calling thread does all of it
        lib.job(ctypes.byref(job))
    else:
        team.parallel(lib.job_address, ctypes.addressof(job), threads, 0)


def xty(X: Tensor, Y: Tensor, C: Tensor, alpha: float, beta: float, lower: bool = False) -> None:
    """C = beta · C + alpha · XᵀY, in place: X, Y [m, K] contiguous, both bf16 or both float32,
    on the CPU, C [K, K] contiguous float32 on the CPU. lower (Y the same tensor as X: the
    Hessian): only the lower triangle i >= j is computed (and entries above it near the
    diagonal; the rest of the upper triangle is left as it was: solver.complete_hessian
    mirrors the lower one). Threads: torch.get_num_threads()."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the XᵀY kernel is not available here (cpu_xtx.available())")
    m, K = X.shape
    if not (
        X.dtype == Y.dtype
        and X.dtype in (torch.bfloat16, torch.float32)
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
