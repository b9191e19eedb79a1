"""The work directory a quantize run solves into before packing (`<output>.work/` unless --work-dir
says otherwise).

    plan.json           what the run is: model + fingerprint, quantization_config, calibration
                        fingerprint and settings, activation dtype/device, tool versions
    measurements.json   --target-bits only: each linear's loss under every candidate (mixed.py); the
                        allocation is recomputed from it (deterministic), not stored
    blocks/block-00007.safetensors
                        one per finished decoder block: its quantized linears' checkpoint tensors
                        (qweight/qzeros/scales/g_idx under the full module names) and, as
                        safetensors metadata, the quant_log rows of its modules, its index and the
                        identity of the plan it was solved under (plan_identity)
    .lock               flock-ed by the run using the directory (a second run is refused)

Every file is written to a temporary name in its own directory and renamed into place, so a run
killed at any moment leaves only whole files behind, and carries a checksum (checksums.py) checked
whenever it is read. The files are a cache: a damaged plan.json or measurements.json is written
again, a damaged block (or one solved under another plan) is deleted and solved again from the
blocks before it, each with a one-line note, and the checkpoint comes out as an uninterrupted run
writes it. A rerun skips every block that checks out.

Calibration activations are deliberately not stored: for a 70B model they are gigabytes per block
(nsamples x seqlen x hidden in the activation dtype). Resuming instead replays the finished blocks
-- each one's linears get the dequantization of its stored tensors, exactly what the original run
put in place, and the calibration batches run through it -- which reproduces the original
activations bit for bit, so a resumed run writes the same checkpoint as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from gptq_cli.errors import UsageError
from gptq_cli.format.bitpack import unpack_qweight, unpack_qzeros
from gptq_cli.format.config import QuantConfig
from gptq_cli.format.quantized import QuantizedWeight
from gptq_cli.format.safetensors_file import FileTensors
from gptq_cli.model.modelio import ModelRef
from gptq_cli.quantization.checksums import (
    Damaged,
    checked_json_bytes,
    checked_safetensors_bytes,
    json_digest,
    read_checked_json,
    verify_safetensors,
    write_atomic,
)

PLAN_FILE = "plan.json"
# quantize --target-bits: every candidate's loss per linear (mixed.py)
MEASUREMENTS_FILE = "measurements.json"
BLOCKS_DIR = "blocks"
LOCK_FILE = ".lock"
_BLOCK_FILE = re.compile(r"block-(\d{5})\.safetensors")
# The plan fields that decide the result: a work dir made with any other value cannot be continued.
# The others (the model as given and where it was found, the dataset's name, the command line) only
# describe the run.
IDENTITY_FIELDS = (
    "model_fingerprint",
    "config",
    "calibration_fingerprint",
    "nsamples",
    "seqlen",
    "seed",
    "batch_size",
    "dtype",
    "device_type",
    "versions",
)
_FINGERPRINTS = ("model_fingerprint", "calibration_fingerprint")


def default_work_dir(output: Path) -> Path:
    """`<output>.work`, beside the output directory."""
    return output.with_name(output.name + ".work")


def is_work_dir(path: str | Path) -> bool:
    """True for a directory holding a plan.json and a blocks/ folder (what `gptq pack WORKDIR`
    takes)."""
    path = Path(path)
    return (path / PLAN_FILE).is_file() and (path / BLOCKS_DIR).is_dir()


def model_fingerprint(ref: ModelRef) -> str:
    """sha256 of config.json and the weight files' names and sizes: changes when the model does,
    without reading gigabytes of weights."""
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


def plan_identity(plan: dict[str, Any]) -> str:
    """sha256 of the plan's IDENTITY_FIELDS: stored in each block file, so that a block is used
    only under the plan it was solved for (with --target-bits, plan["config"] is the allocated
    configuration)."""
    return json_digest({k: plan.get(k) for k in IDENTITY_FIELDS})


def plan_differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The identity fields (one level into dicts, e.g. "config.bits") where two plans differ,
    with the values ("config.bits 4 -> 3"); fingerprints by name only."""
    wanted = json.loads(json.dumps(wanted))  # compare as plan.json stores it (lists, not tuples)
    diffs = []
    for key in IDENTITY_FIELDS:
        old, new = recorded.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            diffs += [
                f"{key}.{k} {old.get(k)!r} -> {new.get(k)!r}"
                for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)
            ]
        elif old != new:
            diffs.append(key if key in _FINGERPRINTS else f"{key} {old!r} -> {new!r}")
    return diffs


