"""QuantLinear against the dequantization formula computed directly from codes/scales/zeros (no
packing): every bit width, v1 and v2 zeros, act-order g_idx, K not a multiple of the group size,
input dtypes."""

from __future__ import annotations

import pytest
import torch

from gptq_cli.model.quant_linear import QuantLinear
from tests.tiny_models import random_quantized_weight

CASES = [
    (bits, fmt, act_order)
    for bits in (2, 3, 4, 8)
    for fmt in ("gptq", "gptq_v2")
    for act_order in (False, True)
]


def reference(x: torch.Tensor, qw, bias=None) -> torch.Tensor:
    """x @ W.T + b in float64, W from QuantizedWeight's own formula on the unpacked values."""
    out = x.double() @ qw.dequantize(torch.float64).t()
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("bits,fmt,act_order", CASES)
def test_forward_matches_reference(bits, fmt, act_order):
    # K = 200 is neither a multiple of the group size (64) nor of 32; N = 48 is not a multiple of 32
    # either.
    qw = random_quantized_weight(
        48, 200, bits=bits, group_size=64, act_order=act_order, sym=fmt == "gptq", seed=bits
    )
    bias = torch.randn(48, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    module = QuantLinear.from_quantized(qw, bias=bias, checkpoint_format=fmt)
    assert (module.bits, module.group_size, module.in_features, module.out_features) == (
        bits,
        64,
        200,
        48,
    )
    assert module.checkpoint_format == fmt

    assert torch.equal(module.dequantize_weight(torch.float32), qw.dequantize(torch.float32))
    x = torch.randn(3, 5, 200, generator=torch.Generator().manual_seed(2))
    out = module(x)
    assert out.shape == (3, 5, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(x, qw, bias), rtol=1e-5, atol=1e-6)


def test_asymmetric_v1_and_v2_give_the_same_weights():
    qw = random_quantized_weight(40, 96, bits=4, group_size=32, sym=False, v1_storable=True, seed=5)
    v1 = QuantLinear.from_quantized(qw, checkpoint_format="gptq")
    v2 = QuantLinear.from_quantized(qw, checkpoint_format="gptq_v2")
    assert not torch.equal(v1.qzeros, v2.qzeros)  # stored differently (zero - 1 vs zero) ...
    assert torch.equal(v1.dequantize_weight(), v2.dequantize_weight())  # ... same meaning


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_has_the_input_dtype(dtype):
    qw = random_quantized_weight(64, 128, bits=4, group_size=32, act_order=True, seed=3)
    module = QuantLinear.from_quantized(qw)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(4))
    out = module(x.to(dtype))
    assert out.dtype == dtype
    expected = reference(x.to(dtype), qw)
    torch.testing.assert_close(
        out.double(), expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max())
    )


def test_per_channel_group_size():
    qw = random_quantized_weight(24, 72, bits=3, group_size=-1, seed=6)
    module = QuantLinear.from_quantized(qw)
    assert module.scales.shape == (1, 24) and int(module.g_idx.max()) == 0
    x = torch.randn(2, 72, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(module(x).double(), reference(x, qw), rtol=1e-5, atol=1e-6)


def test_bf16_scales_are_used_as_stored():
    qw = random_quantized_weight(32, 64, bits=4, group_size=32, seed=8)
    packed = qw.to_tensors("gptq")
    packed["scales"] = qw.scales.to(torch.bfloat16)
    module = QuantLinear(64, 32, 4, 32, scales_dtype=torch.bfloat16)
    module.load_packed(packed)
    assert module.scales.dtype == torch.bfloat16
    qw.scales = packed["scales"]
    assert torch.equal(module.dequantize_weight(torch.float32), qw.dequantize(torch.float32))


def test_state_dict_is_the_checkpoint_layout_and_forward_caches_nothing():
    qw = random_quantized_weight(16, 64, bits=4, group_size=32, seed=9)
    module = QuantLinear.from_quantized(qw, bias=torch.zeros(16, dtype=torch.float16))
    expected = {k: v.clone() for k, v in qw.to_tensors("gptq").items()}
    state = module.state_dict()
    assert sorted(state) == ["bias", "g_idx", "qweight", "qzeros", "scales"]
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    attributes = set(vars(module))
    module(torch.randn(2, 64))
    assert set(vars(module)) == attributes and sorted(module.state_dict()) == sorted(state)


def test_wrong_shapes_are_refused():
    qw = random_quantized_weight(16, 64, bits=4, group_size=32, seed=10)
    module = QuantLinear(64, 16, 4, 32)
    packed = qw.to_tensors("gptq")
    packed["qweight"] = packed["qweight"][:-1]
    with pytest.raises(ValueError, match="qweight has shape"):
        module.load_packed(packed)


@pytest.mark.cuda
@pytest.mark.parametrize("bits,fmt,act_order", [(4, "gptq", True), (3, "gptq_v2", False)])
def test_cuda_forward_matches_cpu(bits, fmt, act_order):
    qw = random_quantized_weight(
        256, 320, bits=bits, group_size=128, act_order=act_order, sym=fmt == "gptq"
    )
    module = QuantLinear.from_quantized(qw, checkpoint_format=fmt)
    x = torch.randn(8, 320, generator=torch.Generator().manual_seed(11))
    cpu = module(x)
    gpu = module.to("cuda")(x.to("cuda"))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
    half = module(x.to("cuda", torch.float16))
    assert half.dtype == torch.float16
    torch.testing.assert_close(
        half.float().cpu(), cpu, rtol=2e-2, atol=2e-2 * float(cpu.abs().max())
    )
