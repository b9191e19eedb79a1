"""The CUDA kernels against their torch twins, and the dispatch between them.

Three layers of evidence:
- CPU: the torch GEMV twin against a plain dequantize-then-matmul reference (packed here, independently of
  format/pack.py), and the dispatch (CPU tensors -> "torch", identical to the twin).
- CPU, emulated: the kernels' exact source compiled with g++ against csrc/emu/cuda_emu.h (CUDA threads as
  fibers, real warp shuffles, shared memory filled with NaN) and run against the twins. Skipped without g++.
- GPU (marker cuda): the built extension against the twins, with the same cases plus real layer shapes.

What "matches" means: the block kernel reproduces the twin bit for bit (codes, scales, zeros, updated weights,
errors); the per-row loss is a sum in another order (float rounding); with the MSE clip search, the error of
each shrink factor is also summed in another order, so a near-tie may pick another factor (a rare row).
The GEMV sums in another order than a matmul: both must be within fp16 rounding of a float64 reference.
"""
from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor

from gptq_cli import kernels, solver
from gptq_cli.format.pack import pack_qweight, pack_qzeros
from gptq_cli.kernels.extension import extension_loaded
from gptq_cli.kernels.gemv_torch import gemv_4bit_torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"


# ---------------------------------------------------------------- the emulated kernels (csrc/emu/harness.cpp)

@dataclass
class Emulator:
    """The launchers of csrc/*.cu built on the CPU emulator, with the torch ops' signatures."""

    lib: ctypes.CDLL

    def _check(self, status: int, error: ctypes.Array) -> None:
        assert status == 0, error.value.decode()

    def gptq_block(self, W: Tensor, Hinv: Tensor, scales: Tensor, zeros: Tensor, group_of_col: Tensor,
                   new_group: Tensor, *, bits: int, sym: bool, mse: bool, group_size: int
                   ) -> tuple[Tensor, Tensor, Tensor]:
        assert W.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous()
        N, B = W.shape
        codes = torch.empty(N, B, dtype=torch.int32)
        errors, losses = torch.empty(N, B), torch.empty(N)
        group_of_col, new_group = group_of_col.to(torch.int64).contiguous(), new_group.to(torch.bool).contiguous()
        error = ctypes.create_string_buffer(256)
        status = self.lib.gptq_emu_gptq_block(
            W.data_ptr(), Hinv.data_ptr(), Hinv.stride(0), Hinv.stride(1), scales.data_ptr(), zeros.data_ptr(),
            group_of_col.data_ptr(), new_group.data_ptr(), codes.data_ptr(), errors.data_ptr(), losses.data_ptr(),
            N, B, scales.shape[1], bits, int(sym), int(mse), min(group_size, 2**30), error, len(error))
        self._check(status, error)
        return codes, errors, losses

    def gemv_4bit(self, x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor,
                  checkpoint_format: str) -> Tensor:
        M, K = x.shape
        N = qweight.shape[1]
        out = torch.empty(M, N, dtype=torch.float16)
        workspace = torch.empty(self.lib.gptq_emu_gemv_4bit_workspace_floats(M, K, N))
        error = ctypes.create_string_buffer(256)
        status = self.lib.gptq_emu_gemv_4bit(
            x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), qzeros.data_ptr(), g_idx.data_ptr(),
            out.data_ptr(), workspace.data_ptr() if workspace.numel() else None, M, K, N,
            kernels.ZERO_OFFSET[checkpoint_format], error, len(error))
        self._check(status, error)
        return out


