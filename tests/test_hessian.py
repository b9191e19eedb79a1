"""The Hessian's accumulation (solver.accumulate_hessian / complete_hessian) and its CPU 16-bit
GEMM route (kernels/cpu_gemm.py): panels of the lower triangle, mirrored once, within float32
summation rounding of the exact XᵀX whichever route computed it."""

from __future__ import annotations

import ctypes
import platform

import pytest
import torch

from gptq_cli.kernels import c_library, cpu_gemm, cpu_xtx
from gptq_cli.quantization import solver
from gptq_cli.quantization.solver import accumulate_hessian, complete_hessian, hessian_panels

FP32_EPS = torch.finfo(torch.float32).eps


def activations(m: int, K: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Columns of very different scales, as real activations have (a few outlier channels)."""
    gen = torch.Generator().manual_seed(seed)
    scale = 0.05 + 4 * torch.rand(K, generator=gen) ** 4
    return (torch.randn(m, K, generator=gen) * scale).to(dtype)


def within_summation_rounding(H: torch.Tensor, X: torch.Tensor) -> None:
    """|H − 2/m XᵀX| ≤ m·ε₃₂·2/m |X|ᵀ|X| elementwise: the classic bound for float32 sums of m
    exact products (the products of 16-bit numbers are exact in float32), with X's values as
    given (no further rounding)."""
    Xd = X.double()
    m = X.shape[0]
    exact = 2 / m * Xd.t() @ Xd
    bound = m * FP32_EPS * (2 / m * Xd.abs().t() @ Xd.abs())
    excess = ((H.double() - exact).abs() - bound).max().item()
    assert excess <= 0, f"float32 summation bound exceeded by {excess:.3g}"


def test_panels_cover_the_columns_in_equal_widths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(solver, "HESSIAN_PANEL", 7)
    panels = hessian_panels(30)
    assert panels[0][0] == 0 and panels[-1][1] == 30 and len(panels) == 5
    assert all(a[1] == b[0] for a, b in zip(panels, panels[1:]))
    assert {e - s for s, e in panels} == {6}
    assert hessian_panels(5) == [(0, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_panels_then_mirror_give_the_exact_symmetric_hessian(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(solver, "HESSIAN_PANEL", 7)  # several panels on a small matrix
    X = activations(3 * 40, 30, dtype, seed=1)
    H, n = None, 0
    for part in X.split(40):
        H, n = accumulate_hessian(H, n, part)
    assert n == 120
    # above the first panel: not computed (half the work); the kernel's tiles are 64 wide, so
    # this matrix is one tile there (test_kernel_computes_the_lower_triangle_only)
    if not cpu_gemm.xtx_kernel(dtype, 30):
        assert torch.equal(H[:6, 6:], torch.zeros(6, 24))
    H = complete_hessian(H)
    assert torch.equal(H, H.t())
    within_summation_rounding(H, X)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_route_is_as_close_as_float32s(dtype: torch.dtype) -> None:
    """The 16-bit-input GEMM and the float32 route of the same activations both stay within
    float32 summation rounding of the exact product, and of each other by twice that."""
    X = activations(4096, 600, dtype, seed=2)  # two panels of the default width
    fast = complete_hessian(accumulate_hessian(None, 0, X)[0])
    wide = complete_hessian(accumulate_hessian(None, 0, X.float())[0])
    within_summation_rounding(fast, X)
    within_summation_rounding(wide, X)
    assert not torch.equal(fast, torch.zeros_like(fast))


@pytest.mark.skipif(
    platform.machine() != "x86_64" or not torch.backends.mkl.is_available(),
    reason="MKL's mixed-precision GEMM ships in torch's x86-64 builds only",
)
def test_mkl_16bit_gemm_is_found_in_torch() -> None:
    assert cpu_gemm.available(torch.bfloat16) and cpu_gemm.available(torch.float16)


@pytest.mark.skipif(not cpu_gemm.available(torch.bfloat16), reason="no MKL bf16 GEMM in this torch")
def test_xtx_panel_touches_its_panel_only() -> None:
    X = activations(64, 20, torch.bfloat16, seed=3)
    H = torch.full((20, 20), 5.0)
    cpu_gemm.xtx_panel(X, H, 8, 13, alpha=0.5, beta=2.0)
    expected = torch.full((20, 20), 5.0)
    expected[8:, 8:13] = 10.0 + 0.5 * (X[:, 8:].double().t() @ X[:, 8:13].double()).float()
    torch.testing.assert_close(H, expected, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError):
        cpu_gemm.xtx_panel(X.t(), H, 0, 5, 1.0, 0.0)  # not contiguous


@pytest.mark.parametrize("kernel", [False, True], ids=["ssyrk", "kernel"])
def test_float32_routes_write_the_lower_triangle_within_summation_rounding(
    kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float32 activations go through MKL's SSYRK or cpu_xtx's kernel (cpu_gemm.xtx_kernel):
    lower triangle only (the kernel: and the upper entries of its 64-wide diagonal tiles),
    beta/alpha as a running mean, within float32 summation rounding of the exact XᵀX, and close
    to torch's GEMM on the same values."""
    if kernel and not cpu_xtx.available():
        pytest.skip("no AVX512-BF16 here, or gptq_cli._cpu_xtx not built")
    if not kernel and cpu_gemm._SSYRK is None:
        pytest.skip("no MKL SSYRK in this torch")
    monkeypatch.setattr(cpu_gemm, "xtx_kernel", lambda dtype, width=0: kernel)
    X = activations(3 * 700, 300, torch.float32, seed=4)
    H, n = None, 0
    for part in X.split(700):
        H, n = accumulate_hessian(H, n, part)
    # the upper triangle is not computed
    assert torch.equal(H.triu(64 if kernel else 1), torch.zeros(300, 300))
    H = complete_hessian(H)
    assert torch.equal(H, H.t())
    within_summation_rounding(H, X)
    torch.testing.assert_close(H, 2 / n * X.t() @ X, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        cpu_gemm.xtx_lower(X.t(), torch.zeros(2100, 2100), 1.0, 0.0)  # not contiguous


needs_kernel = pytest.mark.skipif(
    not cpu_xtx.available(), reason="no AVX512-BF16 here, or gptq_cli._cpu_xtx not built"
)


KERNEL_DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])