def check_new_directory(path: Path, what: str) -> None:
    """UsageError, before any work, when the directory `path` cannot be created later: it exists,
    a parent is a file, a name on the way is too long for the file system (its own with the
    temporary-name suffixes the writers add), or the nearest existing parent is not writable.
    `what` names it in the message (e.g. "--output")."""
    path = Path(path)
    parent, missing = path.absolute(), []
    while True:
        try:
            if parent.exists() or parent.is_symlink():
                break
        except OSError:  # ENAMETOOLONG and the like: judged below by the names' lengths
            pass
        missing.append(parent)
        parent = parent.parent
    if not missing:
        raise UsageError(f"{what} {path} already exists; remove it or choose another {what}")
    if not parent.is_dir():
        raise UsageError(
            f"{what} {path}: {parent} is a file, not a directory; choose another {what}"
        )
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    # the longest name written beside the output: ".<name>.tmp-XXXXXXXX" (the checkpoint writer) or
    # "<name>.work"
    for directory in missing:
        extra = len(".tmp-XXXXXXXX") + 1 if directory == missing[0] else 0
        size = len(directory.name.encode())
        if size + extra > name_max:
            raise UsageError(
                f"{what} {path}: the name {directory.name[:20]}... is {size} bytes long, more than "
                f"this file system allows ({name_max - extra} at most here); choose a "
                "shorter name"
            )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            f"{what} {path}: cannot write in {parent}; choose a directory you can write to"
        )


