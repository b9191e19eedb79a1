"""Peak host memory and time of `gptq quantize` against model depth and layer size (issue 19), on
CPU.

Makes random Llama-shaped fp16 models sharded like real checkpoints (4 / 12 / 24 layers of hidden
2048, and one layer of Llama-70B shape: hidden 8192, MLP 28672, 64 heads, 8 KV heads), quantizes
each with 16 x 128 random calibration tokens on --device cpu in a fresh process, and records that
process's peak RSS (wait4's ru_maxrss), its wall time, and what `--dry-run` estimated, into
bench/scale_cpu.json (one entry per model, updated in place).

    python scripts/bench_scale.py --models 4,12,24,70b --work /tmp/bench-scale
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOCAB = 32000
SHAPES = {  # name -> (layers, hidden, intermediate, heads, kv heads)
    "4": (4, 2048, 5632, 16, 16),
    "12": (12, 2048, 5632, 16, 16),
    "24": (24, 2048, 5632, 16, 16),
    "70b": (1, 8192, 28672, 64, 8),
}
# real checkpoints shard at 2-10 GB; 1 GB gives these small models several shards
SHARD_BYTES = 1 << 30


def make_model(
    path: Path, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int
) -> None:
    """A random fp16 LlamaForCausalLM written tensor by tensor (never all in memory) as
    safetensors shards."""
    import transformers
    from safetensors.torch import save_file

    from tests.tiny_models import make_tiny_tokenizer

    if (path / "model.safetensors.index.json").is_file():
        return
    path.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=False,
        dtype="float16",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    config.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    kv = hidden // heads * kv_heads
    shapes = {"model.embed_tokens.weight": (VOCAB, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (kv, hidden),
                p + "self_attn.v_proj.weight": (kv, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "mlp.gate_proj.weight": (intermediate, hidden),
                p + "mlp.up_proj.weight": (intermediate, hidden),
                p + "mlp.down_proj.weight": (hidden, intermediate),
            }
        )
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (VOCAB, hidden)})
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    weight_map, size, names = {}, 0, []

    def flush() -> None:
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shards[-1], str(path / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shards[-1]})
        shards[-1] = {}

    for key, shape in shapes.items():
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
        t = t.half()
        if shards[-1] and size + t.numel() * 2 > SHARD_BYTES:
            flush()
            size = 0
        shards[-1][key] = t
        size += t.numel() * 2
    flush()
    final = {
        name: f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i, name in enumerate(names)
    }
    for name, new in final.items():
        (path / name).rename(path / new)
    index = {
        "metadata": {"total_size": sum(torch.Size(s).numel() * 2 for s in shapes.values())},
        "weight_map": {k: final[v] for k, v in sorted(weight_map.items())},
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def calibration_file(path: Path, nsamples: int, seqlen: int) -> Path:
    """Pre-tokenized random calibration rows, over the ids the (tiny test) tokenizer knows."""
    from tests.tiny_models import VOCAB_SIZE

    gen = torch.Generator().manual_seed(1)
    rows = torch.randint(3, VOCAB_SIZE, (nsamples, seqlen), generator=gen).tolist()
    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    return path


def run_measured(cmd: list[str], env: dict) -> tuple[int, float, float, str]:
    """(exit code, seconds, peak RSS in GB of the process and its waited children, stderr tail)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    # communicate() has reaped the child; its rusage is in RUSAGE_CHILDREN only as a max over all
    # children, so each measured command is started from a fresh wrapper (see main) and this is that
    # wrapper's max.
    import resource

    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
    return proc.returncode, seconds, peak_gb, (out + err)[-2000:]


def others_running() -> list[str]:
    """Other big processes on the machine (the machine is shared; times and free memory depend on
    them)."""
    me = os.getpid()
    rows = subprocess.run(
        ["ps", "-eo", "pid,rss,pcpu,args", "--sort=-rss"], capture_output=True, text=True
    ).stdout
    out = []
    for line in rows.splitlines()[1:8]:
        pid, rss, pcpu, args = line.split(None, 3)
        if int(pid) != me and int(rss) > 200_000:
            out.append(f"{int(rss) / 1e6:.1f} GB, {pcpu}% cpu: {args[:100]}")
    return out