def _declare(lib: ctypes.CDLL) -> None:
    p, i, i64, buf = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_char_p
    lib.gptq_emu_gptq_block.argtypes = [p, p, i64, i64, p, p, p, p, p, p, p] + [i] * 7 + [buf, i]
    lib.gptq_emu_gemv_4bit_workspace_floats.argtypes = [i, i, i]
    lib.gptq_emu_gemv_4bit_workspace_floats.restype = i64
    lib.gptq_emu_gemv_4bit.argtypes = [p] * 7 + [i] * 4 + [buf, i]
    lib.gptq_emu_set_multiprocessors.argtypes = [i]


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Emulator:
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ is not installed: the kernels cannot be emulated")
    out = tmp_path_factory.mktemp("emulator") / "libgptq_emu.so"
    cmd = [cxx, "-std=c++20", "-O2", "-ffp-contract=off", "-fno-strict-aliasing", "-fPIC", "-shared",
           "-DGPTQ_CUDA_EMU", f"-I{CSRC}", "-x", "c++", str(CSRC / "gptq_block.cu"), str(CSRC / "gemv_4bit.cu"),
           "-x", "none", str(CSRC / "emu" / "harness.cpp"), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lib = ctypes.CDLL(str(out))
    _declare(lib)
    lib.gptq_emu_set_multiprocessors(3)   # few SMs: grid-stride loops and split K really iterate
    return Emulator(lib)


@dataclass
class Backend:
    """Where a kernel runs and the callables that run it there."""

    device: str
    gptq_block: object
    gemv_4bit: object


@pytest.fixture(params=["emulated", pytest.param("cuda", marks=pytest.mark.cuda)])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "cuda":
        assert kernels.backend_name("cuda") == "cuda-ext", \
            "a GPU is present but gptq_cli._C is not: pip install --no-build-isolation -e . (or GPTQ_JIT=1)"
        return Backend("cuda", kernels.gptq_block, kernels.gemv_4bit)
    emu = request.getfixturevalue("emulator")
    return Backend("cpu", emu.gptq_block, emu.gemv_4bit)


# ------------------------------------------------------------------------------------------------ GEMV

def _pack_4bit_rows(values: Tensor) -> Tensor:
    """Independent 4-bit packing along dim 0: word[i, n] holds values[8i + j, n] in bits 4j..4j+3."""
    v = torch.nn.functional.pad(values.to(torch.int64), (0, 0, 0, (-values.shape[0]) % 8))
    v = v.reshape(-1, 8, v.shape[1])
    words = sum(v[:, j] << (4 * j) for j in range(8))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@dataclass
class Layer4bit:
    x: Tensor
    qweight: Tensor
    scales: Tensor
    qzeros: Tensor
    g_idx: Tensor
    weight: Tensor   # float64 [K, N], from the unpacked truth
    checkpoint_format: str

    def reference(self) -> tuple[Tensor, Tensor]:
        """(x @ W in float64, |x| @ |W|: the scale of the accumulation's rounding)."""
        x = self.x.double().cpu()
        return x @ self.weight, x.abs() @ self.weight.abs()


def random_layer(M: int, K: int, N: int, group_size: int, act_order: bool, checkpoint_format: str,
                 seed: int = 0, device: str = "cpu", x_dtype: torch.dtype = torch.float16) -> Layer4bit:
    gen = torch.Generator().manual_seed(seed)
    g = K if group_size == -1 else group_size
    groups = math.ceil(K / g)
    codes = torch.randint(0, 16, (K, N), generator=gen, dtype=torch.int32)
    low = 1 if checkpoint_format == "gptq" else 0          # v1 stores zero - 1: true zeros 1..16
    zeros = torch.randint(low, low + 16, (groups, N), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, N, generator=gen) * 0.02 + 0.001).half()
    g_idx = torch.arange(K, dtype=torch.int32) // g
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen)].contiguous()
    x = torch.randn(M, K, generator=gen).to(x_dtype)
    weight = scales.double()[g_idx.long()] * (codes.double() - zeros.double()[g_idx.long()])
    stored_zeros = zeros - 1 if checkpoint_format == "gptq" else zeros
    return Layer4bit(x.to(device), _pack_4bit_rows(codes).to(device), scales.to(device),
                     _pack_4bit_rows(stored_zeros.t()).t().contiguous().to(device), g_idx.to(device), weight,
                     checkpoint_format)


def assert_within_fp16_rounding(out: Tensor, layer: Layer4bit) -> None:
    ref, magnitude = layer.reference()
    err = (out.double().cpu() - ref).abs()
    bound = 2.0**-10 * ref.abs() + 2.0**-14 * magnitude + 2.0**-24
    assert bool((err <= bound).all()), f"largest excess over the fp16 bound: {float((err - bound).max()):.3g}"


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("M,K,N,group_size,act_order", [
    (1, 256, 64, 64, False), (3, 100, 24, 32, True), (8, 512, 40, -1, False), (2, 96, 16, 96, True)])
