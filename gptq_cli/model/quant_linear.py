"""QuantLinear: an nn.Module that computes a linear layer straight from GPTQ-packed weights (SPEC
§2).

It holds the checkpoint tensors as buffers under their checkpoint names (qweight, qzeros, scales,
g_idx, bias), so a model's state_dict is a GPTQ checkpoint. 4-bit layers go through gptq_cli.kernels
(the CUDA GEMV or dequantize-then-matmul kernels when built, else the torch twin, which dequantizes
a chunk of rows at a time); other widths dequantize and multiply in torch, in the dtype of the
input. Memory stays at the packed size between calls. The one thing kept for the kernels: on the
first CUDA call of an act-order layer, qweight's rows are permuted in place into the kernels' layout
(groups contiguous, `perm` remembers the order), as exllama does; state_dict() still returns the
checkpoint's row order, so the files are unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gptq_cli.format.bitpack import pack_qweight, packed_len, unpack_qweight
from gptq_cli.format.config import FORMATS, check_bits
from gptq_cli.format.quantized import QuantizedWeight
from gptq_cli.kernels import backend_name, gemv_4bit
from gptq_cli.kernels.gemv_torch import Layout4bit, dequantize_packed, layout_4bit


class QuantLinear(nn.Module):
    """y = x @ W.T + bias with W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        *,
        bias: bool = False,
        checkpoint_format: str = "gptq",
        scales_dtype: torch.dtype = torch.float16,
        bias_dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        check_bits(bits)
        if checkpoint_format not in FORMATS:
            raise ValueError(
                f"checkpoint_format must be one of {FORMATS}, got {checkpoint_format!r}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.checkpoint_format = bits, group_size, checkpoint_format
        group = in_features if group_size == -1 else group_size
        groups = math.ceil(in_features / group)
        self.register_buffer(
            "qweight", torch.zeros(packed_len(in_features, bits), out_features, dtype=torch.int32)
        )
        self.register_buffer(
            "qzeros", torch.zeros(groups, packed_len(out_features, bits), dtype=torch.int32)
        )
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=scales_dtype))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32) // group)
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype) if bias else None)
        # The kernels' layout: perm [K] once qweight's rows are permuted (act-order), and its group
        # size (0: not looked at yet, -1: the kernels cannot take this layer).
        self.register_buffer("perm", None, persistent=False)
        self.kernel_group_size = 0

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, checkpoint_format: str = "gptq"
    ) -> QuantLinear:
        """A QuantLinear holding exactly the tensors a checkpoint of `qw` in `checkpoint_format`
        stores."""
        out_features, in_features = qw.codes.shape
        module = cls(
            in_features,
            out_features,
            qw.bits,
            qw.group_size,
            bias=bias is not None,
            checkpoint_format=checkpoint_format,
            scales_dtype=qw.scales.dtype,
            bias_dtype=bias.dtype if bias is not None else torch.float16,
        )
        module.load_packed(qw.to_tensors(checkpoint_format), bias=bias)
        return module

    def load_packed(
        self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None
    ) -> None:
        """Copy checkpoint tensors (qweight, qzeros, scales, g_idx; names without the module
        prefix) into the buffers. Shapes must match this module's; scales and bias keep the dtype
        they come in."""
        self._forget_layout()
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            self._set_buffer(name, tensors[name])
        if (bias is None) != (self.bias is None):
            raise ValueError(
                f"bias {'given' if bias is not None else 'missing'} for a QuantLinear "
                f"{'without' if self.bias is None else 'with'} bias"
            )
        if bias is not None:
            self._set_buffer("bias", bias)

    def _set_buffer(self, name: str, value: torch.Tensor) -> None:
        current = getattr(self, name)
        if tuple(value.shape) != tuple(current.shape):
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}, expected {tuple(current.shape)} for "
                f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}"
            )
        keep_dtype = name in ("scales", "bias")
        setattr(
            self,
            name,
            value.to(device=current.device, dtype=None if keep_dtype else current.dtype).clone(),
        )

    def _forget_layout(self) -> None:
        self.perm, self.kernel_group_size = None, 0

    def checkpoint_qweight(self) -> torch.Tensor:
        """qweight in the checkpoint's row order (undoing the kernels' permutation, if any)."""
        if self.perm is None:
            return self.qweight
        codes = unpack_qweight(self.qweight, 4, self.in_features)
        return pack_qweight(torch.empty_like(codes).index_copy_(0, self.perm.long(), codes), 4)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.perm is not None:
            destination[prefix + "qweight"] = self.checkpoint_qweight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self._forget_layout()  # the incoming qweight is in checkpoint order
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def kernel_layout(self) -> Layout4bit | None:
        """The kernels' layout of this 4-bit layer (None if they cannot take it), made once: for
        act-order, qweight's rows are permuted in place."""
        if self.kernel_group_size == 0:
            layout = layout_4bit(self.qweight, self.g_idx) if self.bits == 4 else None
            self.kernel_group_size = layout.group_size if layout is not None else -1
            if layout is not None and layout.perm is not None:
                self.qweight, self.perm = layout.qweight, layout.perm
        return (
            Layout4bit(self.qweight, self.perm, self.kernel_group_size)
            if self.kernel_group_size > 0
            else None
        )

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full-precision weight [out_features, in_features], in `dtype` (default: the
        scales' dtype)."""
        return dequantize_packed(
            self.checkpoint_qweight(),
            self.scales,
            self.qzeros,
            self.g_idx,
            self.checkpoint_format,
            dtype or self.scales.dtype,
            self.bits,
        ).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized_matmul(x)

    def quantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel seam: 4-bit goes to gptq_cli.kernels (CUDA kernels when built, else the
        torch twin); other widths dequantize in float32 and multiply in x's dtype."""
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self.bits == 4:
            layout = (
                self.kernel_layout()
                if self.perm is not None or backend_name(x.device) == "cuda-ext"
                else None
            )
            out = gemv_4bit(
                x,
                self.qweight,
                self.scales,
                self.qzeros,
                self.g_idx,
                self.checkpoint_format,
                layout,
            )
            return out + bias if bias is not None else out
        return F.linear(x, self.dequantize_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, "
            f"checkpoint_format={self.checkpoint_format}"
        )
