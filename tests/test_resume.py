"""Resumable quantization (issue 6): a run killed or interrupted at any block continues from its
work dir and writes the same bytes as an uninterrupted run; `gptq pack WORKDIR` writes what quantize
itself writes.

The reference is always an uninterrupted `quantize` of the same model and calibration, and the
comparison is of file bytes (sha256), except quant_log.json, whose timings and command line differ
between runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gptq_cli import api
from gptq_cli.cli import app
from gptq_cli.convert import convert_checkpoint
from gptq_cli.errors import Interrupted, UsageError
from gptq_cli.format.config import QuantConfig
from tests.tiny_models import random_input_ids, save_tiny_model

BLOCKS, NSAMPLES, SEQLEN, GROUP = 4, 8, 32, 32
# Small enough that a block takes about a second on a busy 2-core machine, big enough to have every
# linear.
TINY = dict(
    num_hidden_layers=BLOCKS,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("resume") / "model", "llama", **TINY)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume_calib") / "calib.jsonl"
    rows = random_input_ids(NSAMPLES, SEQLEN, seed=5).tolist()
    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    return path


def run_args(model_dir: Path, calib_file: Path, out: Path) -> list[str]:
    return [
        "quantize",
        str(model_dir),
        "--dataset",
        str(calib_file),
        "--nsamples",
        str(NSAMPLES),
        "--seqlen",
        str(SEQLEN),
        "--batch-size",
        "4",
        "--group-size",
        str(GROUP),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "-o",
        str(out),
        "--quiet",
    ]


def api_quantize(model_dir: Path, calib_file: Path, out: Path, **kwargs) -> api.QuantizeResult:
    """The Python API with the settings run_args gives the CLI."""
    return api.quantize(
        str(model_dir),
        QuantConfig(group_size=GROUP),
        dataset=str(calib_file),
        nsamples=NSAMPLES,
        seqlen=SEQLEN,
        batch_size=4,
        device="cpu",
        dtype="float32",
        output=out,
        **kwargs,
    )


def digests(directory: Path) -> dict[str, str]:
    """sha256 of every file but quant_log.json (timings, command line)."""
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(directory.iterdir())
        if f.name != "quant_log.json"
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir, calib_file) -> Path:
    """An uninterrupted quantize run's checkpoint."""
    out = tmp_path_factory.mktemp("resume_ref") / "out"
    api_quantize(model_dir, calib_file, out)
    assert not (out.parent / "out.work").exists()  # removed on success
    return out


@pytest.fixture(scope="module")
def finished_work_dir(tmp_path_factory, model_dir, calib_file) -> Path:
    """A work dir with every block finished: Ctrl-C arrives while the final checkpoint is being
    written."""
    import gptq_cli.format.checkpoint as checkpoint

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    out = tmp_path_factory.mktemp("resume_finished") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "write_checkpoint", interrupted)
        with pytest.raises(Interrupted) as info:
            api_quantize(model_dir, calib_file, out)
    assert (info.value.finished, info.value.total) == (BLOCKS, BLOCKS)
    assert not out.exists()
    return out.parent / "out.work"


def cli_env() -> dict[str, str]:
    """This process's environment with its torch thread count: the in-process reference run and
    the CLI runs must split their matmuls the same way to give the same bits."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def start(args: list[str]) -> subprocess.Popen:
    # SIGINT back to its default in the child: a test session started in the background by a
    # non-interactive shell (`(pytest &)`) ignores SIGINT, and an ignored signal stays ignored
    # across exec.
    return subprocess.Popen(
        [sys.executable, "-m", "gptq_cli.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.fixture
def python_handles_sigint():
    """Ctrl-C raises KeyboardInterrupt in this process for the test's duration, even in a session
    that inherited SIGINT ignored (see start)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def signal_when(proc: subprocess.Popen, path: Path, sig: int) -> tuple[int, str]:
    """Send `sig` as soon as `path` exists; (exit status, stderr)."""
    while not path.exists():
        assert proc.poll() is None, (
            f"the run ended before {path.name} appeared: {proc.communicate()[1]}"
        )
        time.sleep(0.002)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


def block_files(work_dir: Path) -> list[str]:
    return sorted(p.name for p in (work_dir / "blocks").glob("block-*.safetensors"))


