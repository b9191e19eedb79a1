"""How often the first parallel call of MKL's vector math (VML) in a fresh process computes wrong
values, with and without kernels.initialize_cpu_math() before it (issue 29's rare nondeterminism).

Each trial is a fresh Python process that computes a rotary embedding's cos as transformers does
(positions 0..63, head dim 64: 4096 float32 values, which torch splits across 2 threads) twice and
compares the two results; only the first call of the process can differ. Trials alternate between
the two arms, so load affects both alike.

    python scripts/repro_vml_first_call.py --trials 100     # writes bench/vml_first_call_<cpu>.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRIAL = """
import json, sys, torch
torch.set_num_threads(2)
if sys.argv[1] == "initialized":
    from gptq_cli.kernels import initialize_cpu_math
    initialize_cpu_math()
inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64))
freqs = torch.arange(64)[None, :, None].float() * inv_freq
emb = torch.cat((freqs, freqs), dim=-1)
first, second = emb.cos(), emb.cos()
differ, max_abs = int((first != second).sum()), float((first - second).abs().max())
print(json.dumps({"differ": differ, "max_abs": max_abs}))
"""


def trial(arm: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", TRIAL, arm], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--trials", type=int, default=100, help="fresh processes per arm")
    ap.add_argument("--load", default="quiet", help="what else ran on the machine")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    arms: dict[str, list[dict]] = {"plain": [], "initialized": []}
    for i in range(args.trials):
        for arm, results in arms.items():
            results.append(trial(arm))
        print(
            i + 1, {arm: sum(r["differ"] > 0 for r in rs) for arm, rs in arms.items()}, flush=True
        )
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_quality import cpu_info, cpu_slug

    report = {
        "what": "fresh processes whose first parallel VML call (float32 cos of 4096 values, 2 "
        "threads) differs from the second",
        "cpu": cpu_info(),
        "torch": torch.__version__,
        "load": args.load,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "arms": {
            arm: {
                "trials": len(rs),
                "differ": sum(r["differ"] > 0 for r in rs),
                "worst_max_abs": max(r["max_abs"] for r in rs),
                "values_differing_when_it_happens": sorted(
                    {r["differ"] for r in rs if r["differ"]}
                ),
            }
            for arm, rs in arms.items()
        },
    }
    out = args.out or ROOT / "bench" / f"vml_first_call_{cpu_slug()}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["arms"]), "->", out)


if __name__ == "__main__":
    main()
