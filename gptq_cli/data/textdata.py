"""Text datasets: calibration samples and perplexity evaluation windows (the raw documents come from
documents.py).

    docs = load_text("wikitext2", "eval")  # list of raw documents
    # a list of LongTensor [1, seqlen]
    samples = calibration_samples(tokenizer, "builtin", nsamples=128, seqlen=2048)
    windows = eval_windows(tokenizer, "wikitext2", seqlen=2048)  # LongTensor [n, seqlen]

The sampling follows the GPTQ paper's code (IST-DASLab/gptq datautils.py), so with the same
tokenizer the WikiText-2 windows, the C4 evaluation windows and the WikiText-2 calibration samples
are the paper's.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from gptq_cli.data.documents import json_rows, load_text
from gptq_cli.errors import UsageError
from gptq_cli.settings import EVAL_SEQLEN, NSAMPLES, SEED, SEQLEN, check_at_least_one

C4_EVAL_WINDOWS = 256
# Calibration tokenizes at most this many characters (a seeded subset of documents beyond it):
# enough for WikiText-2 train whole (10.9 MB, as the paper does), without tokenizing a 800 MB C4
# shard.
CALIBRATION_CHAR_BUDGET = 16_000_000


def calibration_samples(
    tokenizer,
    dataset: str,
    *,
    nsamples: int = NSAMPLES,
    seqlen: int = SEQLEN,
    seed: int = SEED,
    dataset_path: str | None = None,
) -> list[torch.Tensor]:
    """`nsamples` random windows of `seqlen` tokens, each a LongTensor [1, seqlen], deterministic
    for a seed.

    The documents are joined with "\\n\\n" and tokenized once (short documents still count), then
    each window starts at random.Random(seed).randint(0, n - seqlen - 1), as the paper does for
    WikiText-2. A corpus of at most `seqlen` tokens gives a single, shorter sample. A .jsonl
    whose rows hold `input_ids` is pre-tokenized calibration: its first `nsamples` rows are used
    as-is, truncated to `seqlen`."""
    check_at_least_one(nsamples=nsamples, seqlen=seqlen)
    rows = pretokenized_rows(dataset)
    if rows is not None:
        rows = rows[:nsamples]
        too_big = max(max(row) for row in rows)
        if too_big >= len(tokenizer):
            raise UsageError(
                f"{dataset} holds token id {too_big}, beyond this tokenizer's {len(tokenizer)} "
                f"ids: it was tokenized for another model; give text instead"
            )
        return [torch.tensor(row[:seqlen], dtype=torch.long).unsqueeze(0) for row in rows]
    rng = random.Random(seed)
    docs = _bounded_documents(load_text(dataset, "calibration", dataset_path=dataset_path), rng)
    ids = tokenize("\n\n".join(docs), tokenizer)
    if ids.numel() == 0:
        raise UsageError(f"calibration dataset {dataset} holds no text")
    if ids.numel() <= seqlen:
        return [ids[:seqlen].unsqueeze(0)]
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return [ids[i : i + seqlen].unsqueeze(0) for i in starts]


def eval_windows(
    tokenizer,
    dataset: str,
    *,
    seqlen: int = EVAL_SEQLEN,
    limit: int | None = None,
    dataset_path: str | None = None,
) -> torch.Tensor:
    """Perplexity windows, LongTensor [n, seqlen], with the paper's protocol:
    "\\n\\n".join(documents) tokenized once and cut into n = numel // seqlen consecutive windows;
    for c4, the GPTQ repo's 256 random windows (seed 0) of validation documents longer than
    `seqlen`. `limit` keeps the first `limit` windows."""
    check_at_least_one(seqlen=seqlen)
    if limit is not None:
        check_at_least_one(limit=limit)
    if pretokenized_rows(dataset) is not None:
        raise UsageError(
            f"{dataset} holds pre-tokenized calibration rows (input_ids); evaluate on "
            "a text dataset"
        )
    docs = load_text(dataset, "eval", dataset_path=dataset_path)
    if dataset == "c4":
        return _c4_windows(tokenizer, docs, seqlen, min(limit or C4_EVAL_WINDOWS, C4_EVAL_WINDOWS))
    ids = tokenize("\n\n".join(docs), tokenizer)
    n = ids.numel() // seqlen
    if n == 0:
        raise UsageError(
            f"dataset {dataset} has {ids.numel()} tokens, fewer than --seqlen {seqlen}: "
            f"give a smaller --seqlen or more text"
        )
    n = min(n, limit) if limit else n
    return ids[: n * seqlen].view(n, seqlen)


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Token ids of `text` as a 1-D LongTensor, with the tokenizer's own special tokens (as the
    paper)."""
    # verbose=False: the "longer than the maximum sequence length" warning is expected; we cut
    # windows.
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids[0].to(torch.long)


def pretokenized_rows(dataset: str) -> list[list[int]] | None:
    """The rows of a .jsonl whose rows hold `input_ids`, or None when `dataset` is anything else."""
    path = Path(dataset).expanduser()
    if not (dataset.endswith(".jsonl") and path.is_file()):
        return None
    rows = json_rows(path)
    if not rows or not isinstance(rows[0], dict) or "input_ids" not in rows[0]:
        return None
    out = []
    for i, row in enumerate(rows):
        ids = row.get("input_ids") if isinstance(row, dict) else None
        if not ids or not all(isinstance(t, int) for t in ids):
            raise UsageError(
                f"{path}: row {i + 1} has no list of integer input_ids; every row of a "
                f"pre-tokenized file needs one"
            )
        if min(ids) < 0:
            raise UsageError(
                f"{path}: row {i + 1} holds the negative token id {min(ids)}; token ids start at "
                f"0, so the file is damaged or was not made by a tokenizer"
            )
        out.append(ids)
    return out


def _bounded_documents(docs: list[str], rng: random.Random) -> list[str]:
    """All documents, or a seeded random subset (kept in corpus order) of CALIBRATION_CHAR_BUDGET
    chars."""
    if sum(len(d) for d in docs) <= CALIBRATION_CHAR_BUDGET:
        return docs
    order = list(range(len(docs)))
    rng.shuffle(order)
    chosen, total = [], 0
    for i in order:
        if total >= CALIBRATION_CHAR_BUDGET:
            break
        chosen.append(i)
        total += len(docs[i])
    return [docs[i] for i in sorted(chosen)]


def _c4_windows(tokenizer, docs: list[str], seqlen: int, count: int) -> torch.Tensor:
    """The GPTQ repo's C4 evaluation: with random seeded 0, draw a document, redraw until it has
    more than seqlen tokens, take a window at a random offset; `count` times."""
    rng = random.Random(0)
    too_short: set[int] = set()
    windows = []
    while len(windows) < count:
        i = rng.randint(0, len(docs) - 1)
        ids = tokenize(docs[i], tokenizer)
        if ids.numel() <= seqlen:
            too_short.add(i)
            if len(too_short) == len(docs):
                raise UsageError(
                    f"no c4 document has more than --seqlen {seqlen} tokens: give a "
                    "smaller --seqlen"
                )
            continue
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)
