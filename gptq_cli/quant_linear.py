"""QuantLinear: an nn.Module that computes a linear layer straight from GPTQ-packed weights (SPEC §2).

It holds the checkpoint tensors as buffers under their checkpoint names (qweight, qzeros, scales, g_idx,
bias), so a model's state_dict is a GPTQ checkpoint. The forward pass dequantizes and multiplies in torch on
any device, in the dtype of the input, caching nothing: memory stays at the packed size between calls.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gptq_cli.format.config import FORMATS
from gptq_cli.format.pack import SUPPORTED_BITS, packed_len, unpack_qweight, unpack_qzeros
from gptq_cli.format.quantized import QuantizedWeight
from gptq_cli.kernels import GEMV_MAX_BATCH, gemv_4bit


class QuantLinear(nn.Module):
    """y = x @ W.T + bias with W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, *, bias: bool = False,
                 checkpoint_format: str = "gptq", scales_dtype: torch.dtype = torch.float16,
                 bias_dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
        if checkpoint_format not in FORMATS:
            raise ValueError(f"checkpoint_format must be one of {FORMATS}, got {checkpoint_format!r}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.checkpoint_format = bits, group_size, checkpoint_format
        group = in_features if group_size == -1 else group_size
        groups = math.ceil(in_features / group)
        self.register_buffer("qweight", torch.zeros(packed_len(in_features, bits), out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, packed_len(out_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=scales_dtype))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32) // group)
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype) if bias else None)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       checkpoint_format: str = "gptq") -> "QuantLinear":
        """A QuantLinear holding exactly the tensors a checkpoint of `qw` in `checkpoint_format` stores."""
        out_features, in_features = qw.codes.shape
        module = cls(in_features, out_features, qw.bits, qw.group_size, bias=bias is not None,
                     checkpoint_format=checkpoint_format, scales_dtype=qw.scales.dtype,
                     bias_dtype=bias.dtype if bias is not None else torch.float16)
        module.load_packed(qw.to_tensors(checkpoint_format), bias=bias)
        return module

    def load_packed(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> None:
        """Copy checkpoint tensors (qweight, qzeros, scales, g_idx; names without the module prefix) into the
        buffers. Shapes must match this module's; scales and bias keep the dtype they come in."""
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            self._set_buffer(name, tensors[name])
        if (bias is None) != (self.bias is None):
            raise ValueError(f"bias {'given' if bias is not None else 'missing'} for a QuantLinear "
                             f"{'without' if self.bias is None else 'with'} bias")
        if bias is not None:
            self._set_buffer("bias", bias)

    def _set_buffer(self, name: str, value: torch.Tensor) -> None:
        current = getattr(self, name)
        if tuple(value.shape) != tuple(current.shape):
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(current.shape)} for "
                             f"in_features={self.in_features}, out_features={self.out_features}, "
                             f"bits={self.bits}, group_size={self.group_size}")
        keep_dtype = name in ("scales", "bias")
        setattr(self, name, value.to(device=current.device, dtype=None if keep_dtype else current.dtype).clone())

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full-precision weight [out_features, in_features], in `dtype` (default: the scales' dtype)."""
        codes = unpack_qweight(self.qweight, self.bits, self.in_features)                  # [K, N]
        zeros = unpack_qzeros(self.qzeros, self.bits, self.out_features, self.checkpoint_format)  # [G, N]
        g = self.g_idx.long()
        weight = self.scales.float()[g] * (codes - zeros[g]).float()                        # [K, N]
        return weight.t().to(dtype or self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized_matmul(x)

    def quantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel seam: 4-bit with a few tokens on CUDA goes to gptq_cli.kernels' GEMV (the fused kernel
        when the extension is built); everything else dequantizes in float32 and multiplies in x's dtype."""
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self.bits == 4 and x.is_cuda and x.numel() // self.in_features <= GEMV_MAX_BATCH:
            out = gemv_4bit(x, self.qweight, self.scales, self.qzeros, self.g_idx, self.checkpoint_format)
            return out + bias if bias is not None else out
        return F.linear(x, self.dequantize_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, "
                f"checkpoint_format={self.checkpoint_format}")
