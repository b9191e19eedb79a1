"""The uniform quantization grid GPTQ rounds onto (the reference's quant.py): per-row scale and zero
point of a group of weights, quantize and dequantize, and round-to-nearest of a whole matrix with
it.

Every scale is rounded to float16 before weights are quantized with it, so the error GPTQ
compensates is the error the fp16 checkpoint really has (and `QuantizedWeight.dequantize` reproduces
Q exactly). Symmetric ranges are always mirrored, [-m, m] with m = max(|min|, max) (the reference
keeps min = 0 for a row with no negative weight, which clips its positive half).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gptq_cli.format.config import check_setting
from gptq_cli.format.quantized import QuantizedWeight

MSE_NORM, MSE_GRID, MSE_MAXSHRINK = 2.4, 100, 0.8  # clip search of the reference quant.py
# largest / smallest positive float16 (subnormal)
FP16_MAX, FP16_TINY = 65504.0, 2.0**-24


def _grid(xmin: Tensor, xmax: Tensor, maxq: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale (rounded to float16, kept in float32) and zero point of the grid that spans [xmin,
    xmax]."""
    scale = ((xmax - xmin) / maxq).clamp(FP16_TINY, FP16_MAX).half().float()
    if sym:
        return scale, torch.full_like(scale, (maxq + 1) / 2)
    # clamp: fp16 rounding may push it past maxq
    return scale, torch.round(-xmin / scale).clamp(0, maxq)


def find_params(x: Tensor, bits: int, sym: bool, mse: bool) -> tuple[Tensor, Tensor]:
    """Per-row (scale, zero) float32 [N] for the weights x [N, m]; min/max include 0, as in the
    reference."""
    maxq = 2**bits - 1
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    # an all-zero row: any grid works, use the reference's [-1, 1]
    empty = (xmin == 0) & (xmax == 0)
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
    q = dequantize(quantize(x, scale[:, None], zero[:, None], maxq), scale[:, None], zero[:, None])
    return (q - x).abs().pow(MSE_NORM).sum(dim=1)


def quantize(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Codes (float32 holding integers in [0, maxq]); round half to even, as torch.round in the
    reference."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return scale * (codes - zero)


def quantize_rtn(
    W: Tensor, *, bits: int, group_size: int, sym: bool, mse: bool = False
) -> QuantizedWeight:
    """Round-to-nearest with the same quantizer, groups of consecutive columns. loss stays 0: no
    Hessian."""
    check_setting(bits, group_size)
    W = W.to(torch.float32)
    K = W.shape[1]
    g = K if group_size == -1 else group_size
    codes, scales, zeros = [], [], []
    for start in range(0, K, g):
        scale, zero = find_params(W[:, start : start + g], bits, sym, mse)
        codes.append(quantize(W[:, start : start + g], scale[:, None], zero[:, None], 2**bits - 1))
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight(
        codes=torch.cat(codes, dim=1).to(torch.int32),
        scales=torch.stack(scales).half(),
        zeros=torch.stack(zeros).to(torch.int32),
        g_idx=(torch.arange(K, device=W.device) // g).to(torch.int32),
        bits=bits,
        group_size=group_size,
    )
