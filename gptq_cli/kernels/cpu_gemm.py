"""XᵀX on a CPU through the MKL inside torch: 16-bit activations by its mixed-precision GEMM,
float32 ones by SYRK; bf16 and float32 ones by cpu_xtx.py's AVX512 kernel instead where MKL is the
slower (bf16 on CPUs without AMX: MKL does not use AVX512-BF16 on AMD's; float32 on CPUs not made
by Intel, where its SSYRK ran at about half the FMA rate).

A product of two bf16 (or two fp16) numbers is exact in float32, so a GEMM that reads 16-bit inputs
and accumulates and returns float32 computes the Hessian's panels with only float32 summation
rounding, as the float32 route does, without widening the activations first and at the 16-bit rate
(AMX / AVX512-BF16). torch 2.13's CPU `mm` offers no float32 output for bf16 inputs
(`aten::mm.dtype` is CUDA-only), but the MKL linked into libtorch_cpu exports
`cblas_gemm_bf16bf16f32` and `cblas_gemm_f16f16f32`; they are called here by ctypes (the GIL is
released during the call; MKL's threads are torch's: torch.set_num_threads sets them). Where the
library or the symbol is missing, `available(dtype)` is False and callers use torch's float32 route.

float32 activations: torch has no SYRK (XᵀX computing one triangle), and its GEMM on panels of the
triangle runs at ~70% of MKL's SYRK rate on the AMX Xeon (198 vs 270 GFLOP/s at K = 576, 228 vs 300
at 1536, 4096 rows, 2 cores). libtorch_cpu exports MKL's `mkl_blas_ssyrk` (the Fortran-convention
SSYRK: every argument by reference), which `xtx_lower` calls. Its products and sums are float32, as
the route it replaces; only the summation order differs.
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import Tensor

from gptq_cli.kernels import cpu_xtx

__all__ = ["available", "lower_triangle", "xtx_kernel", "xtx_lower", "xtx_panel", "xty"]

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enums
_SYMBOLS = {torch.bfloat16: "cblas_gemm_bf16bf16f32", torch.float16: "cblas_gemm_f16f16f32"}


def _load() -> dict[torch.dtype, ctypes._CFuncPtr]:
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return {}
    found = {}
    for dtype, symbol in _SYMBOLS.items():
        fn = getattr(lib, symbol, None)
        if fn is None:
            continue
        # MKL_INT is 32-bit in torch's LP64 MKL
        i, p, f = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
        fn.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
        fn.restype = None
        found[dtype] = fn
    return found


def _checked(found: dict[torch.dtype, ctypes._CFuncPtr]) -> dict[torch.dtype, ctypes._CFuncPtr]:
    """Only the functions that compute a known small product exactly: a library built with other
    integer or enum conventions than the signature above assumes must fall back, not give wrong
    Hessians."""
    X = torch.tensor([[1.0, 2.0, -3.0], [4.0, 0.5, 6.0], [-7.0, 8.0, 9.0], [0.25, 1.0, 2.0]])
    expected = X.t() @ X
    good = {}
    for dtype, fn in found.items():
        Xd = X.to(dtype).contiguous()
        H = torch.full((3, 3), 7.0)
        fn(
            _ROW_MAJOR,
            _TRANS,
            _NO_TRANS,
            3,
            3,
            4,
            1.0,
            Xd.data_ptr(),
            3,
            Xd.data_ptr(),
            3,
            0.0,
            H.data_ptr(),
            3,
        )
        if torch.equal(H, expected):
            good[dtype] = fn
    return good


def _load_syrk() -> ctypes._CFuncPtr | None:
    """MKL's SSYRK if it computes a known small XᵀX exactly (else None: the caller's fallback is
    used)."""
    try:
        fn = ctypes.CDLL(
            os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
        ).mkl_blas_ssyrk
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p] + [ctypes.c_void_p] * 8
    fn.restype = None
    X = torch.tensor([[1.0, 2.0, -3.0], [4.0, 0.5, 6.0], [-7.0, 8.0, 9.0], [0.25, 1.0, 2.0]])
    H = torch.full((3, 3), 7.0)
    _syrk(fn, X, H, 1.0, 0.0)
    # lower triangle written, upper untouched
    expected = (X.t() @ X).tril() + torch.full((3, 3), 7.0).triu(1)
    return fn if torch.equal(H, expected) else None


def _syrk(fn: ctypes._CFuncPtr, X: Tensor, H: Tensor, alpha: float, beta: float) -> None:
    # X [m, K] row-major is Xᵀ [K, m] column-major, so Xᵀ X = A Aᵀ with A = Xᵀ ("N"); H's lower
    # triangle in row-major order is the upper one in column-major ("U").
    m, K = X.shape
    n, k, ld = ctypes.c_int(K), ctypes.c_int(m), ctypes.c_int(K)
    a, b = ctypes.c_float(alpha), ctypes.c_float(beta)
    ref = ctypes.byref
    fn(
        b"U",
        b"N",
        ref(n),
        ref(k),
        ref(a),
        ctypes.c_void_p(X.data_ptr()),
        ref(ld),
        ref(b),
        ctypes.c_void_p(H.data_ptr()),
        ref(ld),
    )


_GEMM = _checked(_load()) if os.name == "posix" else {}
_SSYRK = _load_syrk() if os.name == "posix" else None


# float32 XᵀX wider than this stays with SSYRK where it exists: the kernel's tiles leave the L2
# cache there (EPYC, 4096 tokens: 1.09-1.16x SSYRK at K = 4096-5632, 0.93x at 11008;
# bench/hessian_amd-epyc-avx512bf16.json)
FP32_KERNEL_MAX_WIDTH = 8192


def xtx_kernel(dtype: torch.dtype, width: int = 0) -> bool:
    """Whether XᵀX of this dtype (and width) goes to cpu_xtx's kernel rather than MKL: where it
    is the faster (cpu_xtx.preferred), or MKL's routine for it is missing."""
    if not cpu_xtx.available():
        return False
    if dtype == torch.bfloat16:
        return cpu_xtx.preferred(dtype) or dtype not in _GEMM
    if dtype != torch.float32:
        return False
    return _SSYRK is None or (cpu_xtx.preferred(dtype) and width <= FP32_KERNEL_MAX_WIDTH)


