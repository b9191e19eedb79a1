"""The GPTQ algorithm (Frantar et al., ICLR 2023) as pure tensor functions; SPEC §3 is the contract.

It follows IST-DASLab/gptq's gptq.py step by step (its quant.py is quantizer.py here, with two
deliberate choices of its own), with one more: a group's parameters come from its fully updated
weights. Block ends are moved so that a group that starts inside a block also ends in it (the
reference reads the block's columns as they were at the block start); with that, the lazy blocked
solver computes the same thing as the column-by-column algorithm. Errors are plain ValueErrors: what
they mean for a user is the engine's to say.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from gptq_cli.format.config import check_setting
from gptq_cli.format.quantized import QuantizedWeight
from gptq_cli.kernels import cpu_columns, cpu_gemm, matmul_tf32
from gptq_cli.quantization.gptaq import GPTAQ_ALPHA, gptaq_correction
from gptq_cli.quantization.hessian_inverse import (
    DAMP_STEP,
    IndefiniteHessian,
    NonFiniteHessian,
    inverse_hessian_factor,
)
from gptq_cli.quantization.quantizer import dequantize, find_params, quantize

# the solver's API; the damping step, the Hessian errors and matmul_tf32 are re-exported: the
# solver's callers meet them here
__all__ = [
    "DAMP_STEP",
    "ColumnBlock",
    "ColumnBlockFn",
    "GroupLayout",
    "HESSIAN_PANEL",
    "IndefiniteHessian",
    "NonFiniteHessian",
    "accumulate_hessian",
    "column_block_ranges",
    "complete_hessian",
    "group_aware_order",
    "hessian_panels",
    "matmul_tf32",
    "group_layout",
    "quantize_column_block",
    "quantize_weight",
    "single_thread_on_cpu",
]

ColumnBlockFn = Callable[..., tuple[Tensor, Tensor, Tensor]]


@contextmanager
def single_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """The column loop is hundreds of tiny ops per block: on a CPU, waking a second thread for
    each costs more than it saves (and is disastrous on a busy machine), so it runs on one."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


HESSIAN_PANEL = 512  # columns per panel of the Hessian's lower triangle (see hessian_panels)


