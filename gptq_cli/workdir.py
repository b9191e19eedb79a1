"""The work directory a quantize run solves into before packing (`<output>.work/` unless --work-dir says otherwise).

    plan.json                        what the run is: model + fingerprint, quantization_config, calibration
                                     fingerprint and settings, activation dtype/device, tool versions
    measurements.json                --target-bits only: each linear's loss under every candidate (mixed.py);
                                     the allocation is recomputed from it (deterministic), not stored
    blocks/block-00007.safetensors   one per finished decoder block: its quantized linears' checkpoint tensors
                                     (qweight/qzeros/scales/g_idx under the full module names) and, as
                                     safetensors metadata, the quant_log rows of its modules
    .lock                            flock-ed by the run using the directory (a second run is refused)

Every file is written to a temporary name in its own directory and renamed into place, so a run killed at
any moment leaves only whole files behind. A rerun continues after the last finished block.

Calibration activations are deliberately not stored: for a 70B model they are gigabytes per block
(nsamples x seqlen x hidden in the activation dtype). Resuming instead replays the finished blocks -- each
one's linears get the dequantization of its stored tensors, exactly what the original run put in place, and
the calibration batches run through it -- which reproduces the original activations bit for bit, so a
resumed run writes the same checkpoint as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from gptq_cli.errors import GptqError, UsageError
from gptq_cli.format.config import QuantConfig
from gptq_cli.format.pack import unpack_qweight, unpack_qzeros
from gptq_cli.format.quantized import QuantizedWeight
from gptq_cli.format.safetensors_file import FileTensors
from gptq_cli.modelio import ModelRef

PLAN_FILE = "plan.json"
MEASUREMENTS_FILE = "measurements.json"   # quantize --target-bits: every candidate's loss per linear (mixed.py)
BLOCKS_DIR = "blocks"
LOCK_FILE = ".lock"
_BLOCK_FILE = re.compile(r"block-(\d{5})\.safetensors")
# The plan fields that decide the result: a work dir made with any other value cannot be continued. The others
# (the model as given and where it was found, the dataset's name, the command line) only describe the run.
IDENTITY_FIELDS = ("model_fingerprint", "config", "calibration_fingerprint", "nsamples", "seqlen", "seed",
                   "batch_size", "dtype", "device_type", "versions")
_FINGERPRINTS = ("model_fingerprint", "calibration_fingerprint")


def default_work_dir(output: Path) -> Path:
    """`<output>.work`, beside the output directory."""
    return output.with_name(output.name + ".work")


def is_work_dir(path: str | Path) -> bool:
    """True for a directory holding a plan.json and a blocks/ folder (what `gptq pack WORKDIR` takes)."""
    path = Path(path)
    return (path / PLAN_FILE).is_file() and (path / BLOCKS_DIR).is_dir()


def model_fingerprint(ref: ModelRef) -> str:
    """sha256 of config.json and the weight files' names and sizes: changes when the model does, without
    reading gigabytes of weights."""
    h = hashlib.sha256()
    config = ref.path / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    if ref.gguf_file:
        weights = [ref.path / ref.gguf_file]
    else:
        weights = sorted(p for p in ref.path.iterdir() if p.suffix in (".safetensors", ".bin"))
    for p in weights:
        h.update(f"{p.name}\0{p.stat().st_size}\n".encode())
    return h.hexdigest()


def calibration_fingerprint(samples: list[torch.Tensor]) -> str:
    """sha256 of the calibration token ids (each sample's length, then its ids as int64)."""
    h = hashlib.sha256()
    for s in samples:
        ids = s.reshape(-1).to(torch.int64).cpu()
        h.update(ids.numel().to_bytes(8, "little"))
        h.update(ids.numpy().tobytes())
    return h.hexdigest()


def plan_differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The identity fields (one level into dicts, e.g. "config.bits") where two plans differ, with the values
    ("config.bits 4 -> 3"); fingerprints by name only."""
    wanted = json.loads(json.dumps(wanted))  # compare as plan.json stores it (lists, not tuples)
    diffs = []
    for key in IDENTITY_FIELDS:
        old, new = recorded.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            diffs += [f"{key}.{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                      if old.get(k) != new.get(k)]
        elif old != new:
            diffs.append(key if key in _FINGERPRINTS else f"{key} {old!r} -> {new!r}")
    return diffs


def check_new_directory(path: Path, what: str) -> None:
    """UsageError, before any work, when the directory `path` cannot be created later: it exists, a parent is a
    file, its name is too long for the file system (with the temporary-name suffixes the writers add), or the
    nearest existing parent is not writable. `what` names it in the message (e.g. "--output")."""
    path = Path(path)
    if path.exists():
        raise UsageError(f"{what} {path} already exists; remove it or choose another {what}")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: {parent} is a file, not a directory; choose another {what}")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    # the longest name written beside it: ".<name>.tmp-XXXXXXXX" (the checkpoint writer) or "<name>.work"
    longest = len(path.name.encode()) + len(".tmp-XXXXXXXX") + 1
    if longest > name_max:
        raise UsageError(f"{what} {path}: the name is {len(path.name.encode())} bytes long, more than this file "
                         f"system allows ({name_max - longest + len(path.name.encode())} at most here); choose a "
                         f"shorter name")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: cannot write in {parent}; choose a directory you can write to")


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename: readers (and a
    resumed run) see the old file or the whole new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class WorkDir:
    """One work directory: its plan and its finished blocks."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.blocks_path = self.path / BLOCKS_DIR
        self._lock = None

    def has_plan(self) -> bool:
        return (self.path / PLAN_FILE).is_file()

    def read_plan(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / PLAN_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"{self.path / PLAN_FILE} cannot be read ({e}); remove the work dir {self.path} "
                             f"and quantize again") from e

    def open(self, plan: dict[str, Any]) -> int:
        """Start a new work dir for `plan`, or continue one made with the same plan; return how many blocks are
        already finished. Holds the directory's lock until close(). UsageError when the directory is something
        else, was made with other settings, or another run holds it."""
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"work dir {self.path} is a file; remove it or pass another --work-dir")
        if not self.has_plan():
            foreign = [p.name for p in self.path.iterdir() if not _is_ours(p.name)] if self.path.is_dir() else []
            if foreign:
                raise UsageError(f"work dir {self.path} already holds other files ({foreign[0]}, ...) and no "
                                 f"{PLAN_FILE}; pass an empty or new --work-dir")
        self.path.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        if self.has_plan():
            diffs = plan_differences(self.read_plan(), plan)
            if diffs and self.finished_blocks():
                self.close()
                raise UsageError(f"work dir {self.path} was made with other settings ({'; '.join(diffs)}); "
                                 f"remove it to start over, or pass another --work-dir")
            if diffs:  # a run that failed before finishing a block: nothing to keep, start afresh
                (self.path / PLAN_FILE).unlink()
        if not self.has_plan():
            shutil.rmtree(self.blocks_path, ignore_errors=True)  # blocks without their plan cannot be trusted
            (self.path / MEASUREMENTS_FILE).unlink(missing_ok=True)
            write_atomic(self.path / PLAN_FILE, (json.dumps(plan, indent=2, sort_keys=True) + "\n").encode())
        self.blocks_path.mkdir(exist_ok=True)
        return self.finished_blocks()

    def _acquire_lock(self) -> None:
        """An exclusive flock on .lock: two runs writing one work dir would interleave their block files. The OS
        drops it when the process ends, however it ends (SIGKILL included), so a lock is never left stale."""
        try:
            import fcntl
        except ImportError:   # not POSIX: no locking
            return
        self._lock = open(self.path / LOCK_FILE, "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise UsageError(f"work dir {self.path} is in use by another gptq run; wait for it to finish, or "
                             f"pass another --work-dir") from None

    def close(self) -> None:
        """Release the lock taken by open()."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def block_file(self, index: int) -> Path:
        return self.blocks_path / f"block-{index:05d}.safetensors"

    def finished_blocks(self) -> int:
        """How many blocks are finished: files block-00000, block-00001, ... without a gap."""
        if not self.blocks_path.is_dir():
            return 0
        present = {int(m.group(1)) for p in self.blocks_path.iterdir() if (m := _BLOCK_FILE.fullmatch(p.name))}
        count = 0
        while count in present:
            count += 1
        return count

    def write_block(self, index: int, tensors: dict[str, torch.Tensor], rows: list[dict], seconds: float) -> None:
        """Store one finished block: its modules' checkpoint tensors and quant_log rows, and its wall time."""
        from safetensors.torch import save

        # clone: linears solved together share one g_idx tensor, and safetensors refuses shared memory
        data = save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
                    metadata={"format": "pt", "block": str(index), "seconds": repr(float(seconds)),
                              "modules": json.dumps(rows)})
        write_atomic(self.block_file(index), data)

    def open_block(self, index: int) -> tuple[FileTensors, list[dict], float]:
        """(its tensors, each read on access; quant_log rows; seconds) of a finished block."""
        path = self.block_file(index)
        try:
            tensors = FileTensors({path.name: path})
            meta = tensors.metadata()[path.name] or {}
            return tensors, json.loads(meta["modules"]), float(meta["seconds"])
        except Exception as e:  # truncated by hand, wrong file...
            raise GptqError(f"{path} cannot be read ({type(e).__name__}: {e}); delete it and rerun the same "
                            f"command to redo that block") from e

    def read_block(self, index: int) -> tuple[dict[str, torch.Tensor], list[dict], float]:
        """(tensors, quant_log rows, seconds) of a finished block."""
        tensors, rows, seconds = self.open_block(index)
        return dict(tensors.items()), rows, seconds

    def remove_if_unfinished(self) -> None:
        """After a failed run: a work dir without a finished block holds nothing worth keeping; remove it."""
        if not self.finished_blocks():
            self.remove()

    def remove(self) -> None:
        """Delete what the run wrote (plan, blocks, lock); the directory itself too unless something else is in
        it."""
        self.close()
        shutil.rmtree(self.blocks_path, ignore_errors=True)
        for p in self.path.iterdir():
            if _is_ours(p.name) and p.is_file():
                p.unlink()
        if not any(self.path.iterdir()):
            self.path.rmdir()


def _is_ours(name: str) -> bool:
    """plan.json, blocks/, .lock, or a temporary file that a killed write of plan.json left behind."""
    return name in (PLAN_FILE, BLOCKS_DIR, LOCK_FILE, MEASUREMENTS_FILE) or (
        name.startswith((f".{PLAN_FILE}.", f".{MEASUREMENTS_FILE}.")) and name.endswith(".tmp"))


def stored_weights(tensors: dict[str, torch.Tensor], quant: QuantConfig) -> dict[str, QuantizedWeight]:
    """The QuantizedWeight of every module in a block file's tensors (by full module name): the codes, zero
    points, scales and g_idx the solver produced, unpacked from their checkpoint form with each module's own
    bits (quant.module_setting)."""
    weights = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        scales, g_idx = tensors[f"{name}.scales"], tensors[f"{name}.g_idx"]
        n, k = scales.shape[1], g_idx.numel()
        bits, group_size = quant.module_setting(name)
        codes = unpack_qweight(tensors[key], bits, k).t().contiguous()
        zeros = unpack_qzeros(tensors[f"{name}.qzeros"], bits, n, quant.checkpoint_format)
        weights[name] = QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size)
    return weights
