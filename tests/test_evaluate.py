"""Perplexity, speed and `gptq eval` (gptq_cli.evaluate, gptq_cli.commands.eval_cmd) on tiny random
models.

The reference perplexity is computed the way transformers users do: model(input_ids=w,
labels=w).loss per window (the mean NLL of its seqlen - 1 predicted tokens), ppl = exp(mean of those
losses).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gptq_cli.cli import app
from gptq_cli.data.textdata import eval_windows
from gptq_cli.errors import UsageError
from gptq_cli.evaluate import (
    compare,
    evaluate,
    greedy_decode,
    perplexity,
    save_eval_results,
    speed,
)
from gptq_cli.settings import check_context
from tests.tiny_models import (
    make_tiny_model,
    make_tiny_tokenizer,
    random_input_ids,
    save_tiny_model,
)

WORDS = Path(__file__).parent / "fixtures" / "words.txt"
SEQLEN = 64


def reference_ppl(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.double().item() for w in windows]
    return math.exp(sum(losses) / len(losses))


@pytest.fixture(scope="module")
def windows():
    return eval_windows(make_tiny_tokenizer(), str(WORDS), seqlen=SEQLEN)


def test_perplexity_matches_transformers_loss(windows):
    model = make_tiny_model("llama")
    result = perplexity(model, windows[:8])
    assert result["ppl"] == pytest.approx(reference_ppl(model, windows[:8]), rel=1e-4)
    assert result["windows"] == 8 and result["tokens"] == 8 * (SEQLEN - 1)
    assert result["nll"] == pytest.approx(math.log(result["ppl"]), rel=1e-12)


def test_batches_give_the_same_perplexity(windows):
    model = make_tiny_model("gpt2")  # another architecture, with learned position embeddings
    one = perplexity(model, windows[:6])
    assert perplexity(model, windows[:6], batch_size=4)["ppl"] == pytest.approx(
        one["ppl"], rel=1e-5
    )
    assert one["ppl"] == pytest.approx(reference_ppl(model, windows[:6]), rel=1e-4)


def test_progress_reports_every_window(windows):
    seen = []
    perplexity(make_tiny_model("llama"), windows[:5], batch_size=2, progress=seen.append)
    assert seen == [2, 2, 1]


def test_no_windows_is_a_usage_error():
    with pytest.raises(UsageError, match="at least one window"):
        perplexity(make_tiny_model("llama"), torch.zeros(0, SEQLEN, dtype=torch.long))


def test_seqlen_beyond_the_context_is_a_usage_error():
    check_context(make_tiny_model("llama").config, 256)
    with pytest.raises(UsageError, match="context of 256"):
        check_context(make_tiny_model("llama").config, 257)
    with pytest.raises(UsageError, match="context of 256"):  # GPT-2 names it n_positions
        check_context(make_tiny_model("gpt2").config, 300)


def test_greedy_decode_with_the_cache_equals_generate():
    model = make_tiny_model("llama")
    prompt = random_input_ids(1, 20, seed=3)
    run = greedy_decode(model, prompt, new_tokens=12)
    expected = model.generate(prompt, max_new_tokens=13, do_sample=False, min_new_tokens=13)[:, 20:]
    assert torch.equal(run.tokens, expected)
    assert run.prefill_seconds > 0 and run.decode_seconds > 0


def test_speed_reports_token_rates():
    result = speed(make_tiny_model("llama"), make_tiny_tokenizer(), prompt_len=32, new_tokens=4)
    assert (result["prompt_len"], result["new_tokens"]) == (32, 4)
    assert result["prefill_tokens_per_s"] == pytest.approx(32 / result["prefill_seconds"])
    assert result["decode_tokens_per_s"] == pytest.approx(4 / result["decode_seconds"])
    with pytest.raises(UsageError, match="context of 256"):
        speed(make_tiny_model("llama"), make_tiny_tokenizer(), prompt_len=250, new_tokens=10)


def test_evaluate_a_saved_model_matches_the_reference(tiny_llama_dir, windows):
    result = evaluate(str(tiny_llama_dir), dataset=str(WORDS), seqlen=SEQLEN, limit=4)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, dtype=torch.float32
    ).eval()
    assert result["ppl"] == pytest.approx(reference_ppl(model, windows[:4]), rel=1e-4)
    assert (result["quantized"], result["backend"], result["dtype"]) == (False, None, "float32")


def test_evaluate_a_gptq_checkpoint_runs_quantlinear(tiny_gptq_checkpoint, windows):
    result = evaluate(str(tiny_gptq_checkpoint.path), dataset=str(WORDS), seqlen=SEQLEN, limit=4)
    assert result["quantized"] and result["backend"] == "torch"  # on CPU: QuantLinear's torch path
    reference = reference_ppl(tiny_gptq_checkpoint.reference_model(torch.float32), windows[:4])
    assert result["ppl"] == pytest.approx(reference, rel=1e-4)


def test_compare_uses_identical_windows_and_reports_ratios(tiny_llama_dir, tiny_gptq_checkpoint):
    report = compare(
        [str(tiny_llama_dir), str(tiny_gptq_checkpoint.path), str(tiny_llama_dir)],
        dataset=str(WORDS),
        seqlen=SEQLEN,
        limit=3,
    )
    base, quant, again = report["models"]
    assert report["windows"] == 3 and base["tokens"] == quant["tokens"] == 3 * (SEQLEN - 1)
    assert again["ppl"] == base["ppl"] and again["ppl_ratio"] == 1.0
    assert quant["ppl_ratio"] == pytest.approx(quant["ppl"] / base["ppl"], rel=1e-12)


def test_compare_refuses_models_with_different_tokenizers(tmp_path, tiny_llama_dir):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    other = save_tiny_model(tmp_path / "other", "llama")
    vocab = {f"v{i}": i for i in range(512)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="v0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="v0").save_pretrained(
        other
    )
    with pytest.raises(UsageError, match="different tokenizer"):
        compare([str(tiny_llama_dir), str(other)], dataset=str(WORDS), seqlen=SEQLEN, limit=1)


def test_saved_results_replace_the_same_evaluation(tmp_path):
    first = {
        "model": "m",
        "dataset": "wikitext2",
        "seqlen": 2048,
        "windows": 10,
        "ppl": 9.0,
        "ppl_ratio": 1.0,
    }
    save_eval_results(tmp_path, first)
    save_eval_results(tmp_path, {**first, "dataset": "c4", "ppl": 12.0})
    path = save_eval_results(tmp_path, {**first, "ppl": 8.5})
    results = json.loads(path.read_text())["results"]
    assert sorted((r["dataset"], r["ppl"]) for r in results) == [("c4", 12.0), ("wikitext2", 8.5)]
    assert all("ppl_ratio" not in r for r in results)


# --- the command line
# ------------------------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(app, ["eval", *args])


def test_cli_json_output_matches_the_api(tiny_llama_dir):
    out = invoke(
        str(tiny_llama_dir),
        "--dataset",
        str(WORDS),
        "--seqlen",
        str(SEQLEN),
        "--limit",
        "2",
        "--json",
    )
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    api = evaluate(str(tiny_llama_dir), dataset=str(WORDS), seqlen=SEQLEN, limit=2)
    assert result["ppl"] == pytest.approx(api["ppl"], rel=1e-9) and result["windows"] == 2
    assert "ppl_ratio" not in result  # a ratio only when comparing


def test_cli_compare_and_save(tmp_path, tiny_gptq_checkpoint, tiny_llama_dir):
    import shutil

    ckpt = shutil.copytree(tiny_gptq_checkpoint.path, tmp_path / "ckpt")
    out = invoke(
        str(tiny_llama_dir),
        "--compare",
        str(ckpt),
        "--dataset",
        str(WORDS),
        "--seqlen",
        str(SEQLEN),
        "--limit",
        "2",
        "--json",
    )
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert [m["model"] for m in report["models"]] == [str(tiny_llama_dir), str(ckpt)]
    out = invoke(
        str(ckpt),
        "--dataset",
        str(WORDS),
        "--seqlen",
        str(SEQLEN),
        "--limit",
        "2",
        "--save",
        "--quiet",
    )
    assert out.exit_code == 0, out.output
    saved = json.loads((ckpt / "eval_results.json").read_text())["results"]
    assert saved[0]["ppl"] == pytest.approx(report["models"][1]["ppl"], rel=1e-9)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seqlen", "512"], "exceeds the model's context"),
        (["--dataset", "no-such-dataset", "--seqlen", "64"], "unknown dataset"),
        (["--dataset", "WORDS", "--seqlen", "256", "--limit", "0"], "--limit must be at least 1"),
        (
            ["--dataset", "WORDS", "--seqlen", "64", "--batch-size", "0"],
            "--batch-size must be at least 1",
        ),
        (["--compare"], "--compare needs a second model"),
        (["SECOND"], "add --compare"),
        (["--save", "--dataset", "WORDS"], None),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tiny_llama_dir, args, message):
    args = [
        str(WORDS) if a == "WORDS" else str(tiny_llama_dir) if a == "SECOND" else a for a in args
    ]
    if message is None:  # --save with a Hub id: nothing local to write into
        out = invoke("org/not-a-local-dir", *args)
        message = "--save writes into a local model directory"
    else:
        out = invoke(str(tiny_llama_dir), *args)
    assert out.exit_code == 2, out.output
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
