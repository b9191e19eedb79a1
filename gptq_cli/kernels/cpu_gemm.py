"""XᵀX of 16-bit activations with float32 output on a CPU: MKL's mixed-precision GEMM, through torch's own copy.

A product of two bf16 (or two fp16) numbers is exact in float32, so a GEMM that reads 16-bit inputs and
accumulates and returns float32 computes the Hessian's panels with only float32 summation rounding, as the
float32 route does, without widening the activations first and at the 16-bit rate (AMX / AVX512-BF16).
torch 2.13's CPU `mm` offers no float32 output for bf16 inputs (`aten::mm.dtype` is CUDA-only), but the MKL
linked into libtorch_cpu exports `cblas_gemm_bf16bf16f32` and `cblas_gemm_f16f16f32`; they are called here by
ctypes (the GIL is released during the call; MKL's threads are torch's: torch.set_num_threads sets them).
Where the library or the symbol is missing, `available(dtype)` is False and callers use torch's float32 route.
"""
from __future__ import annotations

import ctypes
import os

import torch
from torch import Tensor

__all__ = ["available", "xtx_panel"]

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112   # CBLAS enums
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
        i, p, f = ctypes.c_int, ctypes.c_void_p, ctypes.c_float   # MKL_INT is 32-bit in torch's LP64 MKL
        fn.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
        fn.restype = None
        found[dtype] = fn
    return found


def _checked(found: dict[torch.dtype, ctypes._CFuncPtr]) -> dict[torch.dtype, ctypes._CFuncPtr]:
    """Only the functions that compute a known small product exactly: a library built with other integer or
    enum conventions than the signature above assumes must fall back, not give wrong Hessians."""
    X = torch.tensor([[1.0, 2.0, -3.0], [4.0, 0.5, 6.0], [-7.0, 8.0, 9.0], [0.25, 1.0, 2.0]])
    expected = X.t() @ X
    good = {}
    for dtype, fn in found.items():
        Xd = X.to(dtype).contiguous()
        H = torch.full((3, 3), 7.0)
        fn(_ROW_MAJOR, _TRANS, _NO_TRANS, 3, 3, 4, 1.0, Xd.data_ptr(), 3, Xd.data_ptr(), 3, 0.0, H.data_ptr(), 3)
        if torch.equal(H, expected):
            good[dtype] = fn
    return good


_GEMM = _checked(_load()) if os.name == "posix" else {}


def available(dtype: torch.dtype) -> bool:
    """Whether xtx_panel takes activations of this dtype here."""
    return dtype in _GEMM


def xtx_panel(X: Tensor, H: Tensor, start: int, end: int, alpha: float, beta: float) -> None:
    """H[start:, start:end] = beta · H[start:, start:end] + alpha · X[:, start:]ᵀ X[:, start:end], in place.

    X [m, K] contiguous bf16/fp16 on the CPU (available(X.dtype)); H [K, K] contiguous float32 on the CPU."""
    m, K = X.shape
    if not (X.is_contiguous() and H.is_contiguous() and H.dtype == torch.float32 and H.shape == (K, K)
            and X.device.type == H.device.type == "cpu" and available(X.dtype) and 0 <= start < end <= K):
        raise ValueError(f"xtx_panel: X {tuple(X.shape)} {X.dtype}, H {tuple(H.shape)} {H.dtype}, "
                         f"panel [{start}, {end}) not supported")
    if max(m, K) >= 2 ** 31:
        raise ValueError("xtx_panel: dimensions too large for 32-bit BLAS indices")
    item = X.element_size()
    # row-major C [K - start, end - start] at H[start, start] with leading dimension K
    _GEMM[X.dtype](_ROW_MAJOR, _TRANS, _NO_TRANS, K - start, end - start, m, alpha,
                   X.data_ptr() + start * item, K, X.data_ptr() + start * item, K, beta,
                   H.data_ptr() + (start * K + start) * 4, K)
