"""The torch twin of the CUDA 4-bit GEMV (csrc/gemv_4bit.cu): dequantize the packed weight, then one matmul.

It is what CPUs run and the reference the kernel is tested against. Arithmetic as in the kernel: each weight
is scales[g, n] * (q - z) in float32 and the products are summed in float32; only the order of the sum differs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from gptq_cli.format.pack import unpack_qweight, unpack_qzeros


def dequantize_4bit(qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor,
                    checkpoint_format: str = "gptq") -> Tensor:
    """float32 weight [K, N] (input-major, ready for x @ W) of a 4-bit GPTQ linear; K = len(g_idx)."""
    in_features, out_features = g_idx.numel(), qweight.shape[1]
    codes = unpack_qweight(qweight, 4, in_features).to(torch.float32)                  # [K, N]
    zeros = unpack_qzeros(qzeros, 4, out_features, checkpoint_format).to(torch.float32)  # [G, N]
    groups = g_idx.to(device=qweight.device, dtype=torch.long)
    return scales.to(torch.float32)[groups] * (codes - zeros[groups])


def gemv_4bit_torch(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor,
                    checkpoint_format: str = "gptq") -> Tensor:
    """x [..., K] @ W -> [..., N] in x's dtype, accumulated in float32 (any batch size, any device)."""
    weight = dequantize_4bit(qweight, scales, qzeros, g_idx, checkpoint_format)
    out = x.reshape(-1, x.shape[-1]).to(torch.float32) @ weight
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[1])
