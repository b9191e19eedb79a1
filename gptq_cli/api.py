"""The plain Python API under the CLI: `quantize(...)`, and `evaluate(...)` re-exported from evaluate.py.

    from gptq_cli.api import QuantConfig, evaluate, quantize
    result = quantize("smollm2-135m", QuantConfig(bits=4, group_size=128), dataset="builtin",
                      nsamples=128, seqlen=512, output="smollm2-gptq")
    print(evaluate(str(result.output), dataset="wikitext2", limit=40)["ppl"])
"""
from __future__ import annotations

import json
import platform
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from gptq_cli import __version__, distributed
from gptq_cli.arch import Arch, quantized_shapes, resolve_arch
from gptq_cli.engine import ModuleResult, capture_inputs, quantize_blocks, replay_block
from gptq_cli.errors import GptqError, UsageError, noting_interrupts
from gptq_cli.format.checkpoint import parse_size
from gptq_cli.evaluate import evaluate  # noqa: F401  (re-exported: the API is quantize + evaluate)
from gptq_cli.format.config import QuantConfig
from gptq_cli.modelio import (ModelRef, StreamingModel, load_streaming, load_tokenizer, resolve_device,
                             resolve_dtype, resolve_model, storage_dtype)
from gptq_cli import mixed
from gptq_cli.allocate import Candidate, check_target, parse_candidates
from gptq_cli.preflight import calibration_notes, calibration_seqlen, group_size_notes
from gptq_cli.workdir import (MEASUREMENTS_FILE, WorkDir, calibration_fingerprint, check_new_directory,
                              default_work_dir, model_fingerprint, stored_weights)

# Progress events: ("resume", finished blocks, total, work dir), ("block", done, total), ("module", ModuleResult),
# ("note", text): a setting that could not be applied as asked, and what is done instead
ProgressFn = Callable[..., None]


@dataclass
class QuantizeResult:
    output: Path
    modules: list[dict] = field(default_factory=list)   # quant_log.json's per-module rows
    seconds: float = 0.0
    plan: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)     # settings not applied as asked, and what was done instead
    writer: bool = True   # False on the ranks of a torchrun other than 0: they wrote nothing


def default_output(model: str, quant: QuantConfig, target_bits: float | None = None) -> Path:
    name = Path(model).stem if model.endswith(".gguf") else Path(model.rstrip("/")).name
    if target_bits is not None:
        return Path(f"{name}-gptq-mixed-{target_bits:g}bit")
    return Path(f"{name}-gptq-{quant.bits}bit-g{quant.group_size}")


