"""Quantization speed and memory, ours against GPTQModel, back to back on the same calibration ids
(issue 29).

SmolLM2-135M (a plain HF directory, scripts/prepare_smollm2.py), the shared 128 x 512 C4 ids, bf16
and fp32 activations, 4-bit g128, 4-bit g128 act-order and 3-bit g128. For each (dtype, setting):
ours as a new user runs it (`gptq quantize MODEL --bits .. --group-size .. --dataset IDS --nsamples
128 --seqlen 512 --dtype ..`), then GPTQModel (scripts/gptqmodel_run.py), each in its own process
under /usr/bin/time: wall seconds and peak RSS (`%M`, the largest resident set of the process or any
child it waited for; GPTQModel's own process's peak, from its getrusage, is kept beside it). Our
per-phase seconds come from the checkpoint's quant_log.json. Writes bench/speed_<cpu>.json and
prints the README's table. Run it on a quiet machine: nothing else beside it.

    python scripts/prepare_smollm2.py --out /tmp/smollm2-135m --dtype float16
    python scripts/bench_vs_gptqmodel.py --model /tmp/smollm2-135m --work /tmp/bench-speed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_quality import DATA, cpu_info, cpu_model_and_isa, cpu_slug, timed  # noqa: E402

SETTINGS = {  # name -> (bits, group size, act-order), the flags both tools get
    "4bit-g128": (4, 128, False),
    "4bit-g128-act": (4, 128, True),
    "3bit-g128": (3, 128, False),
}


def flags(setting: str) -> list[str]:
    bits, group_size, desc_act = SETTINGS[setting]
    return [
        "--bits",
        str(bits),
        "--group-size",
        str(group_size),
        *(["--desc-act"] if desc_act else []),
    ]


def run_ours(model: Path, out: Path, flags: list[str], dtype: str, calib: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    # --method gptq: GPTQ against GPTQModel's GPTQ (our default is GPTAQ-LS)
    cmd = [
        shutil.which("gptq") or "gptq",
        "quantize",
        str(model),
        *flags,
        "--method",
        "gptq",
        "--dataset",
        str(calib),
        "--nsamples",
        "128",
        "--seqlen",
        "512",
        "--dtype",
        dtype,
        "-o",
        str(out),
        "--quiet",
    ]
    res = timed(cmd)
    log = json.loads((out / "quant_log.json").read_text())
    return {
        "wall_s": res["wall_s"],
        "peak_rss_mb": res["peak_rss_mb"],
        "phases_s": log["phases"],
        "command": " ".join(cmd),
    }


def run_gptqmodel(model: Path, out: Path, flags: list[str], dtype: str, calib: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "gptqmodel_run.py"),
        str(model),
        str(out),
        *flags,
        "--calib",
        str(calib),
        "--dtype",
        dtype,
    ]
    res = timed(cmd, env={"GPTQMODEL_CPU_WORKERS": "2"})
    own = json.loads(res["stdout"].strip().splitlines()[-1])
    return {
        "wall_s": res["wall_s"],
        "peak_rss_mb": res["peak_rss_mb"],
        "own_process_peak_rss_mb": own["peak_rss_mb"],
        "version": own["version"],
        "command": " ".join(cmd),
    }


def table(results: dict) -> str:
    lines = [
        "| dtype | setting | GPTQModel wall / peak RSS | ours wall / peak RSS | speedup | ours: "
        "load, forward, Hessian, solve, pack, write (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results.values():
        g, o = r["gptqmodel"], r["ours"]
        p = o["phases_s"]
        phases = ", ".join(
            f"{p[k]:.1f}" for k in ("load", "forward", "hessian", "solve", "pack", "write")
        )
        lines.append(
            f"| {r['dtype']} | {r['setting']} | {g['wall_s']:.1f} s / {g['peak_rss_mb']:.0f} MB | "
            f"{o['wall_s']:.1f} s / {o['peak_rss_mb']:.0f} MB | **{r['speedup']:.2f}×** | "
            f"{phases} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=Path("/tmp/smollm2-135m"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-speed"))
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--report", type=Path, default=None, help="default bench/speed_<cpu>.json")
    args = ap.parse_args()
    calib = DATA / "calib_smollm2_c4_128x512.jsonl"
    report_path = args.report or ROOT / "bench" / f"speed_{cpu_slug()}.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    name, isa = cpu_model_and_isa()
    import torch

    report.update(
        {
            "what": "gptq quantize vs GPTQModel on SmolLM2-135M, 128 x 512 shared C4 ids, "
            "back to back",
            "machine": {
                "cpu": cpu_info(),
                "model_name": name,
                "isa": isa,
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "torch": torch.__version__,
            },
            "calibration": str(calib.name),
        }
    )
    results = report.setdefault("results", {})
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    args.work.mkdir(parents=True, exist_ok=True)
    for dtype in args.dtypes:
        for setting in args.settings:
            print(f"{dtype} {setting}: ours ...", file=sys.stderr, flush=True)
            ours = run_ours(
                args.model, args.work / f"ours-{dtype}-{setting}", flags(setting), dtype, calib
            )
            print(f"  {ours['wall_s']} s; GPTQModel ...", file=sys.stderr, flush=True)
            theirs = run_gptqmodel(
                args.model, args.work / f"gptqmodel-{dtype}-{setting}", flags(setting), dtype, calib
            )
            print(f"  {theirs['wall_s']} s", file=sys.stderr, flush=True)
            results[f"{dtype}/{setting}"] = {
                "dtype": dtype,
                "setting": setting,
                "ours": ours,
                "gptqmodel": theirs,
                "speedup": round(theirs["wall_s"] / ours["wall_s"], 2),
                "commit": commit,
                "loadavg_after": os.getloadavg(),
                "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            }
            report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
