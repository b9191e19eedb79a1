"""Perplexity with the GPTQ paper's protocol, generation speed, and the plain Python API over both.

    from gptq_cli.evaluate import evaluate, compare
    # {"ppl": ..., "windows": ..., ...}
    evaluate("llama2-7b-gptq", dataset="wikitext2", seqlen=2048)
    # the same windows for each model, and each one's ppl ratio to the first
    compare(["meta-llama/Llama-2-7b-hf", "llama2-7b-gptq"], limit=40)

Full-precision models load with transformers (Hub id, local directory, .gguf file or built-in name);
GPTQ checkpoints load through gptq_cli.model.loader, so their linears run in our QuantLinear.
"""

from __future__ import annotations

import gc
import inspect
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gptq_cli import __version__, kernels
from gptq_cli.data.documents import BUILTIN_TEXT
from gptq_cli.data.textdata import eval_windows, tokenize
from gptq_cli.errors import UsageError
from gptq_cli.settings import (
    EVAL_BATCH_SIZE,
    EVAL_DATASET,
    EVAL_SEQLEN,
    check_at_least_one,
    check_context,
    context_length,
)

# progress(label, windows_done, windows_total): label names the model being evaluated.
ProgressFn = Callable[[str, int, int], None]
RESULTS_FILE = "eval_results.json"
# Positions whose logits are upcast to float32 at once: bounds the extra memory to chunk x vocab
# floats.
LOGIT_CHUNK = 512
SPEED_PROMPT_LEN, SPEED_NEW_TOKENS = 256, 64