def batch_samples(samples: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Stack equal-length samples into batches (samples of another length go in their own batches)."""
    batches, current = [], []
    for s in samples:
        if current and (len(current) == batch_size or current[0].shape[-1] != s.shape[-1]):
            batches.append(torch.cat(current))
            current = []
        current.append(s.reshape(1, -1))
    if current:
        batches.append(torch.cat(current))
    return batches


class QuantizeInterrupted(KeyboardInterrupt):
    """Ctrl-C during quantize: the work dir keeps the finished blocks and the same call continues from there.
    A KeyboardInterrupt still, so that code catching Exception does not swallow it."""

    def __init__(self, finished: int, total: int, work_dir: Path):
        super().__init__(f"interrupted after block {finished} of {total}; rerun the same command to continue "
                         f"(work dir {work_dir})")
        self.finished, self.total, self.work_dir = finished, total, work_dir


def quantize(model: str, quant: QuantConfig | None = None, *, dataset: str = "builtin",
             dataset_path: str | None = None, nsamples: int = 128, seqlen: int | None = None, seed: int = 0,
             batch_size: int = 8, device: str | None = None, dtype: str = "auto",
             output: str | Path | None = None, work_dir: str | Path | None = None, resume: bool = False,
             command: str | None = None, progress: ProgressFn | None = None, target_bits: float | None = None,
             candidates: list[Candidate] | None = None, measurements: str | Path | None = None) -> QuantizeResult:
    """Quantize `model` (Hub id, local dir, .gguf or built-in name) with GPTQ and write a GPTQ checkpoint.

    Each finished block is stored in `work_dir` (default `<output>.work`); a call that finds a work dir made with
    the same settings continues after its last finished block (resume=True insists on one), and the work dir
    is removed once the checkpoint is written. `command` is recorded in quant_log.json. seqlen None: 2048, or
    the model's context if that is shorter; a seqlen beyond the context is refused.
    target_bits: choose each linear's bits and group size among `candidates` (default bits 2/3/4/8 x groups
    32/64/128) within that average of stored bits per weight (mixed.py); quant's bits/group_size are then
    ignored. `measurements`: a measurements.json of an earlier such run with the same model, calibration and
    shared settings, instead of measuring again."""
    from gptq_cli.textdata import calibration_samples

    quant = quant or QuantConfig()
    out = Path(output) if output else default_output(model, quant, target_bits)
    check_new_directory(out, "--output")
    wd = WorkDir(work_dir if work_dir else default_work_dir(out))
    if not wd.path.exists():
        check_new_directory(wd.path, "--work-dir")
    if resume and not wd.has_plan():
        raise UsageError(f"--resume: there is no work dir {wd.path} to continue; run without --resume to start, "
                         f"or pass the --work-dir an interrupted run left")
    dev = resolve_device(device)
    resolve_dtype(dtype, dev)   # a bad --dtype is refused before the model is looked for
    ranks = distributed.init(dev)   # under torchrun: this process's share of the batches and solves
    progress = progress if ranks.writer else None
    torch.manual_seed(seed)
    t_start = time.perf_counter()

    ref = resolve_model(model)
    cdtype = resolve_dtype(dtype, dev, storage_dtype(ref))
    tokenizer = load_tokenizer(ref)
    sm = load_streaming(ref, cdtype)
    seqlen = calibration_seqlen(sm.model.config, seqlen)
    samples = calibration_samples(tokenizer, dataset, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                  dataset_path=dataset_path)
    layers_path, arch = resolve_arch(sm.model)
    n_blocks = len(sm.model.get_submodule(layers_path))
    shapes = quantized_shapes(sm.model, layers_path)
    notes = calibration_notes(samples, nsamples, seqlen) + group_size_notes(shapes, quant.group_size)
    for note in notes:
        if progress:
            progress("note", note)
    quant.meta.update(damp_auto_increment=0.01, static_groups=quant.static_groups)
    if target_bits is not None:
        candidates = candidates or parse_candidates(None)
        check_target(target_bits, list(shapes.values()), candidates)
        quant.meta.update(target_bits=target_bits, candidates=[c.name for c in candidates])
    # what was used, not what was asked: the longest sample (a short corpus gives one shorter sample)
    used_seqlen = max(s.shape[-1] for s in samples)
    plan = _work_plan(model, ref, quant, samples, dataset=dataset, seqlen=used_seqlen, seed=seed,
                      batch_size=batch_size, device=dev, dtype=cdtype, blocks=n_blocks, command=command, notes=notes)
    done = distributed.broadcast_int(ranks, wd.open(plan) if ranks.writer else 0)   # rank 0 alone writes
    with noting_interrupts() as interrupted:
        try:
            if target_bits is not None:
                quant = mixed.allocate_run(wd, plan, sm, layers_path, batch_samples(samples, batch_size), quant,
                                           dev, cdtype, measurements,
                                           (lambda i, n: progress("measure", i, n)) if progress else None)
            if done < n_blocks:
                if done and progress:
                    progress("resume", done, n_blocks, wd.path)
                _solve_into(wd, sm, layers_path, arch, samples, batch_size, quant, dev, cdtype, done, progress,
                            ranks)
            if not ranks.writer:
                return QuantizeResult(out, [], time.perf_counter() - t_start, plan, notes, writer=False)
            rows = _write_kept_blocks(wd, plan, out, sm, ref, tokenizer, command=command)
        except Exception as e:
            if not interrupted():
                if ranks.writer:
                    wd.remove_if_unfinished()
                raise
            raise QuantizeInterrupted(wd.finished_blocks(), n_blocks, wd.path) from e
        except KeyboardInterrupt:
            raise QuantizeInterrupted(wd.finished_blocks(), n_blocks, wd.path) from None
        finally:
            if ranks.writer:
                wd.close()
    wd.remove()
    return QuantizeResult(out, rows, time.perf_counter() - t_start, plan, notes)


def _write_kept_blocks(wd: WorkDir, plan: dict, out: Path, sm: StreamingModel, ref: ModelRef, tokenizer, *,
                       command: str | None) -> list[dict]:
    """_write_output at the end of a run; when it fails, say that the solved blocks are kept and how to pack them."""
    try:
        return _write_output(wd, plan, out, sm, ref, tokenizer, command=command)
    except (UsageError, OSError) as e:
        keep = (f"; the {plan['blocks']} quantized blocks are kept in {wd.path}: `gptq pack {wd.path} -o DIR` "
                f"writes the checkpoint without quantizing again")
        raise (UsageError if isinstance(e, UsageError) else GptqError)(f"{e}{keep}") from e


def pack_workdir(work_dir: str | Path, output: str | Path, *, checkpoint_format: str | None = None,
                 max_shard_size: int | str = "5GB") -> Path:
    """`gptq pack WORKDIR`: write the checkpoint of a finished work dir to `output` (the same writing quantize
    ends with), in `checkpoint_format` (None: the quantized one), sharded at `max_shard_size`. The work dir
    stays. The model recorded in plan.json provides the unquantized tensors, config and tokenizer."""
    wd = WorkDir(work_dir)
    out = Path(output)
    plan = wd.read_plan()
    parse_size(max_shard_size)  # a bad size is a usage error before any work
    missing = plan["blocks"] - wd.finished_blocks()
    if missing:
        raise UsageError(f"{wd.path} is missing {missing} of {plan['blocks']} blocks; rerun the quantize command "
                         f"that made it to finish them")
    if out.exists():
        raise UsageError(f"{out} already exists; remove it or choose another output directory")
    ref = ModelRef(Path(plan["model_path"]), plan.get("gguf_file"), plan["model"])
    found = (ref.path / (ref.gguf_file or "config.json")).is_file()
    if not found or model_fingerprint(ref) != plan["model_fingerprint"]:
        raise UsageError(f"the model {plan['model']} is no longer as it was at {ref.path} when {wd.path} was "
                         f"made; quantize it again")
    sm = load_streaming(ref, getattr(torch, plan["dtype"]))
    if "target_bits" in plan["config"].get("meta", {}):
        quant = QuantConfig.from_hf_dict(plan["config"])
        plan["config"] = mixed.allocated_config(wd, plan, quant, check=False).to_hf_dict()
    _write_output(wd, plan, out, sm, ref, load_tokenizer(ref), command=plan.get("command"),
                  checkpoint_format=checkpoint_format, max_shard_size=max_shard_size)
    return out


def _work_plan(model: str, ref: ModelRef, quant: QuantConfig, samples: list[torch.Tensor], *, dataset: str,
               seqlen: int, seed: int, batch_size: int, device: torch.device, dtype: torch.dtype, blocks: int,
               command: str | None, notes: list[str]) -> dict:
    """plan.json: what decides the result (workdir.IDENTITY_FIELDS) and what describes the run."""
    import transformers

    return {"model": model, "model_path": str(ref.path.resolve()), "gguf_file": ref.gguf_file,
            "model_fingerprint": model_fingerprint(ref), "blocks": blocks, "config": quant.to_hf_dict(),
            "dataset": dataset, "calibration_fingerprint": calibration_fingerprint(samples),
            "nsamples": len(samples), "seqlen": seqlen, "seed": seed, "batch_size": batch_size,
            "tokens": int(sum(s.numel() for s in samples)),
            "dtype": str(dtype).removeprefix("torch."), "device": str(device), "device_type": device.type,
            "versions": {"gptq_cli": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "command": command, "notes": notes}


def _solve_into(wd: WorkDir, sm: StreamingModel, layers_path: str, arch: Arch | None, samples: list[torch.Tensor],
                batch_size: int, quant: QuantConfig, dev: torch.device, cdtype: torch.dtype, done: int,
                progress: ProgressFn | None, ranks: distributed.Ranks) -> None:
    """Replay the `done` finished blocks, then quantize the rest, storing each block as it finishes (rank 0;
    each rank calibrates on its share of the batches)."""
    n_blocks = len(sm.model.get_submodule(layers_path))
    calib = capture_inputs(sm, layers_path, ranks.share(batch_samples(samples, batch_size)), dev, cdtype)
    for i in range(done):
        replay_block(sm, layers_path, i, calib, stored_weights(wd.read_block(i)[0], quant), dev, cdtype)
        if progress:
            progress("block", i + 1, n_blocks)
    t_block = time.perf_counter()
    for i, results in quantize_blocks(sm, layers_path, arch, calib, quant, dev, cdtype, start=done,
                                      on_module=(lambda r: progress("module", r)) if progress else None,
                                      ranks=ranks):
        if not ranks.writer:
            continue
        tensors = {f"{r.name}.{key}": value for r in results for key, value in r.tensors.items()}
        wd.write_block(i, tensors, [_log_row(r, len(samples)) for r in results], time.perf_counter() - t_block)
        t_block = time.perf_counter()
        if progress:
            progress("block", i + 1, n_blocks)


def _write_output(wd: WorkDir, plan: dict, out: Path, sm: StreamingModel, ref: ModelRef, tokenizer, *,
                  command: str | None, checkpoint_format: str | None = None,
                  max_shard_size: int | str = "5GB") -> list[dict]:
    """Assemble the checkpoint from the work dir's blocks and the model's unquantized tensors and write it
    atomically to `out`; return quant_log.json's per-module rows."""
    from gptq_cli.format.checkpoint import write_checkpoint

    tensors: dict[str, torch.Tensor] = {}
    rows: list[dict] = []
    seconds = 0.0
    for i in range(plan["blocks"]):
        block_tensors, block_rows, block_seconds = wd.read_block(i)
        tensors.update(block_tensors)
        rows += block_rows
        seconds += block_seconds
    quantization_config = plan["config"]
    if checkpoint_format and checkpoint_format != quantization_config["checkpoint_format"]:
        from gptq_cli.convert import convert_qzeros, relabel_format
        quant = QuantConfig.from_hf_dict(quantization_config)
        for r in rows:
            key = f"{r['name']}.qzeros"
            tensors[key] = convert_qzeros(tensors[key], quant.module_setting(r["name"])[0],
                                          tensors[f"{r['name']}.scales"].shape[1],
                                          quantization_config["checkpoint_format"], checkpoint_format,
                                          name=r["name"])
        quantization_config = relabel_format(quantization_config, checkpoint_format)
    unquantized = _unquantized_tensors(sm, ref, {r["name"] for r in rows})
    tensors.update(unquantized)
    # config.json must describe the files, not the in-memory model (which holds the activation dtype): the
    # dtype the unquantized tensors are stored in, and the class name loaders such as vLLM dispatch on
    # (configs made from GGUF files lack it).
    config = sm.model.config
    config.dtype = next((t.dtype for t in unquantized.values() if t.is_floating_point()), torch.float16)
    if not getattr(config, "architectures", None):
        config.architectures = [type(sm.model).__name__]
    log = {"model": plan["model"], "tool": f"gptq_cli:{__version__}", "command": command,
           "config": quantization_config,
           "calibration": {"dataset": plan["dataset"], "nsamples": plan["nsamples"], "seqlen": plan["seqlen"],
                           "seed": plan["seed"], "tokens": plan["tokens"]},
           "device": plan["device"], "dtype": plan["dtype"], "torch": torch.__version__,
           "platform": platform.platform(),
           "seconds": round(seconds, 2),  # time spent on the blocks, summed over interrupted runs
           "notes": plan.get("notes", []), "modules": rows}
    extra_files = {}
    if (wd.path / MEASUREMENTS_FILE).is_file():   # --target-bits: reusable for other budgets (--measurements)
        measured = json.loads((wd.path / MEASUREMENTS_FILE).read_text())
        log["measure_seconds"] = measured.pop("seconds", None)   # timings go in the log, the rest is deterministic
        extra_files[MEASUREMENTS_FILE] = (json.dumps(measured, indent=1) + "\n").encode()
    extra_files["quant_log.json"] = json.dumps(log, indent=2).encode()
    with _tokenizer_dir(ref, tokenizer) as src_dir:
        generation = getattr(sm.model, "generation_config", None)
        if not (src_dir / "generation_config.json").is_file() and generation is not None:
            # a GGUF source (or a directory without one): the generation defaults transformers derived on load
            extra_files["generation_config.json"] = (generation.to_json_string(use_diff=True)).encode()
        write_checkpoint(out, tensors, config, quantization_config, src_dir=src_dir, max_shard_size=max_shard_size,
                         extra_files=extra_files)
    return rows


