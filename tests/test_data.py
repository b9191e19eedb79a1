"""Text datasets (gptq_cli.data.textdata): documents of every source kind, evaluation windows,
calibration samples.

The tiny tokenizer is word-level ("w17" -> one id, whitespace dropped, no special tokens), so the
expected ids of a text are computed here independently, by looking each whitespace-separated word up
in its vocabulary.
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import random
from pathlib import Path

import pytest
import tomllib
import torch

from gptq_cli.data import documents, textdata
from gptq_cli.data.textdata import calibration_samples, eval_windows, load_text
from gptq_cli.errors import UsageError
from tests.tiny_models import make_tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
WORDS = FIXTURES / "words.txt"
DOCS = FIXTURES / "docs.jsonl"
PROMPT_NATURAL = FIXTURES / "prompt_natural.jsonl"
PRETOKENIZED = FIXTURES / "pretokenized.jsonl"


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def word_ids(text: str, tokenizer) -> list[int]:
    vocab = tokenizer.get_vocab()
    return [vocab[w] for w in text.split()]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_slice_of(window: list[int], ids: list[int]) -> bool:
    n = len(window)
    return any(ids[i : i + n] == window for i in range(len(ids) - n + 1))


# --- documents
# -------------------------------------------------------------------------------------------


def test_txt_is_one_document_for_eval_and_paragraphs_for_calibration():
    text = WORDS.read_text()
    assert load_text(str(WORDS), "eval") == [text]
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    assert load_text(str(WORDS), "calibration") == paragraphs


def test_jsonl_text_rows_and_prompt_natural_text_rows():
    assert load_text(str(DOCS), "eval") == [r["text"] for r in jsonl(DOCS)]
    rows = jsonl(PROMPT_NATURAL)
    assert load_text(str(PROMPT_NATURAL), "calibration") == [
        r["prompt"] + r["natural_text"] for r in rows
    ]


def test_json_array_gzipped_jsonl_and_parquet_give_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [r["text"] for r in jsonl(DOCS)]
    (tmp_path / "a.json").write_text(json.dumps([{"text": t} for t in texts]))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pq.write_table(
        pa.table({"id": list(range(len(texts))), "content": texts}), tmp_path / "a.parquet"
    )
    for name in ("a.json", "a.jsonl.gz", "a.parquet"):
        assert load_text(str(tmp_path / name), "eval") == texts, name


def test_rows_without_text_are_a_usage_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1, "score": 2.0}) + "\n")
    with pytest.raises(UsageError, match="text"):
        load_text(str(bad), "eval")


@pytest.mark.parametrize(
    "dataset, message",
    [
        ("wikitext", "unknown dataset"),
        ("missing/file.txt", "not found"),
        ("./nothing.jsonl", "not found"),
    ],
)
def test_unknown_names_and_missing_files_are_usage_errors(dataset, message):
    with pytest.raises(UsageError, match=message):
        load_text(dataset, "eval")


@pytest.mark.parametrize("name", ["wikitext2", "c4"])
def test_unreachable_named_dataset_names_the_flag_to_give(monkeypatch, name):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UsageError, match="--dataset-path"):
        load_text(name, "eval")


def test_dataset_path_offline_copies_of_wikitext2(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # A single text file: the evaluation string itself.
    assert load_text("wikitext2", "eval", dataset_path=str(WORDS)) == [WORDS.read_text()]
    # The Hub repo's layout: wikitext-2-raw-v1/test-*.parquet rows, joined with "\n\n" for
    # evaluation.
    rows = ["", " = Heading = ", "", " w5 w6 w7 ", " w8 w9"]
    (tmp_path / "wikitext-2-raw-v1").mkdir()
    pq.write_table(
        pa.table({"text": rows}), tmp_path / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet"
    )
    assert load_text("wikitext2", "eval", dataset_path=str(tmp_path)) == rows
    with pytest.raises(UsageError, match="does not hold c4"):
        load_text("c4", "eval", dataset_path=str(tmp_path))


def hub_like_dataset():
    import datasets

    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["w3 w4", "w5"]}),
            "validation": datasets.Dataset.from_dict({"text": ["w6 w7 w8"]}),
        }
    )


def test_saved_and_hub_datasets_use_train_for_calibration_and_test_or_validation_for_eval(
    tmp_path, monkeypatch
):
    import datasets

    hub_like_dataset().save_to_disk(str(tmp_path / "saved"))
    assert load_text(str(tmp_path / "saved"), "calibration") == ["w3 w4", "w5"]
    assert load_text(str(tmp_path / "saved"), "eval") == ["w6 w7 w8"]
    monkeypatch.setattr(datasets, "load_dataset", lambda dataset_id: hub_like_dataset())
    # no reachability probe: the stub stands in for the Hub (or its cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_text("someone/some-corpus", "eval") == ["w6 w7 w8"]


def test_builtin_calibration_text_is_shipped_as_package_data():
    docs = load_text("builtin", "calibration")
    assert len(docs) > 100 and all(d.strip() for d in docs)
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["gptq_cli"]
    package_root = Path(documents.__file__).parents[1]  # gptq_cli/, where package-data is rooted
    relative = documents.BUILTIN_TEXT.relative_to(package_root).as_posix()
    assert any(fnmatch.fnmatch(relative, p) for p in patterns)


# --- evaluation windows
# ----------------------------------------------------------------------------------


def test_eval_windows_are_consecutive_slices_of_the_whole_text(tok):
    ids = word_ids(WORDS.read_text(), tok)
    seqlen = 64
    windows = eval_windows(tok, str(WORDS), seqlen=seqlen)
    n = len(ids) // seqlen
    assert windows.dtype == torch.long and windows.shape == (n, seqlen)
    assert windows.flatten().tolist() == ids[: n * seqlen]


def test_eval_windows_of_documents_join_them_with_blank_lines(tok):
    texts = [r["text"] for r in jsonl(DOCS)]
    ids = word_ids("\n\n".join(texts), tok)
    windows = eval_windows(tok, str(DOCS), seqlen=100)
    assert windows.flatten().tolist() == ids[: len(ids) // 100 * 100]


def test_limit_keeps_the_first_windows_and_may_exceed_what_exists(tok):
    all_windows = eval_windows(tok, str(WORDS), seqlen=64)
    assert torch.equal(eval_windows(tok, str(WORDS), seqlen=64, limit=3), all_windows[:3])
    assert torch.equal(eval_windows(tok, str(WORDS), seqlen=64, limit=10_000), all_windows)


def test_too_short_text_and_nonpositive_sizes_are_usage_errors(tok, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("w3 w4 w5 w6 w7")
    with pytest.raises(UsageError, match="fewer than --seqlen 16"):
        eval_windows(tok, str(short), seqlen=16)
    for kwargs in ({"seqlen": 0}, {"seqlen": 8, "limit": 0}):
        with pytest.raises(UsageError, match="at least 1"):
            eval_windows(tok, str(WORDS), **kwargs)


def test_pretokenized_rows_are_not_evaluation_text(tok):
    with pytest.raises(UsageError, match="pre-tokenized"):
        eval_windows(tok, str(PRETOKENIZED), seqlen=8)


def gptq_repo_c4_windows(docs: list[str], tokenizer, seqlen: int, count: int) -> list[list[int]]:
    """The C4 evaluation loop of the GPTQ paper's code, restated: global random seeded 0, redraw
    documents until one is long enough, a random window of it."""
    random.seed(0)
    out = []
    for _ in range(count):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = word_ids(docs[i], tokenizer)
            if len(ids) >= seqlen:
                break
        start = random.randint(0, len(ids) - seqlen - 1)
        out.append(ids[start : start + seqlen])
    return out


def test_c4_windows_follow_the_gptq_repo_protocol(tok):
    docs = [r["text"] for r in jsonl(DOCS)]
    seqlen = 48
    # where the original crashes instead of redrawing
    assert all(len(d.split()) != seqlen for d in docs)
    windows = eval_windows(tok, "c4", seqlen=seqlen, dataset_path=str(DOCS))
    assert windows.shape == (textdata.C4_EVAL_WINDOWS, seqlen)
    assert windows.tolist() == gptq_repo_c4_windows(docs, tok, seqlen, textdata.C4_EVAL_WINDOWS)
    assert torch.equal(
        eval_windows(tok, "c4", seqlen=seqlen, limit=7, dataset_path=str(DOCS)), windows[:7]
    )


def test_c4_without_a_long_enough_document_is_a_usage_error(tok):
    with pytest.raises(UsageError, match="no c4 document"):
        eval_windows(tok, "c4", seqlen=200, dataset_path=str(DOCS))


# --- calibration
# -----------------------------------------------------------------------------------------


def test_calibration_samples_are_seeded_random_windows_of_the_concatenated_documents(tok):
    ids = word_ids(WORDS.read_text(), tok)
    samples = calibration_samples(tok, str(WORDS), nsamples=10, seqlen=32, seed=0)
    assert len(samples) == 10
    assert all(s.shape == (1, 32) and s.dtype == torch.long for s in samples)
    assert all(is_slice_of(s[0].tolist(), ids) for s in samples)
    again = calibration_samples(tok, str(WORDS), nsamples=10, seqlen=32, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(samples, again))
    other = calibration_samples(tok, str(WORDS), nsamples=10, seqlen=32, seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(samples, other))


def test_calibration_follows_the_papers_wikitext2_sampling(tok):
    ids = word_ids(WORDS.read_text(), tok)
    # the paper: random.seed(seed), i = randint(0, numel - seqlen - 1), window ids[i:i+seqlen]
    random.seed(5)
    expected = [ids[i : i + 40] for i in (random.randint(0, len(ids) - 40 - 1) for _ in range(6))]
    got = calibration_samples(
        tok, "wikitext2", nsamples=6, seqlen=40, seed=5, dataset_path=str(WORDS)
    )
    assert [s[0].tolist() for s in got] == expected


def test_short_documents_are_concatenated_not_dropped(tok, tmp_path):
    docs = [f"w{10 + 3 * i} w{11 + 3 * i} w{12 + 3 * i}" for i in range(100)]  # 3 words each
    path = tmp_path / "short_docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    samples = calibration_samples(tok, str(path), nsamples=5, seqlen=16, seed=0)
    doc_of = {tok.get_vocab()[w]: i for i, d in enumerate(docs) for w in d.split()}
    for s in samples:
        assert s.shape == (1, 16)
        # 16 tokens span at least 5 three-word documents
        assert len({doc_of[t] for t in s[0].tolist()}) >= 5


def test_a_corpus_shorter_than_seqlen_gives_one_shorter_sample(tok, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("w3 w4 w5\n\nw6 w7")
    samples = calibration_samples(tok, str(path), nsamples=8, seqlen=64)
    assert [s.tolist() for s in samples] == [[word_ids("w3 w4 w5 w6 w7", tok)]]


def test_large_corpora_sample_from_a_seeded_subset_of_documents(tok, monkeypatch):
    texts = [r["text"] for r in jsonl(DOCS)]
    monkeypatch.setattr(textdata, "CALIBRATION_CHAR_BUDGET", 1000)
    tokenized = []
    real_tokenize = textdata.tokenize
    monkeypatch.setattr(
        textdata, "tokenize", lambda text, t: tokenized.append(text) or real_tokenize(text, t)
    )
    samples = calibration_samples(tok, str(DOCS), nsamples=6, seqlen=20, seed=3)
    chosen = tokenized[0].split("\n\n")
    assert 1000 <= len(tokenized[0]) < sum(len(t) for t in texts) / 2
    positions = [texts.index(d) for d in chosen]
    assert positions == sorted(positions)  # a subset, in corpus order
    assert all(is_slice_of(s[0].tolist(), word_ids(tokenized[0], tok)) for s in samples)
    again = calibration_samples(tok, str(DOCS), nsamples=6, seqlen=20, seed=3)
    assert tokenized[1] == tokenized[0] and all(torch.equal(a, b) for a, b in zip(samples, again))


def test_pretokenized_jsonl_is_used_as_is(tok):
    rows = [r["input_ids"] for r in jsonl(PRETOKENIZED)]
    samples = calibration_samples(tok, str(PRETOKENIZED), nsamples=5, seqlen=30, seed=123)
    assert [s[0].tolist() for s in samples] == [r[:30] for r in rows[:5]]
    assert len(calibration_samples(tok, str(PRETOKENIZED), nsamples=1000, seqlen=30)) == len(rows)


def test_pretokenized_rows_must_all_hold_integer_ids(tmp_path, tok):
    path = tmp_path / "ids.jsonl"
    path.write_text(
        json.dumps({"input_ids": [5, 6, 7]}) + "\n" + json.dumps({"input_ids": "5 6"}) + "\n"
    )
    with pytest.raises(UsageError, match="row 2"):
        calibration_samples(tok, str(path), nsamples=2, seqlen=4)


def test_pretokenized_ids_beyond_the_vocabulary_are_a_usage_error(tmp_path, tok):
    path = tmp_path / "other_model.jsonl"
    path.write_text(json.dumps({"input_ids": [5, 6, len(tok)]}) + "\n")
    with pytest.raises(UsageError, match="another model"):
        calibration_samples(tok, str(path), nsamples=1, seqlen=4)
