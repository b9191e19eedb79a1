"""The GPTQ algorithm (Frantar et al., ICLR 2023) as pure tensor functions; SPEC §3 is the contract.

It follows IST-DASLab/gptq (gptq.py, quant.py) step by step, with three deliberate choices:
- every scale is rounded to float16 before weights are quantized with it, so the error GPTQ compensates is
  the error the fp16 checkpoint really has (and `QuantizedWeight.dequantize` reproduces Q exactly);
- symmetric ranges are always mirrored, [-m, m] with m = max(|min|, max) (the reference keeps min = 0 for a
  row with no negative weight, which clips its positive half);
- a group's parameters come from its fully updated weights: block ends are moved so that a group that
  starts inside a block also ends in it (the reference reads the block's columns as they were at the block
  start). With that, the lazy blocked solver computes the same thing as the column-by-column algorithm.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor

from gptq_cli.errors import GptqError, UsageError
from gptq_cli.format.quantized import QuantizedWeight

BITS = (2, 3, 4, 8)
DAMP_STEP = 0.01                    # automatic damping increase when Cholesky fails
MSE_NORM, MSE_GRID, MSE_MAXSHRINK = 2.4, 100, 0.8   # clip search of the reference quant.py
FP16_MAX, FP16_TINY = 65504.0, 2.0 ** -24           # largest / smallest positive float16 (subnormal)

BlockFn = Callable[..., tuple[Tensor, Tensor, Tensor]]


@contextmanager
def matmul_tf32(allowed: bool) -> Iterator[None]:
    """CUDA float32 matmuls with TF32 tensor cores allowed or not; the previous setting comes back."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def tf32_is_exact(dtype: torch.dtype) -> bool:
    """Whether TF32 tensor cores multiply values of `dtype` exactly: TF32 keeps 11 significant bits, as fp16
    does (bf16 has 8); products are exact and sums are fp32, so the Hessian loses nothing (SPEC §3)."""
    return dtype in (torch.float16, torch.bfloat16)


@contextmanager
def single_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """The column loop is hundreds of tiny ops per block: on a CPU, waking a second thread for each costs
    more than it saves (and is disastrous on a busy machine), so it runs on one."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def accumulate_hessian(H: Tensor | None, n: int, X: Tensor, mask: Tensor | None = None) -> tuple[Tensor, int]:
    """Fold activations X [..., K] into the running mean H = 2/n · Σ x xᵀ (float32, updated in place).

    mask [...] (X's leading dims) marks the tokens to keep, e.g. the attention mask, so padding is excluded.
    Returns (H, new token count n). H is None on the first call; it lives on X's device then.
    On CUDA, fp16/bf16 activations use TF32 tensor cores (exact products, fp32 sums), fp32 ones do not.
    """
    X = X.reshape(-1, X.shape[-1])
    if mask is not None:
        X = X[mask.reshape(-1).to(device=X.device, dtype=torch.bool)]
    if H is None:
        H = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float32, device=X.device)
    m = X.shape[0]
    if m == 0:
        return H, n
    tensor_cores = tf32_is_exact(X.dtype)   # fp32 activations keep full fp32 products
    X = X.to(device=H.device, dtype=torch.float32)
    with matmul_tf32(tensor_cores):
        H.mul_(n / (n + m)).addmm_(X.t(), X, alpha=2 / (n + m))
    return H, n + m


def _grid(xmin: Tensor, xmax: Tensor, maxq: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale (rounded to float16, kept in float32) and zero point of the grid that spans [xmin, xmax]."""
    scale = ((xmax - xmin) / maxq).clamp(FP16_TINY, FP16_MAX).half().float()
    if sym:
        return scale, torch.full_like(scale, (maxq + 1) / 2)
    return scale, torch.round(-xmin / scale).clamp(0, maxq)  # clamp: fp16 rounding may push it past maxq


def find_params(x: Tensor, bits: int, sym: bool, mse: bool) -> tuple[Tensor, Tensor]:
    """Per-row (scale, zero) float32 [N] for the weights x [N, m]; min/max include 0, as in the reference."""
    maxq = 2 ** bits - 1
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)   # an all-zero row: any grid works, use the reference's [-1, 1]
    xmin, xmax = xmin.masked_fill(empty, -1.0), xmax.masked_fill(empty, 1.0)
    scale, zero = _grid(xmin, xmax, maxq, sym)
    if not mse:
        return scale, zero
    best = _clip_error(x, scale, zero, maxq)
    for i in range(1, int(MSE_MAXSHRINK * MSE_GRID)):
        shrink = 1 - i / MSE_GRID
        scale1, zero1 = _grid(shrink * xmin, shrink * xmax, maxq, sym)
        err = _clip_error(x, scale1, zero1, maxq)
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, scale1, scale), torch.where(better, zero1, zero)
    return scale, zero


