"""safetensors files read and written one tensor at a time, so that neither side ever holds a whole
model.

Reading: `FileTensors` parses the headers once (checking them as safetensors itself does) and reads
each tensor on access with plain reads into a fresh tensor. Not memory-mapped on purpose: a mapping
keeps every page read so far in the process's resident set (RSS) until the file is closed, so
reading a model block by block would grow RSS by a block each time; read pages stay only in the
kernel's page cache.

Writing: `write_file` computes the header from names, dtypes and shapes (a `LazyTensors` knows them
without producing the data), then produces and writes each tensor in turn. The bytes are those
safetensors' own `save_file` writes (its `prepare` in tensor.rs): tensors ordered by descending
dtype rank, then by name; the header compact JSON with `__metadata__` first, padded with spaces to a
multiple of 8 bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from gptq_cli.errors import UsageError

# safetensors' Dtype enum, highest rank first: the order save_file writes tensors of different
# dtypes in.
DTYPES: dict[str, torch.dtype] = {
    "U64": torch.uint64,
    "I64": torch.int64,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F32": torch.float32,
    "U32": torch.uint32,
    "I32": torch.int32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "U16": torch.uint16,
    "I16": torch.int16,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAME = {dtype: name for name, dtype in DTYPES.items()}
_RANK = {name: i for i, name in enumerate(DTYPES)}  # sort key: highest rank first
_MAX_HEADER = 100_000_000  # safetensors' own limit

Spec = tuple[torch.dtype, tuple[int, ...]]


def nbytes(spec: Spec) -> int:
    """The bytes a tensor of this dtype and shape takes in a safetensors file."""
    dtype, shape = spec
    return math.prod(shape) * dtype.itemsize


class LazyTensors(Mapping[str, torch.Tensor]):
    """Tensors whose dtype and shape are known up front and whose data is produced only when read
    (each read produces it again): what the checkpoint writer takes, so that it holds one tensor
    at a time. Iterates in insertion order."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Spec, Callable[[], torch.Tensor]]] = {}

    @classmethod
    def holding(cls, tensors: Mapping[str, torch.Tensor]) -> LazyTensors:
        """The tensors of another mapping, each taken from it only when read: tensors already in
        memory, or a FileTensors (whose `spec` gives dtype and shape without reading the data)."""
        out = cls()
        for key in tensors:
            spec = (
                tensors.spec(key)
                if hasattr(tensors, "spec")
                else (tensors[key].dtype, tuple(tensors[key].shape))
            )
            out.add(key, spec, lambda k=key: tensors[k])
        return out

    def add(self, key: str, spec: Spec, load: Callable[[], torch.Tensor]) -> None:
        self._entries[key] = ((spec[0], tuple(spec[1])), load)

    def transform(self, key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Produce `fn` of the tensor instead of the tensor (fn keeps dtype and shape)."""
        spec, load = self._entries[key]
        self._entries[key] = (spec, lambda: fn(load()))

    def spec(self, key: str) -> Spec:
        return self._entries[key][0]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._entries[key][1]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class FileTensors(Mapping[str, torch.Tensor]):
    """The tensors of safetensors files (a checkpoint's shards, a source model, a work dir
    block), each read on access; iterates in sorted order. A file whose header is not
    safetensors' is refused at once, naming it."""

    def __init__(self, files: Mapping[str, Path]):
        self._entries: dict[str, tuple[Path, int, str, tuple[int, ...], int, int]] = {}
        self._metadata: dict[str, dict[str, str] | None] = {}
        for name, path in files.items():
            self._metadata[name] = self._read_header(Path(path))

    def _read_header(self, path: Path) -> dict[str, str] | None:
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if size < 8 or n > min(_MAX_HEADER, size - 8):
                    raise ValueError("header length beyond the file")
                header = json.loads(f.read(n))
            metadata = header.pop("__metadata__", None)
            end = 0
            for key, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
                start, stop = entry["data_offsets"]
                shape = tuple(int(d) for d in entry["shape"])
                if start != end or stop - start != nbytes((DTYPES[entry["dtype"]], shape)):
                    raise ValueError(f"offsets of {key} do not match its dtype and shape")
                end = stop
                self._entries[key] = (path, 8 + n, entry["dtype"], shape, start, stop)
            if 8 + n + end != size:
                raise ValueError("the data does not end where the file does")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(
                f"{path} is not a readable safetensors file ({type(e).__name__}: {e}): it is "
                f"truncated or corrupt; copy or download it again"
            ) from e
        return metadata

    def __getitem__(self, key: str) -> torch.Tensor:
        path, base, dtype, shape, start, stop = self._entries[key]
        out = torch.empty(shape, dtype=DTYPES[dtype])
        view = (
            memoryview(out.reshape(-1).view(torch.uint8).numpy())
            if out.numel()
            else memoryview(b"")
        )
        with open(path, "rb", buffering=0) as f:
            f.seek(base + start)
            done = 0
            while done < stop - start:  # readinto may return less than asked for
                got = f.readinto(view[done:])
                if not got:
                    raise UsageError(
                        f"{path} ended while reading {key}: it is truncated; copy or "
                        "download it again"
                    )
                done += got
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def spec(self, key: str) -> Spec:
        _, _, dtype, shape, _, _ = self._entries[key]
        return DTYPES[dtype], shape

    def dtype_and_shape(self, key: str) -> tuple[str, tuple[int, ...]]:
        """The stored dtype ('I32', 'F16', 'BF16', ...) and shape of a tensor, without reading
        its data."""
        _, _, dtype, shape, _, _ = self._entries[key]
        return dtype, shape

    def metadata(self) -> dict[str, dict[str, str] | None]:
        """The safetensors metadata of each file, by the name it was given."""
        return dict(self._metadata)


def write_file(
    path: Path, tensors: LazyTensors, keys: list[str], metadata: dict[str, str] | None
) -> None:
    """Write `keys` of `tensors` to the safetensors file `path`, producing one tensor at a time;
    the same bytes as `safetensors.torch.save_file({k: tensors[k] for k in keys}, path,
    metadata)`."""
    order = sorted(keys, key=lambda k: (_RANK[_dtype_name(tensors.spec(k)[0])], k))
    header: dict = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for key in order:
        spec = tensors.spec(key)
        header[key] = {
            "dtype": _dtype_name(spec[0]),
            "shape": list(spec[1]),
            "data_offsets": [offset, offset + nbytes(spec)],
        }
        offset += nbytes(spec)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for key in order:
            t = tensors[key].detach().to("cpu").contiguous()
            # a wrong spec would corrupt every later offset
            if (t.dtype, tuple(t.shape)) != tensors.spec(key):
                raise ValueError(
                    f"{key} is {t.dtype} {list(t.shape)}, announced as {tensors.spec(key)}"
                )
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            del t


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _NAME:
        raise ValueError(f"safetensors cannot store {dtype}")
    return _NAME[dtype]
