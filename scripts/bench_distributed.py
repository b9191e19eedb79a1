"""Multi-process quantize on one machine: `torchrun --nproc-per-node N` × T threads against 1
process × N·T threads, one after the other in one run, same model, calibration and flags. Each runs
under a fresh wrapper process, so its wall time and peak RSS are its own (peak RSS as wait4 reports
it: the largest single process, not the ranks' sum). Writes bench/distributed_<model>.json.

    python scripts/bench_distributed.py --model smollm2-135m --procs 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CALIB = ROOT.parent / "shared" / "data" / "calib_smollm2_c4_128x512.jsonl"


def run(cmd: list[str], threads: int) -> dict:
    """Wall time, the largest process's peak RSS (wait4 over the wrapper's children) and the exit
    code."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    wrapper = (
        "import json, resource, subprocess, sys, time; t = time.perf_counter(); rc = "
        "subprocess.run(sys.argv[1:]).returncode; print(json.dumps({'rc': rc, 'seconds': "
        "time.perf_counter() - t, 'peak_rss_gb': "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd], env=env, capture_output=True, text=True
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        sys.exit(f"no result from {' '.join(cmd)}:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def digest(checkpoint: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(checkpoint.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def mean_loss(checkpoint: Path) -> float:
    rows = json.loads((checkpoint / "quant_log.json").read_text())["modules"]
    return sum(r["loss"] for r in rows) / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument(
        "--threads", type=int, default=1, help="threads per rank in the multi-process run"
    )
    ap.add_argument("--dataset", default=str(CALIB))
    ap.add_argument("--report", default=None)
    args = ap.parse_args()
    flags = ["--dataset", args.dataset, "--device", "cpu", "--method", "gptq", "--quiet"]
    work = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    single = run(
        [
            sys.executable,
            "-m",
            "gptq_cli.cli",
            "quantize",
            args.model,
            "-o",
            str(work / "one"),
            *flags,
        ],
        args.procs * args.threads,
    )
    multi = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={args.procs}",
            "-m",
            "gptq_cli.cli",
            "quantize",
            args.model,
            "-o",
            str(work / "many"),
            *flags,
        ],
        args.threads,
    )
    for name, r in (("one", single), ("many", multi)):
        if r["rc"] == 0:
            r.update(digest=digest(work / name), mean_module_loss=mean_loss(work / name))
    report = {
        "what": f"gptq quantize {args.model}: 1 process x {args.procs * args.threads} threads vs "
        f"torchrun {args.procs} processes x {args.threads} thread(s), CPU (gloo), run one after "
        f"the other",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "loadavg_before": list(os.getloadavg()),
        },
        "flags": flags,
        "command": " ".join(sys.argv),
        "one_process": single,
        "torchrun": multi,
        "speedup": round(single["seconds"] / multi["seconds"], 3),
        "same_bytes": single.get("digest") == multi.get("digest"),
    }
    slug = Path(args.model.rstrip("/")).name.replace(".gguf", "")
    path = Path(args.report or ROOT / "bench" / f"distributed_{slug}.json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
