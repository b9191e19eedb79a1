"""The Python steps of scripts/device_check.sh; each writes one JSON file into OUTDIR.

    python scripts/device_check.py {kernels,quantize,ppl} OUTDIR [--cpu] [--budget SECONDS]

kernels   -> kernels.json: GEMV vs fp16 F.linear and vs the measured copy bandwidth; the block
          kernel vs the torch column loop on 4096x4096 (scripts/bench_kernels.py).
quantize  -> quantize.json: a Llama-2-7B-shaped model (hidden 4096, MLP 11008, 32 heads, vocab
          32000; LAYERS layers; random fp16 weights made here, a BPE tokenizer trained here on the
          built-in calibration text) quantized at 128 x 2048 (4-bit, g128, act-order) with
          per-phase timers and peak GPU memory, extrapolated to 32 layers; then the same with every
          submodule's inputs recorded (calibration.CUDA_RECORD_LIMIT lifted) if the budget allows;
          then batch-1 decode tokens/s, 4-bit vs fp16.
ppl       -> ppl.json: a tiny Llama quantized here, its perplexity on CUDA and on the CPU (within
          1%).
Nothing is downloaded. --cpu runs the same code at toy sizes on the CPU, to show the script works.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import defaultdict
from functools import wraps
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import bench_kernels  # noqa: E402

from gptq_cli import api, export  # noqa: E402
from gptq_cli.data.documents import BUILTIN_TEXT  # noqa: E402
from gptq_cli.evaluate import evaluate  # noqa: E402
from gptq_cli.format.config import QuantConfig  # noqa: E402
from gptq_cli.quantization import calibration, engine  # noqa: E402

SEVEN_B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
)
TOY = dict(
    hidden_size=256,
    intermediate_size=704,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=4096,
)


def fresh_dir(path: str) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return Path(path)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on the built-in calibration text (offline, a few
    seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(BUILTIN_TEXT)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def make_llama(path: Path, dims: dict, layers: int, device: str) -> Path:
    """A random fp16 Llama with `dims`, saved with the trained tokenizer (weights drawn on
    `device`)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = train_tokenizer(dims["vocab_size"])
    config = LlamaConfig(
        **dims,
        num_hidden_layers=layers,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class PhaseTimers:
    """Wraps the engine's phases with synchronized wall-clock timers (seconds summed per phase)."""

    PHASES = [
        (api, "capture_inputs", "capture"),
        (calibration, "collect_hessians", "forward_and_hessians"),
        (calibration, "accumulate_hessian", "hessian_matmuls"),
        (engine, "_solve", "solve"),
        (calibration, "advance", "advance"),
        (export, "write_output", "write"),
    ]

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.saved = []

    def __enter__(self) -> PhaseTimers:
        for module, name, phase in self.PHASES:
            fn = getattr(module, name)
            self.saved.append((module, name, fn))
            setattr(module, name, self._timed(fn, phase))
        return self

    def _timed(self, fn, phase: str):
        @wraps(fn)
        def run(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                self.seconds[phase] += time.perf_counter() - t0

        return run

    def __exit__(self, *exc) -> None:
        for module, name, fn in self.saved:
            setattr(module, name, fn)


def quantize_run(
    model_dir: Path, out: Path, *, nsamples: int, seqlen: int, layers: int, device: str
) -> dict:
    block_times: list[float] = []
    last = [0.0]

    def progress(kind, *args):
        if kind == "block":
            now = time.perf_counter()
            block_times.append(now - last[0])
            last[0] = now

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    quant = QuantConfig(bits=4, group_size=128, desc_act=True)
    with PhaseTimers() as timers:
        t0 = last[0] = time.perf_counter()
        api.quantize(
            str(model_dir),
            quant,
            dataset="builtin",
            nsamples=nsamples,
            seqlen=seqlen,
            device=device,
            output=out,
            progress=progress,
            method="gptq",
        )
        total = time.perf_counter() - t0
    blocks = (
        sum(block_times[1:]) / max(1, len(block_times) - 1)
        if len(block_times) > 1
        else total / layers
    )
    row = {
        "layers": layers,
        "total_s": total,
        "phases_s": dict(timers.seconds),
        "block_s": block_times,
        "mean_block_s_after_first": blocks,
        "extrapolated_32_layers_s": total + (32 - layers) * blocks,
        "records_inputs_limit_bytes": calibration.CUDA_RECORD_LIMIT,
    }
    if device == "cuda":
        row["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def decode_speed(path: Path, device: str) -> dict:
    result = evaluate(str(path), dataset="builtin", seqlen=512, limit=1, device=device, speed=True)
    return {k: v for k, v in result.items() if k in ("speed", "ppl", "dtype", "device", "backend")}


def step_kernels(outdir: Path, cpu: bool) -> dict:
    device = torch.device("cpu" if cpu else "cuda")
    copy = bench_kernels.copy_bandwidth_gbps(device, 64 << 20 if cpu else 1 << 30)
    shapes = [(256, 512)] if cpu else bench_kernels.GEMV_SHAPES
    return {
        **bench_kernels.device_info(device),
        "copy_gbps": copy,
        "gemv": bench_kernels.bench_gemv(device, shapes, copy_gbps=copy),
        "block": bench_kernels.bench_block(
            device, [(256, 512)] if cpu else [(4096, 4096)], repeats=1 if cpu else 3
        ),
    }


def step_quantize(outdir: Path, cpu: bool, budget: float, layers: int) -> dict:
    t_start = time.perf_counter()
    device = "cpu" if cpu else "cuda"
    nsamples, seqlen = (4, 128) if cpu else (128, 2048)
    work = fresh_dir("/tmp/gptq_device_check")
    model_dir = make_llama(work / "model", TOY if cpu else SEVEN_B, layers, device)
    made = time.perf_counter() - t_start
    report = {
        "model": {"dims": TOY if cpu else SEVEN_B, "layers": layers, "make_s": made},
        "calibration": {"dataset": "builtin", "nsamples": nsamples, "seqlen": seqlen},
        "default": quantize_run(
            model_dir,
            work / "q_default",
            nsamples=nsamples,
            seqlen=seqlen,
            layers=layers,
            device=device,
        ),
    }
    print(json.dumps(report["default"], indent=1), flush=True)
    spent = time.perf_counter() - t_start
    # room for the comparison and decode
    if budget - spent > 1.5 * report["default"]["total_s"] + 60:
        calibration.CUDA_RECORD_LIMIT = 1 << 62
        report["record_all_inputs"] = quantize_run(
            model_dir,
            work / "q_record",
            nsamples=nsamples,
            seqlen=seqlen,
            layers=layers,
            device=device,
        )
        print(json.dumps(report["record_all_inputs"], indent=1), flush=True)
    else:
        report["record_all_inputs"] = "skipped: not enough time left in the budget"
    report["decode_4bit"] = decode_speed(work / "q_default", device)
    report["decode_fp16"] = decode_speed(model_dir, device)
    return report


def step_ppl(outdir: Path, cpu: bool) -> dict:
    work = fresh_dir("/tmp/gptq_device_check_ppl")
    device = "cpu" if cpu else "cuda"
    dims = {**TOY, "vocab_size": 4096}
    model_dir = make_llama(work / "model", dims, 2, "cpu")
    ckpt = work / "q"
    api.quantize(
        str(model_dir),
        QuantConfig(bits=4, group_size=128, desc_act=True),
        dataset="builtin",
        nsamples=16,
        seqlen=256,
        device=device,
        output=ckpt,
        method="gptq",
    )
    runs = {
        dev: evaluate(str(ckpt), dataset="builtin", seqlen=256, limit=8, device=dev)
        for dev in ([] if cpu else ["cuda"]) + ["cpu"]
    }
    ppl = {dev: run["ppl"] for dev, run in runs.items()}
    report = {
        "quantized_on": device,
        "perplexity": ppl,
        "eval": {dev: {k: run[k] for k in ("backend", "dtype")} for dev, run in runs.items()},
    }
    if "cuda" in ppl:
        report["relative_difference"] = abs(ppl["cuda"] - ppl["cpu"]) / ppl["cpu"]
        report["within_1_percent"] = report["relative_difference"] <= 0.01
    # the default method (GPTAQ-LS: a second, full-precision stream of activations) on this device,
    # and the same on the CPU: their perplexities should agree as GPTQ's do
    gptaq = {}
    for dev in ([] if cpu else ["cuda"]) + ["cpu"]:
        out = work / f"q_gptaq_ls_{dev}"
        api.quantize(
            str(model_dir),
            QuantConfig(bits=4, group_size=128, desc_act=True),
            dataset="builtin",
            nsamples=16,
            seqlen=256,
            device=dev,
            output=out,
            method="gptaq-ls",
        )
        gptaq[dev] = evaluate(str(out), dataset="builtin", seqlen=256, limit=8, device="cpu")["ppl"]
    report["gptaq_ls_quantized_on"] = gptaq
    if "cuda" in gptaq:
        report["gptaq_ls_relative_difference"] = abs(gptaq["cuda"] - gptaq["cpu"]) / gptaq["cpu"]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["kernels", "quantize", "ppl"])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--cpu", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds this step may take")
    parser.add_argument(
        "--layers", type=int, default=4, help="decoder layers of the 7B-shaped model"
    )
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu")
    t0 = time.perf_counter()
    if args.step == "kernels":
        report = step_kernels(args.outdir, args.cpu)
    elif args.step == "quantize":
        report = step_quantize(args.outdir, args.cpu, args.budget, 2 if args.cpu else args.layers)
    else:
        report = step_ppl(args.outdir, args.cpu)
    report["step_seconds"] = time.perf_counter() - t0
    report["cpu_mode"] = args.cpu
    (args.outdir / f"{args.step}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.outdir / (args.step + '.json')}", flush=True)


if __name__ == "__main__":
    main()
