"""GPTAQ's layer objective on synthetic layers: how far each solver gets toward the full-precision
target.

For a layer W with full-precision inputs X and the quantized model's inputs X̃ = X + drift, GPTAQ
(Li et al. 2025) aims at ‖Q X̃ᵀ − W Xᵀ‖² instead of GPTQ's ‖Q X̃ᵀ − W X̃ᵀ‖². Three solvers, same H =
2/n X̃ᵀX̃ and dXXT = 2/n ΔXᵀX̃: GPTQ; GPTAQ's column update (solver.quantize_weight with dXXT, alpha
0.25 and 1); and GPTQ run on the least-squares target W' = W + alpha · W dXXT H⁻¹ (the minimiser of
the same objective before
quantization: ‖Q X̃ᵀ − W Xᵀ‖² = ‖(Q − W') X̃ᵀ‖² + const at alpha 1). Errors are relative to GPTQ's;
"floor" is W itself (unquantized) against the target. Layers from tests/test_gptaq.py's
asymmetric_problem.

    python scripts/bench_gptaq_synthetic.py --out bench/gptaq_synthetic.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gptq_cli.quantization.gptaq import least_squares_target  # noqa: E402
from gptq_cli.quantization.solver import quantize_weight  # noqa: E402
from tests.test_gptaq import asymmetric_problem  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "gptaq_synthetic.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for bits, group_size in ((4, 128), (3, 128), (4, 32), (3, 32)):
        for seed in range(3):
            W, H, dXXT, X, X_q = asymmetric_problem(N=256, K=512, seed=seed, tokens=4096)
            target = W @ X.t()

            def error(Q: torch.Tensor) -> float:
                return float((Q @ X_q.t() - target).square().sum())

            settings = {"bits": bits, "group_size": group_size, "act_group_aware": True}
            base = error(quantize_weight(W, H, **settings).dequantize())
            row = {"bits": bits, "group_size": group_size, "seed": seed, "floor": error(W) / base}
            for alpha in (0.25, 1.0):
                row[f"gptaq_alpha{alpha}"] = (
                    error(quantize_weight(W, H, dXXT=dXXT, alpha=alpha, **settings).dequantize())
                    / base
                )
                row[f"gptq_on_target_alpha{alpha}"] = (
                    error(
                        quantize_weight(
                            least_squares_target(W, H, dXXT, alpha, 0.01), H, **settings
                        ).dequantize()
                    )
                    / base
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
    means = {
        k: sum(r[k] for r in rows) / len(rows)
        for k in rows[0]
        if k not in ("bits", "group_size", "seed")
    }
    args.out.write_text(
        json.dumps(
            {
                "what": "error against the full-precision target, relative to GPTQ's (lower is "
                "better); synthetic layers N=256, K=512, 4096 tokens, drift 0.15, group-aware "
                "order",
                "machine": {"platform": platform.platform(), "torch": torch.__version__},
                "mean": means,
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(json.dumps(means))


if __name__ == "__main__":
    main()