def test_killed_and_interrupted_runs_continue_to_the_same_bytes(
    tmp_path, model_dir, calib_file, reference
):
    out = tmp_path / "out"
    work = tmp_path / "out.work"
    args = run_args(model_dir, calib_file, out)

    status, _ = signal_when(
        start(args), work / "blocks" / "block-00000.safetensors", signal.SIGKILL
    )
    assert (
        status == -signal.SIGKILL
        and not out.exists()
        and block_files(work)[0] == "block-00000.safetensors"
    )

    status, stderr = signal_when(
        start(args), work / "blocks" / "block-00001.safetensors", signal.SIGINT
    )
    done = len(block_files(work))
    assert status == 130 and not out.exists() and 2 <= done < BLOCKS
    lines = [line for line in stderr.splitlines() if "interrupted" in line]
    assert (
        len(lines) == 1
        and f"after block {done} of {BLOCKS}" in lines[0]
        and "rerun the same command" in lines[0]
    )

    status, _ = signal_when(
        start(args), work / "blocks" / "block-00002.safetensors", signal.SIGKILL
    )
    assert status == -signal.SIGKILL and not out.exists() and len(block_files(work)) < BLOCKS
    # what a write killed half way leaves behind: a temporary file, never a block file
    (work / "blocks" / ".block-00003.safetensors.x1y2.tmp").write_bytes(b"\0" * 100)

    finished = subprocess.run(
        [sys.executable, "-m", "gptq_cli.cli", *args], capture_output=True, text=True, env=cli_env()
    )
    assert finished.returncode == 0, finished.stderr
    assert not work.exists()
    assert digests(out) == digests(reference)
    log = json.loads((out / "quant_log.json").read_text())
    assert log["command"].startswith(f"gptq quantize {model_dir} ") and log["command"].endswith(
        " --quiet"
    )
    assert [m["name"] for m in log["modules"]] == [
        m["name"] for m in json.loads((reference / "quant_log.json").read_text())["modules"]
    ]


def test_pack_of_a_finished_work_dir_writes_what_quantize_writes(
    tmp_path, finished_work_dir, reference
):
    plan = json.loads((finished_work_dir / "plan.json").read_text())
    assert plan["blocks"] == BLOCKS and plan["config"]["bits"] == 4 and plan["nsamples"] == NSAMPLES
    result = CliRunner().invoke(
        app, ["pack", str(finished_work_dir), "-o", str(tmp_path / "packed"), "--json"]
    )
    assert result.exit_code == 0, result.stderr
    assert digests(tmp_path / "packed") == digests(reference)
    assert json.loads(result.stdout)["source_format"] == "gptq"

    # another zero-point format: the same as converting quantize's own checkpoint
    result = CliRunner().invoke(
        app, ["pack", str(finished_work_dir), "-o", str(tmp_path / "v2"), "--format", "gptq_v2"]
    )
    assert result.exit_code == 0, result.stderr
    converted = convert_checkpoint(reference, tmp_path / "converted", checkpoint_format="gptq_v2")
    assert digests(tmp_path / "v2") == digests(converted)
    assert finished_work_dir.is_dir()  # pack leaves the work dir