def _log_row(r: ModuleResult, nsamples: int) -> dict:
    return {"name": r.name, "loss": float(r.loss), "damp": float(r.damp), "seconds": round(r.seconds, 4),
            "samples": nsamples, "tokens": r.tokens}


def _unquantized_tensors(sm: StreamingModel, ref: ModelRef, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the original that is not a quantized linear's weight, in the model's own dtype
    (as stored in its files; fp16 for a GGUF source). Biases of quantized linears are stored as fp16."""
    out = {}
    tied = getattr(sm.model.config, "tie_word_embeddings", False)
    if sm.source is not None:
        items = ((name, lambda k=key: sm.source.get(k)) for name, key in sm.key_of.items())
    else:
        state = sm.model.state_dict()
        items = ((name, lambda t=t: t.to(torch.float16) if t.is_floating_point() else t)
                 for name, t in state.items() if not (tied and name == "lm_head.weight"))
    for name, load in items:
        module, _, leaf = name.rpartition(".")
        if module in quantized:
            if leaf == "bias":
                out[name] = load().to(torch.float16).contiguous()
            continue
        out[name] = load().contiguous()
    return out


@contextmanager
def _tokenizer_dir(ref: ModelRef, tokenizer) -> Iterator[Path]:
    """A directory holding the tokenizer files (a GGUF source has none on disk: they are saved to a temporary
    directory that is removed afterwards)."""
    if ref.gguf_file is None:
        yield ref.path
        return
    with tempfile.TemporaryDirectory(prefix="gptq-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        yield Path(tmp)