def available(dtype: torch.dtype) -> bool:
    """Whether this module takes activations of this dtype here: xtx_panel (or xtx_lower, where
    lower_triangle says so) for bf16/fp16, xtx_lower for float32."""
    return dtype in _GEMM or xtx_kernel(dtype) or (dtype == torch.float32 and _SSYRK is not None)


def lower_triangle(dtype: torch.dtype) -> bool:
    """Whether xtx_lower takes activations of this dtype: float32 by MKL's SSYRK or cpu_xtx's
    kernel, bf16 by the kernel; others go by xtx_panel."""
    return (dtype == torch.float32 and _SSYRK is not None) or xtx_kernel(dtype)


def xtx_lower(X: Tensor, H: Tensor, alpha: float, beta: float) -> None:
    """H's lower triangle (diagonal included) = beta · H + alpha · XᵀX, in place; the upper
    triangle is left to complete_hessian (SSYRK does not touch it; the bf16 kernel writes its
    entries near the diagonal). X [m, K] contiguous on the CPU, float32 or bf16
    (lower_triangle(X.dtype)); H [K, K] contiguous float32 on the CPU."""
    if xtx_kernel(X.dtype, X.shape[1]):
        cpu_xtx.xty(X, X, H, alpha, beta, lower=True)
        return
    m, K = X.shape
    if not (
        X.is_contiguous()
        and H.is_contiguous()
        and X.dtype == H.dtype == torch.float32
        and H.shape == (K, K)
        and X.device.type == H.device.type == "cpu"
        and _SSYRK is not None
    ):
        raise ValueError(
            f"xtx_lower: X {tuple(X.shape)} {X.dtype}, H {tuple(H.shape)} {H.dtype} not supported"
        )
    if max(m, K) >= 2**31:
        raise ValueError("xtx_lower: dimensions too large for 32-bit BLAS indices")
    _syrk(_SSYRK, X, H, alpha, beta)


def xtx_panel(X: Tensor, H: Tensor, start: int, end: int, alpha: float, beta: float) -> None:
    """H[start:, start:end] = beta · H[start:, start:end] + alpha · X[:, start:]ᵀ X[:, start:end],
    in place.

    X [m, K] contiguous bf16/fp16 on the CPU (available(X.dtype)); H [K, K] contiguous float32 on
    the CPU."""
    m, K = X.shape
    if not (
        X.is_contiguous()
        and H.is_contiguous()
        and H.dtype == torch.float32
        and H.shape == (K, K)
        and X.device.type == H.device.type == "cpu"
        and available(X.dtype)
        and 0 <= start < end <= K
    ):
        raise ValueError(
            f"xtx_panel: X {tuple(X.shape)} {X.dtype}, H {tuple(H.shape)} {H.dtype}, "
            f"panel [{start}, {end}) not supported"
        )
    if max(m, K) >= 2**31:
        raise ValueError("xtx_panel: dimensions too large for 32-bit BLAS indices")
    item = X.element_size()
    # row-major C [K - start, end - start] at H[start, start] with leading dimension K
    _GEMM[X.dtype](
        _ROW_MAJOR,
        _TRANS,
        _NO_TRANS,
        K - start,
        end - start,
        m,
        alpha,
        X.data_ptr() + start * item,
        K,
        X.data_ptr() + start * item,
        K,
        beta,
        H.data_ptr() + (start * K + start) * 4,
        K,
    )


def xty(X: Tensor, Y: Tensor, C: Tensor, alpha: float, beta: float) -> None:
    """C = beta · C + alpha · XᵀY, in place: X, Y [m, K] contiguous, both bf16 or both fp16, on
    the CPU (available(X.dtype)); C [K, K] contiguous float32 on the CPU. Products exact, sums
    float32."""
    if X.dtype == torch.bfloat16 and xtx_kernel(X.dtype):
        cpu_xtx.xty(X, Y, C, alpha, beta)
        return
    m, K = X.shape
    if not (
        X.is_contiguous()
        and Y.is_contiguous()
        and C.is_contiguous()
        and X.shape == Y.shape
        and X.dtype == Y.dtype
        and X.dtype in _GEMM
        and C.dtype == torch.float32
        and C.shape == (K, K)
        and X.device.type == Y.device.type == C.device.type == "cpu"
    ):
        raise ValueError(
            f"xty: X {tuple(X.shape)} {X.dtype}, Y {tuple(Y.shape)} {Y.dtype}, C {tuple(C.shape)} "
            f"{C.dtype} not supported"
        )
    if max(m, K) >= 2**31:
        raise ValueError("xty: dimensions too large for 32-bit BLAS indices")
    _GEMM[X.dtype](
        _ROW_MAJOR,
        _TRANS,
        _NO_TRANS,
        K,
        K,
        m,
        alpha,
        X.data_ptr(),
        K,
        Y.data_ptr(),
        K,
        beta,
        C.data_ptr(),
        K,
    )
