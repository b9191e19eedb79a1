"""Kernel dispatch: the CUDA extension (csrc/) when it is loaded and the tensors are on CUDA, else the torch twins.

- `gptq_block(...)`: one block of GPTQ's column loop, solver.quantize_block's contract (docs/DESIGN.md);
  pass it as `solver.quantize_weight(..., block_fn=gptq_block)`.
- `gemv_4bit(x, qweight, scales, qzeros, g_idx, checkpoint_format)`: x @ Wᵀ for a 4-bit GPTQ linear.
- `backend_name(device)`: "cuda-ext" or "torch", which of the two runs for tensors on that device.

A call the kernel cannot take (a shape, dtype or batch size outside its limits) goes to the twin, which
computes the same thing, so callers never need to check.
"""
from __future__ import annotations

import torch
from torch import Tensor

from gptq_cli.kernels.extension import extension_loaded
from gptq_cli.kernels.gemv_torch import gemv_4bit_torch

MAX_BLOCK_COLUMNS = 128   # csrc/kernels.h kMaxBlockColumns
GEMV_MAX_BATCH = 8        # csrc/kernels.h kGemvMaxBatch
ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}   # v1 stores zero - 1


def backend_name(device: torch.device | str) -> str:
    """"cuda-ext" when tensors on `device` run the CUDA extension, else "torch"."""
    return "cuda-ext" if torch.device(device).type == "cuda" and extension_loaded() else "torch"


def gptq_block(W: Tensor, Hinv: Tensor, scales: Tensor, zeros: Tensor, group_of_col: Tensor, new_group: Tensor,
               *, bits: int, sym: bool, mse: bool, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """solver.quantize_block, fused into one CUDA launch when possible (same arguments, same results)."""
    fits = (W.dim() == 2 and 1 <= W.shape[1] <= MAX_BLOCK_COLUMNS
            and all(t.dtype == torch.float32 for t in (W, Hinv, scales, zeros))
            and all(t.is_contiguous() for t in (W, scales, zeros)))
    if fits and backend_name(W.device) == "cuda-ext":
        return torch.ops.gptq_cli.gptq_block(W, Hinv, scales, zeros, group_of_col.to(torch.int64).contiguous(),
                                             new_group.to(torch.bool).contiguous(), bits, sym, mse, group_size)
    from gptq_cli.solver import quantize_block   # lazily: the solver may itself import this module

    return quantize_block(W, Hinv, scales, zeros, group_of_col, new_group, bits=bits, sym=sym, mse=mse,
                          group_size=group_size)


def _gemv_fits(x2d: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor) -> bool:
    M, K = x2d.shape
    N = qweight.shape[1]
    return (1 <= M <= GEMV_MAX_BATCH and K % 8 == 0 and N % 4 == 0 and qweight.shape[0] == K // 8
            and x2d.dtype == torch.float16 and scales.dtype == torch.float16
            and qweight.dtype == torch.int32 and qzeros.dtype == torch.int32 and g_idx.dtype == torch.int32
            and all(t.is_contiguous() for t in (x2d, qweight, scales, qzeros, g_idx))
            and qweight.data_ptr() % 16 == 0 and scales.data_ptr() % 8 == 0)


def gemv_4bit(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor,
              checkpoint_format: str = "gptq") -> Tensor:
    """x [..., K] @ Wᵀ -> [..., N] for a 4-bit GPTQ linear (qweight [K/8, N], scales [G, N], qzeros [G, N/8],
    g_idx [K]); checkpoint_format "gptq" (qzeros hold zero - 1) or "gptq_v2". Output in x's dtype."""
    if checkpoint_format not in ZERO_OFFSET:
        raise ValueError(f"checkpoint_format must be one of {tuple(ZERO_OFFSET)}, got {checkpoint_format!r}")
    x2d = x.reshape(-1, x.shape[-1])
    if backend_name(x.device) == "cuda-ext" and _gemv_fits(x2d, qweight, scales, qzeros, g_idx):
        out = torch.ops.gptq_cli.gemv_4bit(x2d, qweight, scales, qzeros, g_idx, ZERO_OFFSET[checkpoint_format])
        return out.reshape(*x.shape[:-1], qweight.shape[1])
    return gemv_4bit_torch(x, qweight, scales, qzeros, g_idx, checkpoint_format)
