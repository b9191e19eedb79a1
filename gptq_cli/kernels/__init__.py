"""Kernel dispatch: the CUDA extension (csrc/) when it is loaded and the tensors are on CUDA, else
the torch twins.

- `gptq_block(...)`: one block of GPTQ's column loop in one CUDA launch,
  solver.quantize_column_block's contract (docs/DESIGN.md) for CUDA float32 blocks; the engine
  passes it to the solver as column_block_fn where the extension runs
  (engine.column_block_function), the solver's own loop elsewhere. Nothing here imports the solver.
- `gemv_4bit(x, qweight, scales, qzeros, g_idx, checkpoint_format, layout=None)`: x @ Wᵀ for a 4-bit
  GPTQ linear, any batch: the GEMV kernel for 1..8 rows of fp16/bf16 activations, else the
  dequantize kernel and one matmul; `layout` (from `layout_4bit`, computed once per layer by
  QuantLinear) saves recomputing the kernels' layout (for act-order, a permutation of qweight's
  rows) on every call.
- `dequantize_4bit_kernel_order(layout, scales, qzeros, checkpoint_format, dtype)`: the weight in
  kernel order.
- `backend_name(device)`: "cuda-ext" or "torch", which of the two runs for tensors on that device.
- `matmul_tf32(allowed)`: CUDA float32 matmuls with TF32 tensor cores allowed or not, within a
  `with`.
- `initialize_cpu_math()`: MKL's vector math initialised in the calling thread, before a model runs
  (why: there).

A GEMV or dequantize call the kernels cannot take (a shape, dtype or batch size outside their
limits) goes to the twin, which computes the same thing, so callers never need to check.

May import: format, errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from gptq_cli.kernels.extension import extension_loaded
from gptq_cli.kernels.gemv_torch import Layout4bit, dequantize_packed, gemv_4bit_torch, layout_4bit

MAX_BLOCK_COLUMNS = 128  # csrc/kernels.h kMaxBlockColumns
GEMV_MAX_BATCH = 8  # csrc/kernels.h kGemvMaxBatch
ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}  # v1 stores zero - 1


@contextmanager
def matmul_tf32(allowed: bool) -> Iterator[None]:
    """CUDA float32 matmuls with TF32 tensor cores allowed or not; the previous setting comes
    back."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def initialize_cpu_math() -> None:
    """Make MKL's vector math library (VML) initialise itself in this thread, once, before any model
    runs.

    torch computes float cos, sin, exp, ... of CPU tensors through VML, split across its threads
    from 2048 elements on. When the first VML call of a process runs in two threads at once, one
    thread sometimes gets values up to 1.5e-4 off (a race in VML's lazy initialisation): 5 of 150
    fresh processes on the 2-core Xeon (scripts/repro_vml_first_call.py,
    bench/vml_first_call_*.json; 7 of 100 in a hand-run loop). In a quantize run that call is the
    rotary embedding's cos of the first calibration batch, so layer 0's o_proj Hessian and
    everything after it changed now and then (issue 29's rare nondeterminism). One call small
    enough to stay in this thread settles it (0 of 150)."""
    torch.ones(256).exp()


def backend_name(device: torch.device | str) -> str:
    """ "cuda-ext" when tensors on `device` run the CUDA extension, else "torch"."""
    return "cuda-ext" if torch.device(device).type == "cuda" and extension_loaded() else "torch"