def test_torch_gemv_twin_equals_dequantize_then_matmul(M, K, N, group_size, act_order, checkpoint_format) -> None:
    layer = random_layer(M, K, N, group_size, act_order, checkpoint_format, x_dtype=torch.float32)
    out = gemv_4bit_torch(layer.x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, checkpoint_format)
    ref, magnitude = layer.reference()
    assert out.dtype == torch.float32 and out.shape == (M, N)
    assert bool(((out.double() - ref).abs() <= 1e-6 * magnitude).all())


def test_torch_gemv_twin_keeps_leading_dims_and_dtype() -> None:
    layer = random_layer(6, 64, 16, 32, False, "gptq")
    x = layer.x.reshape(2, 3, 64)
    out = gemv_4bit_torch(x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx)
    assert out.shape == (2, 3, 16) and out.dtype == torch.float16
    assert_within_fp16_rounding(out.reshape(6, 16), layer)


def test_v1_and_v2_zeros_of_the_same_weight_give_the_same_output() -> None:
    layer = random_layer(2, 128, 32, 32, True, "gptq_v2", seed=3)
    layer.qzeros = _pack_4bit_rows(torch.full((32, 4), 8)).t().contiguous()   # true zero 8 stored as v2...
    v1_qzeros = _pack_4bit_rows(torch.full((32, 4), 7)).t().contiguous()      # ...and as v1 (z - 1)
    assert int(v1_qzeros[0, 0]) == 0x77777777
    v2 = gemv_4bit_torch(layer.x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, "gptq_v2")
    v1 = gemv_4bit_torch(layer.x, layer.qweight, layer.scales, v1_qzeros, layer.g_idx, "gptq")
    assert torch.equal(v1, v2)


GEMV_CASES = [  # M, K, N, group size, act-order, format: split K, N not a multiple of 256 or 8, ragged groups
    (1, 512, 512, 128, False, "gptq"), (8, 1024, 260, 32, True, "gptq_v2"), (3, 2048, 516, -1, False, "gptq"),
    (5, 4096, 64, 128, True, "gptq_v2"), (2, 8, 4, -1, False, "gptq"), (7, 1000, 128, 100, True, "gptq"),
    (4, 512, 1024, 64, False, "gptq_v2"), (6, 256, 12, 16, True, "gptq")]


@pytest.mark.parametrize("M,K,N,group_size,act_order,checkpoint_format", GEMV_CASES)
def test_gemv_kernel_is_within_fp16_rounding(backend: Backend, M, K, N, group_size, act_order,
                                             checkpoint_format) -> None:
    layer = random_layer(M, K, N, group_size, act_order, checkpoint_format, seed=M * K + N, device=backend.device)
    out = backend.gemv_4bit(layer.x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, checkpoint_format)
    assert out.shape == (M, N) and out.dtype == torch.float16 and out.device.type == backend.device
    assert_within_fp16_rounding(out, layer)
    twin = gemv_4bit_torch(layer.x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, checkpoint_format)
    assert_within_fp16_rounding(twin, layer)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 4, 8])
@pytest.mark.parametrize("N,K", [(512, 512), (4096, 4096), (11008, 4096), (4096, 11008), (28672, 4096),
                                 (4096, 28672), (512, 28672), (28672, 512)])
def test_cuda_gemv_at_layer_shapes(M, N, K) -> None:
    for act_order, checkpoint_format in [(False, "gptq"), (True, "gptq_v2")]:
        layer = random_layer(M, K, N, 128, act_order, checkpoint_format, seed=N + K, device="cuda")
        out = kernels.gemv_4bit(layer.x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, checkpoint_format)
        assert_within_fp16_rounding(out, layer)


# ------------------------------------------------------------------------------------- the block kernel

