"""Where a dataset's raw documents come from: the built-in text, WikiText-2 and C4 (from the Hub
through `datasets`, or an offline copy given as --dataset-path), local files (.txt, .jsonl, .json,
.parquet, .jsonl.gz/.json.gz), a directory saved with datasets' save_to_disk, or a Hub dataset id
(org/name). textdata.py turns the documents into calibration samples and evaluation windows.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

from gptq_cli.errors import UsageError

PURPOSES = ("calibration", "eval")
NAMED = ("wikitext2", "c4", "builtin")
BUILTIN_TEXT = Path(__file__).parent / "calibration.txt"
WIKITEXT_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1")
WIKITEXT_SPLITS = {"calibration": "train", "eval": "test"}
C4_HUB = "allenai/c4"
# The shards the GPTQ paper samples from: the first train shard, the first validation shard.
C4_SHARDS = {
    "calibration": ("train", "en/c4-train.00000-of-01024.json.gz"),
    "eval": ("validation", "en/c4-validation.00000-of-00008.json.gz"),
}
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")


def load_text(dataset: str, purpose: str = "eval", *, dataset_path: str | None = None) -> list[str]:
    """The raw documents of `dataset` for `purpose` ("calibration" or "eval"). The evaluation
    text is "\\n\\n".join(documents); a .txt file is one document for evaluation and its
    blank-line separated paragraphs for calibration."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    if dataset == "builtin":
        return _txt_documents(BUILTIN_TEXT.read_text(encoding="utf-8"), purpose)
    if dataset in ("wikitext2", "c4"):
        return _named_documents(dataset, purpose, dataset_path)
    if dataset_path:
        raise UsageError(
            f"--dataset-path is for the named datasets (wikitext2, c4); give the file itself as "
            f"--dataset {dataset_path}"
        )
    path = Path(dataset).expanduser()
    if path.is_file():
        return _file_documents(path, purpose)
    if path.is_dir():
        return _saved_dataset_documents(path, purpose)
    if dataset.endswith(LOCAL_SUFFIXES) or dataset.startswith((".", "/", "~")):
        raise UsageError(f"dataset file {dataset} not found; check the path")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", dataset):
        return _hub_documents(dataset, purpose)
    raise UsageError(
        f"unknown dataset {dataset!r}: use one of {', '.join(NAMED)}, a .txt/.jsonl/.json/.parquet "
        f"file, or a Hub dataset id like org/name"
    )


def _txt_documents(text: str, purpose: str) -> list[str]:
    if purpose == "eval":
        return [text]
    return [p for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def _named_documents(name: str, purpose: str, dataset_path: str | None) -> list[str]:
    if dataset_path:
        return _offline_copy_documents(name, purpose, Path(dataset_path).expanduser())
    _check_hub_reachable(
        name, f"give an offline copy with --dataset-path ({_offline_hint(name, purpose)})"
    )
    import datasets  # imported here: slow to import, and only needed for Hub datasets

    try:
        if name == "wikitext2":
            rows = datasets.load_dataset(*WIKITEXT_HUB, split=WIKITEXT_SPLITS[purpose])
        else:
            split, shard = C4_SHARDS[purpose]
            rows = datasets.load_dataset(C4_HUB, data_files={split: shard}, split=split)
    except Exception as e:  # offline, Hub unreachable, gated: all mean "give a local copy"
        where = "the datasets cache (HF_HUB_OFFLINE is set)" if _hub_offline() else "the Hub"
        raise UsageError(
            f"cannot load {name} from {where} ({type(e).__name__}); give an offline copy with "
            f"--dataset-path ({_offline_hint(name, purpose)})"
        ) from e
    return list(rows["text"])


def _check_hub_reachable(dataset: str, instead: str, timeout: float = 3.0) -> None:
    """Fail at once, with what to do instead, when the Hub cannot be reached: `datasets` would
    otherwise retry for about 30 s. With HF_HUB_OFFLINE set there is nothing to check: datasets
    then reads its cache only, at once."""
    import socket
    from urllib.parse import urlsplit

    if _hub_offline():
        return
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise UsageError(
            f"cannot reach the Hub at {endpoint.hostname}:{port} to load {dataset} ({e}); "
            f"{instead}, or set HF_HUB_OFFLINE=1 to use a copy in the datasets cache"
        ) from None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _offline_hint(name: str, purpose: str) -> str:
    if name == "wikitext2":
        return (
            f"a .txt of the wikitext-2-raw-v1 {WIKITEXT_SPLITS[purpose]} split joined with "
            "blank lines, or "
            f"a directory holding wikitext-2-raw-v1/{WIKITEXT_SPLITS[purpose]}-*.parquet"
        )
    return f"the file {C4_SHARDS[purpose][1]} or a directory holding it"


def _offline_copy_documents(name: str, purpose: str, path: Path) -> list[str]:
    """A named dataset from a local copy: a file, a directory laid out as its Hub repo, or
    save_to_disk."""
    if path.is_file():
        return _file_documents(path, purpose)
    if not path.is_dir():
        raise UsageError(f"--dataset-path {path} not found; give {_offline_hint(name, purpose)}")
    if name == "c4":
        shard = C4_SHARDS[purpose][1]
        for candidate in (path / shard, path / Path(shard).name):
            if candidate.is_file():
                return _file_documents(candidate, purpose)
    else:
        split = WIKITEXT_SPLITS[purpose]
        parquet = sorted(path.glob(f"**/{WIKITEXT_HUB[1]}/{split}-*.parquet"))
        if parquet:
            return [doc for f in parquet for doc in _file_documents(f, purpose)]
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _saved_dataset_documents(path, purpose)
    raise UsageError(
        f"--dataset-path {path} does not hold {name}; give {_offline_hint(name, purpose)}"
    )


def _hub_documents(dataset_id: str, purpose: str) -> list[str]:
    _check_hub_reachable(dataset_id, "give a local .txt/.jsonl/.parquet file as --dataset")
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_id)
    except Exception as e:
        raise UsageError(
            f"cannot load dataset {dataset_id!r} from the Hub ({type(e).__name__}: {e}); "
            f"offline, give a local .txt/.jsonl/.parquet file as --dataset"
        ) from e
    return _dataset_split_texts(loaded, purpose, dataset_id)