def measure(name: str, work: Path, nsamples: int, seqlen: int) -> dict:
    layers, hidden, inter, heads, kv = SHAPES[name]
    model = work / f"llama-{name}"
    make_model(model, layers, hidden, inter, heads, kv)
    calib = calibration_file(work / "calib.jsonl", nsamples, seqlen)
    out = work / f"out-{name}"
    subprocess.run(["rm", "-rf", str(out), str(out) + ".work"], check=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [
        shutil.which("gptq") or "gptq",
        "quantize",
        str(model),
        "-o",
        str(out),
        "--dataset",
        str(calib),
        "--nsamples",
        str(nsamples),
        "--seqlen",
        str(seqlen),
        "--device",
        "cpu",
        "--method",
        "gptq",
    ]
    plan = json.loads(
        subprocess.run(
            base + ["--dry-run", "--json"], env=env, capture_output=True, text=True, check=True
        ).stdout
    )
    load = {"loadavg_before": os.getloadavg(), "other_processes_before": others_running()}
    wrapper = [sys.executable, __file__, "--child", "--", *base, "--quiet"]
    res = subprocess.run(wrapper, env=env, capture_output=True, text=True)
    child = json.loads(res.stdout.strip().splitlines()[-1])
    disk = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    estimate = {
        k: plan.get(k)
        for k in ("peak_host_memory_gb", "peak_device_memory_gb", "estimated_seconds")
    }
    ratios = {
        "peak_rss_over_estimate": round(child["peak_gb"] / plan["peak_host_memory_gb"], 2),
        "seconds_over_estimate": round(child["seconds"] / plan["estimated_seconds"], 2),
    }
    log = out / "quant_log.json"
    solves = {}
    if layers == 1 and log.is_file():  # where the time of one big layer goes
        for m in json.loads(log.read_text())["modules"]:
            solves[m["name"]] = m.get("seconds")
    return {
        "model": f"llama-{name}",
        "layers": layers,
        "hidden": hidden,
        "intermediate": inter,
        "heads": heads,
        "kv_heads": kv,
        "on_disk_gb": round(disk / 1e9, 2),
        "exit_code": child["rc"],
        "peak_rss_gb": round(child["peak_gb"], 2),
        "seconds": round(child["seconds"], 1),
        "dry_run": estimate,
        **ratios,
        **({"solve_seconds_by_module": solves} if solves else {}),
        **load,
        "loadavg_after": os.getloadavg(),
        "tail": child["tail"] if child["rc"] else "",
    }


def main() -> None:
    # measure one command in a fresh process: RUSAGE_CHILDREN is then its own
    if sys.argv[1:2] == ["--child"]:
        rc, seconds, peak, tail = run_measured(sys.argv[3:], dict(os.environ))
        print(json.dumps({"rc": rc, "seconds": seconds, "peak_gb": peak, "tail": tail}))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models", default="4,12,24,70b", help=f"comma-separated, of {', '.join(SHAPES)}"
    )
    ap.add_argument(
        "--work", default="/tmp/bench-scale", help="where models and outputs go (several GB)"
    )
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--report", default=str(ROOT / "bench" / "scale_cpu.json"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report_path = Path(args.report)
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report.update(
        {
            "what": "gptq quantize --device cpu on random Llama-shaped fp16 models: "
            "peak RSS vs depth",
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "memory_gb": round(
                    os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1
                ),
                "torch": torch.__version__,
            },
            "calibration": f"{args.nsamples} x {args.seqlen} random token ids",
            "settings": "4-bit g128 sym",
        }
    )
    results = report.setdefault("results", {})
    for name in args.models.split(","):
        print(f"measuring llama-{name} ...", file=sys.stderr, flush=True)
        results[name] = {
            **measure(name, work, args.nsamples, args.seqlen),
            "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        print(json.dumps(results[name], indent=1), file=sys.stderr, flush=True)
        report_path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