def correlated_hessian(K: int, seed: int, dead: tuple[int, ...] = ()) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * K, K, generator=gen) @ (torch.eye(K) + 0.3 * torch.randn(K, K, generator=gen) / K**0.5)
    X[:, list(dead)] = 0
    return 2 * X.t() @ X / X.shape[0]


BLOCK_CASES = [  # bits, group size, sym, desc_act, static groups, mse, K
    (4, 128, True, False, False, False, 200), (3, 32, False, True, False, False, 200),
    (2, 64, True, True, True, False, 200), (8, -1, False, False, False, False, 160),
    (4, 256, True, False, False, False, 300), (3, 48, True, True, False, False, 136)]


@pytest.mark.parametrize("bits,group_size,sym,desc_act,static_groups,mse,K", BLOCK_CASES)
def test_block_kernel_reproduces_the_solver_bit_for_bit(backend: Backend, bits, group_size, sym, desc_act,
                                                        static_groups, mse, K) -> None:
    gen = torch.Generator().manual_seed(bits * K)
    W = (torch.randn(40, K, generator=gen) * 0.05).to(backend.device)
    H = correlated_hessian(K, seed=K, dead=(5,)).to(backend.device)
    settings = dict(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, static_groups=static_groups,
                    mse=mse)
    twin = solver.quantize_weight(W, H, **settings)
    fused = solver.quantize_weight(W, H, **settings, block_fn=backend.gptq_block)
    for name in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(fused, name), getattr(twin, name)), name
    assert fused.damp == twin.damp
    assert fused.loss == pytest.approx(twin.loss, rel=1e-5)


def test_block_kernel_with_mse_clip_search(backend: Backend) -> None:
    gen = torch.Generator().manual_seed(7)
    K = 160
    W = (torch.randn(16, K, generator=gen) * 0.05).to(backend.device)
    W[:, 3] *= 20   # outliers: the clip search has something to clip
    H = correlated_hessian(K, seed=1).to(backend.device)
    settings = dict(bits=4, group_size=32, sym=False, desc_act=True, mse=True)
    twin = solver.quantize_weight(W, H, **settings)
    fused = solver.quantize_weight(W, H, **settings, block_fn=backend.gptq_block)
    # Near-ties between shrink factors may go either way (see the module docstring): a rare row differs.
    # Rows are independent: a row whose group parameters agree must agree everywhere.
    same_rows = (fused.scales == twin.scales).all(dim=0) & (fused.zeros == twin.zeros).all(dim=0)
    assert same_rows.float().mean() >= 0.9
    assert torch.equal(fused.codes[same_rows], twin.codes[same_rows])
    assert fused.loss == pytest.approx(twin.loss, rel=1e-2)


