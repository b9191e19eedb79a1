"""The result of quantizing one linear layer, independent of how it was found or where it is
stored."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptq_cli.format.bitpack import pack_qweight, pack_qzeros


@dataclass
class QuantizedWeight:
    """One quantized linear in nn.Linear orientation (N = out_features, K = in_features, G groups).

    W[n, k] = scales[g_idx[k], n] * (codes[n, k] - zeros[g_idx[k], n])
    """

    codes: torch.Tensor  # int32 [N, K], values in [0, 2^bits)
    scales: torch.Tensor  # float16 [G, N]
    zeros: torch.Tensor  # int32 [G, N], the true zero points (never the v1 "zero - 1")
    g_idx: torch.Tensor  # int32 [K], group of each input column
    bits: int
    group_size: int  # -1 = one group over all of K
    loss: float = 0.0  # GPTQ loss: sum (w - q)^2 / Hinv[i,i]^2 / 2
    damp: float = 0.0  # damping fraction finally used (after any automatic increase)
    row_loss: torch.Tensor | None = None  # float32 [N]: each output row's share of `loss`

    def split_rows(self, sizes: list[int]) -> list[QuantizedWeight]:
        """Cut into consecutive row ranges: linears that share one Hessian (q/k/v, gate/up) are
        solved as one stacked matrix, since rows are independent given the inverse Hessian."""
        parts, start = [], 0
        for size in sizes:
            rows = slice(start, start + size)
            row_loss = self.row_loss[rows] if self.row_loss is not None else None
            parts.append(
                QuantizedWeight(
                    self.codes[rows],
                    self.scales[:, rows],
                    self.zeros[:, rows],
                    self.g_idx,
                    self.bits,
                    self.group_size,
                    float(row_loss.sum()) if row_loss is not None else 0.0,
                    self.damp,
                    row_loss,
                )
            )
            start += size
        return parts

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """The same result with its tensors on `device` (a new object; this one is unchanged)."""
        moved = {f: getattr(self, f).to(device) for f in ("codes", "scales", "zeros", "g_idx")}
        row_loss = self.row_loss.to(device) if self.row_loss is not None else None
        return QuantizedWeight(
            **moved,
            bits=self.bits,
            group_size=self.group_size,
            loss=self.loss,
            damp=self.damp,
            row_loss=row_loss,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = self.g_idx.long()
        scales = self.scales.to(torch.float32)[g].t()  # [N, K]
        zeros = self.zeros.to(torch.float32)[g].t()
        return (scales * (self.codes.to(torch.float32) - zeros)).to(dtype)

    def to_tensors(self, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
        """The per-module tensors of a GPTQ checkpoint (names without the module prefix)."""
        return {
            "qweight": pack_qweight(self.codes.t(), self.bits),
            "qzeros": pack_qzeros(self.zeros, self.bits, checkpoint_format),
            "scales": self.scales.to(torch.float16).contiguous(),
            "g_idx": self.g_idx.to(torch.int32).contiguous(),
        }
