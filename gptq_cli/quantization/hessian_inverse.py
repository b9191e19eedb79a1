"""Hinv, the upper Cholesky factor of the damped Hessian's inverse (SPEC §3), in one K×K buffer
besides H.

The paper computes it as cholesky(cholesky_inverse(cholesky(H)), upper=True): three factorisations.
This computes the same factor with one Cholesky and one triangular inverse. With J the
order-reversing permutation, J·H·J = L·Lᵀ (L lower) gives H = R·Rᵀ with R = J·L·J upper; then H⁻¹ =
R⁻ᵀ·R⁻¹ = Uᵀ·U with U = R⁻¹ upper, and by the Cholesky factor's uniqueness U is Hinv, equal to the
paper's up to float32 rounding (test_solver.py).

Why not the paper's route: LAPACK's cholesky_inverse (potri) is where MKL is slow on AMD CPUs, and
erratically
so: 14 s for K = 4096 against 0.6 s for the Cholesky on the 2-core EPYC these sessions get, growing
far faster than K³ once the matrix leaves the cache. The triangular inverse here is matrix products
on panels of the buffer (plain BLAS, no copies of the K×K views), K³/3 multiply-adds like the
Cholesky.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DAMP_STEP = 0.01  # automatic damping increase when Cholesky fails
DIAGONAL_BLOCK = 256  # columns of L⁻¹ computed per step
PANEL = 1024  # columns of the finished part of L⁻¹ per product


class NonFiniteHessian(ValueError):
    """The Hessian has NaN/Inf entries."""


class IndefiniteHessian(ValueError):
    """The Hessian is not positive definite at any damping the solver tries."""


def inverse_hessian_factor(
    H: Tensor, damp_percent: float, perm: Tensor | None = None, dead: Tensor | None = None
) -> tuple[Tensor, float]:
    """Hinv = upper Cholesky factor of (H' + damp·mean(diag H')·I)⁻¹, raising damp by DAMP_STEP
    until it works; H' = H[perm][:, perm] (H itself without perm) with the diagonal entries at the
    positions `dead` (of H') set to 1. H is not modified.

    Memory: one K×K buffer besides H, column-major (LAPACK works in place on that layout). J·H'·J
    is written into it a slice at a time and factorised, inverted and reversed in place; a failed
    factorisation is retried by rewriting the buffer from H. Returns (Hinv, column-major, the
    damp fraction used)."""
    if not _all_finite(H):
        raise NonFiniteHessian("the Hessian has NaN/Inf entries")
    K = H.shape[0]
    order = None if perm is None else perm.flip(0)  # J·H'·J
    A = torch.empty_strided((K, K), (1, K), dtype=torch.float32, device=H.device)
    info = torch.empty((), dtype=torch.int32, device=H.device)
    mean_diag = None
    tries = math.ceil((1 - damp_percent) / DAMP_STEP)
    for i in range(tries):
        # round: no drift from repeated float additions
        damp = round(damp_percent + i * DAMP_STEP, 6)
        _load_permuted(A, H, order)
        if dead is not None:
            A.diagonal()[dead.flip(0)] = 1
        if mean_diag is None:
            mean_diag = A.diagonal().mean()
        A.diagonal().add_(damp * mean_diag)
        torch.linalg.cholesky_ex(A, out=(A, info))  # lower; the strict upper triangle is zeroed
        if info == 0:
            _invert_lower(A)
            _reverse(A)
            if _all_finite(A):
                return A, damp
    raise IndefiniteHessian(f"the Hessian is not positive definite even with damp_percent {damp}")


def _invert_lower(A: Tensor, block: int = DIAGONAL_BLOCK, panel: int = PANEL) -> None:
    """A (lower triangular, zeros above) := A⁻¹, in place, from the last block of columns to the
    first. With A = [[L11, 0], [L21, L22]] and L22⁻¹ already in place: A⁻¹'s block column is
    [L11⁻¹; −L22⁻¹·L21·L11⁻¹]. L22⁻¹·L21 is summed over panels of L22⁻¹'s columns, each only from
    its diagonal down (zeros above)."""
    K = A.shape[0]
    for j in reversed(range(0, K, block)):
        e = min(j + block, K)
        L11inv = torch.linalg.solve_triangular(
            A[j:e, j:e].contiguous(), torch.eye(e - j, dtype=A.dtype, device=A.device), upper=False
        )
        if e < K:
            L21, L22inv = A[e:, j:e], A[e:, e:]
            T = torch.zeros(K - e, e - j, dtype=A.dtype, device=A.device)
            for p in range(0, K - e, panel):
                q = min(p + panel, K - e)
                T[p:].addmm_(L22inv[p:, p:q], L21[p:q])
            torch.mm(T, L11inv, out=L21)
            L21.neg_()
        A[j:e, j:e] = L11inv.tril()


def _reverse(A: Tensor, chunk: int = 1 << 22) -> None:
    """A := J·A·J in place: A[i, j] ↔ A[K−1−i, K−1−j] is the reversal of A's contiguous storage,
    swapped a chunk from each end at a time."""
    # a view of the storage either way
    flat = A.mT.reshape(-1) if A.mT.is_contiguous() else A.reshape(-1)
    n = flat.numel()
    for s in range(0, n // 2, chunk):
        e = min(s + chunk, n // 2)
        head = flat[s:e].clone()
        flat[s:e] = flat[n - e : n - s].flip(0)
        flat[n - e : n - s] = head.flip(0)


def _load_permuted(A: Tensor, H: Tensor, perm: Tensor | None, rows: int = 1024) -> None:
    """A[i, j] = H[perm[i], perm[j]] for a column-major A (perm None: the reversal, J·H·J),
    written through its row-major transpose (Aᵀ[j, i] = Hᵀ[perm[j], perm[i]]) a slice of rows at
    a time: the temporaries are slices, not K×K. The reversal alone is a plain copy reversed in
    place (a gather costs ~5x more)."""
    if perm is None:
        A.copy_(H)
        _reverse(A)
        return
    At, Ht = A.mT, H.mT
    for r in range(0, H.shape[0], rows):
        torch.index_select(Ht.index_select(0, perm[r : r + rows]), 1, perm, out=At[r : r + rows])


def _all_finite(M: Tensor, cols: int = 1024) -> bool:
    """torch.isfinite(M).all() without a K×K boolean temporary. A finite sum needs finite entries
    (NaN and Inf propagate through it), so one reduction answers; only a sum that overflows looks
    at the entries."""
    if bool(torch.isfinite(M.sum())):
        return True
    return all(bool(torch.isfinite(M[:, c : c + cols]).all()) for c in range(0, M.shape[1], cols))