@needs_kernel
@KERNEL_DTYPES
@pytest.mark.parametrize("m,K", [(4096, 600), (77, 70), (1, 130)])
def test_kernel_is_within_float32_summation_rounding(m: int, K: int, dtype: torch.dtype) -> None:
    """csrc/cpu_xtx.c against the exact product: odd token counts (bf16: the last paired with
    zero), widths that are not whole tiles in either direction, alpha and beta applied once."""
    X = activations(m, K, dtype, seed=3)
    Y = activations(m, K, dtype, seed=4)
    C = torch.full((K, K), 3.0)
    cpu_xtx.xty(X, Y, C, 2 / m, 0.5)
    Xd, Yd = X.double(), Y.double()
    exact = 1.5 + 2 / m * Xd.t() @ Yd
    bound = m * FP32_EPS * (2 / m * Xd.abs().t() @ Yd.abs()) + 4 * FP32_EPS
    assert ((C.double() - exact).abs() - bound).max().item() <= 0
    H = torch.zeros(K, K)
    cpu_xtx.xty(X, X, H, 2 / m, 0.0, lower=True)
    within_summation_rounding(complete_hessian(H), X)


@needs_kernel
@KERNEL_DTYPES
def test_kernel_computes_the_lower_triangle_only(dtype: torch.dtype) -> None:
    X = activations(64, 200, dtype, seed=5)
    H = torch.zeros(200, 200)
    cpu_xtx.xty(X, X, H, 2 / 64, 0.0, lower=True)
    # tiles are 64 columns wide: the ones right of a row's own tile are not computed
    assert torch.equal(H[:64, 128:], torch.zeros(64, 72))
    within_summation_rounding(complete_hessian(H), X)


@needs_kernel
@KERNEL_DTYPES
def test_kernel_bytes_do_not_depend_on_the_thread_count(dtype: torch.dtype) -> None:
    X = activations(1000, 700, dtype, seed=6)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            H = torch.zeros(700, 700)
            cpu_xtx.xty(X, X, H, 1.0, 0.0, lower=True)
            results.append(H.tril())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_torch_openmp_runtime_is_found_where_torch_uses_openmp() -> None:
    """The kernels' threads are torch's own (c_library.torch_openmp): found wherever torch's
    parallel backend is OpenMP, and a region of it runs the function on every thread asked for."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's parallel backend here is not OpenMP")
    team = c_library.torch_openmp()
    assert team is not None
    seen = []
    thread_num = ctypes.CFUNCTYPE(ctypes.c_int)(team.thread_num)
    body = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _data: seen.append(thread_num()))
    team.parallel(ctypes.cast(body, ctypes.c_void_p).value, None, 3, 0)
    assert sorted(seen) == [0, 1, 2]


def test_wide_float32_hessians_stay_with_ssyrk_where_it_exists() -> None:
    if cpu_gemm._SSYRK is None:
        pytest.skip("no MKL SSYRK in this torch")
    assert not cpu_gemm.xtx_kernel(torch.float32, cpu_gemm.FP32_KERNEL_MAX_WIDTH + 1)
    assert cpu_gemm.xtx_kernel(torch.float32, 576) == cpu_xtx.preferred(torch.float32)
