"""The torch twins of the CUDA 4-bit kernels (csrc/gemv_4bit.cu), and the kernels' layout of a 4-bit
layer.

The twins are what CPUs run and the references the kernels are tested against; dequantize_packed, at
any width, is also the one dequantization of packed tensors (QuantLinear's for widths the kernels do
not take). Weights are computed as the kernels compute them: s·(q − z) exactly, rounded once to fp16
when the activations are fp16 (the GEMV's HMUL2), kept exact in fp32 otherwise (its bf16 path
multiplies in fp32). Products are summed in fp32; only the order of the sum differs from the kernel.
Nothing of size K×N in fp32 is built per call: the weight is dequantized CHUNK_ROWS input rows at a
time (a multiple of every width's packing chunk, at most 32 values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gptq_cli.format.bitpack import pack_qweight, packed_len, unpack_qweight, unpack_qzeros

CHUNK_ROWS = 1024  # rows of K dequantized at a time: 1024 × N floats of scratch
# values of K per step of the GEMV (csrc/gemv_4bit.cu kUnroll · 8): groups must align to it
KERNEL_STEP = 32


@dataclass(frozen=True)
class Layout4bit:
    """A 4-bit layer as the CUDA kernels read it: qweight's rows in kernel order, where every
    group's rows are contiguous and row k belongs to group k // group_size."""

    qweight: Tensor  # [K/8, N] int32
    # int32 [K]: the input column that kernel-order row k holds (None: the identity)
    perm: Tensor | None
    group_size: int  # K when the layer has one group

    def group_index(self) -> Tensor:
        """g_idx of the rows in kernel order: row k is in group k // group_size."""
        K = self.qweight.shape[0] * 8
        return torch.arange(K, device=self.qweight.device, dtype=torch.int32) // self.group_size


def layout_4bit(qweight: Tensor, g_idx: Tensor) -> Layout4bit | None:
    """The kernels' layout of a layer, or None when they cannot take it (groups of unequal sizes,
    a group size that is not a multiple of 32, K % 8 or N % 4 not 0). With act-order the rows are
    permuted here, once."""
    K, N = g_idx.numel(), qweight.shape[1]
    if K < 8 or K % 8 or N < 4 or N % 4 or qweight.shape[0] != K // 8:
        return None
    g = g_idx.to(torch.int64)
    order = torch.argsort(g, stable=True)
    counts = torch.bincount(g)
    group_size = int(counts[0])
    ordered = torch.arange(K, device=g.device) // group_size
    if not (group_size == K or group_size % KERNEL_STEP == 0) or not torch.equal(g[order], ordered):
        return None
    if torch.equal(order, torch.arange(K, device=g.device)):
        return Layout4bit(qweight, None, group_size)
    codes = unpack_qweight(qweight, 4, K)[order]
    return Layout4bit(pack_qweight(codes, 4), order.to(torch.int32).contiguous(), group_size)


def _chunk_weight(
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    g_idx: Tensor,
    k0: int,
    k1: int,
    dtype: torch.dtype,
    bits: int = 4,
) -> Tensor:
    """W rows k0..k1 [k1 - k0, N] in `dtype`: s·(q − z) computed exactly in fp32, rounded once.
    k0 and k1 are multiples of the packing chunk (k1 may be K)."""
    codes = unpack_qweight(qweight[packed_len(k0, bits) : packed_len(k1, bits)], bits, k1 - k0)
    groups = g_idx[k0:k1].to(device=qweight.device, dtype=torch.long)
    weight = scales.to(torch.float32)[groups] * (codes - zeros[groups]).to(torch.float32)
    return weight.to(dtype)


def dequantize_packed(
    qweight: Tensor,
    scales: Tensor,
    qzeros: Tensor,
    g_idx: Tensor,
    checkpoint_format: str = "gptq",
    dtype: torch.dtype = torch.float32,
    bits: int = 4,
) -> Tensor:
    """The weight [K, N] (input-major, ready for x @ W) of a `bits`-bit GPTQ linear in `dtype`; K
    = len(g_idx). For 4 bits, bit for bit what the CUDA dequantize kernel writes (in kernel
    order) for fp16 and bf16."""
    K, N = g_idx.numel(), qweight.shape[1]
    zeros = unpack_qzeros(qzeros, bits, N, checkpoint_format)
    out = torch.empty(K, N, dtype=dtype, device=qweight.device)
    for k0 in range(0, K, CHUNK_ROWS):
        k1 = min(k0 + CHUNK_ROWS, K)
        out[k0:k1] = _chunk_weight(qweight, scales, zeros, g_idx, k0, k1, dtype, bits)
    return out


def gemv_4bit_torch(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    qzeros: Tensor,
    g_idx: Tensor,
    checkpoint_format: str = "gptq",
) -> Tensor:
    """x [..., K] @ W -> [..., N] in x's dtype, accumulated in float32 (any batch size, any
    device); fp16 activations meet fp16-rounded weights, as in the kernel."""
    K, N = g_idx.numel(), qweight.shape[1]
    zeros = unpack_qzeros(qzeros, 4, N, checkpoint_format)
    weight_dtype = torch.float16 if x.dtype == torch.float16 else torch.float32
    x2d = x.reshape(-1, K).to(torch.float32)
    out = torch.zeros(x2d.shape[0], N, dtype=torch.float32, device=x.device)
    for k0 in range(0, K, CHUNK_ROWS):
        k1 = min(k0 + CHUNK_ROWS, K)
        weight = _chunk_weight(qweight, scales, zeros, g_idx, k0, k1, weight_dtype).to(
            torch.float32
        )
        out.addmm_(x2d[:, k0:k1], weight)
    return out.to(x.dtype).reshape(*x.shape[:-1], N)