def hessian_panels(K: int) -> list[tuple[int, int]]:
    """[start, end) of the column panels H is accumulated in: equal widths of at most
    HESSIAN_PANEL columns. Panel j computes H[start_j:, start_j:end_j], so P panels cost (P + 1)
    / 2P of the full XᵀX's products; narrower panels save more arithmetic but run the GEMM at a
    lower rate."""
    count = max(1, math.ceil(K / HESSIAN_PANEL))
    bounds = [round(j * K / count) for j in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def accumulate_hessian(
    H: Tensor | None, n: int, X: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, int]:
    """Fold activations X [..., K] into the running mean H = 2/n · Σ x xᵀ (float32, updated in
    place), the lower triangle only: each panel of hessian_panels from the diagonal down (about half
    the products of the whole XᵀX). complete_hessian mirrors it into the full matrix once, when the
    solve needs it.

    mask [...] (X's leading dims) marks the tokens to keep, e.g. the attention mask, so padding
    is excluded. Returns (H, new token count n). H is None on the first call; it lives on X's
    device then. fp16/bf16 activations lose nothing: their products are exact in float32 and the
    sums are float32 (SPEC §3), on a CPU through MKL's 16-bit-input, float32-output GEMM, or for
    bf16 on CPUs without AMX an AVX512-BF16 kernel that computes the lower triangle by 64-column
    tiles (kernels/cpu_gemm.py, cpu_xtx.py), on CUDA through TF32 tensor cores (TF32 keeps 11
    significant bits, as fp16 does; bf16 has 8). fp32 activations use fp32 (on a CPU MKL's SYRK,
    which computes the lower triangle itself, or on CPUs not made by Intel the kernel above)."""
    X = X.reshape(-1, X.shape[-1])
    if mask is not None:
        X = X[mask.reshape(-1).to(device=X.device, dtype=torch.bool)]
    K = X.shape[1]
    if H is None:
        H = torch.zeros(K, K, dtype=torch.float32, device=X.device)
    m = X.shape[0]
    if m == 0:
        return H, n
    alpha, beta = 2 / (n + m), n / (n + m)
    if X.device.type == H.device.type == "cpu" and cpu_gemm.available(X.dtype):
        X = X.contiguous()
        if cpu_gemm.lower_triangle(X.dtype):
            cpu_gemm.xtx_lower(X, H, alpha, beta)
        else:
            for start, end in hessian_panels(K):
                cpu_gemm.xtx_panel(X, H, start, end, alpha, beta)
        return H, n + m
    tensor_cores = X.dtype in (torch.float16, torch.bfloat16)
    X = X.to(device=H.device, dtype=torch.float32)
    with matmul_tf32(tensor_cores):
        for start, end in hessian_panels(K):
            H[start:, start:end].addmm_(X[:, start:].t(), X[:, start:end], beta=beta, alpha=alpha)
    return H, n + m


def complete_hessian(H: Tensor) -> Tensor:
    """The full symmetric H from accumulate_hessian's lower triangle, in place (and returned): a
    panel's strip at a time, so the temporaries stay a strip, not K×K. The result is exactly
    symmetric."""
    for start, end in hessian_panels(H.shape[0]):
        diagonal = H[start:end, start:end]
        diagonal.copy_(diagonal.tril() + diagonal.tril(-1).t())
        H[start:end, end:].copy_(H[end:, start:end].t())
    return H


def quantize_column_block(
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
    P: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ's inner loop over the B columns of one block; all N rows are independent (the CUDA
    kernel's seam; the full contract is in docs/DESIGN.md, "The solver's block step").

    W [N, B] float32 (solving order, earlier blocks' updates applied) is updated in place. Hinv [B,
    B]: the block's diagonal block of the upper Cholesky factor of H⁻¹. scales, zeros [N, Gtot]
    float32: group parameters; where new_group[c], column group_of_col[c] is written with
    find_params of W[:, c:c+group_size]. Per column c: q = quantize(w_c); err = (w_c - q) / Hinv[c,
    c]; W[:, c+1:] -= err ⊗ Hinv[c, c+1:]. Returns (codes int32 [N, B], Err float32 [N, B] = each
    column's err, losses [N] = Σ_c err² / 2); the caller applies the lazy update W[:, end:] -= Err @
    Hinv[block, end:]. GPTAQ (P [B, B], the block's diagonal block of gptaq_correction): each
    column's update also carries the value w_c it was quantized from, W[:, c+1:] -= err ⊗ Hinv[c,
    c+1:] - w_c ⊗ P[c, c+1:].

    The columns between two group starts run in C on a CPU (kernels/cpu_columns.py, the same
    bits), else in the torch loop below; a group's parameters are found in torch where it starts,
    from all rows at once."""
    maxq = 2**bits - 1
    codes = torch.empty_like(W)
    Err = torch.empty_like(W)
    threads = torch.get_num_threads()
    with single_thread_on_cpu(W.device):
        P = None if P is None else P.to(W.dtype).contiguous()
        if _runs_in_c(W, scales, zeros):
            Hinv, columns = (
                Hinv.contiguous(),
                partial(cpu_columns.run_columns, threads=threads, P=P),
            )
        else:
            columns = _ColumnsInTorch(W, Hinv, group_of_col, P)
        group_of = group_of_col.to(torch.int64).contiguous()
        starts = [c for c in new_group.nonzero().flatten().tolist() if c > 0]
        for c0, c1 in zip([0] + starts, starts + [W.shape[1]]):
            if new_group[c0]:
                g = int(group_of[c0])
                scales[:, g], zeros[:, g] = find_params(W[:, c0 : c0 + group_size], bits, sym, mse)
            columns(W, Hinv, scales, zeros, group_of, codes, Err, c0, c1, maxq)
        losses = Err.square().sum(dim=1) / 2  # (w - q)² / Hinv[c, c]² = err²
    return codes.to(torch.int32), Err, losses


def _runs_in_c(W: Tensor, scales: Tensor, zeros: Tensor) -> bool:
    """The C loop updates W, scales and zeros where they are: they must be contiguous float32 CPU
    tensors."""
    return (
        W.device.type == "cpu"
        and cpu_columns.available()
        and all(t.is_contiguous() and t.dtype == torch.float32 for t in (W, scales, zeros))
    )


class _ColumnsInTorch:
    """Columns [c0, c1) of a block, one after another, with torch ops (kernels/cpu_columns.py's
    twin)."""

    def __init__(
        self, W: Tensor, Hinv: Tensor, group_of_col: Tensor, P: Tensor | None = None
    ) -> None:
        self.P = P
        # Python scalars and column views keep the per-column work to a handful of tensor ops: on a
        # CPU the loop's cost is dispatch overhead, not arithmetic.
        self.diag, self.groups = Hinv.diagonal().tolist(), group_of_col.tolist()
        # err ⊗ Hinv[c, c+1:] of each column goes into the front of one buffer, contiguous, instead
        # of a fresh N×(B−c−1) tensor per column: fresh ones would be mapped and unmapped each time
        # (the allocator keeps large ones out of its heap, modelio.bound_allocator), which costs
        # more than the arithmetic
        self.update = torch.empty(W.numel(), dtype=W.dtype, device=W.device)

    def __call__(
        self,
        W: Tensor,
        Hinv: Tensor,
        scales: Tensor,
        zeros: Tensor,
        group_of_col: Tensor,
        codes: Tensor,
        Err: Tensor,
        c0: int,
        c1: int,
        maxq: int,
    ) -> None:
        N, B = W.shape
        for c in range(c0, c1):
            g = self.groups[c]
            w, scale, zero = W[:, c], scales[:, g], zeros[:, g]
            code = quantize(w, scale, zero, maxq)
            codes[:, c] = code
            err = torch.sub(w, dequantize(code, scale, zero), out=Err[:, c]).div_(self.diag[c])
            rest = B - c - 1
            update = torch.mul(
                err[:, None], Hinv[c, c + 1 :], out=self.update[: N * rest].view(N, rest)
            )
            # GPTAQ: the quantized-from value w, before W's columns after it change
            if self.P is not None:
                update -= w[:, None] * self.P[c, c + 1 :]
            W[:, c + 1 :] -= update


def column_block_ranges(
    columns: int, group_size: int, block_size: int, align_groups: bool
) -> list[tuple[int, int]]:
    """[start, end) of each lazy-update block. With align_groups, a block ends early at the start
    of a group that would not fit in it, so every group either starts at a block start or lies
    inside one block."""
    ranges, start = [], 0
    while start < columns:
        end = min(start + block_size, columns)
        last_group_start = (end - 1) // group_size * group_size
        if (
            align_groups
            and last_group_start > start
            and min(last_group_start + group_size, columns) > end
        ):
            end = last_group_start
        ranges.append((start, end))
        start = end
    return ranges


def group_aware_order(diag: Tensor, group_size: int) -> Tensor:
    """Group-aware act-order (GPTQModel's "GAR"): act-order's benefit without its scattered
    g_idx. Groups of consecutive columns stay whole, so g_idx stays k // g; the groups are solved
    in decreasing order of their largest Hessian diagonal entry and, inside each group, columns
    in decreasing diagonal order. Columns past the last whole group keep their places at the end.
    Stable sorts: ties keep a fixed order. Per channel (group_size = K) this is act-order itself,
    and costs loaders nothing: g_idx is all zeros either way."""
    K = diag.numel()
    whole = K // group_size
    arange = torch.arange(K, device=diag.device)
    if whole == 0:
        return arange
    values, within = torch.sort(
        diag[: whole * group_size].view(whole, group_size), dim=1, descending=True, stable=True
    )
    group_order = torch.argsort(values[:, 0], descending=True, stable=True)
    starts = (torch.arange(whole, device=diag.device) * group_size)[:, None]
    return torch.cat([(within + starts)[group_order].reshape(-1), arange[whole * group_size :]])


@dataclass(frozen=True)
class ColumnBlock:
    """One lazy-update block, positions [start, end): new_group [end - start] bool marks the
    groups whose parameters quantize_column_block finds; params_first lists (group, its
    positions) found at the block start."""

    start: int
    end: int
    new_group: Tensor
    params_first: list[tuple[int, slice | Tensor]]


@dataclass(frozen=True)
class GroupLayout:
    """Groups, worked out once: the group of each position (column in solving order: act-order
    makes groups of consecutive positions; static groups and group-aware order keep each column
    in its original group) and of each original column (g_idx), and where each group's parameters
    are found: a static group's from its original columns before any update (at the first block);
    any other's from its updated columns where it starts (in quantize_column_block when it lies
    in one block, at its block's start when it is wider)."""

    size: int  # columns per group (K when per channel)
    count: int
    of_position: Tensor  # int64 [K]
    g_idx: Tensor  # int64 [K]
    blocks: list[ColumnBlock]


def group_layout(
    K: int,
    g: int,
    perm: Tensor | None,
    desc_act: bool,
    static: bool,
    block_size: int,
    device: torch.device,
) -> GroupLayout:
    """The GroupLayout of K columns in groups of g, solved in the order `perm` (None: as they
    are)."""
    position = torch.arange(K, device=device)
    invperm = None if perm is None else torch.argsort(perm)
    of_position = (
        (position if perm is None else perm) // g if static or not desc_act else position // g
    )
    count = math.ceil(K / g)
    blocks = []
    for start, end in column_block_ranges(K, g, block_size, align_groups=not static):
        if static:  # groups of consecutive original columns
            new_group = torch.zeros(end - start, dtype=torch.bool, device=device)
            first = (
                [
                    (
                        j,
                        slice(j * g, (j + 1) * g)
                        if invperm is None
                        else invperm[j * g : (j + 1) * g],
                    )
                    for j in range(count)
                ]
                if start == 0
                else []
            )
        else:
            cols = torch.arange(start, end, device=device)
            new_group = (cols % g == 0) & ((cols + g).clamp(max=K) <= end)
            # at its block's start all its columns are final
            wide = start % g == 0 and min(start + g, K) > end
            first = [(int(of_position[start]), slice(start, start + g))] if wide else []
        blocks.append(ColumnBlock(start, end, new_group, first))
    g_idx = of_position if invperm is None else of_position[invperm]
    return GroupLayout(g, count, of_position, g_idx, blocks)


def quantize_weight(
    W: Tensor,
    H: Tensor,
    *,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    static_groups: bool = False,
    act_group_aware: bool = False,
    damp_percent: float = 0.01,
    mse: bool = False,
    block_size: int = 128,
    column_block_fn: ColumnBlockFn = quantize_column_block,
    dXXT: Tensor | None = None,
    alpha: float = GPTAQ_ALPHA,
) -> QuantizedWeight:
    """GPTQ-quantize W [N, K] with the Hessian H [K, K] of its inputs (SPEC §3): H -> solving
    order -> Hinv -> blocks. Inputs are not modified. Working set besides them: one K×K float32
    buffer (inverse_hessian_factor) and W's float32 copy, codes and one lazy-update product, each
    N×K. column_block_fn runs each block; it must honour quantize_column_block's contract (the
    fused CUDA kernel does). dXXT [K, K]: GPTAQ (gptaq_correction): the inputs' asymmetry ΔX X̃ᵀ,
    scaled as H; column_block_fn then gets P (quantize_column_block takes it; the CUDA kernel
    does not). One more K×K float32 buffer."""
    check_setting(bits, group_size, damp_percent)
    if block_size < 1:
        raise ValueError(f"block size must be at least 1, got {block_size}")
    N, K = W.shape
    if H.shape != (K, K):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight shape {(N, K)}")
    g = K if group_size == -1 else group_size
    with matmul_tf32(False):  # TF32 would cost ~3 decimal digits of the solver's float32 values
        # read only: the solver works in its own buffer
        H = H.to(device=W.device, dtype=torch.float32)
        dead = H.diagonal() == 0  # inputs that are always 0: their weights cannot matter
        diag = H.diagonal().masked_fill(dead, 1)
        perm = None  # the solving order
        if desc_act or act_group_aware:
            perm = (
                torch.argsort(diag, descending=True, stable=True)
                if desc_act
                else group_aware_order(diag, g)
            )
        # W in solving order, float32; permuted before widening, so the temporary is in W's own
        # dtype.
        W = (
            W.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            if perm is None
            else W.index_select(1, perm).to(torch.float32)
        )
        dead_pos = dead if perm is None else dead[perm]
        W[:, dead_pos] = 0
        Hinv, damp = inverse_hessian_factor(H, damp_percent, perm, dead_pos)
        P = None if dXXT is None else gptaq_correction(dXXT, Hinv, alpha, perm, dead)

        groups = group_layout(K, g, perm, desc_act, static_groups, block_size, W.device)
        scales = torch.zeros(N, groups.count, dtype=torch.float32, device=W.device)
        zeros = torch.zeros_like(scales)
        # in solving order (one gather at the end)
        codes = torch.empty(N, K, dtype=torch.int32, device=W.device)
        row_loss = torch.zeros(N, dtype=torch.float32, device=W.device)
        for block in groups.blocks:
            start, end = block.start, block.end
            for j, positions in block.params_first:
                scales[:, j], zeros[:, j] = find_params(W[:, positions], bits, sym, mse)
            columns = W[:, start:end].contiguous()
            # row-major: the column loop reads Hinv's rows, and torch's outer product with a strided
            # row runs ~5x slower on a CPU than with a contiguous one (the K×K buffer itself is
            # column-major)
            hinv_block = Hinv[start:end, start:end].contiguous()
            # CUDA's column_block_fn: none
            gptaq = {} if P is None else {"P": P[start:end, start:end].contiguous()}
            block_codes, Err, losses = column_block_fn(
                columns,
                hinv_block,
                scales,
                zeros,
                groups.of_position[start:end],
                block.new_group,
                bits=bits,
                sym=sym,
                mse=mse,
                group_size=g,
                **gptaq,
            )
            codes[:, start:end] = block_codes
            if P is None:
                W[:, end:] -= Err @ Hinv[start:end, end:]
            else:  # GPTAQ: `columns` now holds the values the block's columns were quantized from
                W[:, end:] -= Err @ Hinv[start:end, end:] - columns @ P[start:end, end:]
            row_loss += losses

    if perm is not None:  # back to the original column order
        codes = codes.index_select(1, torch.argsort(perm))
    return QuantizedWeight(
        codes=codes,
        scales=scales.t().half().contiguous(),
        zeros=zeros.t().to(torch.int32).contiguous(),
        g_idx=groups.g_idx.to(torch.int32),
        bits=bits,
        group_size=group_size,
        loss=float(row_loss.sum()),
        damp=damp,
        row_loss=row_loss,
    )
