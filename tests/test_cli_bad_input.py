"""What a user meets on bad input (issue 18 items 1-6): one line on stderr that says what is wrong
and what to do, exit code 2, no traceback, and nothing half-written on disk. The bad inputs covered
here:

| item | command | bad input | answer | |---|---|---|---| | 1 | inspect, quantize, eval | names like
`x[/]`, `a[bold]b`, `my[/]model` (rich markup) | the name printed as typed, exit 2 | | 1 | inspect
--plot | no matplotlib: the hint names the `[plot]` extra | printed with its brackets, exit 2 | | 2
| quantize | `.jsonl` of `input_ids` with a negative id | exit 2 before any work dir | | 2 |
quantize (API) | a run failing before its first block | no work dir left; a rerun with other data
works | | 2 | quantize | work dir of other settings, no finished block | started afresh (one with a
block: refused) | | 3 | quantize | `--seqlen` beyond the model's context | exit 2 (as eval) | | 3 |
quantize | `--asym --format gptq` | exit 2 (v1 cannot store an asym zero of 0) | | 3 | quantize |
calibration text shorter than nsamples x seqlen | note; quant_log records what was used
(test_cli_output.py) | | 3 | quantize | `--group-size 48` on width-256 layers | note (fast kernels
need K % group == 0) (test_cli_output.py) | | 3 | pack | `--max-shard-size 0` | exit 2 | | 4 |
quantize | `-o` that exists, with another `--work-dir` | exit 2 before any work | | 4 | quantize
(API) | `-o` appearing while the run works | exit 2 naming `gptq pack WORKDIR`; blocks kept | | 4, 5
| quantize, pack | `-o` name of 250 bytes; `-o` under a file | exit 2 | | 5 | quantize | `--device
foo`, `--device mps` | exit 2 | | 5 | quantize | a binary `--dataset` file | exit 2 | | 5 |
quantize, eval | empty / non-object `config.json` | exit 2 | | 5 | quantize, eval | truncated
`model.safetensors` | exit 2 naming the file | | 5 | eval | GPTQ checkpoint with a NaN scale | exit
2 pointing at `gptq inspect` | | 6 | eval (textdata) | Hub unreachable | exit 2 at once, no
`datasets` retries | | 6 | eval | `HF_HUB_OFFLINE=1` and nothing cached | exit 2 with the
`--dataset-path` hint |
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gptq_cli import api
from gptq_cli.cli import app
from gptq_cli.errors import UsageError
from gptq_cli.format.config import QuantConfig
from gptq_cli.quantization.workdir import WorkDir
from tests.tiny_models import random_input_ids, save_tiny_model

# the tiny llama with one decoder block: a run takes a second or two
ONE_BLOCK = dict(num_hidden_layers=1)
FAST = ["--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--dtype", "float32", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("ux_model") / "model", "llama", **ONE_BLOCK)


def gptq(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def refused(result, *phrases: str, code: int = 2) -> str:
    """The one stderr line of a refusal, after checking the exit code, the line and the phrases
    in it."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


