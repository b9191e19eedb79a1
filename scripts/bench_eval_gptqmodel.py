"""Perplexity of a GPTQModel-made checkpoint: gptq_cli's loader + evaluate() vs transformers +
optimum + gptqmodel.

    python scripts/bench_eval_gptqmodel.py /tmp/gptqm_runs/g128_bf16 --windows 40

WikiText-2 raw test (../shared/data), first --windows windows of 2048 tokens, float32 on CPU. The
reference runs in its own process (gptqmodel never enters ours) with the GPTQ paper's loop over
model(window, labels=window).loss. Writes bench/eval_gptqmodel_checkpoint.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2_raw_test.txt"

REFERENCE = r"""
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig
ckpt, text, seqlen, windows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
bits = json.load(open(f"{ckpt}/config.json"))["quantization_config"]["bits"]
quant = GPTQConfig(bits=bits, backend="gptq_torch")
model = AutoModelForCausalLM.from_pretrained(
    ckpt, dtype=torch.float32, device_map="cpu", quantization_config=quant).eval()
text = open(text, encoding="utf-8").read()
ids = AutoTokenizer.from_pretrained(ckpt)(text, return_tensors="pt").input_ids
n = min(windows, ids.shape[1] // seqlen)
with torch.no_grad():
    window = lambda i: ids[:, i * seqlen:(i + 1) * seqlen]
    nll = sum(model(input_ids=window(i), labels=window(i)).loss.double() * seqlen for i in range(n))
kinds = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
ppl = float(torch.exp(nll / (n * seqlen)))
print(json.dumps({"ppl": ppl, "windows": n, "quant_modules": kinds}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--text", type=Path, default=WIKITEXT)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "eval_gptqmodel_checkpoint.json")
    args = ap.parse_args()

    from gptq_cli.evaluate import evaluate

    t0 = time.perf_counter()
    ours = evaluate(
        str(args.checkpoint),
        dataset="wikitext2",
        dataset_path=str(args.text),
        seqlen=args.seqlen,
        limit=args.windows,
        device="cpu",
        dtype="float32",
    )
    t1 = time.perf_counter()
    env = {
        **os.environ,
        "GPTQMODEL_CPU_WORKERS": "2",
        "TORCHDYNAMO_DISABLE": "1",
        "GPTQMODEL_DISABLE_PACK_EXT": "1",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            REFERENCE,
            str(args.checkpoint),
            str(args.text),
            str(args.seqlen),
            str(args.windows),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"transformers + gptqmodel failed:\n{proc.stderr[-3000:]}")
    reference = json.loads(proc.stdout.strip().splitlines()[-1])
    t2 = time.perf_counter()
    qcfg = json.loads((args.checkpoint / "config.json").read_text())["quantization_config"]
    report = {
        "what": "WikiText-2 raw test perplexity of a GPTQModel checkpoint, first "
        f"{ours['windows']} windows of {args.seqlen} tokens, float32 CPU",
        "checkpoint": str(args.checkpoint),
        "made_by": qcfg.get("meta", {}).get("quantizer"),
        "config": {
            k: qcfg.get(k) for k in ("bits", "group_size", "desc_act", "sym", "checkpoint_format")
        },
        "machine": f"{os.cpu_count()}-core CPU, {platform.platform()}",
        "gptq_cli": {
            "ppl": ours["ppl"],
            "backend": ours.get("backend"),
            "seconds": round(t1 - t0, 1),
        },
        "transformers_gptqmodel": {**reference, "seconds": round(t2 - t1, 1)},
        "relative_difference": abs(ours["ppl"] - reference["ppl"]) / reference["ppl"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if report["relative_difference"] > 1e-3:
        raise SystemExit(
            "gptq_cli's perplexity differs from transformers + gptqmodel's by more than 0.1%"
        )


if __name__ == "__main__":
    main()
