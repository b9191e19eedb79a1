"""Act-order variants on the real SmolLM2-135M (issue 33): is a file vLLM 0.32 serves as good as one
it refuses?

vLLM 0.32 refuses desc_act true with groups. `--desc-act --static-groups` solves in the same
act-order but keeps each group's columns (g_idx = k // group, written as desc_act false); the
default orders columns within and across groups by the Hessian diagonal without moving any column
out of its group (group-aware). Each is quantized on the same calibration ids per seed
(bench_quality.py's draws: seed 0 is the shared 128 x 512 file) and scored on WikiText-2 (40 x 2048,
bench_quality's protocol and perplexity cache); mean and spread over the seeds.

    python scripts/bench_act_order.py --group-size 128 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "bench_quality", ROOT / "scripts" / "bench_quality.py"
)
bq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bq)

VARIANTS = {
    "group-aware (default)": [],
    "--desc-act": ["--desc-act"],
    "--desc-act --static-groups": ["--desc-act", "--static-groups"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/smollm2-135m"))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--eval-dtype", default=bq.fast_cpu_dtype(), choices=["float32", "bfloat16"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_act_order"))
    ap.add_argument("--ppl-cache", type=Path, default=Path("/tmp/bench_quality/ppl_cache.json"))
    args = ap.parse_args()

    from gptq_cli.data.textdata import eval_windows
    from gptq_cli.evaluate import perplexity
    from gptq_cli.format.compat import VLLM
    from gptq_cli.inspection import inspect_checkpoint
    from gptq_cli.model.loader import load_quantized_model
    from gptq_cli.model.modelio import load_tokenizer, resolve_model

    args.work.mkdir(parents=True, exist_ok=True)
    args.ppl_cache.parent.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.eval_dtype)
    tokenizer = load_tokenizer(resolve_model(str(args.model)))
    text = bq.DATA / "wikitext2_raw_test.txt"
    windows = eval_windows(tokenizer, str(text), seqlen=2048, limit=args.windows)
    cache = json.loads(args.ppl_cache.read_text()) if args.ppl_cache.is_file() else {}
    setting = ["--bits", str(args.bits), "--group-size", str(args.group_size)]
    name = f"{args.bits}g{args.group_size}"
    out_path = ROOT / "bench" / f"act_order_smollm2_{name}_{bq.cpu_slug()}_{args.eval_dtype}.json"
    report = {
        "what": __doc__.splitlines()[0],
        "machine": bq.cpu_info(),
        "torch": torch.__version__,
        "setting": name,
        "eval": {
            "text": text.name,
            "windows": windows.shape[0],
            "seqlen": 2048,
            "dtype": args.eval_dtype,
        },
        "command": f"python scripts/bench_act_order.py --bits {args.bits} --group-size "
        f"{args.group_size} --seeds {' '.join(map(str, args.seeds))}",
        "variants": {},
    }
    for variant, flags in VARIANTS.items():
        runs = {}
        for seed in args.seeds:
            calib = bq.calibration_file(seed, tokenizer, args.work)
            out = args.work / f"{name}-{'-'.join(flags).strip('-') or 'default'}-seed{seed}"
            if not (out / "config.json").is_file():
                bq.quantize_ours(
                    args.model, [*setting, *flags, "--dtype", args.eval_dtype], calib, out
                )
            key = f"{bq.weights_digest(out)}|{text.name}|{windows.shape[0]}x2048|{args.eval_dtype}"
            if key not in cache:
                cache[key] = round(
                    perplexity(load_quantized_model(out, dtype=dtype), windows)["ppl"], 4
                )
                args.ppl_cache.write_text(json.dumps(cache, indent=1))
            inspected = inspect_checkpoint(out)
            runs[seed] = {
                "ppl": cache[key],
                "desc_act_in_file": inspected.quantization_config["desc_act"],
                "vllm": {v.loader: v.loads for v in inspected.loaders if v.loader in VLLM},
            }
            print(f"{variant} seed {seed}: ppl {cache[key]}", flush=True)
        ppls = [r["ppl"] for r in runs.values()]
        report["variants"][variant] = {
            "flags": flags,
            "seeds": runs,
            "mean": round(statistics.mean(ppls), 4),
            "spread": round(max(ppls) - min(ppls), 4),
        }
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    for variant, r in report["variants"].items():
        print(f"{variant:>28}: mean {r['mean']} (spread {r['spread']})")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
