"""What a user sees when things go right (issue 18 items 3, 7, 8, 9, 11): notes for settings
applied otherwise than asked, the short end-of-run summary (the full table behind --table and in
quant_log.json), no other library's noise, help text that fits 80 columns, and output files with
the modes the user's umask gives."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gptq_cli.cli import app
from gptq_cli.format.checkpoint import write_checkpoint
from tests.tiny_models import save_tiny_model, tiny_config

COMMANDS = ("quantize", "eval", "inspect", "pack", "push")
RUN = ["--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(
        tmp_path_factory.mktemp("ux_out") / "model", "llama", num_hidden_layers=1
    )


def gptq(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_the_end_of_a_run_is_a_short_summary_and_the_table_is_behind_a_flag(tmp_path, model_dir):
    result = gptq("quantize", model_dir, "-o", tmp_path / "out", *RUN)
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    log = json.loads((tmp_path / "out" / "quant_log.json").read_text())
    # a summary of fixed length, not a row per module
    assert len(lines) <= 13
    text = result.stderr
    assert re.search(r"quantized +.*model → .*out in [\d.]+ s", text)
    assert re.search(
        r"seconds +load [\d.]+, forward [\d.]+, hessian [\d.]+, solve [\d.]+, pack [\d.]+, "
        r"write [\d.]+\n",
        text,
    )
    phases = log["phases"]  # exclusive seconds per phase: they add up to the run's wall time
    assert set(phases) == {"load", "forward", "hessian", "solve", "pack", "write", "other", "total"}
    assert all(v >= 0 for v in phases.values()) and phases["forward"] > 0 and phases["solve"] > 0
    assert sum(v for k, v in phases.items() if k != "total") == pytest.approx(
        phases["total"], abs=0.06
    )
    assert re.search(r"size +[\d.]+ MB vs [\d.]+ MB in fp16 \([\d.]+x smaller\)", text)
    worst = max(log["modules"], key=lambda r: r["loss"])["name"]
    assert re.search(rf"worst loss +{re.escape(worst)} ", text)
    assert (
        f"gptq inspect {tmp_path / 'out'}" in text and "gptq eval" in text and "check  ok" in text
    )
    assert "┃" not in text  # no table

    table = gptq("quantize", model_dir, "-o", tmp_path / "out2", *RUN, "--table")
    assert all(r["name"] in table.stderr for r in log["modules"])  # --table: every module's row

    as_json = gptq("quantize", model_dir, "-o", tmp_path / "out3", *RUN, "--json")
    summary = json.loads(as_json.stdout)
    assert [m["loss"] for m in summary["worst_modules"]] == sorted(
        (r["loss"] for r in log["modules"]), reverse=True
    )[:3]
    on_disk = sum(f.stat().st_size for f in (tmp_path / "out3").glob("*.safetensors"))
    # tensor bytes: the file less its header
    assert 0.99 < summary["bytes"] / on_disk <= 1
    assert summary["compression_ratio"] == pytest.approx(
        summary["fp16_bytes"] / summary["bytes"], abs=1e-3
    )
    assert summary["problems"] == [] and summary["next"][1] == f"gptq inspect {tmp_path / 'out3'}"


def test_settings_applied_otherwise_than_asked_are_said_and_recorded(tmp_path, model_dir):
    short = tmp_path / "short.txt"
    short.write_text(" ".join(f"w{i}" for i in range(100)))
    result = gptq(
        "quantize",
        model_dir,
        "-o",
        tmp_path / "out",
        "--dataset",
        short,
        "--nsamples",
        "4",
        "--seqlen",
        "200",
        "--group-size",
        "48",
        "--device",
        "cpu",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert (
        len(notes) == 2
        and "1 sample(s) of 100 tokens" in notes[0]
        and "--group-size 48" in notes[1]
    )
    log = json.loads((tmp_path / "out" / "quant_log.json").read_text())
    # what was used
    assert log["calibration"]["nsamples"] == 1 and log["calibration"]["seqlen"] == 100
    assert [f"note: {n}" for n in log["notes"]] == notes


def test_quiet_runs_print_nothing_but_ours(tmp_path, model_dir):
    """Subprocesses: the noise comes from imports (torchao, torch) and from libraries' loggers
    and tqdm bars."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    gptq_cmd = [sys.executable, "-m", "gptq_cli.cli"]
    out = tmp_path / "out"
    quantize = subprocess.run(
        [*gptq_cmd, "quantize", str(model_dir), "-o", str(out), *RUN, "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert quantize.returncode == 0 and quantize.stderr == "" and quantize.stdout == "", (
        quantize.stderr
    )
    text = tmp_path / "words.txt"
    text.write_text(" ".join(f"w{i % 400}" for i in range(200)))
    evaluate = subprocess.run(
        [*gptq_cmd, "eval", str(out), "--dataset", str(text), "--seqlen", "32", "-q", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert evaluate.returncode == 0 and evaluate.stderr == "", evaluate.stderr
    assert json.loads(evaluate.stdout)["quantized"] is True


def test_the_command_line_loads_no_torch_before_a_command_runs():
    """`gptq --help` stays instant, and tqdm is first imported after the CLI has switched its
    bars off."""
    probe = (
        "import sys, gptq_cli.cli; print(sorted(m for m in ('torch', 'tqdm', 'transformers') "
        "if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.parametrize("command", ("", *COMMANDS))
def test_help_fits_80_columns_without_value_types_on_flags(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = CliRunner().invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    usage = lines[0]
    assert usage.startswith("Usage: gptq")
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert "<bool>" not in result.output and "…" not in result.output
    assert not any(line.rstrip().endswith("...") for line in lines[1:])  # nothing cut short
    arguments = re.findall(r"\{([^}]*)\}", usage)
    assert all(a == a.upper() for a in arguments), usage  # {MODEL}, never {model}
    if command:
        assert "Examples:" in result.output


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoints_get_the_modes_of_the_users_umask(tmp_path, umask):
    import torch

    previous = os.umask(umask)
    try:
        out = write_checkpoint(
            tmp_path / "ckpt",
            {"w": torch.zeros(2)},
            tiny_config("llama"),
            {"quant_method": "gptq", "bits": 4},
            extra_files={"quant_log.json": b"{}"},
        )
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == dict.fromkeys(
        ("config.json", "quantize_config.json", "model.safetensors", "quant_log.json"),
        0o666 & ~umask,
    )


def test_generation_config_is_written_even_when_the_source_has_none(tmp_path, model_dir):
    """A GGUF file (the quick-start model) or a directory without generation_config.json: the
    output gets the generation defaults transformers derives from the model config; a directory's
    own file is copied as is."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in model_dir.iterdir():
        if f.name != "generation_config.json":
            (bare / f.name).write_bytes(f.read_bytes())
    assert gptq("quantize", bare, "-o", tmp_path / "out", *RUN, "-q").exit_code == 0
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["bos_token_id"] == 1
    assert gptq("quantize", model_dir, "-o", tmp_path / "out2", *RUN, "-q").exit_code == 0
    assert (tmp_path / "out2" / "generation_config.json").read_bytes() == (
        model_dir / "generation_config.json"
    ).read_bytes()