@dataclass
class ModelSource:
    name: str  # as the user gave it
    ref: Any  # gptq_cli.model.modelio.ModelRef: where the files are
    tokenizer: Any
    config: Any
    quantized: bool


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    quantized: bool
    device: torch.device
    dtype: torch.dtype


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """exp(mean NLL over every predicted token of every window): each window [seqlen] predicts
    its tokens 1..seqlen-1 from the ones before. NLL sums in float64 from float32 log-softmax of
    the logits. progress(n) is called after each batch with the number of windows it held."""
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise UsageError(
            f"need at least one window of two or more tokens, got shape {tuple(windows.shape)}"
        )
    check_at_least_one(batch_size=batch_size)
    model.eval()
    device = _device_of(model)
    nll_sum, predicted = 0.0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, windows.shape[0], batch_size):
            batch = windows[first : first + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            nll_sum += _summed_nll(logits, batch)
            predicted += batch.shape[0] * (batch.shape[1] - 1)
            del logits
            if progress:
                progress(batch.shape[0])
    nll = nll_sum / predicted
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "windows": windows.shape[0],
        "seqlen": windows.shape[1],
        "tokens": predicted,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _summed_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Sum of -log p(ids[:, t+1] | ids[:, :t+1]) over t, upcasting the logits chunk by chunk."""
    total = 0.0
    for s in range(0, ids.shape[1] - 1, LOGIT_CHUNK):
        e = min(s + LOGIT_CHUNK, ids.shape[1] - 1)
        chunk = logits[:, s:e].float()
        total += (
            F.cross_entropy(
                chunk.reshape(-1, chunk.shape[-1]),
                ids[:, s + 1 : e + 1].reshape(-1),
                reduction="sum",
            )
            .double()
            .item()
        )
    return total


@dataclass
class GreedyRun:
    # [1, new_tokens + 1]: the token prefill chose, then one per decode step
    tokens: torch.Tensor
    prefill_seconds: float
    decode_seconds: float


def greedy_decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> GreedyRun:
    """Greedy generation with the KV cache, timing the prompt's forward pass and the `new_tokens`
    single-token steps after it separately (batch 1)."""
    device = _device_of(model)
    prompt = prompt.to(device)
    # transformers 5 renamed the KV cache argument and output field past_key_values -> cache.
    cache = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        model(input_ids=prompt[:, :8], use_cache=False)  # warm-up: first-call costs are not speed
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        t1 = time.perf_counter()
        tokens = [token]
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **{cache: out[cache]})
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
        _sync(device)
        t2 = time.perf_counter()
    return GreedyRun(torch.cat(tokens, dim=1).cpu(), t1 - t0, t2 - t1)


def speed(
    model: torch.nn.Module,
    tokenizer,
    *,
    prompt_len: int = SPEED_PROMPT_LEN,
    new_tokens: int = SPEED_NEW_TOKENS,
) -> dict:
    """Prefill and decode tokens/s at batch 1, greedy, on a fixed prompt (the start of the
    built-in text)."""
    if prompt_len < 8 or new_tokens < 1:
        raise UsageError(
            "speed needs a prompt of at least 8 tokens and 1 new token, got "
            f"{prompt_len}, {new_tokens}"
        )
    check_context(model.config, prompt_len + new_tokens, what="speed's prompt + new tokens")
    ids = tokenize(BUILTIN_TEXT.read_text(encoding="utf-8"), tokenizer)
    prompt = ids.repeat(math.ceil(prompt_len / ids.numel()))[:prompt_len].unsqueeze(0)
    run = greedy_decode(model, prompt, new_tokens)
    return {
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_tokens_per_s": prompt_len / run.prefill_seconds,
        "decode_tokens_per_s": new_tokens / run.decode_seconds,
        "prefill_seconds": run.prefill_seconds,
        "decode_seconds": run.decode_seconds,
    }


def open_model(model_path: str, trust_remote_code: bool = False) -> ModelSource:
    """A model's files, tokenizer and config, without its weights: enough to check the data and
    the context before the (possibly long) weight loading."""
    from transformers import AutoConfig

    from gptq_cli.format.reader import is_quantized_checkpoint
    from gptq_cli.model.modelio import load_tokenizer, resolve_model

    ref = resolve_model(model_path, trust_remote_code)
    quantized = ref.gguf_file is None and is_quantized_checkpoint(ref.path)
    return ModelSource(
        model_path,
        ref,
        load_tokenizer(ref),
        AutoConfig.from_pretrained(ref.path, **ref.load_kwargs),
        quantized,
    )


def load_model(
    source: ModelSource, *, device: str | None = None, dtype: str = "auto"
) -> LoadedModel:
    """The model's weights, ready for evaluation on `device`: GPTQ checkpoints through
    gptq_cli.model.loader (their linears become QuantLinear), anything else through transformers.
    dtype "auto": float32 on CPU (half-precision matmuls there are slow and less exact), the
    checkpoint's own dtype on GPU."""
    from transformers import AutoModelForCausalLM

    from gptq_cli.model.modelio import resolve_device, resolve_dtype, storage_dtype

    dev = resolve_device(device)
    kernels.initialize_cpu_math()
    if dtype == "auto":
        cdtype = torch.float32 if dev.type == "cpu" else storage_dtype(source.ref)
    else:
        cdtype = resolve_dtype(dtype, dev)
    if source.quantized:
        from gptq_cli.model.loader import load_quantized_model

        model = load_quantized_model(
            source.ref.path,
            device=dev,
            dtype=cdtype,
            trust_remote_code=source.ref.trust_remote_code,
        )
    else:
        model = (
            AutoModelForCausalLM.from_pretrained(
                source.ref.path, dtype=cdtype, **source.ref.load_kwargs
            )
            .to(dev)
            .eval()
        )
    return LoadedModel(model, source.tokenizer, source.quantized, dev, cdtype)


def evaluate(
    model_path: str,
    *,
    dataset: str = EVAL_DATASET,
    seqlen: int = EVAL_SEQLEN,
    limit: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
    speed: bool = False,
    dataset_path: str | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    progress: ProgressFn | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Perplexity of one model (full precision or GPTQ) on `dataset`, plus tokens/s when `speed`."""
    return compare(
        [model_path],
        dataset=dataset,
        seqlen=seqlen,
        limit=limit,
        device=device,
        dtype=dtype,
        speed=speed,
        dataset_path=dataset_path,
        batch_size=batch_size,
        progress=progress,
        trust_remote_code=trust_remote_code,
    )["models"][0]


def compare(
    model_paths: list[str],
    *,
    dataset: str = EVAL_DATASET,
    seqlen: int = EVAL_SEQLEN,
    limit: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
    speed: bool = False,
    dataset_path: str | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    progress: ProgressFn | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Evaluate each model on the same windows (tokenized once, with the first model's tokenizer;
    every other model must share that tokenizer). With several models, each result carries
    ppl_ratio = its ppl / the first model's ppl. trust_remote_code: models whose config.json
    names their own code may run it."""
    if not model_paths:
        raise UsageError("give at least one model to evaluate")
    # checked before any model loads; perplexity() checks it again for direct callers
    check_at_least_one(batch_size=batch_size)
    sources = [open_model(path, trust_remote_code) for path in model_paths]
    for source in sources:
        check_context(source.config, seqlen)
        if not same_tokenizer(sources[0].tokenizer, source.tokenizer):
            raise UsageError(
                f"{source.name} has a different tokenizer from {sources[0].name}: their "
                f"perplexities are not comparable; evaluate them separately"
            )
    windows = eval_windows(
        sources[0].tokenizer, dataset, seqlen=seqlen, limit=limit, dataset_path=dataset_path
    )
    results = []
    for source in sources:
        loaded = load_model(source, device=device, dtype=dtype)
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            progress(source.name, done, windows.shape[0])

        result = {
            "model": source.name,
            "dataset": dataset,
            "quantized": loaded.quantized,
            # "cuda-ext": QuantLinear may use the CUDA GEMV (4-bit, small batches; else
            # dequantize + matmul)
            "backend": kernels.backend_name(loaded.device) if loaded.quantized else None,
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."),
            **perplexity(
                loaded.model, windows, batch_size=batch_size, progress=advance if progress else None
            ),
        }
        if speed:
            result["speed"] = _speed_of(loaded)
        results.append(result)
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if len(results) > 1:
        for r in results:
            r["ppl_ratio"] = r["ppl"] / results[0]["ppl"]
    return {"dataset": dataset, "seqlen": seqlen, "windows": windows.shape[0], "models": results}


def _speed_of(loaded: LoadedModel) -> dict:
    # Module level because compare's `speed` flag shadows the speed() function inside it.
    # Small-context models get a shorter prompt rather than an error.
    context = context_length(loaded.model.config) or SPEED_PROMPT_LEN + SPEED_NEW_TOKENS
    return speed(
        loaded.model, loaded.tokenizer, prompt_len=min(SPEED_PROMPT_LEN, context - SPEED_NEW_TOKENS)
    )


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers turn text into the same ids (same vocabulary and the same special
    tokens)."""
    probe = "Perplexity windows must be identical.\n\n = Heading = \n 12,345 tokens; ünïcödé."
    return (
        a.get_vocab() == b.get_vocab()
        and tokenize(probe, a).tolist() == tokenize(probe, b).tolist()
    )


def save_eval_results(checkpoint_dir: str | Path, result: dict) -> Path:
    """Add `result` to <checkpoint_dir>/eval_results.json, replacing an earlier one with the same
    dataset, seqlen and window count. The file: {"tool": ..., "results": [{"dataset", "seqlen",
    "windows", "ppl", ...}]}."""
    path = Path(checkpoint_dir) / RESULTS_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    key = (result["dataset"], result["seqlen"], result["windows"])
    kept = [
        r
        for r in saved.get("results", [])
        if (r.get("dataset"), r.get("seqlen"), r.get("windows")) != key
    ]
    entry = {k: v for k, v in result.items() if k != "ppl_ratio"}
    entry["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path.write_text(
        json.dumps({"tool": f"gptq_cli:{__version__}", "results": kept + [entry]}, indent=2) + "\n"
    )
    return path


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
