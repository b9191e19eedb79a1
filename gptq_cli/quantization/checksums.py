"""Files that carry their own checksum, written atomically: the work dir's plan.json,
measurements.json and block files (SPEC §1: every file in the work directory is checked when read; a
damaged one is never used).

A JSON document holds the sha256 of its canonical form (sorted keys, no spaces) under CHECKSUM_KEY.
A safetensors file holds, in its header's metadata under the same key, the sha256 of its header
without that entry (in canonical form) followed by its data bytes: a changed byte anywhere, header
or tensor data, shows.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from gptq_cli.errors import naming_the_file

__all__ = [
    "CHECKSUM_KEY",
    "Damaged",
    "write_atomic",
    "json_digest",
    "checked_json_bytes",
    "verified_json",
    "read_checked_json",
    "checked_safetensors_bytes",
    "verify_safetensors",
]

CHECKSUM_KEY = "sha256"
_CHUNK = 16 << 20  # bytes hashed per read: a block file of a 70B model is ~0.5 GB


class Damaged(ValueError):
    """A file that cannot be read or whose checksum does not match its contents."""


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename:
    readers (and a resumed run) see the old file or the whole new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        raise naming_the_file(e, path) from e


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def json_digest(obj: Any) -> str:
    """sha256 of `obj`'s canonical JSON (sorted keys, no spaces; tuples as lists)."""
    return hashlib.sha256(_canonical(obj)).hexdigest()


def checked_json_bytes(doc: dict[str, Any], indent: int = 2) -> bytes:
    """`doc` as JSON with its checksum added (any checksum it holds is replaced)."""
    body = {k: v for k, v in doc.items() if k != CHECKSUM_KEY}
    body[CHECKSUM_KEY] = json_digest(body)
    return (json.dumps(body, indent=indent, sort_keys=True) + "\n").encode()


def verified_json(doc: Any) -> dict[str, Any]:
    """A parsed checked_json_bytes document without its checksum; Damaged when it is not a JSON
    object, has no checksum or one that does not match."""
    if not isinstance(doc, dict) or not isinstance(doc.get(CHECKSUM_KEY), str):
        raise Damaged("has no checksum")
    body = {k: v for k, v in doc.items() if k != CHECKSUM_KEY}
    if json_digest(body) != doc[CHECKSUM_KEY]:
        raise Damaged("does not match its checksum")
    return body


def read_checked_json(path: Path) -> dict[str, Any]:
    """verified_json of the file at `path`; Damaged also when it cannot be read or parsed."""
    try:
        doc = json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise Damaged(f"cannot be read ({type(e).__name__})") from e
    return verified_json(doc)


def _header_digest(header: dict[str, Any]) -> hashlib._Hash:
    """sha256 started with the header's canonical form, its checksum entry left out."""
    header = dict(header)
    meta = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != CHECKSUM_KEY}
    header["__metadata__"] = meta
    return hashlib.sha256(_canonical(header))


def checked_safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file of `tensors` whose metadata holds `metadata` and the file's checksum."""
    from safetensors.torch import save

    draft = save(tensors, metadata=metadata)
    n = int.from_bytes(draft[:8], "little")
    h = _header_digest(json.loads(draft[8 : 8 + n]))
    # the data bytes do not depend on the metadata: same in the final file
    h.update(memoryview(draft)[8 + n :])
    return save(tensors, metadata={**metadata, CHECKSUM_KEY: h.hexdigest()})


def verify_safetensors(path: Path) -> dict[str, str]:
    """The metadata of a file written by checked_safetensors_bytes after reading all of it
    against its checksum; Damaged when it cannot be read, is cut short, or a byte differs."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 100 << 20:
                raise Damaged("has no valid safetensors header")
            header = json.loads(f.read(n))
            stored = (header.get("__metadata__") or {}).get(CHECKSUM_KEY)
            if not isinstance(stored, str):
                raise Damaged("has no checksum")
            h = _header_digest(header)
            ends = [
                end
                for k, spec in header.items()
                if k != "__metadata__"
                for end in spec["data_offsets"][1:]
            ]
            size = 0
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        if isinstance(e, Damaged):
            raise
        raise Damaged(f"cannot be read ({type(e).__name__})") from e
    if size != max(ends, default=0):
        raise Damaged(f"holds {size} data bytes where its header says {max(ends, default=0)}")
    if h.hexdigest() != stored:
        raise Damaged("does not match its checksum")
    return {k: v for k, v in header["__metadata__"].items() if k != CHECKSUM_KEY}
