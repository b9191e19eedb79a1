"""The Hessian's accumulation on a CPU, route by route, side by side in one run (issue 29).

For 4096 tokens of random bf16 activations of width K (SmolLM2's 576 and 1536, Llama's
2048/4096/5632/11008):
- fp32 full: the activations widened to float32, then one float32 addmm of the whole XᵀX (the route
  before);
- fp32 panels: the same in float32, lower panels only (solver.hessian_panels), as fp32 activations
  now take;
- 16-bit full: MKL's bf16-input, fp32-output GEMM of the whole XᵀX (kernels/cpu_gemm.py);
- 16-bit panels: the same on the lower panels: what accumulate_hessian does for bf16/fp16
  activations where MKL's GEMM is the faster route (AMX);
- kernel lower: csrc/cpu_xtx.c's AVX512-BF16 kernel on the lower triangle by 64-column tiles: what
  accumulate_hessian does for bf16 activations on CPUs without AMX ("bf16_route" says which);
- fp32 SSYRK and fp32 kernel: the same values as float32 activations, by MKL's SSYRK (Intel CPUs)
  and by the kernel's float32 instance (other CPUs; "fp32_route" says which).
Milliseconds per call (best of 5) and each route's largest error against the float64 product,
relative to the largest entry. Writes bench/hessian_<cpu>.json. Quiet machine only.

    python scripts/bench_hessian.py
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptq_cli.kernels import cpu_gemm, cpu_xtx  # noqa: E402
from gptq_cli.quantization.solver import accumulate_hessian, complete_hessian, hessian_panels  # noqa: E402
from scripts.bench_quality import cpu_info, cpu_slug  # noqa: E402

TOKENS = 4096
WIDTHS = (576, 1536, 2048, 4096, 5632, 11008)


def best_ms(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(min(times) * 1e3, 3)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = {}
    for K in WIDTHS:
        X = (
            torch.randn(TOKENS, K, generator=gen) * (0.05 + 4 * torch.rand(K, generator=gen) ** 4)
        ).bfloat16()
        H = torch.zeros(K, K)

        def fp32_full():
            H.addmm_(X.float().t(), X.float(), beta=0.5, alpha=0.5)

        def fp32_panels():
            Xf = X.float()
            for s, e in hessian_panels(K):
                H[s:, s:e].addmm_(Xf[:, s:].t(), Xf[:, s:e], beta=0.5, alpha=0.5)

        def bf16_full():
            cpu_gemm.xtx_panel(X, H, 0, K, 0.5, 0.5)

        def bf16_panels():
            for s, e in hessian_panels(K):
                cpu_gemm.xtx_panel(X, H, s, e, 0.5, 0.5)

        exact = 2 / TOKENS * X.double().t() @ X.double()
        scale = exact.abs().max().item()

        def error(H_route: torch.Tensor) -> float:
            return float(f"{(H_route.double() - exact).abs().max().item() / scale:.3g}")

        wide = torch.zeros(K, K).addmm_(X.float().t(), X.float(), alpha=2 / TOKENS)
        fast = complete_hessian(accumulate_hessian(None, 0, X)[0])
        row = {
            "fp32_full_ms": best_ms(fp32_full),
            "fp32_panels_ms": best_ms(fp32_panels),
            "panels": len(hessian_panels(K)),
            "error_fp32_full": error(wide),
            "error_16bit_panels": error(fast),
        }
        if torch.bfloat16 in cpu_gemm._GEMM:
            row.update({"bf16_full_ms": best_ms(bf16_full), "bf16_panels_ms": best_ms(bf16_panels)})
            row["speedup_over_before"] = round(row["fp32_full_ms"] / row["bf16_panels_ms"], 2)
        Xf = X.float()
        routes = {  # name -> (fn(X, H, alpha, beta) writing H's lower triangle, X)
            "kernel_lower": (lambda A, C, a, b: cpu_xtx.xty(A, A, C, a, b, lower=True), X),
            "fp32_syrk": (lambda A, C, a, b: cpu_gemm._syrk(cpu_gemm._SSYRK, A, C, a, b), Xf),
            "fp32_kernel": (lambda A, C, a, b: cpu_xtx.xty(A, A, C, a, b, lower=True), Xf),
        }
        for name, (fn, A) in routes.items():
            if (name == "fp32_syrk" and cpu_gemm._SSYRK is None) or (
                "kernel" in name and not cpu_xtx.available()
            ):
                continue
            lower = torch.zeros(K, K)
            fn(A, lower, 2 / TOKENS, 0.0)
            row[f"{name}_ms"] = best_ms(lambda fn=fn, A=A: fn(A, H, 0.5, 0.5))
            row[f"error_{name.removesuffix('_lower')}"] = error(complete_hessian(lower))
        if "bf16_panels_ms" in row and "kernel_lower_ms" in row:
            row["kernel_over_mkl_panels"] = round(row["bf16_panels_ms"] / row["kernel_lower_ms"], 2)
        if "fp32_syrk_ms" in row and "fp32_kernel_ms" in row:
            row["fp32_kernel_over_syrk"] = round(row["fp32_syrk_ms"] / row["fp32_kernel_ms"], 2)
        rows[str(K)] = row
        print(K, row, file=sys.stderr, flush=True)
    report = {
        "what": f"Hessian accumulation of {TOKENS} bf16 activation rows of width K on a CPU, "
        "by route (fp32_*: the same values as float32 activations)",
        "machine": {
            "cpu": cpu_info(),
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "mkl_16bit_gemm": torch.bfloat16 in cpu_gemm._GEMM,
        "bf16_kernel": cpu_xtx.available(),
        # what accumulate_hessian uses for bf16 activations here ("error_16bit_panels" is its error)
        "bf16_route": "cpu_xtx kernel (lower triangle by 64-column tiles)"
        if cpu_gemm.lower_triangle(torch.bfloat16)
        else "MKL bf16 GEMM panels",
        "fp32_route": "cpu_xtx kernel, float32 instance"
        if cpu_gemm.xtx_kernel(torch.float32)
        else "MKL SSYRK",
        "loadavg": os.getloadavg(),
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "results": rows,
    }
    out = ROOT / "bench" / f"hessian_{cpu_slug()}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