def gptq_block(
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
    """solver.quantize_column_block fused into one CUDA launch (same arguments, same results);
    ValueError for tensors the kernel does not take."""
    fits = (
        W.dim() == 2
        and 1 <= W.shape[1] <= MAX_BLOCK_COLUMNS
        and all(t.dtype == torch.float32 for t in (W, Hinv, scales, zeros))
        and all(t.is_contiguous() for t in (W, scales, zeros))
    )
    if not fits or backend_name(W.device) != "cuda-ext":
        raise ValueError(
            f"gptq_block takes contiguous float32 blocks of at most {MAX_BLOCK_COLUMNS} columns "
            f"on a GPU with the CUDA extension (got {tuple(W.shape)} {W.dtype} on {W.device}); "
            f"elsewhere use solver.quantize_column_block"
        )
    return torch.ops.gptq_cli.gptq_block(
        W,
        Hinv,
        scales,
        zeros,
        group_of_col.to(torch.int64).contiguous(),
        new_group.to(torch.bool).contiguous(),
        bits,
        sym,
        mse,
        group_size,
    )


_ACT = {torch.float16: 0, torch.bfloat16: 1}  # csrc/kernels.h Act


def _layout_fits(layout: Layout4bit | None, x2d: Tensor, scales: Tensor, qzeros: Tensor) -> bool:
    tensors = (x2d, layout.qweight, scales, qzeros) if layout is not None else ()
    return (
        layout is not None
        and x2d.dtype in _ACT
        and scales.dtype == torch.float16
        and qzeros.dtype == torch.int32
        and all(t.is_contiguous() for t in tensors)
        and all(t.data_ptr() % 16 == 0 for t in (x2d, layout.qweight))
        and (layout.perm is None or layout.perm.data_ptr() % 16 == 0)
        and scales.data_ptr() % 8 == 0
    )


def gemv_4bit(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    qzeros: Tensor,
    g_idx: Tensor,
    checkpoint_format: str = "gptq",
    layout: Layout4bit | None = None,
) -> Tensor:
    """x [..., K] @ Wᵀ -> [..., N] for a 4-bit GPTQ linear (qweight [K/8, N], scales [G, N],
    qzeros [G, N/8], g_idx [K]); checkpoint_format "gptq" (qzeros hold zero - 1) or "gptq_v2".
    Output in x's dtype. With `layout` (layout_4bit's), its qweight and perm are what is
    multiplied: `qweight` and `g_idx` are then not read, so they may be either the checkpoint's
    or already in kernel order."""
    if checkpoint_format not in ZERO_OFFSET:
        raise ValueError(
            f"checkpoint_format must be one of {tuple(ZERO_OFFSET)}, got {checkpoint_format!r}"
        )
    x2d = x.reshape(-1, x.shape[-1])
    if backend_name(x.device) == "cuda-ext":
        layout = layout if layout is not None else layout_4bit(qweight, g_idx)
        x2d = x2d.contiguous()
        if _layout_fits(layout, x2d, scales, qzeros):
            args = (
                layout.qweight,
                scales,
                qzeros,
                layout.group_size,
                ZERO_OFFSET[checkpoint_format],
            )
            if x2d.shape[0] <= GEMV_MAX_BATCH:
                out = torch.ops.gptq_cli.gemv_4bit(x2d, *args, layout.perm)
            else:  # prefill: one dequantization, one matmul (tensor cores)
                weight = torch.ops.gptq_cli.dequantize_4bit(*args, _ACT[x2d.dtype])
                out = (x2d if layout.perm is None else x2d[:, layout.perm.long()]) @ weight
            return out.reshape(*x.shape[:-1], qweight.shape[1])
    # the twin on the kernel order: input gathered alike
    if layout is not None and layout.perm is not None:
        return gemv_4bit_torch(
            x.index_select(-1, layout.perm.long()),
            layout.qweight,
            scales,
            qzeros,
            layout.group_index(),
            checkpoint_format,
        )
    return gemv_4bit_torch(x, qweight, scales, qzeros, g_idx, checkpoint_format)


def dequantize_4bit_kernel_order(
    layout: Layout4bit, scales: Tensor, qzeros: Tensor, checkpoint_format: str, dtype: torch.dtype
) -> Tensor:
    """W [K, N] in `dtype` with its rows in kernel order (the CUDA kernel on CUDA fp16/bf16, else
    the twin)."""
    if backend_name(scales.device) == "cuda-ext" and dtype in _ACT:
        return torch.ops.gptq_cli.dequantize_4bit(
            layout.qweight,
            scales,
            qzeros,
            layout.group_size,
            ZERO_OFFSET[checkpoint_format],
            _ACT[dtype],
        )
    return dequantize_packed(
        layout.qweight, scales, qzeros, layout.group_index(), checkpoint_format, dtype
    )
