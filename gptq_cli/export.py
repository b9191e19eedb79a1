"""The checkpoint a quantize run ends with (and `gptq pack WORKDIR` writes again): the work dir's
quantized blocks, the source model's other tensors, its config, tokenizer and generation defaults,
and quant_log.json.

Nothing is gathered in memory first: the checkpoint's tensors are a LazyTensors whose entries read
one tensor from a block file or the source model when the writer reaches it
(format/safetensors_file.py), so the write holds about one tensor at a time, whatever the depth of
the model.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path

import torch

from gptq_cli import __version__
from gptq_cli.errors import GptqError, UsageError, describe_os_error
from gptq_cli.format import checkpoint
from gptq_cli.format.config import QuantConfig
from gptq_cli.format.safetensors_file import LazyTensors
from gptq_cli.model.modelio import ModelRef, StreamingModel, load_streaming, load_tokenizer
from gptq_cli.quantization import mixed
from gptq_cli.quantization.checksums import Damaged, checked_json_bytes, read_checked_json
from gptq_cli.quantization.workdir import (
    MEASUREMENTS_FILE,
    WorkDir,
    check_new_directory,
    model_fingerprint,
    plan_identity,
)


@contextmanager
def claim_output(out: Path) -> Iterator[None]:
    """Hold `out` for this run from its start: an flock on `.<name>.lock` beside it, so that a
    second run writing the same output (with another work dir) is refused at once instead of
    after all its work. The OS drops the lock however the process ends. Holding it, temporary
    directories a killed writer of `out` left beside it are stale and removed. On leaving, the
    lock file goes, and so do the parent directories made for it if nothing was written."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the final write still refuses an existing output
        yield
        return
    parent = out.absolute().parent
    made = [d for d in (parent, *parent.parents) if not d.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    lock_path = parent / f".{out.name}.lock"
    try:
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(
                    f"--output {out} is being written by another gptq run; wait for it to finish "
                    f"or choose another --output"
                ) from None
            for stale in parent.glob(f".{glob_escape(out.name)}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            try:
                yield
            finally:
                lock_path.unlink(missing_ok=True)
    finally:
        for d in made:  # innermost first; a directory something was written into stays
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()


def write_kept_blocks(
    wd: WorkDir,
    plan: dict,
    out: Path,
    sm: StreamingModel,
    ref: ModelRef,
    tokenizer,
    *,
    command: str | None,
    phases: Callable[[], dict] | None = None,
) -> list[dict]:
    """write_output at the end of a run; when it fails, say that the solved blocks are kept and
    how to pack them."""
    try:
        return write_output(wd, plan, out, sm, ref, tokenizer, command=command, phases=phases)
    except (UsageError, OSError) as e:
        keep = (
            f"; the {plan['blocks']} quantized blocks are kept in {wd.path}: `gptq pack "
            f"{wd.path} -o DIR` writes the checkpoint without quantizing again"
        )
        if isinstance(e, UsageError):
            raise UsageError(f"{e}{keep}") from e
        raise GptqError(f"{describe_os_error(e)}{keep}") from e


def pack_workdir(
    work_dir: str | Path,
    output: str | Path,
    *,
    checkpoint_format: str | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """`gptq pack WORKDIR`: write the checkpoint of a finished work dir to `output` (the same
    writing quantize ends with), in `checkpoint_format` (None: the quantized one), sharded at
    `max_shard_size`. The work dir stays. The model recorded in plan.json provides the
    unquantized tensors, config and tokenizer."""
    wd = WorkDir(work_dir)
    out = Path(output)
    plan = wd.read_plan()
    checkpoint.parse_size(max_shard_size)  # a bad size is a usage error before any work
    missing = sum(not wd.block_file(i).is_file() for i in range(plan["blocks"]))
    if missing:
        raise UsageError(
            f"{wd.path} is missing {missing} of {plan['blocks']} blocks; rerun the quantize "
            f"command that made it to finish them"
        )
    check_new_directory(out, "output directory")
    # the model's own code runs only if the quantize run that made the work dir was allowed to run
    # it
    ref = ModelRef(
        Path(plan["model_path"]),
        plan.get("gguf_file"),
        plan["model"],
        trust_remote_code=plan.get("trust_remote_code", False),
    )
    found = (ref.path / (ref.gguf_file or "config.json")).is_file()
    if not found or model_fingerprint(ref) != plan["model_fingerprint"]:
        raise UsageError(
            f"the model {plan['model']} is no longer as it was at {ref.path} when {wd.path} was "
            f"made; quantize it again"
        )
    sm = load_streaming(ref, getattr(torch, plan["dtype"]))
    if "target_bits" in plan["config"].get("meta", {}):
        quant = QuantConfig.from_hf_dict(plan["config"])
        plan["config"] = mixed.allocated_config(wd, plan, quant, check=False).to_hf_dict()
    write_output(
        wd,
        plan,
        out,
        sm,
        ref,
        load_tokenizer(ref),
        command=plan.get("command"),
        checkpoint_format=checkpoint_format,
        max_shard_size=max_shard_size,
    )
    return out


def write_output(
    wd: WorkDir,
    plan: dict,
    out: Path,
    sm: StreamingModel,
    ref: ModelRef,
    tokenizer,
    *,
    command: str | None,
    checkpoint_format: str | None = None,
    max_shard_size: int | str = "5GB",
    phases: Callable[[], dict] | None = None,
) -> list[dict]:
    """Write the checkpoint of the work dir's blocks and the model's unquantized tensors
    atomically to `out`; return quant_log.json's per-module rows. `phases`: the run's seconds per
    phase, asked for once the tensors are written, for quant_log.json."""
    tensors = LazyTensors()
    rows: list[dict] = []
    seconds = 0.0
    identity = plan_identity(plan)  # each block is read only after it checks out under this plan
    for i in range(plan["blocks"]):
        block, block_rows, block_seconds = wd.open_block(i, identity)
        for key in block:
            tensors.add(key, block.spec(key), lambda b=block, k=key: b[k])
        rows += block_rows
        seconds += block_seconds
    quantization_config = plan["config"]
    if checkpoint_format and checkpoint_format != quantization_config["checkpoint_format"]:
        from gptq_cli.convert import convert_all_qzeros, relabel_format

        convert_all_qzeros(
            tensors,
            QuantConfig.from_hf_dict(quantization_config),
            quantization_config["checkpoint_format"],
            checkpoint_format,
        )
        quantization_config = relabel_format(quantization_config, checkpoint_format)
    unquantized = _add_unquantized(tensors, sm, {r["name"] for r in rows})
    # config.json must describe the files, not the in-memory model (which holds the activation
    # dtype): the dtype the unquantized tensors are stored in, and the class name loaders such as
    # vLLM dispatch on (configs made from GGUF files lack it).
    config = sm.model.config
    config.dtype = next((dtype for dtype in unquantized if dtype.is_floating_point), torch.float16)
    if not getattr(config, "architectures", None):
        config.architectures = [type(sm.model).__name__]
    log = {
        "model": plan["model"],
        "tool": f"gptq_cli:{__version__}",
        "command": command,
        "config": quantization_config,
        "calibration": {
            "dataset": plan["dataset"],
            "nsamples": plan["nsamples"],
            "seqlen": plan["seqlen"],
            "seed": plan["seed"],
            "tokens": plan["tokens"],
        },
        "device": plan["device"],
        "dtype": plan["dtype"],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "seconds": round(seconds, 2),  # time spent on the blocks, summed over interrupted runs
        "trust_remote_code": plan.get("trust_remote_code", False),
        "notes": plan.get("notes", []),
        "modules": rows,
    }
    extra_files = {}
    # --target-bits: reusable for other budgets (--measurements)
    if (wd.path / MEASUREMENTS_FILE).is_file():
        try:
            measured = read_checked_json(wd.path / MEASUREMENTS_FILE)
        except Damaged as e:
            raise UsageError(
                f"{wd.path / MEASUREMENTS_FILE} {e}; rerun the quantize command that made "
                f"{wd.path} (it measures again)"
            ) from e
        # timings go in the log, the rest is deterministic
        log["measure_seconds"] = measured.pop("seconds", None)
        extra_files[MEASUREMENTS_FILE] = checked_json_bytes(measured, indent=1)
    if phases is None:
        extra_files["quant_log.json"] = json.dumps(log, indent=2).encode()
    else:  # written after the tensors, so that the checkpoint's own writing is counted
        extra_files["quant_log.json"] = lambda: json.dumps(
            {**log, "phases": phases()}, indent=2
        ).encode()
    with tokenizer_dir(ref, tokenizer) as src_dir:
        generation = getattr(sm.model, "generation_config", None)
        if not (src_dir / "generation_config.json").is_file() and generation is not None:
            # a GGUF source (or a directory without one): the generation defaults transformers
            # derived on load
            extra_files["generation_config.json"] = (
                generation.to_json_string(use_diff=True)
            ).encode()
        checkpoint.write_checkpoint(
            out,
            tensors,
            config,
            quantization_config,
            src_dir=src_dir,
            max_shard_size=max_shard_size,
            extra_files=extra_files,
        )
    return rows


def _add_unquantized(
    tensors: LazyTensors, sm: StreamingModel, quantized: set[str]
) -> list[torch.dtype]:
    """Add every tensor of the original that is not a quantized linear's weight, in the model's
    own dtype (as stored in its files; fp16 for a GGUF source); biases of quantized linears are
    stored as fp16. Returns their dtypes in the model's order."""
    tied = getattr(sm.model.config, "tie_word_embeddings", False)
    if sm.source is not None:
        items = [
            (name, sm.source.spec(key), lambda k=key: sm.source[k])
            for name, key in sm.key_of.items()
        ]
    else:  # loaded whole (GGUF, renamed weights): already in memory, converted as each is written

        def half(t: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...]]:
            return torch.float16 if t.is_floating_point() else t.dtype, tuple(t.shape)

        items = [
            (name, half(t), lambda t=t: t.to(torch.float16) if t.is_floating_point() else t)
            for name, t in sm.model.state_dict().items()
            if not (tied and name == "lm_head.weight")
        ]
    dtypes = []
    for name, (dtype, shape), load in items:
        module, _, leaf = name.rpartition(".")
        if module in quantized:
            if leaf != "bias":
                continue
            dtype, load = torch.float16, (lambda load=load: load().to(torch.float16))
        tensors.add(name, (dtype, shape), load)
        dtypes.append(dtype)
    return dtypes


@contextmanager
def tokenizer_dir(ref: ModelRef, tokenizer) -> Iterator[Path]:
    """A directory holding the tokenizer files (a GGUF source has none on disk: they are saved to
    a temporary directory that is removed afterwards)."""
    if ref.gguf_file is None:
        yield ref.path
        return
    with tempfile.TemporaryDirectory(prefix="gptq-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        yield Path(tmp)