def adversarial_rows(N: int, B: int, gen: torch.Generator) -> Tensor:
    """Weights that probe the quantizer's edges: zero, constant, huge, tiny, one-signed and outlier rows."""
    W = torch.randn(N, B, generator=gen) * 0.05
    W[0] = 0                        # all zero: the [-1, 1] grid
    W[1] = 0.25                     # constant positive
    W[2] = -3.0                     # constant negative
    W[3] *= 1e7                     # scale clamped to the largest float16
    W[4] *= 1e-9                    # scale clamped to the smallest float16 subnormal
    W[5] = W[5].abs()               # no negative weight
    W[6, B // 2] = 40.0             # one outlier
    return W


@pytest.mark.parametrize("B,group_size", [(128, 32), (128, 128), (77, 20), (1, 1), (33, 300)])
@pytest.mark.parametrize("bits,sym", [(2, False), (3, True), (4, False), (8, True)])
def test_block_kernel_on_adversarial_rows_matches_quantize_block(backend: Backend, B, group_size, bits, sym) -> None:
    gen = torch.Generator().manual_seed(B + bits)
    N = 100   # more rows than the emulated grid (3 SMs x 4 CTAs x 8 warps) covers at once
    W = adversarial_rows(N, B, gen)
    K = B + 40
    Hinv, _ = solver.inverse_hessian_factor(correlated_hessian(K, seed=B).to(backend.device), 0.01)
    Hinv = Hinv[:B, :B]                  # a column-major view, as the solver passes it
    groups = math.ceil(K / group_size)
    cols = torch.arange(B)
    group_of_col = cols // group_size
    new_group = (cols % group_size == 0) & (cols + group_size <= B)
    scales = torch.zeros(N, groups)
    zeros = torch.zeros(N, groups)
    for start in range(0, B, group_size):   # groups that do not fit in the block: the caller finds them first
        if not new_group[start]:
            g = start // group_size
            scales[:, g], zeros[:, g] = solver.find_params(W[:, start:start + group_size], bits, sym, False)
    args = [t.to(backend.device) for t in (W, Hinv, scales, zeros, group_of_col, new_group)]
    expected_args = [t.clone() for t in args]
    result = backend.gptq_block(*args, bits=bits, sym=sym, mse=False, group_size=group_size)
    expected = solver.quantize_block(*expected_args, bits=bits, sym=sym, mse=False, group_size=group_size)
    assert torch.equal(result[0], expected[0]), "codes"
    assert torch.equal(result[1], expected[1]), "errors"
    torch.testing.assert_close(result[2], expected[2], rtol=1e-5, atol=0)
    for got, want, name in zip(args, expected_args, ("W", "Hinv", "scales", "zeros")):
        assert torch.equal(got, want), name
    assert bool((result[0] >= 0).all() and (result[0] < 2**bits).all())


@pytest.mark.cuda
@pytest.mark.parametrize("N,K", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_cuda_block_kernel_at_layer_shapes(N, K) -> None:
    gen = torch.Generator().manual_seed(N + K)
    W = (torch.randn(N, K, generator=gen) * 0.02).cuda()
    X = torch.randn(2 * K, K, generator=gen).cuda()
    H = 2 * X.t() @ X / X.shape[0]
    settings = dict(bits=4, group_size=128, sym=True, desc_act=True)
    twin = solver.quantize_weight(W, H, **settings)
    fused = solver.quantize_weight(W, H, **settings, block_fn=kernels.gptq_block)
    for name in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(fused, name), getattr(twin, name)), name


# ------------------------------------------------------------------------------------------- dispatch

def test_cpu_tensors_use_the_torch_twins() -> None:
    assert kernels.backend_name("cpu") == "torch"
    assert kernels.backend_name(torch.device("cpu")) == "torch"
    if not torch.cuda.is_available():
        assert kernels.backend_name("cuda") == "torch" and not extension_loaded()


def test_dispatch_on_cpu_is_the_twin_exactly() -> None:
    layer = random_layer(3, 256, 32, 64, True, "gptq_v2")
    out = kernels.gemv_4bit(layer.x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, "gptq_v2")
    assert torch.equal(out, gemv_4bit_torch(layer.x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx,
                                            "gptq_v2"))
    W, H = torch.randn(24, 96) * 0.1, correlated_hessian(96, seed=2)
    settings = dict(bits=3, group_size=32, sym=False, desc_act=True)
    dispatched = solver.quantize_weight(W, H, **settings, block_fn=kernels.gptq_block)
    direct = solver.quantize_weight(W, H, **settings)
    assert torch.equal(dispatched.codes, direct.codes) and dispatched.loss == direct.loss


def test_gemv_rejects_an_unknown_checkpoint_format() -> None:
    layer = random_layer(1, 64, 8, 32, False, "gptq")
    with pytest.raises(ValueError, match="checkpoint_format"):
        kernels.gemv_4bit(layer.x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, "gptq_v3")


def test_packing_here_agrees_with_the_checkpoint_packer() -> None:
    codes = torch.randint(0, 16, (40, 24), dtype=torch.int32)
    assert torch.equal(_pack_4bit_rows(codes), pack_qweight(codes, 4))
    zeros = torch.randint(1, 17, (3, 24), dtype=torch.int32)
    assert torch.equal(_pack_4bit_rows(zeros.t() - 1).t(), pack_qzeros(zeros, 4, "gptq"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_jit_opt_in_never_builds_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTQ_JIT", "1")
    extension_loaded.cache_clear()
    try:
        assert extension_loaded() is False
        assert kernels.backend_name("cuda") == "torch"
    finally:
        extension_loaded.cache_clear()
