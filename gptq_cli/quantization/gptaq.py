"""GPTAQ (Li et al. 2025, "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric
Calibration"): GPTQ whose layers aim at the full-precision model's output on full-precision inputs
X, not at their own output on the quantized model's inputs X̃. What it adds to GPTQ, as pure tensor
functions: the asymmetry term ΔX X̃ᵀ (ΔX = X − X̃; accumulated beside the Hessian as X X̃ᵀ, less H
at the end), the paper's correction P that the solver's column update carries
(solver.quantize_weight(dXXT=...)), and the least-squares target GPTQ can be run on instead
(`--method gptaq-ls`). The engine's full-precision stream lives in fp_stream.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gptq_cli.kernels import cpu_gemm, matmul_tf32
from gptq_cli.settings import GPTAQ_ALPHA

__all__ = [
    "GPTAQ_ALPHA",
    "accumulate_cross",
    "cross_term",
    "gptaq_correction",
    "least_squares_target",
]


def accumulate_cross(C: Tensor | None, n: int, X_fp: Tensor, X: Tensor) -> Tensor:
    """GPTAQ's product of the two models' inputs, beside accumulate_hessian's H: fold one batch
    into the running mean C = 2/n · Σ x_fp xᵀ (float32 [K, K], rows the full-precision model's
    input channels, columns the quantized model's), n the token count H had before this batch;
    cross_term(C, H) is then ΔX X̃ᵀ. X_fp [..., K]: the full-precision model's inputs to the same
    linear, token for token with X. As for H, 16-bit activations lose nothing (exact products,
    float32 sums): on a CPU MKL's 16-bit GEMM or, for bf16 without AMX, cpu_xtx's kernel
    (kernels/cpu_gemm.py), 5-8x faster on the AMX Xeon than widening both and multiplying their
    difference; on CUDA TF32 tensor cores."""
    if X_fp.shape != X.shape:
        raise ValueError(
            f"GPTAQ needs the full-precision and the quantized inputs token for token; got "
            f"{tuple(X_fp.shape)} and {tuple(X.shape)} (e.g. experts routed differently)"
        )
    K = X.shape[-1]
    X, X_fp = X.reshape(-1, K), X_fp.reshape(-1, K)
    m = X.shape[0]
    if C is None:
        C = torch.zeros(K, K, dtype=torch.float32, device=X.device)
    if m == 0:
        return C
    alpha, beta = 2 / (n + m), n / (n + m)
    sixteen_bit = X.dtype == X_fp.dtype and X.dtype in (torch.float16, torch.bfloat16)
    if sixteen_bit and X.device.type == C.device.type == "cpu" and cpu_gemm.available(X.dtype):
        cpu_gemm.xty(X_fp.contiguous(), X.contiguous(), C, alpha, beta)
        return C
    with matmul_tf32(sixteen_bit):
        return C.mul_(beta).addmm_(
            X_fp.t().to(C.device, torch.float32), X.to(C.device, torch.float32), alpha=alpha
        )


def cross_term(C: Tensor, H: Tensor, asymmetric: bool = True) -> Tensor:
    """ΔX X̃ᵀ = C − H, in place in C: accumulate_cross's C and the complete Hessian of the same
    tokens, both float32 sums of exact products. The difference loses about log2(|X| / |ΔX|) bits
    of C's precision (~1e-6 relative at a real model's asymmetry). asymmetric False (no batch's
    two inputs differed): exactly 0, where C − H would keep the two sums' different rounding."""
    return C.sub_(H) if asymmetric else C.zero_()


def gptaq_correction(
    dXXT: Tensor, Hinv: Tensor, alpha: float, perm: Tensor | None, dead: Tensor
) -> Tensor:
    """GPTAQ's P (Li et al. 2025, "asymmetric calibration"): each layer's target is the
    full-precision model's output W X on full-precision inputs X, not W X̃ on the quantized
    model's inputs X̃. Quantizing column i leaves, besides GPTQ's error, that input channel's
    asymmetry w_i ΔX_i (ΔX = X − X̃) to the columns after it; their least-squares share is w_i
    P[i, i+1:] with P = alpha · triu₁(ΔX X̃ᵀ Uᵀ) U, U the upper Cholesky factor of H⁻¹ (the rows
    of U after i factor the inverse of H's trailing block). dXXT in the original column order,
    scaled as H; returned in solving order, float32, strictly upper triangular."""
    D = dXXT.to(device=Hinv.device, dtype=torch.float32)
    # dead inputs: their weights are zeroed, as in H
    D = D.masked_fill(dead[None, :].to(D.device), 0)
    if perm is not None:
        D = D[perm][:, perm]
    return alpha * (D @ Hinv.t()).triu_(1) @ Hinv


def least_squares_target(
    W: Tensor, H: Tensor, dXXT: Tensor, alpha: float, damp_percent: float
) -> Tensor:
    """The weights that minimise GPTAQ's objective ‖W' X̃ᵀ − W Xᵀ‖² before any rounding, moved by
    `alpha`: W + alpha · W ΔXX̃ᵀ H⁻¹ (float32, H damped as the solver damps it). GPTQ run on them
    aims at the full-precision output (`--method gptaq-ls`): at alpha 1, ‖Q X̃ᵀ − W Xᵀ‖² = ‖(Q −
    W') X̃ᵀ‖² + a constant, GPTQ's own objective with W' in place of W."""
    W = W.to(torch.float32)
    Hd = H.to(torch.float32) + damp_percent * H.diagonal().mean() * torch.eye(
        H.shape[0], device=H.device
    )
    L = torch.linalg.cholesky(Hd)
    return W + alpha * torch.cholesky_solve((W @ dXXT.to(W)).t(), L).t()
