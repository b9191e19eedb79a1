"""The GPU quantize path's choices, checked where they can be on a CPU (and on a GPU where one is
present).

- Hessians: fp16/bf16 activations are accumulated with TF32 tensor cores allowed, fp32 ones never.
  On a CPU the flag changes nothing, so the CPU tests check (a) the flag each matmul runs under and
  (b), by rounding fp32 inputs to TF32 by hand, that fp16/bf16 values pass through TF32 unchanged
  (so only the fp32 sums' order can differ), while fp32 activations would lose ~3 digits. The `cuda`
  test measures the real thing.
- Packing: the engine packs where it solved; packing is exact integer arithmetic, so it is the same
  on any device (the `cuda` test compares the two bit for bit).
- Activation dtype: "auto" is the model's stored dtype on a GPU, a CPU-speed choice on a CPU.
- Recorded inputs on a GPU: capped, so that a 7B-shaped quantize at 128 x 2048 records no 5.4 GiB
  tensor.
"""

from __future__ import annotations

import pytest
import torch

from gptq_cli.format.bitpack import pack_qweight, pack_qzeros
from gptq_cli.format.quantized import QuantizedWeight
from gptq_cli.model import modelio
from gptq_cli.quantization import calibration, solver


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest TF32 value (10 explicit mantissa bits, ties to even), as fp32."""
    bits = x.view(torch.int32).to(torch.int64)
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return rounded.to(torch.int32).view(torch.float32)


def activations(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # six decades of magnitude
    x = torch.randn(2, 48, 64, generator=gen) * torch.logspace(-3, 2, 64)
    return x.to(dtype)


@pytest.mark.parametrize(
    "dtype,allowed", [(torch.float16, True), (torch.bfloat16, True), (torch.float32, False)]
)
def test_hessian_allows_tf32_only_for_half_precision_activations(
    dtype, allowed, monkeypatch
) -> None:
    seen = []
    addmm = torch.Tensor.addmm_

    def spy(self, *args, **kwargs):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return addmm(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "addmm_", spy)
    # the torch route, as on a GPU
    monkeypatch.setattr(solver.cpu_gemm, "available", lambda dtype: False)
    before = torch.backends.cuda.matmul.allow_tf32
    solver.accumulate_hessian(None, 0, activations(dtype))
    assert seen == [allowed] and torch.backends.cuda.matmul.allow_tf32 == before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tf32_rounding_leaves_half_precision_activations_exact(dtype) -> None:
    x = activations(dtype).float()
    # every fp16/bf16 value is a TF32 value: products exact
    assert torch.equal(tf32_round(x), x)
    X = x.reshape(-1, 64)
    assert torch.equal(tf32_round(X).t() @ tf32_round(X), X.t() @ X)


def test_tf32_would_cost_fp32_activations_precision() -> None:
    X = activations(torch.float32).reshape(-1, 64)
    exact = X.double().t() @ X.double()
    scale = X.double().abs().t() @ X.double().abs()
    tf32 = tf32_round(X).double().t() @ tf32_round(X).double()
    fp32 = (
        solver.complete_hessian(solver.accumulate_hessian(None, 0, X)[0]).double() * X.shape[0] / 2
    )
    assert float(((tf32 - exact).abs() / scale).max()) > 2**-13  # what TF32 inputs would lose
    assert float(((fp32 - exact).abs() / scale).max()) < 2**-18  # what the fp32 path keeps


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_tensor_core_hessian_is_as_accurate_as_the_fp32_path(dtype) -> None:
    X = activations(dtype).reshape(-1, 64).repeat(64, 1).cuda()
    H, n = solver.accumulate_hessian(None, 0, X)  # TF32 tensor cores
    with solver.matmul_tf32(False):
        Xf = X.float()
        full = torch.zeros_like(H).addmm_(Xf.t(), Xf, alpha=2 / n)  # plain fp32 (what ran before)
    exact = 2 * X.double().t() @ X.double() / n
    scale = 2 * X.double().abs().t() @ X.double().abs() / n
    err = float(((H.double() - exact).abs() / scale).max())
    assert err <= 4 * float(((full.double() - exact).abs() / scale).max()) + 2**-22


def test_engine_packs_where_it_solved_and_the_pack_equals_the_host_pack() -> None:
    from gptq_cli.format.config import QuantConfig
    from gptq_cli.quantization.engine import _solve

    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 40, bias=False).requires_grad_(False)
    X = torch.randn(256, 64, generator=gen)
    H, n = solver.accumulate_hessian(None, 0, X)
    quant = QuantConfig(bits=4, group_size=32, desc_act=True, checkpoint_format="gptq_v2")
    W = linear.weight.clone()  # _solve puts the dequantized weight in its place
    [result] = _solve(["proj"], [linear], H, n, quant, "layers.0.", torch.float32)
    assert all(t.device.type == "cpu" for t in result.tensors.values())
    # What the host packed before: the codes themselves (solved again, identically) moved to the CPU
    # first.
    qw = solver.quantize_weight(W, H, bits=4, group_size=32, desc_act=True)
    assert torch.equal(result.tensors["qweight"], pack_qweight(qw.codes.t().cpu(), 4))
    assert torch.equal(result.tensors["qzeros"], pack_qzeros(qw.zeros.cpu(), 4, "gptq_v2"))


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cuda_pack_is_the_host_pack_bit_for_bit(bits) -> None:
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (300, 4096), generator=gen, dtype=torch.int32)
    zeros = torch.randint(1, 2**bits, (3, 4096), generator=gen, dtype=torch.int32)
    qw = QuantizedWeight(
        codes,
        torch.ones(3, 4096, dtype=torch.float16),
        zeros,
        torch.arange(300, dtype=torch.int32) // 128,
        bits,
        128,
    )
    host, device = qw.to_tensors("gptq"), qw.to("cuda").to_tensors("gptq")
    assert all(torch.equal(device[k].cpu(), host[k]) for k in host)


def test_auto_dtype_is_the_stored_dtype_on_a_gpu() -> None:
    cuda = torch.device("cuda")
    for stored in (torch.float16, torch.bfloat16, torch.float32):
        assert modelio.resolve_dtype("auto", cuda, stored) == stored
    # --dtype overrides
    assert modelio.resolve_dtype("float16", cuda, torch.bfloat16) == torch.float16
    cpu = modelio.resolve_dtype("auto", torch.device("cpu"), torch.bfloat16)
    assert cpu == (torch.bfloat16 if modelio.cpu_has_fast_bf16() else torch.float32)


def test_recorded_inputs_on_a_gpu_are_capped(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (139 << 30, 141 << 30))
    cuda = torch.device("cuda")
    down_proj_inputs = 128 * 2048 * 11008 * 2  # a 7B's at 128 x 2048 in fp16: 5.4 GiB
    assert not calibration.fits_in_memory(down_proj_inputs, cuda)
    # a small calibration set: 32 MiB
    assert calibration.fits_in_memory(8 * 512 * 4096 * 2, cuda)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 141 << 30))
    # and never more than a share of what is free
    assert not calibration.fits_in_memory(512 << 20, cuda)
