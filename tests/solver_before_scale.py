"""The solver's quantize_weight as it was before its memory work (issue 19), kept verbatim for
one test: the new one, which works in a single K×K buffer, must give the same result bit for bit
when both get Hinv by the paper's route (old_inverse_hessian_factor; the solver's own
factorisation is checked against that route separately). Only the parts that changed are here;
the block loop and quantizer are imported from the solver."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gptq_cli.format.quantized import QuantizedWeight
from gptq_cli.quantization.solver import (
    DAMP_STEP,
    column_block_ranges,
    find_params,
    group_aware_order,
    matmul_tf32,
    quantize_column_block,
    single_thread_on_cpu,
)


def old_inverse_hessian_factor(H: Tensor, damp_percent: float) -> tuple[Tensor, float]:
    mean_diag = H.diagonal().mean()
    tries = math.ceil((1 - damp_percent) / DAMP_STEP)
    for i in range(tries):
        damp = round(damp_percent + i * DAMP_STEP, 6)
        damped = H.clone()
        damped.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(Hinv).all():
                return Hinv, damp
    raise RuntimeError("not positive definite")


def old_quantize_weight(
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
) -> QuantizedWeight:
    N, K = W.shape
    g = K if group_size == -1 else group_size
    n_groups = math.ceil(K / g)
    with matmul_tf32(False):
        W = W.to(dtype=torch.float32, copy=True)
        H = H.to(device=W.device, dtype=torch.float32, copy=True)
        dead = H.diagonal() == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        scales = torch.zeros(N, n_groups, dtype=torch.float32, device=W.device)
        zeros = torch.zeros_like(scales)
        if static_groups:
            for j in range(n_groups):
                scales[:, j], zeros[:, j] = find_params(W[:, j * g : (j + 1) * g], bits, sym, mse)
        if desc_act or act_group_aware:
            perm = (
                torch.argsort(H.diagonal(), descending=True, stable=True)
                if desc_act
                else group_aware_order(H.diagonal(), g)
            )
            W, H = W[:, perm], H[perm][:, perm]
        else:
            perm = torch.arange(K, device=W.device)
        group_of_pos = (
            perm // g if static_groups or not desc_act else torch.arange(K, device=W.device) // g
        )
        Hinv, damp = old_inverse_hessian_factor(H, damp_percent)
        codes = torch.zeros(N, K, dtype=torch.int32, device=W.device)
        row_loss = torch.zeros(N, dtype=torch.float32, device=W.device)
        for start, end in column_block_ranges(K, g, block_size, align_groups=not static_groups):
            new_group = torch.zeros(end - start, dtype=torch.bool, device=W.device)
            if not static_groups:
                cols = torch.arange(start, end, device=W.device)
                new_group = (cols % g == 0) & ((cols + g).clamp(max=K) <= end)
                if start % g == 0 and min(start + g, K) > end:
                    j = int(group_of_pos[start])
                    scales[:, j], zeros[:, j] = find_params(W[:, start : start + g], bits, sym, mse)
            block = W[:, start:end].contiguous()
            with single_thread_on_cpu(W.device):
                block_codes, Err, losses = quantize_column_block(
                    block,
                    Hinv[start:end, start:end],
                    scales,
                    zeros,
                    group_of_pos[start:end],
                    new_group,
                    bits=bits,
                    sym=sym,
                    mse=mse,
                    group_size=g,
                )
            codes[:, start:end] = block_codes
            W[:, end:] -= Err @ Hinv[start:end, end:]
            row_loss += losses
    invperm = torch.argsort(perm)
    return QuantizedWeight(
        codes=codes[:, invperm].contiguous(),
        scales=scales.t().half().contiguous(),
        zeros=zeros.t().to(torch.int32).contiguous(),
        g_idx=group_of_pos[invperm].to(torch.int32),
        bits=bits,
        group_size=group_size,
        loss=float(row_loss.sum()),
        damp=damp,
        row_loss=row_loss,
    )