def _saved_dataset_documents(path: Path, purpose: str) -> list[str]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise UsageError(
            f"{path} is not a dataset saved with datasets' save_to_disk ({type(e).__name__}); "
            f"give a .txt/.jsonl/.json/.parquet file instead"
        ) from e
    return _dataset_split_texts(loaded, purpose, str(path))


def _dataset_split_texts(loaded, purpose: str, what: str) -> list[str]:
    """Texts of the split that fits `purpose` (calibration: train; eval: test, else validation)."""
    if hasattr(loaded, "keys"):  # a DatasetDict
        wanted = ("train",) if purpose == "calibration" else ("test", "validation")
        split = next((s for s in wanted if s in loaded), None)
        if split is None:
            raise UsageError(
                f"{what} has no {' or '.join(wanted)} split (it has {', '.join(loaded)})"
            )
        loaded = loaded[split]
    return [_row_text(row, what, i) for i, row in enumerate(loaded)]


def _file_documents(path: Path, purpose: str) -> list[str]:
    try:
        return _read_documents(path, purpose)
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); give a text file: .txt, "
            f".jsonl, .json or .parquet"
        ) from e


def _read_documents(path: Path, purpose: str) -> list[str]:
    name = path.name.lower()
    if name.endswith(".txt"):
        return _txt_documents(path.read_text(encoding="utf-8"), purpose)
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise UsageError(
                f"{path} is not a readable Parquet file ({e}); give a .parquet, .jsonl or .txt file"
            ) from e
        return [_row_text(row, str(path), i) for i, row in enumerate(table.to_pylist())]
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        rows = json_rows(path)
        if rows and isinstance(rows[0], dict) and "input_ids" in rows[0]:
            raise UsageError(
                f"{path} holds pre-tokenized input_ids, not text; it can only be calibration data "
                f"for the tokenizer that made it"
            )
        return [_row_text(row, str(path), i) for i, row in enumerate(rows)]
    raise UsageError(
        f"unsupported dataset file {path}: use .txt, .jsonl, .json, .parquet or .jsonl.gz"
    )


def json_rows(path: Path) -> list:
    """Rows of a JSON array file, or of a JSON-lines file (optionally gzipped)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (gzip.BadGzipFile, EOFError) as e:
        raise UsageError(
            f"{path} is not a complete gzip file ({e}); give the file again or unpacked"
        ) from e
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); give a UTF-8 JSON file"
        ) from e
    try:
        if text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON / JSON lines ({e.msg} at line {e.lineno})") from e


def _row_text(row, what: str, index: int) -> str:
    """A row's document: a plain string, a "text" field, or "prompt" + "natural_text" (the C4
    excerpt's layout), or the row's only string field."""
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        if isinstance(row.get("text"), str):
            return row["text"]
        if isinstance(row.get("prompt"), str) and isinstance(row.get("natural_text"), str):
            return row["prompt"] + row["natural_text"]
        strings = [k for k, v in row.items() if isinstance(v, str)]
        if len(strings) == 1:
            return row[strings[0]]
    keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
    raise UsageError(
        f'{what}: row {index + 1} has no text (fields: {keys}); rows need a "text" field, or '
        f'"prompt" and "natural_text"'
    )
