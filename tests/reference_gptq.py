"""An independent, deliberately plain GPTQ for the tests: the paper's Algorithm 1 without lazy
batching.

Written from SPEC §3 and the paper, not from gptq_cli.quantization.solver: one column at a time, and
after each column the error is propagated to *all* remaining columns at once. Group parameters are
found when a group starts, from the then fully updated weights. The quantizer follows the reference
quant.py plus the project's choices (scales rounded to float16 before use, symmetric ranges
mirrored, all-zero rows on the grid [-1, 1]).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gptq_cli.format.quantized import QuantizedWeight


def reference_params(
    x: torch.Tensor, bits: int, sym: bool, mse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of x [N, m], both float32."""
    maxq = 2**bits - 1
    lo = torch.minimum(x.min(dim=1).values, torch.tensor(0.0))
    hi = torch.maximum(x.max(dim=1).values, torch.tensor(0.0))
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    all_zero = (lo == 0) & (hi == 0)
    lo[all_zero], hi[all_zero] = -1.0, 1.0

    def grid(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.clamp((hi - lo) / maxq, 2.0**-24, 65504.0).to(torch.float16).to(torch.float32)
        zero = (
            torch.full_like(scale, (maxq + 1) // 2)
            if sym
            else torch.clamp(torch.round(-lo / scale), 0, maxq)
        )
        return scale, zero

    scale, zero = grid(lo, hi)
    if mse:
        best_err = torch.full_like(scale, float("inf"))
        for i in range(80):  # shrink factors 1.00, 0.99, ..., 0.21
            s, z = grid((1 - i / 100) * lo, (1 - i / 100) * hi)
            q = s[:, None] * (
                torch.clamp(torch.round(x / s[:, None]) + z[:, None], 0, maxq) - z[:, None]
            )
            err = ((q - x).abs() ** 2.4).sum(dim=1)
            for n in range(x.shape[0]):
                if err[n] < best_err[n]:
                    best_err[n], scale[n], zero[n] = err[n], s[n], z[n]
    return scale, zero


def unrounded_grid(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale before its float16 rounding and the asymmetric zero before rounding (to judge
    ties)."""
    maxq = 2**bits - 1
    lo, hi = x.min(dim=1).values.clamp(max=0), x.max(dim=1).values.clamp(min=0)
    if sym:
        lo, hi = -torch.maximum(-lo, hi), torch.maximum(-lo, hi)
    scale = (hi - lo) / maxq
    return scale, -lo / scale.to(torch.float16).to(torch.float32)


def reference_gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool = False,
    static_groups: bool = False,
    act_group_aware: bool = False,
    damp_percent: float = 0.01,
    mse: bool = False,
    dXXT: torch.Tensor | None = None,
    alpha: float = 0.25,
) -> dict[str, torch.Tensor | float]:
    """Column-by-column GPTQ. Returns codes [N, K] (original order), dequantized Q [N, K], g_idx
    [K], scales/zeros [G, N] and the loss Σ (w - q)² / Hinv[i,i]² / 2. With dXXT = ΔX X̃ᵀ (GPTAQ,
    Li et al. 2025): P = alpha · triu₁(dXXT Uᵀ) U, and each column's update also adds w_i ⊗ P[i,
    i:] (w_i: the value column i was quantized from), as the GPTAQ authors' code does inside one
    block."""
    W, H = W.clone().float(), H.clone().float()
    D = None if dXXT is None else dXXT.clone().float()
    N, K = W.shape
    maxq = 2**bits - 1
    g = K if group_size == -1 else group_size
    n_groups = -(-K // g)

    for d in range(K):
        if H[d, d] == 0:
            H[d, d] = 1.0
            W[:, d] = 0.0
            if D is not None:
                D[:, d] = 0.0

    static = [reference_params(W[:, j * g : (j + 1) * g], bits, sym, mse) for j in range(n_groups)]

    order = list(range(K))
    group_aware = act_group_aware and not desc_act
    if desc_act:
        order = sorted(range(K), key=lambda k: -H[k, k].item())  # Python's sort is stable
    # whole groups, by their largest diagonal entry; inside a group by diagonal; tail last
    elif group_aware:
        whole = K // g
        groups = sorted(
            range(whole), key=lambda j: -max(H[k, k].item() for k in range(j * g, (j + 1) * g))
        )
        order = [
            k
            for j in groups
            for k in sorted(range(j * g, (j + 1) * g), key=lambda k: -H[k, k].item())
        ]
        order += list(range(whole * g, K))
    W, H = W[:, order], H[order][:, order]
    D = None if D is None else D[order][:, order]

    damp = damp_percent
    while True:
        Hd = H + damp * torch.diag(H).mean() * torch.eye(K)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                break
        damp = round(damp + 0.01, 6)
        assert damp < 1, "reference: Hessian hopeless"
    P = torch.zeros(K, K) if D is None else alpha * (D @ U.t()).triu(1) @ U

    codes, Q, unrounded = torch.zeros(N, K), torch.zeros(N, K), torch.zeros(N, K)
    raw_scales, raw_zeros = torch.zeros(n_groups, N), torch.zeros(n_groups, N)
    group_of = torch.zeros(K, dtype=torch.long)
    scales, zeros = torch.zeros(n_groups, N), torch.zeros(n_groups, N)
    loss = 0.0
    for i in range(K):
        if static_groups:
            group = order[i] // g
            scale, zero = static[group]
        else:
            group = order[i] // g if group_aware else i // g
            if i % g == 0:
                scale, zero = reference_params(W[:, i : i + g], bits, sym, mse)
                raw_scales[group], raw_zeros[group] = unrounded_grid(W[:, i : i + g], bits, sym)
        scales[group], zeros[group] = scale, zero
        group_of[order[i]] = group
        unrounded[:, order[i]] = W[:, i] / scale
        c = torch.clamp(torch.round(W[:, i] / scale) + zero, 0, maxq)
        q = scale * (c - zero)
        codes[:, order[i]], Q[:, order[i]] = c, q
        err = (W[:, i] - q) / U[i, i]
        loss += float(((W[:, i] - q) ** 2).sum() / U[i, i] ** 2 / 2)
        w = W[:, i].clone()
        # full update of every remaining column (P = 0 without dXXT)
        W[:, i:] -= err[:, None] * U[i, i:][None, :] - w[:, None] * P[i, i:][None, :]
    return {
        "codes": codes.to(torch.int32),
        "Q": Q,
        "g_idx": group_of,
        "scales": scales,
        "zeros": zeros,
        "loss": loss,
        "damp": damp,
        "order": torch.tensor(order),
        "unrounded": unrounded,
        "raw_scales": raw_scales,
        "raw_zeros": raw_zeros,
    }


def quantization_loss(W: Tensor, H: Tensor, qw: QuantizedWeight) -> float:
    """The proxy loss GPTQ minimises, tr((W − Q) H (W − Q)ᵀ), computed in float64: the tests'
    yardstick (the solver reports its own, QuantizedWeight.loss)."""
    D = W.double() - qw.dequantize(torch.float64).to(W.device)
    return float(torch.einsum("nk,kl,nl->", D, H.double().to(W.device), D))