def test_pack_refuses_an_unfinished_work_dir(tmp_path, finished_work_dir):
    partial = shutil.copytree(finished_work_dir, tmp_path / "partial.work")
    (partial / "blocks" / "block-00003.safetensors").unlink()
    result = CliRunner().invoke(app, ["pack", str(partial), "-o", str(tmp_path / "out")])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert f"missing 1 of {BLOCKS} blocks" in lines[0] and "rerun" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_rerun_with_other_settings_refuses_and_names_them(
    tmp_path, model_dir, calib_file, finished_work_dir
):
    work = shutil.copytree(finished_work_dir, tmp_path / "out.work")
    before = sorted(p.name for p in work.rglob("*"))
    result = CliRunner().invoke(
        app, [*run_args(model_dir, calib_file, tmp_path / "out"), "--bits", "3"]
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert "config.bits 4 -> 3" in lines[0] and "--work-dir" in lines[0]
    assert sorted(p.name for p in work.rglob("*")) == before and not (tmp_path / "out").exists()


def test_resume_without_a_work_dir_is_a_usage_error(tmp_path, model_dir, calib_file):
    result = CliRunner().invoke(
        app, [*run_args(model_dir, calib_file, tmp_path / "out"), "--resume"]
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "--resume" in lines[0], result.stderr
    assert not (tmp_path / "out.work").exists()


def test_a_finished_work_dir_is_packed_without_solving_again(
    tmp_path, model_dir, calib_file, finished_work_dir, reference, monkeypatch
):
    """A rerun after an interruption during the final write only packs (solving would raise
    here)."""
    shutil.copytree(finished_work_dir, tmp_path / "out.work")
    monkeypatch.setattr(api, "_solve_into", lambda *a, **k: pytest.fail("solved again"))
    result = api_quantize(model_dir, calib_file, tmp_path / "out", resume=True)
    assert digests(result.output) == digests(reference) and not (tmp_path / "out.work").exists()
    assert len(result.modules) == BLOCKS * 7


def test_work_dir_block_files_hold_the_checkpoint_tensors(finished_work_dir, reference):
    """Each block file holds exactly its linears' packed tensors as the checkpoint stores them."""
    from safetensors.torch import load_file

    final = load_file(reference / "model.safetensors")
    for i in range(BLOCKS):
        stored = load_file(finished_work_dir / "blocks" / f"block-{i:05d}.safetensors")
        assert {k.rsplit(".", 2)[0] for k in stored} == {
            f"model.layers.{i}.self_attn",
            f"model.layers.{i}.mlp",
        }
        assert all(torch.equal(t, final[k]) for k, t in stored.items())


def test_a_work_dir_in_use_by_another_run_is_refused(tmp_path, model_dir, calib_file):
    """Two runs on one work dir would interleave their block files: the second is refused with
    one line, exit 2, and nothing in the directory changes; once the first is done the dir is
    usable again."""
    import fcntl

    from gptq_cli.quantization.workdir import WorkDir

    work = tmp_path / "out.work"
    work.mkdir()
    with open(work / ".lock", "a") as held:  # what a running quantize holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = CliRunner().invoke(app, run_args(model_dir, calib_file, tmp_path / "out"))
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, result.stderr
        assert "in use by another gptq run" in lines[0] and "--work-dir" in lines[0]
        assert (
            sorted(p.name for p in work.iterdir()) == [".lock"] and not (tmp_path / "out").exists()
        )
    plan = {"model_fingerprint": "m", "config": {"bits": 4}}
    first, second = WorkDir(work), WorkDir(work)
    assert first.open(plan) == []
    with pytest.raises(UsageError, match="in use"):
        second.open(plan)
    first.close()
    assert second.open(plan) == []  # released: the next run takes it
    second.close()


def test_ctrl_c_inside_a_c_extension_is_an_interrupt_not_a_failure(
    tmp_path, model_dir, calib_file, monkeypatch, python_handles_sigint
):
    """SIGINT landing in safetensors' get_tensor comes out as ValueError (seen in CI); it is
    still Ctrl-C: exit 130 and the continue message, not exit 1."""

    def extension_call(*_args, **_kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the KeyboardInterrupt is raised here, in "the extension"
        except KeyboardInterrupt:
            # an extension's own error, raised while Ctrl-C was being handled (chained as such)
            message = "could not determine the shape of object type 'torch.storage.UntypedStorage'"
            raise ValueError(message)  # noqa: B904

    monkeypatch.setattr(api, "_solve_into", extension_call)
    result = CliRunner().invoke(app, run_args(model_dir, calib_file, tmp_path / "out"))
    assert result.exit_code == 130, result.output
    assert "interrupted after block 0 of 4" in result.stderr and not (tmp_path / "out").exists()

    monkeypatch.setattr(
        api, "_solve_into", lambda *a, **k: (_ for _ in ()).throw(ValueError("a real failure"))
    )
    result = CliRunner().invoke(app, run_args(model_dir, calib_file, tmp_path / "out"))
    assert result.exit_code == 1 and "ValueError: a real failure" in result.stderr


def test_without_a_terminal_each_block_is_one_log_line(tmp_path, model_dir, calib_file, reference):
    """No TTY (a pipeline, nohup, CI): no bars, but a line per finished block; --quiet silences
    them."""
    args = [a for a in run_args(model_dir, calib_file, tmp_path / "out") if a != "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("block ")]
    assert [line.split(" quantized")[0] for line in lines] == [
        f"block {i}/{BLOCKS}" for i in range(1, BLOCKS + 1)
    ]
    assert digests(tmp_path / "out") == digests(reference)

    result = CliRunner().invoke(app, run_args(model_dir, calib_file, tmp_path / "quiet"))
    assert result.exit_code == 0 and "block " not in result.stderr
