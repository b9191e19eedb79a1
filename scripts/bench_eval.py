"""WikiText-2 perplexity of SmolLM2-135M: gptq_cli's evaluate() against a plain-transformers loop
written here.

    python scripts/prepare_smollm2.py --out /tmp/smollm2-135m-fp16      # once, if missing
    python scripts/bench_eval.py --model /tmp/smollm2-135m-fp16 --windows 40

Both read ../shared/data/wikitext2_raw_test.txt (exactly "\\n\\n".join(test rows)), cut it into
windows of 2048 tokens and evaluate the first --windows of them in float32 on CPU. The reference
loop is the GPTQ paper's: loss of model(window, labels=window), nll = loss * seqlen, ppl =
exp(sum(nll) / (windows * seqlen)). Writes bench/eval_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2_raw_test.txt"


def reference_ppl(model_dir: Path, text_file: Path, seqlen: int, windows: int) -> float:
    """The paper's evaluation loop, with nothing from gptq_cli."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(text_file.read_text(encoding="utf-8"), return_tensors="pt").input_ids
    n = min(windows, ids.shape[1] // seqlen)
    nlls = []
    with torch.no_grad():
        for i in range(n):
            batch = ids[:, i * seqlen : (i + 1) * seqlen]
            nlls.append(model(input_ids=batch, labels=batch).loss.float() * seqlen)
    return torch.exp(torch.stack(nlls).sum() / (n * seqlen)).item()


def cpu_name() -> str:
    for line in (
        Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    ):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=Path("/tmp/smollm2-135m-fp16"))
    ap.add_argument("--text", type=Path, default=WIKITEXT)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "eval_smollm2.json")
    args = ap.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(
            f"{args.model} is missing: python scripts/prepare_smollm2.py --out {args.model}"
        )

    from gptq_cli.evaluate import evaluate

    t0 = time.perf_counter()
    ours = evaluate(
        str(args.model),
        dataset="wikitext2",
        dataset_path=str(args.text),
        seqlen=args.seqlen,
        limit=args.windows,
        device="cpu",
        dtype="float32",
    )
    t1 = time.perf_counter()
    reference = reference_ppl(args.model, args.text, args.seqlen, args.windows)
    t2 = time.perf_counter()

    report = {
        "what": f"WikiText-2 (raw test) perplexity, first {ours['windows']} windows of "
        f"{args.seqlen} tokens, float32",
        "model": str(args.model),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "note": "shared 2-core CPU with other jobs running: wall times are indicative only",
        },
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gptq_cli_ppl": ours["ppl"],
        "reference_ppl": reference,
        "relative_difference": abs(ours["ppl"] - reference) / reference,
        "windows": ours["windows"],
        "tokens_predicted": ours["tokens"],
        "wall_seconds": {
            "gptq_cli_evaluate": round(t1 - t0, 1),
            "reference_loop": round(t2 - t1, 1),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if not math.isfinite(ours["ppl"]) or report["relative_difference"] > 1e-4:
        raise SystemExit(
            "gptq_cli's perplexity differs from the reference loop by more than 1e-4 (relative)"
        )


if __name__ == "__main__":
    main()