class WorkDir:
    """One work directory: its plan and its finished blocks."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.blocks_path = self.path / BLOCKS_DIR
        self._lock = None

    def has_plan(self) -> bool:
        return (self.path / PLAN_FILE).is_file()

    def read_plan(self) -> dict[str, Any]:
        """plan.json, checked; UsageError when it is damaged (only the quantize run that made it
        can redo it)."""
        try:
            return read_checked_json(self.path / PLAN_FILE)
        except Damaged as e:
            raise UsageError(
                f"{self.path / PLAN_FILE} {e}; rerun the quantize command that made {self.path} "
                f"(it writes the plan again and keeps the blocks that check out)"
            ) from e

    def open(self, plan: dict[str, Any]) -> list[str]:
        """Start a new work dir for `plan`, or continue one made with the same plan; return notes
        on what was found damaged. Holds the directory's lock until close(). UsageError when the
        directory is something else, was made with other settings, or another run holds it."""
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(
                f"work dir {self.path} is a file; remove it or pass another --work-dir"
            )
        if not self.has_plan():
            foreign = (
                [p.name for p in self.path.iterdir() if not _is_ours(p.name)]
                if self.path.is_dir()
                else []
            )
            if foreign:
                raise UsageError(
                    f"work dir {self.path} already holds other files ({foreign[0]}, ...) and no "
                    f"{PLAN_FILE}; pass an empty or new --work-dir"
                )
        self.path.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        notes = []
        if self.has_plan():
            try:
                diffs = plan_differences(read_checked_json(self.path / PLAN_FILE), plan)
            # the blocks carry the identity of their plan: each is judged on its own
            except Damaged as e:
                notes.append(f"{self.path / PLAN_FILE} {e}; writing it again")
                diffs = None
            if diffs and self.finished_blocks():
                self.close()
                raise UsageError(
                    f"work dir {self.path} was made with other settings ({'; '.join(diffs)}); "
                    f"remove it to start over, or pass another --work-dir"
                )
            if diffs is None or diffs:  # damaged, or a run that failed before finishing a block
                (self.path / PLAN_FILE).unlink()
                if diffs:
                    shutil.rmtree(self.blocks_path, ignore_errors=True)
                    (self.path / MEASUREMENTS_FILE).unlink(missing_ok=True)
        if not self.has_plan():
            write_atomic(self.path / PLAN_FILE, checked_json_bytes(plan))
        self.blocks_path.mkdir(exist_ok=True)
        return notes

    def _acquire_lock(self) -> None:
        """An exclusive flock on .lock: two runs writing one work dir would interleave their
        block files. The OS drops it when the process ends, however it ends (SIGKILL included),
        so a lock is never left stale."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return
        self._lock = open(self.path / LOCK_FILE, "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise UsageError(
                f"work dir {self.path} is in use by another gptq run; wait for it to finish, or "
                f"pass another --work-dir"
            ) from None

    def close(self) -> None:
        """Release the lock taken by open()."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def block_file(self, index: int) -> Path:
        return self.blocks_path / f"block-{index:05d}.safetensors"

    def finished_blocks(self) -> int:
        """How many block files there are (not checked: check_blocks does that)."""
        if not self.blocks_path.is_dir():
            return 0
        return sum(1 for p in self.blocks_path.iterdir() if _BLOCK_FILE.fullmatch(p.name))

    def write_block(
        self,
        index: int,
        tensors: dict[str, torch.Tensor],
        rows: list[dict],
        seconds: float,
        identity: str,
    ) -> None:
        """Store one finished block: its modules' checkpoint tensors and quant_log rows, its wall
        time, and the identity of the plan it was solved under (plan_identity)."""
        # clone: linears solved together share one g_idx tensor, and safetensors refuses shared
        # memory
        data = checked_safetensors_bytes(
            {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
            {
                "format": "pt",
                "block": str(index),
                "plan": identity,
                "seconds": repr(float(seconds)),
                "modules": json.dumps(rows),
            },
        )
        write_atomic(self.block_file(index), data)

    def _check_block(self, index: int, identity: str) -> dict[str, str]:
        """The metadata of block `index` once its file checks out; Damaged saying why not."""
        meta = verify_safetensors(self.block_file(index))
        if meta.get("block") != str(index):
            raise Damaged(f"holds block {meta.get('block')}")
        if meta.get("plan") != identity:
            raise Damaged("was solved under other settings")
        return meta

    def check_blocks(self, count: int, identity: str) -> tuple[list[bool], list[str]]:
        """Which of blocks 0..count-1 are stored and check out under the plan `identity`, and a
        note for each one that did not (deleted, so that it is solved again). Block files beyond
        `count` are deleted."""
        usable, notes = [], []
        for index in range(count):
            path = self.block_file(index)
            if not path.exists():
                usable.append(False)
                continue
            try:
                self._check_block(index, identity)
                usable.append(True)
            except Damaged as e:
                notes.append(f"{path} {e}; solving block {index} again")
                path.unlink()
                usable.append(False)
        for p in self.blocks_path.iterdir() if self.blocks_path.is_dir() else ():
            if (m := _BLOCK_FILE.fullmatch(p.name)) and int(m.group(1)) >= count:
                p.unlink()
        return usable, notes

    def open_block(self, index: int, identity: str) -> tuple[FileTensors, list[dict], float]:
        """(its tensors, each read on access; quant_log rows; seconds) of a finished block,
        checked whole first; UsageError when it is missing or does not check out (`gptq pack`
        cannot solve it again)."""
        path = self.block_file(index)
        try:
            meta = self._check_block(index, identity)
        except Damaged as e:
            raise UsageError(
                f"{path} {e}; rerun the quantize command that made {self.path}: it solves that "
                f"block again and keeps the others"
            ) from e
        return FileTensors({path.name: path}), json.loads(meta["modules"]), float(meta["seconds"])

    def read_block(
        self, index: int, identity: str
    ) -> tuple[dict[str, torch.Tensor], list[dict], float]:
        """(tensors, quant_log rows, seconds) of a finished block."""
        tensors, rows, seconds = self.open_block(index, identity)
        return dict(tensors.items()), rows, seconds

    def remove_if_unfinished(self) -> None:
        """After a failed run: a work dir without a finished block holds nothing worth keeping;
        remove it."""
        if not self.finished_blocks():
            self.remove()

    def remove(self) -> None:
        """Delete what the run wrote (plan, blocks, lock); the directory itself too unless
        something else is in it."""
        self.close()
        shutil.rmtree(self.blocks_path, ignore_errors=True)
        for p in self.path.iterdir():
            if _is_ours(p.name) and p.is_file():
                p.unlink()
        if not any(self.path.iterdir()):
            self.path.rmdir()


def _is_ours(name: str) -> bool:
    """plan.json, blocks/, .lock, or a temporary file that a killed write of plan.json left
    behind."""
    return name in (PLAN_FILE, BLOCKS_DIR, LOCK_FILE, MEASUREMENTS_FILE) or (
        name.startswith((f".{PLAN_FILE}.", f".{MEASUREMENTS_FILE}.")) and name.endswith(".tmp")
    )


def stored_weights(
    tensors: dict[str, torch.Tensor], quant: QuantConfig
) -> dict[str, QuantizedWeight]:
    """The QuantizedWeight of every module in a block file's tensors (by full module name): the
    codes, zero points, scales and g_idx the solver produced, unpacked from their checkpoint form
    with each module's own bits (quant.module_setting)."""
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
