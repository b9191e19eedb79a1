"""The CUDA kernels against their torch twins, and the dispatch between them.

Three layers of evidence:
- CPU: the torch GEMV twin against a plain dequantize-then-matmul reference (packed here,
  independently of format/bitpack.py), and the dispatch (CPU tensors -> "torch", identical to the
  twin).
- CPU, emulated: the kernels' exact source compiled with g++ against csrc/emu/cuda_emu.h (CUDA
  threads as fibers, real warp shuffles, shared memory filled with NaN) and run against the twins.
  Skipped without g++.
- GPU (marker cuda): the built extension against the twins, with the same cases plus real layer
  shapes.

What "matches" means: the block kernel reproduces the twin bit for bit (codes, scales, zeros,
updated weights, errors); the per-row loss is a sum in another order (float rounding); with the MSE
clip search, the error of each shrink factor is also summed in another order, so a near-tie may pick
another factor (a rare row). The GEMV sums in another order than a matmul: both must be within fp16
rounding of a float64 reference.
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

from gptq_cli import kernels
from gptq_cli.format.bitpack import pack_qweight, pack_qzeros
from gptq_cli.kernels.extension import extension_loaded
from gptq_cli.kernels.gemv_torch import Layout4bit, dequantize_packed, gemv_4bit_torch, layout_4bit
from gptq_cli.quantization import engine, solver

CSRC = Path(__file__).resolve().parents[1] / "csrc"
ACT = {torch.float16: 0, torch.bfloat16: 1}  # csrc/kernels.h Act


# ---------------------------------------------------------------- the emulated kernels
# (csrc/emu/harness.cpp)


@dataclass
class Emulator:
    """The launchers of csrc/*.cu built on the CPU emulator, with the torch ops' signatures."""

    lib: ctypes.CDLL

    def _check(self, status: int, error: ctypes.Array) -> None:
        assert status == 0, error.value.decode()

    def gptq_block(
        self,
        W: Tensor,
        Hinv: Tensor,
        scales: Tensor,
        zeros: Tensor,
        group_of_col: Tensor,
        new_group: Tensor,
        *,
        bits: int,
        sym: bool,
        mse: bool,
        group_size: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        assert W.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous()
        N, B = W.shape
        codes = torch.empty(N, B, dtype=torch.int32)
        errors, losses = torch.empty(N, B), torch.empty(N)
        group_of_col, new_group = (
            group_of_col.to(torch.int64).contiguous(),
            new_group.to(torch.bool).contiguous(),
        )
        error = ctypes.create_string_buffer(256)
        status = self.lib.gptq_emu_gptq_block(
            W.data_ptr(),
            Hinv.data_ptr(),
            Hinv.stride(0),
            Hinv.stride(1),
            scales.data_ptr(),
            zeros.data_ptr(),
            group_of_col.data_ptr(),
            new_group.data_ptr(),
            codes.data_ptr(),
            errors.data_ptr(),
            losses.data_ptr(),
            N,
            B,
            scales.shape[1],
            bits,
            int(sym),
            int(mse),
            min(group_size, 2**30),
            error,
            len(error),
        )
        self._check(status, error)
        return codes, errors, losses

    def gemv_4bit(
        self,
        x: Tensor,
        qweight: Tensor,
        scales: Tensor,
        qzeros: Tensor,
        g_idx: Tensor,
        checkpoint_format: str,
    ) -> Tensor:
        layout = layout_4bit(qweight, g_idx)
        assert layout is not None, "a case the kernels cannot take"
        M, K = x.shape
        N = qweight.shape[1]
        out = torch.empty(M, N, dtype=x.dtype)
        perm = layout.perm.data_ptr() if layout.perm is not None else None
        error = ctypes.create_string_buffer(256)
        status = self.lib.gptq_emu_gemv_4bit(
            x.contiguous().data_ptr(),
            layout.qweight.data_ptr(),
            scales.data_ptr(),
            qzeros.data_ptr(),
            perm,
            out.data_ptr(),
            M,
            K,
            N,
            layout.group_size,
            kernels.ZERO_OFFSET[checkpoint_format],
            ACT[x.dtype],
            error,
            len(error),
        )
        self._check(status, error)
        return out

    def dequantize_kernel_order(
        self,
        layout: Layout4bit,
        scales: Tensor,
        qzeros: Tensor,
        checkpoint_format: str,
        dtype: torch.dtype,
    ) -> Tensor:
        K, N = layout.qweight.shape[0] * 8, layout.qweight.shape[1]
        out = torch.empty(K, N, dtype=dtype)
        error = ctypes.create_string_buffer(256)
        status = self.lib.gptq_emu_dequantize_4bit(
            layout.qweight.data_ptr(),
            scales.data_ptr(),
            qzeros.data_ptr(),
            out.data_ptr(),
            K,
            N,
            layout.group_size,
            kernels.ZERO_OFFSET[checkpoint_format],
            ACT[dtype],
            error,
            len(error),
        )
        self._check(status, error)
        return out


def _declare(lib: ctypes.CDLL) -> None:
    p, i, i64, buf = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_char_p
    lib.gptq_emu_gptq_block.argtypes = [p, p, i64, i64, p, p, p, p, p, p, p] + [i] * 7 + [buf, i]
    lib.gptq_emu_gemv_4bit.argtypes = [p] * 6 + [i] * 6 + [buf, i]
    lib.gptq_emu_dequantize_4bit.argtypes = [p] * 4 + [i] * 5 + [buf, i]
    lib.gptq_emu_set_multiprocessors.argtypes = [i]


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Emulator:
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ is not installed: the kernels cannot be emulated")
    out = tmp_path_factory.mktemp("emulator") / "libgptq_emu.so"
    cmd = [
        cxx,
        "-std=c++20",
        "-O2",
        "-ffp-contract=off",
        "-fno-strict-aliasing",
        "-fPIC",
        "-shared",
        "-DGPTQ_CUDA_EMU",
        f"-I{CSRC}",
        "-x",
        "c++",
        str(CSRC / "gptq_block.cu"),
        str(CSRC / "gemv_4bit.cu"),
        "-x",
        "none",
        str(CSRC / "emu" / "harness.cpp"),
        "-o",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lib = ctypes.CDLL(str(out))
    _declare(lib)
    lib.gptq_emu_set_multiprocessors(3)  # few SMs: grid-stride loops and split K really iterate
    return Emulator(lib)


@dataclass
class Backend:
    """Where a kernel runs and the callables that run it there."""

    device: str
    gptq_block: object
    gemv_4bit: object
    dequantize_kernel_order: object


@pytest.fixture(params=["emulated", pytest.param("cuda", marks=pytest.mark.cuda)])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "cuda":
        assert kernels.backend_name("cuda") == "cuda-ext", (
            "a GPU is present but gptq_cli._C is not: pip install --no-build-isolation -e . (or "
            "GPTQ_JIT=1)"
        )
        return Backend(
            "cuda", kernels.gptq_block, kernels.gemv_4bit, kernels.dequantize_4bit_kernel_order
        )
    emu = request.getfixturevalue("emulator")
    return Backend("cpu", emu.gptq_block, emu.gemv_4bit, emu.dequantize_kernel_order)


# ------------------------------------------------------------------------------------------------
# GEMV


def _pack_4bit_rows(values: Tensor) -> Tensor:
    """Independent 4-bit packing along dim 0: word[i, n] holds values[8i + j, n] in bits
    4j..4j+3."""
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
    weight: Tensor  # float64 [K, N], from the unpacked truth
    checkpoint_format: str

    def reference(self) -> tuple[Tensor, Tensor]:
        """(x @ W in float64, |x| @ |W|: the scale of the accumulation's rounding), on the
        layer's device."""
        x = self.x.double()
        return x @ self.weight, x.abs() @ self.weight.abs()


def random_layer(
    M: int,
    K: int,
    N: int,
    group_size: int,
    act_order: bool,
    checkpoint_format: str,
    seed: int = 0,
    device: str = "cpu",
    x_dtype: torch.dtype = torch.float16,
) -> Layer4bit:
    """Everything drawn and computed on `device` (layer shapes would take minutes on a CPU)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    g = K if group_size == -1 else group_size
    groups = math.ceil(K / g)
    codes = torch.randint(0, 16, (K, N), generator=gen, dtype=torch.int32, device=device)
    low = 1 if checkpoint_format == "gptq" else 0  # v1 stores zero - 1: true zeros 1..16
    zeros = torch.randint(
        low, low + 16, (groups, N), generator=gen, dtype=torch.int32, device=device
    )
    scales = (torch.rand(groups, N, generator=gen, device=device) * 0.02 + 0.001).half()
    g_idx = torch.arange(K, dtype=torch.int32, device=device) // g
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen, device=device)].contiguous()
    x = torch.randn(M, K, generator=gen, device=device).to(x_dtype)
    weight = scales.double()[g_idx.long()] * (codes.double() - zeros.double()[g_idx.long()])
    stored_zeros = zeros - 1 if checkpoint_format == "gptq" else zeros
    return Layer4bit(
        x,
        _pack_4bit_rows(codes),
        scales,
        _pack_4bit_rows(stored_zeros.t()).t().contiguous(),
        g_idx,
        weight,
        checkpoint_format,
    )


def assert_within_rounding(out: Tensor, layer: Layer4bit, bf16_weights: bool = False) -> None:
    """The kernels' error budget against the exact float64 result. fp16: weights rounded to fp16
    (2^-12 relative), each product and each 4-term partial sum rounded to fp16 (together < 2^-9
    of Σ|x·w|), products that fall into fp16's subnormals (< 2^-25 each), the output rounded
    (2^-11). bf16: exact weights and fp32 products and sums (2^-20 of Σ|x·w| is generous), the
    output rounded to bf16 (2^-9); weights rounded to bf16 (2^-9 of Σ|x·w|) when `bf16_weights`
    (the dequantize-then-matmul path for more than 8 rows)."""
    ref, magnitude = layer.reference()
    err = (out.double() - ref).abs()
    if out.dtype == torch.float16:
        bound = 2.0**-11 * ref.abs() + 2.0**-9 * magnitude + layer.x.shape[1] * 2.0**-25
    else:
        bound = 2.0**-8 * ref.abs() + (2.0**-8 if bf16_weights else 2.0**-20) * magnitude + 2.0**-30
    assert not out.isnan().any()
    assert bool((err <= bound).all()), (
        f"largest excess over the bound: {float((err - bound).max()):.3g}"
    )


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize(
    "M,K,N,group_size,act_order",
    [
        (1, 256, 64, 64, False),
        (3, 100, 24, 32, True),
        (8, 512, 40, -1, False),
        (2, 96, 16, 96, True),
    ],
)
def test_torch_gemv_twin_equals_dequantize_then_matmul(
    M, K, N, group_size, act_order, checkpoint_format
) -> None:
    layer = random_layer(M, K, N, group_size, act_order, checkpoint_format, x_dtype=torch.float32)
    out = gemv_4bit_torch(
        layer.x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, checkpoint_format
    )
    ref, magnitude = layer.reference()
    assert out.dtype == torch.float32 and out.shape == (M, N)
    assert bool(((out.double() - ref).abs() <= 1e-6 * magnitude).all())


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
def test_torch_gemv_twin_keeps_leading_dims_and_dtype(x_dtype: torch.dtype, monkeypatch) -> None:
    # several chunks, one cut mid-group
    monkeypatch.setattr("gptq_cli.kernels.gemv_torch.CHUNK_ROWS", 24)
    layer = random_layer(6, 64, 16, 32, False, "gptq", x_dtype=x_dtype)
    out = gemv_4bit_torch(
        layer.x.reshape(2, 3, 64), layer.qweight, layer.scales, layer.qzeros, layer.g_idx
    )
    assert out.shape == (2, 3, 16) and out.dtype == x_dtype
    assert_within_rounding(out.reshape(6, 16), layer)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_twin_dequantization_rounds_the_exact_weight_once(dtype: torch.dtype, monkeypatch) -> None:
    monkeypatch.setattr("gptq_cli.kernels.gemv_torch.CHUNK_ROWS", 40)
    layer = random_layer(1, 128, 24, 32, True, "gptq_v2", seed=5)
    got = dequantize_packed(
        layer.qweight, layer.scales, layer.qzeros, layer.g_idx, "gptq_v2", dtype
    )
    assert got.dtype == dtype and torch.equal(got, layer.weight.to(dtype))


def test_v1_and_v2_zeros_of_the_same_weight_give_the_same_output() -> None:
    layer = random_layer(2, 128, 32, 32, True, "gptq_v2", seed=3)
    # true zero 8 stored as v2...
    layer.qzeros = _pack_4bit_rows(torch.full((32, 4), 8)).t().contiguous()
    v1_qzeros = _pack_4bit_rows(torch.full((32, 4), 7)).t().contiguous()  # ...and as v1 (z - 1)
    assert int(v1_qzeros[0, 0]) == 0x77777777
    v2 = gemv_4bit_torch(layer.x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, "gptq_v2")
    v1 = gemv_4bit_torch(layer.x, layer.qweight, layer.scales, v1_qzeros, layer.g_idx, "gptq")
    assert torch.equal(v1, v2)


def test_kernel_layout_makes_act_order_groups_contiguous() -> None:
    layer = random_layer(1, 256, 8, 64, True, "gptq", seed=11)
    layout = layout_4bit(layer.qweight, layer.g_idx)
    assert layout is not None and layout.group_size == 64 and layout.perm is not None
    perm = layout.perm.long()
    # groups contiguous, in order
    assert torch.equal(layer.g_idx[perm].long(), torch.arange(256) // 64)
    codes = dequantize_packed(layout.qweight, layer.scales, layer.qzeros, layer.g_idx[perm], "gptq")
    assert torch.equal(
        codes, dequantize_packed(layer.qweight, layer.scales, layer.qzeros, layer.g_idx)[perm]
    )
    ordered = random_layer(1, 256, 8, 64, False, "gptq")
    assert layout_4bit(ordered.qweight, ordered.g_idx).perm is None
    # one group: any K % 8 == 0
    per_channel = random_layer(1, 40, 8, -1, False, "gptq")
    assert layout_4bit(per_channel.qweight, per_channel.g_idx).group_size == 40
    # not a multiple of 32: the twin
    for group_size in (16, 100):
        odd = random_layer(1, 200, 8, group_size, False, "gptq")
        assert layout_4bit(odd.qweight, odd.g_idx) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "K,N,group_size,act_order,checkpoint_format",
    [(256, 36, 32, True, "gptq"), (64, 8, -1, False, "gptq_v2"), (192, 64, 64, False, "gptq")],
)
def test_dequantize_kernel_is_the_twin_bit_for_bit(
    backend: Backend, dtype, K, N, group_size, act_order, checkpoint_format
) -> None:
    layer = random_layer(
        1, K, N, group_size, act_order, checkpoint_format, seed=K + N, device=backend.device
    )
    layout = layout_4bit(layer.qweight, layer.g_idx)
    got = backend.dequantize_kernel_order(
        layout, layer.scales, layer.qzeros, checkpoint_format, dtype
    )
    twin = dequantize_packed(
        layer.qweight, layer.scales, layer.qzeros, layer.g_idx, checkpoint_format, dtype
    )
    rows = layout.perm.long() if layout.perm is not None else slice(None)
    assert got.dtype == dtype and torch.equal(got.cpu(), twin[rows].cpu())


# M, K, N, group size, act-order, format, activations: N not a multiple of 32 or 8, K not of 32,
GEMV_CASES = [
    # a K-slot with a partial step, a short last group, M 1..8
    (1, 512, 64, 128, False, "gptq", torch.float16),
    (8, 1024, 36, 32, True, "gptq_v2", torch.bfloat16),
    (3, 2048, 68, -1, False, "gptq", torch.float16),
    (5, 256, 32, 64, True, "gptq_v2", torch.float16),
    (2, 8, 4, -1, False, "gptq", torch.bfloat16),
    (7, 1000, 12, -1, True, "gptq", torch.bfloat16),
    (3, 704, 36, 128, True, "gptq", torch.bfloat16),
    (4, 512, 40, 64, False, "gptq_v2", torch.bfloat16),
    (6, 256, 12, 32, True, "gptq", torch.float16),
]


@pytest.mark.parametrize("M,K,N,group_size,act_order,checkpoint_format,x_dtype", GEMV_CASES)
def test_gemv_kernel_is_within_rounding(
    backend: Backend, M, K, N, group_size, act_order, checkpoint_format, x_dtype
) -> None:
    layer = random_layer(
        M,
        K,
        N,
        group_size,
        act_order,
        checkpoint_format,
        seed=M * K + N,
        device=backend.device,
        x_dtype=x_dtype,
    )
    out = backend.gemv_4bit(
        layer.x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, checkpoint_format
    )
    assert out.shape == (M, N) and out.dtype == x_dtype and out.device.type == backend.device
    assert_within_rounding(out, layer)
    twin = gemv_4bit_torch(
        layer.x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, checkpoint_format
    )
    assert_within_rounding(twin, layer)


def test_gemv_kernel_survives_large_activations(backend: Backend) -> None:
    """Outliers of a few thousand (as LLM activations have): no fp16 partial sum may overflow."""
    layer = random_layer(2, 256, 32, 64, True, "gptq", seed=9, device=backend.device)
    layer.x[:, ::37] = 3000.0
    out = backend.gemv_4bit(layer.x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, "gptq")
    assert bool(out.isfinite().all())
    assert_within_rounding(out, layer)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 4, 8, 64])
@pytest.mark.parametrize(
    "N,K",
    [
        (512, 512),
        (4096, 4096),
        (11008, 4096),
        (4096, 11008),
        (28672, 4096),
        (4096, 28672),
        (512, 28672),
        (28672, 512),
    ],
)
def test_cuda_gemv_at_layer_shapes(M, N, K) -> None:
    for act_order, checkpoint_format, x_dtype in [
        (False, "gptq", torch.float16),
        (True, "gptq_v2", torch.bfloat16),
    ]:
        layer = random_layer(
            M, K, N, 128, act_order, checkpoint_format, seed=N + K, device="cuda", x_dtype=x_dtype
        )
        out = kernels.gemv_4bit(
            layer.x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, checkpoint_format
        )
        assert_within_rounding(out, layer, bf16_weights=M > kernels.GEMV_MAX_BATCH)


# ------------------------------------------------------------------------------------- the block
# kernel


def correlated_hessian(K: int, seed: int, dead: tuple[int, ...] = ()) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * K, K, generator=gen) @ (
        torch.eye(K) + 0.3 * torch.randn(K, K, generator=gen) / K**0.5
    )
    X[:, list(dead)] = 0
    return 2 * X.t() @ X / X.shape[0]


BLOCK_CASES = [  # bits, group size, sym, desc_act, static groups, mse, K
    (4, 128, True, False, False, False, 200),
    (3, 32, False, True, False, False, 200),
    (2, 64, True, True, True, False, 200),
    (8, -1, False, False, False, False, 160),
    (4, 256, True, False, False, False, 300),
    (3, 48, True, True, False, False, 136),
]


@pytest.mark.parametrize("bits,group_size,sym,desc_act,static_groups,mse,K", BLOCK_CASES)
def test_block_kernel_reproduces_the_solver_bit_for_bit(
    backend: Backend, bits, group_size, sym, desc_act, static_groups, mse, K
) -> None:
    gen = torch.Generator().manual_seed(bits * K)
    W = (torch.randn(40, K, generator=gen) * 0.05).to(backend.device)
    H = correlated_hessian(K, seed=K, dead=(5,)).to(backend.device)
    settings = dict(
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=desc_act,
        static_groups=static_groups,
        mse=mse,
    )
    twin = solver.quantize_weight(W, H, **settings)
    fused = solver.quantize_weight(W, H, **settings, column_block_fn=backend.gptq_block)
    for name in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(fused, name), getattr(twin, name)), name
    assert fused.damp == twin.damp
    assert fused.loss == pytest.approx(twin.loss, rel=1e-5)


def test_block_kernel_with_mse_clip_search(backend: Backend) -> None:
    gen = torch.Generator().manual_seed(7)
    K = 160
    W = (torch.randn(16, K, generator=gen) * 0.05).to(backend.device)
    W[:, 3] *= 20  # outliers: the clip search has something to clip
    H = correlated_hessian(K, seed=1).to(backend.device)
    settings = dict(bits=4, group_size=32, sym=False, desc_act=True, mse=True)
    twin = solver.quantize_weight(W, H, **settings)
    fused = solver.quantize_weight(W, H, **settings, column_block_fn=backend.gptq_block)
    # Near-ties between shrink factors may go either way (see the module docstring): a rare row
    # differs. Rows are independent: a row whose group parameters agree must agree everywhere.
    same_rows = (fused.scales == twin.scales).all(dim=0) & (fused.zeros == twin.zeros).all(dim=0)
    assert same_rows.float().mean() >= 0.9
    assert torch.equal(fused.codes[same_rows], twin.codes[same_rows])
    assert fused.loss == pytest.approx(twin.loss, rel=1e-2)


def adversarial_rows(N: int, B: int, gen: torch.Generator) -> Tensor:
    """Weights that probe the quantizer's edges: zero, constant, huge, tiny, one-signed and
    outlier rows."""
    W = torch.randn(N, B, generator=gen) * 0.05
    W[0] = 0  # all zero: the [-1, 1] grid
    W[1] = 0.25  # constant positive
    W[2] = -3.0  # constant negative
    W[3] *= 1e7  # scale clamped to the largest float16
    W[4] *= 1e-9  # scale clamped to the smallest float16 subnormal
    W[5] = W[5].abs()  # no negative weight
    W[6, B // 2] = 40.0  # one outlier
    return W


@pytest.mark.parametrize("B,group_size", [(128, 32), (128, 128), (77, 20), (1, 1), (33, 300)])
@pytest.mark.parametrize("bits,sym", [(2, False), (3, True), (4, False), (8, True)])
def test_block_kernel_on_adversarial_rows_matches_quantize_block(
    backend: Backend, B, group_size, bits, sym
) -> None:
    gen = torch.Generator().manual_seed(B + bits)
    N = 100  # more rows than the emulated grid (3 SMs x 4 CTAs x 8 warps) covers at once
    W = adversarial_rows(N, B, gen)
    K = B + 40
    Hinv, _ = solver.inverse_hessian_factor(correlated_hessian(K, seed=B).to(backend.device), 0.01)
    Hinv = Hinv[:B, :B]  # a column-major view, as the solver passes it
    groups = math.ceil(K / group_size)
    cols = torch.arange(B)
    group_of_col = cols // group_size
    new_group = (cols % group_size == 0) & (cols + group_size <= B)
    scales = torch.zeros(N, groups)
    zeros = torch.zeros(N, groups)
    # groups that do not fit in the block: the caller finds them first
    for start in range(0, B, group_size):
        if not new_group[start]:
            g = start // group_size
            scales[:, g], zeros[:, g] = solver.find_params(
                W[:, start : start + group_size], bits, sym, False
            )
    args = [t.to(backend.device) for t in (W, Hinv, scales, zeros, group_of_col, new_group)]
    expected_args = [t.clone() for t in args]
    result = backend.gptq_block(*args, bits=bits, sym=sym, mse=False, group_size=group_size)
    expected = solver.quantize_column_block(
        *expected_args, bits=bits, sym=sym, mse=False, group_size=group_size
    )
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
    fused = solver.quantize_weight(W, H, **settings, column_block_fn=kernels.gptq_block)
    for name in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(fused, name), getattr(twin, name)), name


# -------------------------------------------------------------------------------------------
# dispatch


def test_cpu_tensors_use_the_torch_twins() -> None:
    assert kernels.backend_name("cpu") == "torch"
    assert kernels.backend_name(torch.device("cpu")) == "torch"
    if not torch.cuda.is_available():
        assert kernels.backend_name("cuda") == "torch" and not extension_loaded()


def test_dispatch_on_cpu_is_the_twin_exactly() -> None:
    layer = random_layer(3, 256, 32, 64, True, "gptq_v2")
    out = kernels.gemv_4bit(
        layer.x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, "gptq_v2"
    )
    assert torch.equal(
        out,
        gemv_4bit_torch(layer.x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, "gptq_v2"),
    )
    # the solver's block step: the engine picks the torch loop for CPU tensors; the kernel refuses
    # them
    assert engine.column_block_function(torch.device("cpu")) is solver.quantize_column_block
    W, Hinv = torch.randn(4, 8), torch.eye(8)
    scales, zeros = torch.ones(4, 1), torch.zeros(4, 1)
    with pytest.raises(ValueError, match="solver.quantize_column_block"):
        kernels.gptq_block(
            W,
            Hinv,
            scales,
            zeros,
            torch.zeros(8, dtype=torch.long),
            torch.zeros(8, dtype=torch.bool),
            bits=4,
            sym=True,
            mse=False,
            group_size=8,
        )


def test_gemv_rejects_an_unknown_checkpoint_format() -> None:
    layer = random_layer(1, 64, 8, 32, False, "gptq")
    with pytest.raises(ValueError, match="checkpoint_format"):
        kernels.gemv_4bit(
            layer.x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, "gptq_v3"
        )


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


def test_quant_linear_with_rows_permuted_for_the_kernels_keeps_checkpoint_state() -> None:
    from gptq_cli.model.quant_linear import QuantLinear
    from tests.tiny_models import random_quantized_weight

    qw = random_quantized_weight(48, 256, bits=4, group_size=64, act_order=True, seed=4)
    module = QuantLinear.from_quantized(qw, checkpoint_format="gptq")
    checkpoint = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(5))
    before = module(x)
    layout = module.kernel_layout()  # what the first CUDA call does: rows permuted in place
    assert (
        layout is not None
        and module.perm is not None
        and not torch.equal(module.qweight, checkpoint["qweight"])
    )
    # the twin on the permuted rows
    torch.testing.assert_close(module(x), before, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, checkpoint[k]) for k, v in module.state_dict().items())
    assert torch.equal(module.dequantize_weight(torch.float32), qw.dequantize(torch.float32))
    module.load_state_dict(checkpoint)  # checkpoint order again: the permutation is forgotten
    assert module.perm is None and torch.equal(module.qweight, checkpoint["qweight"])
    torch.testing.assert_close(module(x), before, rtol=0, atol=0)