def entries(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.mark.parametrize(
    "args, shown",
    [
        (["inspect", "x[/]"], "x[/] does not exist"),
        (["inspect", "a[bold]b"], "a[bold]b does not exist"),
        (["quantize", "my[/]model", "-o", "OUT"], "'my[/]model' not found"),
        (["eval", "./p[red]x"], "p[red]x"),
    ],
)
def test_names_print_as_typed_not_as_markup(tmp_path, monkeypatch, args, shown):
    monkeypatch.chdir(tmp_path)
    refused(gptq(*args), shown)
    assert entries(tmp_path) == set()


def test_a_hint_with_brackets_keeps_them(tmp_path, monkeypatch):
    """The matplotlib hint names the `[plot]` extra; rendered as markup it lost it."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    from gptq_cli.commands.common import run
    from gptq_cli.losses import plot_losses

    result = CliRunner().invoke(
        typer_app_of(lambda: run(lambda: plot_losses([], tmp_path / "x.png"))), []
    )
    refused(result, "pip install 'gptq-cli[plot]'")


def typer_app_of(body):
    import typer

    one = typer.Typer()
    one.command()(body)
    return one


def test_negative_token_ids_are_bad_input_and_leave_no_work_dir(tmp_path, model_dir):
    bad = tmp_path / "neg.jsonl"
    bad.write_text(json.dumps({"input_ids": [-5, 3, 4, 5] * 8}) + "\n")
    refused(
        gptq("quantize", model_dir, "--dataset", bad, "-o", tmp_path / "out", *FAST),
        "negative token id -5",
    )
    assert entries(tmp_path) == {"neg.jsonl"}


def test_a_run_failing_before_its_first_block_leaves_nothing_and_the_rerun_starts(
    tmp_path, model_dir, monkeypatch
):
    def fail(*args, **kwargs):
        raise RuntimeError("out of memory in block 0")

    monkeypatch.setattr(api, "_solve_into", fail)
    with pytest.raises(RuntimeError):
        api.quantize(
            str(model_dir),
            QuantConfig(),
            nsamples=2,
            seqlen=32,
            device="cpu",
            dtype="float32",
            output=tmp_path / "out",
        )
    assert entries(tmp_path) == set()
    monkeypatch.undo()
    other = tmp_path / "calib.jsonl"
    other.write_text(
        "".join(json.dumps({"input_ids": r}) + "\n" for r in random_input_ids(2, 32).tolist())
    )
    result = gptq("quantize", model_dir, "--dataset", other, "-o", tmp_path / "out", *FAST)
    assert result.exit_code == 0, result.output
    assert entries(tmp_path) == {"calib.jsonl", "out"}


def test_a_work_dir_without_finished_blocks_is_started_afresh_under_other_settings(tmp_path):
    plan = {"config": {"bits": 4}, "calibration_fingerprint": "a"}
    wd = WorkDir(tmp_path / "w")
    assert wd.open(plan) == []
    wd.close()
    # nothing finished: nothing to protect
    assert wd.open({**plan, "calibration_fingerprint": "b"}) == []
    assert json.loads((tmp_path / "w" / "plan.json").read_text())["calibration_fingerprint"] == "b"
    wd.write_block(0, {}, [], 1.0, "identity")
    wd.close()
    with pytest.raises(UsageError, match="other settings"):
        # a finished block is worth keeping
        WorkDir(tmp_path / "w").open(plan)


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--seqlen", "300", "--device", "cpu"], "exceeds the model's context"),
        (["--asym", "--format", "gptq"], "--asym needs --format gptq_v2"),
        (["--device", "foo"], "--device foo: use cpu, cuda"),
        (["--device", "mps"], "--device mps: use cpu, cuda"),
        (["--work-dir", "elsewhere"], "--output"),
        (["--method", "awq"], "--method 'awq': use one of gptq, gptaq"),
        (["--method", "gptaq", "--gptaq-alpha", "0"], "--gptaq-alpha 0.0: use"),
        (["--method", "gptaq-ls", "--gptaq-alpha", "2", "--dry-run"], "--gptaq-alpha 2.0: use"),
        (
            ["--method", "gptq", "--gptaq-alpha", "0.5"],
            "--gptaq-alpha goes with --method gptaq or gptaq-ls",
        ),
    ],
)
def test_quantize_settings_that_cannot_be_applied_are_refused_before_any_work(
    tmp_path, model_dir, args, phrase
):
    if "--work-dir" in args:
        (tmp_path / "out").mkdir()
    before = entries(tmp_path)
    seqlen = [] if "--seqlen" in args else ["--seqlen", "32"]
    refused(
        gptq(
            "quantize",
            model_dir,
            "-o",
            tmp_path / "out",
            "--nsamples",
            "2",
            *seqlen,
            "--quiet",
            *args,
        ),
        phrase,
    )
    assert entries(tmp_path) == before


def test_bad_output_paths_are_refused_before_any_work(tmp_path, model_dir):
    (tmp_path / "a_file").write_text("")
    refused(
        gptq("quantize", model_dir, "-o", tmp_path / ("x" * 250), *FAST), "choose a shorter name"
    )
    refused(
        gptq("quantize", model_dir, "-o", tmp_path / "a_file" / "out", *FAST),
        "is a file, not a directory",
    )
    assert entries(tmp_path) == {"a_file"}


def test_an_output_appearing_during_the_run_keeps_the_blocks_and_says_how_to_pack_them(
    tmp_path, model_dir
):
    out = tmp_path / "out"

    def someone_else_writes_out(kind, *args):
        if kind == "block":
            out.mkdir(exist_ok=True)

    with pytest.raises(UsageError, match=r"kept in .*out\.work: `gptq pack .*out\.work -o DIR`"):
        api.quantize(
            str(model_dir),
            QuantConfig(),
            nsamples=2,
            seqlen=32,
            device="cpu",
            dtype="float32",
            output=out,
            progress=someone_else_writes_out,
        )
    packed = gptq("pack", tmp_path / "out.work", "-o", tmp_path / "packed", "--quiet")
    assert packed.exit_code == 0, packed.output
    assert (tmp_path / "packed" / "model.safetensors").is_file()


def test_pack_refuses_a_shard_size_of_zero(tmp_path, tiny_gptq_checkpoint):
    refused(
        gptq("pack", tiny_gptq_checkpoint.path, "-o", tmp_path / "out", "--max-shard-size", "0"),
        "--max-shard-size 0",
    )
    refused(gptq("pack", tiny_gptq_checkpoint.path, "-o", tmp_path / ("y" * 250)), "shorter name")
    assert entries(tmp_path) == set()


def test_unreadable_inputs_are_named(tmp_path, model_dir):
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\x00\x01\xff\xfe" * 10)
    refused(
        gptq("quantize", model_dir, "--dataset", binary, "-o", tmp_path / "out", *FAST),
        "is not UTF-8 text",
    )
    for name, content in (("empty", ""), ("list", "[1, 2]")):
        broken = tmp_path / name
        broken.mkdir()
        for f in model_dir.iterdir():
            (broken / f.name).write_bytes(f.read_bytes())
        (broken / "config.json").write_text(content)
        refused(gptq("quantize", broken, "-o", tmp_path / "out", *FAST), f"{name}/config.json")
        refused(gptq("eval", broken, "--dataset", binary), f"{name}/config.json")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in model_dir.iterdir():
        (truncated / f.name).write_bytes(
            f.read_bytes()[:1000] if f.suffix == ".safetensors" else f.read_bytes()
        )
    refused(
        gptq("quantize", truncated, "-o", tmp_path / "out", *FAST),
        "model.safetensors is not a readable",
    )
    refused(gptq("eval", truncated, "--seqlen", "32"), "truncated or corrupt")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()


def test_eval_of_a_checkpoint_with_a_nan_scale_is_refused_not_reported(
    tmp_path, tiny_gptq_checkpoint
):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan-scale"
    bad.mkdir()
    for f in tiny_gptq_checkpoint.path.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(bad / "model.safetensors")
    next(t for k, t in sorted(tensors.items()) if k.endswith(".scales"))[0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    text = tmp_path / "words.txt"
    text.write_text(" ".join(f"w{i % 400}" for i in range(300)))
    result = gptq("eval", bad, "--dataset", text, "--seqlen", "32", "--limit", "2", "--json")
    refused(result, "perplexity of nan", f"gptq inspect {bad}")
    assert result.stdout == ""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_hub_fails_at_once_without_datasets_retries(monkeypatch):
    import datasets

    from gptq_cli.data.textdata import load_text

    def must_not_be_called(*args, **kwargs):
        raise AssertionError(
            "load_dataset called although the Hub cannot be reached (it retries for ~30 s)"
        )

    monkeypatch.setattr(datasets, "load_dataset", must_not_be_called)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    for name in ("wikitext2", "c4", "someone/corpus"):
        with pytest.raises(UsageError, match="cannot reach the Hub .*HF_HUB_OFFLINE=1"):
            load_text(name, "eval")
    with pytest.raises(UsageError, match="--dataset-path"):
        load_text("wikitext2", "eval")


def test_offline_mode_with_nothing_cached_says_to_give_a_local_copy(tmp_path, tiny_gptq_checkpoint):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptq_cli.cli",
            "eval",
            str(tiny_gptq_checkpoint.path),
            "--dataset",
            "wikitext2",
            "--seqlen",
            "32",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.count("\n") == 1
        and "--dataset-path" in proc.stderr
        and "datasets cache" in proc.stderr
    )