def _clip_error(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    q = _dequantize(_quantize(x, scale[:, None], zero[:, None], maxq), scale[:, None], zero[:, None])
    return (q - x).abs().pow(MSE_NORM).sum(dim=1)


def _quantize(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Codes (float32 holding integers in [0, maxq]); round half to even, as torch.round in the reference."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def _dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return scale * (codes - zero)


def quantize_block(W: Tensor, Hinv: Tensor, scales: Tensor, zeros: Tensor, group_of_col: Tensor,
                   new_group: Tensor, *, bits: int, sym: bool, mse: bool, group_size: int
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ's inner loop over the B columns of one block; all N rows are independent (the CUDA kernel's seam).

    W [N, B] float32, contiguous: the block's weights (permuted order), with every earlier block's update
      applied. Updated in place: on return W[:, c] holds the value column c was quantized from.
    Hinv [B, B] float32: this block's diagonal block of the upper Cholesky factor of H⁻¹.
    scales, zeros [N, Gtot] float32, contiguous: per-row group parameters (scales fp16-representable, zeros
      whole numbers). Where new_group[c], column group_of_col[c] is written in place with find_params of
      W[:, c : c + group_size] (clipped at B) as it is when column c is reached; the caller sets new_group
      only for groups that lie wholly in the block and fills every other group's column itself beforehand.
    group_of_col [B] int64: the group of each column. new_group [B] bool.
    bits, sym, mse: the quantizer (find_params). group_size: columns per group, >= 1 (K for one group).
    For each column c: q = quantize(w_c); err = (w_c - q) / Hinv[c, c]; W[:, c+1:] -= err ⊗ Hinv[c, c+1:].
    Returns (codes int32 [N, B], Err float32 [N, B] = the err of each column,
             losses float32 [N] = Σ_c (w_c - q)² / Hinv[c, c]² / 2).
    The caller then applies the lazy update W[:, end:] -= Err @ Hinv[block, end:].
    """
    maxq = 2 ** bits - 1
    codes = torch.empty_like(W)
    Err = torch.empty_like(W)
    # Python scalars and column views keep the per-column work to a handful of tensor ops: on a CPU the
    # loop's cost is dispatch overhead, not arithmetic.
    diag, groups, starts = Hinv.diagonal().tolist(), group_of_col.tolist(), new_group.tolist()
    current = None
    for c in range(W.shape[1]):
        g = groups[c]
        if starts[c]:
            scales[:, g], zeros[:, g] = find_params(W[:, c:c + group_size], bits, sym, mse)
        if starts[c] or g != current:
            scale, zero, current = scales[:, g], zeros[:, g], g
        w = W[:, c]
        code = _quantize(w, scale, zero, maxq)
        codes[:, c] = code
        err = torch.sub(w, _dequantize(code, scale, zero), out=Err[:, c]).div_(diag[c])
        W[:, c + 1:] -= torch.outer(err, Hinv[c, c + 1:])
    losses = Err.square().sum(dim=1) / 2   # (w - q)² / Hinv[c, c]² = err²
    return codes.to(torch.int32), Err, losses


def block_ranges(columns: int, group_size: int, block_size: int, align_groups: bool) -> list[tuple[int, int]]:
    """[start, end) of each lazy-update block. With align_groups, a block ends early at the start of a group
    that would not fit in it, so every group either starts at a block start or lies inside one block."""
    ranges, start = [], 0
    while start < columns:
        end = min(start + block_size, columns)
        last_group_start = (end - 1) // group_size * group_size
        if align_groups and last_group_start > start and min(last_group_start + group_size, columns) > end:
            end = last_group_start
        ranges.append((start, end))
        start = end
    return ranges


def inverse_hessian_factor(H: Tensor, damp_percent: float, perm: Tensor | None = None,
                           dead: Tensor | None = None) -> tuple[Tensor, float]:
    """Hinv = upper Cholesky factor of (H' + damp·mean(diag H')·I)⁻¹, raising damp by DAMP_STEP until it works;
    H' = H[perm][:, perm] (H itself without perm) with the diagonal entries at the positions `dead` (of H')
    set to 1. H is not modified.

    Memory: one K×K buffer besides H. H' is written into it a slice at a time, and the Cholesky factor, its
    inverse and the second factor are computed in place (LAPACK works in place on a column-major matrix);
    a failed factorisation is retried by rewriting the buffer from H. Returns (Hinv, column-major, the damp
    fraction used)."""
    if not _all_finite(H):
        raise GptqError("the Hessian has NaN/Inf entries: the calibration activations overflowed; "
                        "try --dtype float32 or check the calibration data")
    K = H.shape[0]
    A = torch.empty_strided((K, K), (1, K), dtype=torch.float32, device=H.device)
    info = torch.empty((), dtype=torch.int32, device=H.device)
    mean_diag = None
    tries = math.ceil((1 - damp_percent) / DAMP_STEP)
    for i in range(tries):
        damp = round(damp_percent + i * DAMP_STEP, 6)   # round: no drift from repeated float additions
        _load_permuted(A, H, perm)
        if dead is not None:
            A.diagonal()[dead] = 1
        if mean_diag is None:
            mean_diag = A.diagonal().mean()
        A.diagonal().add_(damp * mean_diag)
        torch.linalg.cholesky_ex(A, out=(A, info))
        if info == 0:
            torch.cholesky_inverse(A, out=A)
            torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
            if info == 0 and _all_finite(A):
                return A, damp
    raise GptqError(f"the Hessian is not positive definite even with damp_percent {damp}; "
                    "the layer's calibration inputs are degenerate: use more or different calibration samples")


def _load_permuted(A: Tensor, H: Tensor, perm: Tensor | None, rows: int = 1024) -> None:
    """A[i, j] = H[perm[i], perm[j]] for a column-major A, written through its row-major transpose
    (Aᵀ[j, i] = Hᵀ[perm[j], perm[i]]) a slice of rows at a time: the temporaries are slices, not K×K."""
    At, Ht = A.mT, H.mT
    for r in range(0, H.shape[0], rows):
        if perm is None:
            At[r:r + rows].copy_(Ht[r:r + rows])
        else:
            torch.index_select(Ht.index_select(0, perm[r:r + rows]), 1, perm, out=At[r:r + rows])


def _all_finite(M: Tensor, cols: int = 1024) -> bool:
    """torch.isfinite(M).all() without a K×K boolean temporary."""
    return all(bool(torch.isfinite(M[:, c:c + cols]).all()) for c in range(0, M.shape[1], cols))


def group_aware_order(diag: Tensor, group_size: int) -> Tensor:
    """Group-aware act-order (GPTQModel's "GAR"): act-order's benefit without its scattered g_idx. Groups of
    consecutive columns stay whole, so g_idx stays k // g; the groups are solved in decreasing order of their
    largest Hessian diagonal entry and, inside each group, columns in decreasing diagonal order. Columns past
    the last whole group keep their places at the end. Stable sorts: ties keep a fixed order. Per channel
    (group_size = K) this is act-order itself, and costs loaders nothing: g_idx is all zeros either way."""
    K = diag.numel()
    whole = K // group_size
    arange = torch.arange(K, device=diag.device)
    if whole == 0:
        return arange
    values, within = torch.sort(diag[:whole * group_size].view(whole, group_size), dim=1, descending=True,
                                stable=True)
    group_order = torch.argsort(values[:, 0], descending=True, stable=True)
    starts = (torch.arange(whole, device=diag.device) * group_size)[:, None]
    return torch.cat([(within + starts)[group_order].reshape(-1), arange[whole * group_size:]])


def _check_settings(bits: int, group_size: int, damp_percent: float = 0.01, block_size: int = 1) -> None:
    if bits not in BITS:
        raise UsageError(f"bits must be one of {BITS}, got {bits}")
    if group_size != -1 and group_size < 1:
        raise UsageError(f"group size must be a positive number of columns or -1, got {group_size}")
    if not 0 < damp_percent < 1:
        raise UsageError(f"damp percent must be in (0, 1), got {damp_percent}; the usual value is 0.01")
    if block_size < 1:
        raise UsageError(f"block size must be at least 1, got {block_size}")


def quantize_weight(W: Tensor, H: Tensor, *, bits: int = 4, group_size: int = 128, sym: bool = True,
                    desc_act: bool = False, static_groups: bool = False, act_group_aware: bool = False,
                    damp_percent: float = 0.01,
                    mse: bool = False, block_size: int = 128, block_fn: BlockFn = quantize_block
                    ) -> QuantizedWeight:
    """GPTQ-quantize W [N, K] with the Hessian H [K, K] of its inputs (SPEC §3). Inputs are not modified.

    Working set besides the inputs: one K×K float32 buffer (inverse_hessian_factor) and W's float32 copy,
    codes and one lazy-update product, each N×K.

    block_fn runs each block; it must honour quantize_block's contract (the fused CUDA kernel does)."""
    _check_settings(bits, group_size, damp_percent, block_size)
    N, K = W.shape
    if H.shape != (K, K):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight shape {(N, K)}")
    g = K if group_size == -1 else group_size
    n_groups = math.ceil(K / g)
    with matmul_tf32(False):   # TF32 would cost ~3 decimal digits of the solver's float32 values
        H = H.to(device=W.device, dtype=torch.float32)   # read only: the solver works in its own buffer
        dead = H.diagonal() == 0   # inputs that are always 0: their weights cannot matter
        diag = H.diagonal().masked_fill(dead, 1)
        perm = None
        if desc_act or act_group_aware:
            perm = (torch.argsort(diag, descending=True, stable=True) if desc_act
                    else group_aware_order(diag, g))
        # W in solving order, float32; permuted before widening, so the temporary is in W's own dtype.
        W = (W.to(torch.float32, memory_format=torch.contiguous_format, copy=True) if perm is None
             else W.index_select(1, perm).to(torch.float32))
        dead_pos = dead if perm is None else dead[perm]
        W[:, dead_pos] = 0
        invperm = None if perm is None else torch.argsort(perm)

        scales = torch.zeros(N, n_groups, dtype=torch.float32, device=W.device)
        zeros = torch.zeros_like(scales)
        if static_groups:   # groups of consecutive original columns, found before any update
            for j in range(n_groups):
                original = W[:, j * g:(j + 1) * g] if perm is None else W[:, invperm[j * g:(j + 1) * g]]
                scales[:, j], zeros[:, j] = find_params(original, bits, sym, mse)

        position = torch.arange(K, device=W.device)
        original_col = position if perm is None else perm
        # Which group each position belongs to: act-order makes groups of consecutive positions; static
        # groups and group-aware order keep each column in its original group (g_idx = k // g).
        group_of_pos = original_col // g if static_groups or not desc_act else position // g

        Hinv, damp = inverse_hessian_factor(H, damp_percent, perm, dead_pos)
        codes = torch.empty(N, K, dtype=torch.int32, device=W.device)   # in original column order
        row_loss = torch.zeros(N, dtype=torch.float32, device=W.device)
        for start, end in block_ranges(K, g, block_size, align_groups=not static_groups):
            new_group = torch.zeros(end - start, dtype=torch.bool, device=W.device)
            if not static_groups:
                cols = torch.arange(start, end, device=W.device)
                new_group = (cols % g == 0) & ((cols + g).clamp(max=K) <= end)
                if start % g == 0 and min(start + g, K) > end:
                    # a group wider than this block: at the block start all its columns are fully updated
                    j = int(group_of_pos[start])
                    scales[:, j], zeros[:, j] = find_params(W[:, start:start + g], bits, sym, mse)
            block = W[:, start:end].contiguous()
            with single_thread_on_cpu(W.device):
                block_codes, Err, losses = block_fn(block, Hinv[start:end, start:end], scales, zeros,
                                                    group_of_pos[start:end], new_group,
                                                    bits=bits, sym=sym, mse=mse, group_size=g)
            codes[:, slice(start, end) if perm is None else perm[start:end]] = block_codes
            W[:, end:] -= Err @ Hinv[start:end, end:]
            row_loss += losses

    g_idx = group_of_pos if invperm is None else group_of_pos[invperm]
    return QuantizedWeight(codes=codes, scales=scales.t().half().contiguous(),
                           zeros=zeros.t().to(torch.int32).contiguous(), g_idx=g_idx.to(torch.int32),
                           bits=bits, group_size=group_size, loss=float(row_loss.sum()), damp=damp,
                           row_loss=row_loss)


def quantize_rtn(W: Tensor, *, bits: int, group_size: int, sym: bool, mse: bool = False) -> QuantizedWeight:
    """Round-to-nearest with the same quantizer, groups of consecutive columns. loss stays 0: no Hessian."""
    _check_settings(bits, group_size)
    W = W.to(torch.float32)
    K = W.shape[1]
    g = K if group_size == -1 else group_size
    codes, scales, zeros = [], [], []
    for start in range(0, K, g):
        scale, zero = find_params(W[:, start:start + g], bits, sym, mse)
        codes.append(_quantize(W[:, start:start + g], scale[:, None], zero[:, None], 2 ** bits - 1))
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight(codes=torch.cat(codes, dim=1).to(torch.int32), scales=torch.stack(scales).half(),
                           zeros=torch.stack(zeros).to(torch.int32),
                           g_idx=(torch.arange(K, device=W.device) // g).to(torch.int32),
                           bits=bits, group_size=group_size)


def quantization_loss(W: Tensor, H: Tensor, qw: QuantizedWeight) -> float:
    """The proxy loss GPTQ minimises, tr((W − Q) H (W − Q)ᵀ), computed in float64."""
    D = W.double() - qw.dequantize(torch.float64).to(W.device)
    return float(torch.einsum("nk,kl,nl->", D, H.double().to(W.device), D))
