"""Fault injection (issue 30, SPEC §1): damaged work-dir files, a full disk, kill -9 during the
final write, shard names leading out of a checkpoint, a model that needs its own code, a second run
on the same output.

Each case ends byte-identical to an uninterrupted run after a rerun, or with exit 2, one line, and
nothing half-written. The reference is an uninterrupted quantize of the same tiny model and
calibration; checkpoints are compared file by file (sha256), quant_log.json aside (timings, command
line).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gptq_cli import api
from gptq_cli.cli import app
from gptq_cli.errors import Interrupted

# the tiny model, calibration, settings and file digests of the resume tests (fixtures included)
from tests.test_resume import BLOCKS, api_quantize, calib_file, cli_env, digests, model_dir  # noqa: F401
from tests.test_resume import run_args as cli_args

STORED = 3  # blocks the interrupted run leaves in its work dir


def quantize(model_dir: Path, calib_file: Path, out: Path, notes: list[str] | None = None) -> Path:
    """test_resume's api_quantize, collecting the run's notes."""

    def progress(kind, *args):
        if kind == "note" and notes is not None:
            notes.append(args[0])

    return api_quantize(model_dir, calib_file, out, progress=progress).output


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir, calib_file) -> dict[str, str]:
    return digests(quantize(model_dir, calib_file, tmp_path_factory.mktemp("faults_ref") / "out"))


@pytest.fixture(scope="module")
def partial_work_dir(tmp_path_factory, model_dir, calib_file) -> Path:
    """A work dir holding blocks 0..STORED-1 of an interrupted run (Ctrl-C while solving block
    STORED)."""
    real, calls = api.quantize_decoder_block, []

    def ctrl_c_at_last(*args, **kwargs):
        calls.append(1)
        if len(calls) > STORED:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path_factory.mktemp("faults_partial") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api, "quantize_decoder_block", ctrl_c_at_last)
        with pytest.raises(Interrupted):
            quantize(model_dir, calib_file, out)
    return out.parent / "out.work"


def block(work: Path, index: int) -> Path:
    return work / "blocks" / f"block-{index:05d}.safetensors"


def flip(path: Path, offset: int, count: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = bytes(b ^ 0xFF for b in data[offset : offset + count])
    path.write_bytes(bytes(data))


def data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def damage_flipped_data(work):
    flip(block(work, 1), data_start(block(work, 1)) + 50)


def damage_flipped_header(work):  # a digit of a shape: the header still parses
    path = block(work, 1)
    data = path.read_bytes()
    at = data.index(b'"shape":[') + len(b'"shape":[')
    path.write_bytes(data[:at] + (b"9" if data[at : at + 1] != b"9" else b"8") + data[at + 1 :])


def damage_truncated(work):
    path = block(work, 1)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_missing(work):  # blocks 0 and 2 stay: 1 is solved, 2 replayed
    block(work, 1).unlink()


def damage_other_settings(work):  # a block a run of other settings stored, checksum intact
    from gptq_cli.quantization.checksums import verify_safetensors
    from gptq_cli.quantization.workdir import WorkDir

    wd = WorkDir(work)
    tensors, rows, seconds = wd.read_block(1, verify_safetensors(block(work, 1))["plan"])
    wd.write_block(
        1,
        {k: v + 1 if k.endswith("scales") else v for k, v in tensors.items()},
        rows,
        seconds,
        "another plan",
    )


def damage_extra_block(work):  # a block beyond the model's depth
    shutil.copy(block(work, 0), block(work, BLOCKS + 3))


@pytest.mark.parametrize(
    "damage, noted",
    [
        (damage_flipped_data, "does not match its checksum"),
        (damage_flipped_header, "does not match its checksum"),
        (damage_truncated, "block 1"),
        (damage_missing, None),
        (damage_other_settings, "solved under other settings"),
        (damage_extra_block, None),
    ],
)
def test_a_damaged_block_is_solved_again_and_the_checkpoint_is_the_same(
    tmp_path, model_dir, calib_file, partial_work_dir, reference, damage, noted
):
    work = shutil.copytree(partial_work_dir, tmp_path / "out.work")
    damage(work)
    notes: list[str] = []
    real, solved = api.quantize_decoder_block, []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            api,
            "quantize_decoder_block",
            lambda sm, lp, i, *a, **k: solved.append(i) or real(sm, lp, i, *a, **k),
        )
        out = quantize(model_dir, calib_file, tmp_path / "out", notes)
    assert digests(out) == reference
    assert solved == ([1] if damage is not damage_extra_block else []) + list(range(STORED, BLOCKS))
    if noted:
        assert len(notes) == 1 and noted in notes[0] and "block-00001" in notes[0], notes
    else:
        assert notes == []
    assert not work.exists()


@pytest.mark.parametrize("damage", ["edited value", "not json", "empty"])
def test_a_damaged_plan_is_written_again_and_the_blocks_that_check_out_are_kept(
    tmp_path, model_dir, calib_file, partial_work_dir, reference, damage
):
    work = shutil.copytree(partial_work_dir, tmp_path / "out.work")
    plan = work / "plan.json"
    text = plan.read_text()
    plan.write_text(
        {
            "edited value": text.replace('"seed": 0', '"seed": 1'),
            "not json": text[:40],
            "empty": "",
        }[damage]
    )
    # gptq pack cannot redo the plan: one line, exit 2, nothing written
    result = CliRunner().invoke(app, ["pack", str(work), "-o", str(tmp_path / "packed")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "plan.json" in lines[0], result.output
    assert not (tmp_path / "packed").exists()
    notes: list[str] = []
    real, solved = api.quantize_decoder_block, []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            api,
            "quantize_decoder_block",
            lambda sm, lp, i, *a, **k: solved.append(i) or real(sm, lp, i, *a, **k),
        )
        out = quantize(model_dir, calib_file, tmp_path / "out", notes)
    assert digests(out) == reference and solved == list(range(STORED, BLOCKS))
    assert len(notes) == 1 and "plan.json" in notes[0] and "writing it again" in notes[0]


def test_a_damaged_block_stops_gptq_pack_with_one_line(
    tmp_path, model_dir, calib_file, partial_work_dir
):
    work = shutil.copytree(partial_work_dir, tmp_path / "out.work")
    for i in range(STORED, BLOCKS):  # as if finished: pack needs every block
        shutil.copy(block(work, 0), block(work, i))
    result = CliRunner().invoke(app, ["pack", str(work), "-o", str(tmp_path / "packed")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert (
        "block-00003.safetensors holds block 0" in lines[0]
        and "rerun the quantize command" in lines[0]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.work"]


@pytest.fixture
def tiny_disk(tmp_path):
    """(a 64 KiB tmpfs, a function that resizes it to n bytes); skipped where this process may
    not mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")

    def grow(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

    try:
        yield mount, grow
    finally:
        subprocess.run(["umount", "-l", str(mount)])


@pytest.mark.parametrize("size, kept", [(64 << 10, "block"), (200 << 10, "final")])
def test_a_full_disk_stops_with_one_line_and_the_rerun_with_room_writes_the_same_checkpoint(
    tiny_disk, model_dir, calib_file, reference, size, kept
):
    """size 64k: the disk fills while the blocks are stored; 200k: while the checkpoint (~290 kB)
    is written."""
    disk, grow = tiny_disk
    grow(size)
    out = disk / "out"
    result = CliRunner().invoke(app, cli_args(model_dir, calib_file, out))
    lines = result.stderr.strip().splitlines()
    assert (
        result.exit_code == 1 and len(lines) == 1 and "no space left on the device at" in lines[0]
    ), result.output
    assert "Errno" not in lines[0] and "free space there" in lines[0]
    # no half checkpoint, no temporary left
    assert not out.exists() and not list(disk.glob(".out.*"))
    if kept == "final":
        assert f"the {BLOCKS} quantized blocks are kept" in lines[0]
    grow(4 << 20)
    result = CliRunner().invoke(app, cli_args(model_dir, calib_file, out))
    assert result.exit_code == 0, result.output
    assert digests(out) == reference and sorted(p.name for p in disk.iterdir()) == ["out"]


KILL_IN_FINAL_WRITE = """
import os, signal, sys
import gptq_cli.format.checkpoint as checkpoint
real = checkpoint._write_safetensors
def write_then_die(tmp, *args, **kwargs):
    real(tmp, *args, **kwargs)
    # the tensors are in the temporary directory, nothing renamed yet
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint._write_safetensors = write_then_die
from gptq_cli.cli import app
sys.argv = ["gptq"] + sys.argv[1:]
app()
"""


def test_kill_9_during_the_final_write_leaves_no_checkpoint_and_the_rerun_writes_the_same(
    tmp_path, model_dir, calib_file, reference
):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_IN_FINAL_WRITE, *cli_args(model_dir, calib_file, out)],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists() and list(tmp_path.glob(".out.tmp-*"))  # what a killed writer leaves
    result = CliRunner().invoke(app, cli_args(model_dir, calib_file, out))
    assert result.exit_code == 0, result.output
    assert digests(out) == reference
    # the stale temporary went with the rerun
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_second_run_on_the_same_output_is_refused_at_the_start(
    tmp_path, model_dir, calib_file, monkeypatch
):
    """Another work dir, the same -o: refused before any work, not after it (issue 30)."""
    monkeypatch.setattr(api, "load_streaming", lambda *a, **k: pytest.fail("the model was loaded"))
    with open(tmp_path / ".out.lock", "a") as held:  # what a running quantize holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = CliRunner().invoke(
            app,
            [
                *cli_args(model_dir, calib_file, tmp_path / "out"),
                "--work-dir",
                str(tmp_path / "other.work"),
            ],
        )
    lines = result.stderr.strip().splitlines()
    assert (
        result.exit_code == 2
        and len(lines) == 1
        and "being written by another gptq run" in lines[0]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_gptq_checkpoint) -> Path:
    from gptq_cli.convert import convert_checkpoint

    out = convert_checkpoint(
        tiny_gptq_checkpoint.path,
        tmp_path_factory.mktemp("faults_sharded") / "ckpt",
        max_shard_size="200KB",
    )
    assert (
        len(
            set(
                json.loads((out / "model.safetensors.index.json").read_text())[
                    "weight_map"
                ].values()
            )
        )
        > 1
    )
    return out


def with_shard_name(src: Path, dst: Path, name: str) -> Path:
    """A copy of the sharded checkpoint whose index sends its first tensor to `name`."""
    ckpt = shutil.copytree(src, dst)
    index = ckpt / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"][next(iter(doc["weight_map"]))] = name
    index.write_text(json.dumps(doc))
    return ckpt


WORDS = Path(__file__).parent / "fixtures" / "words.txt"


@pytest.mark.parametrize(
    "name", ["../../../../etc/passwd", "/etc/passwd", "sub/model.safetensors", "..", "outside-link"]
)
@pytest.mark.parametrize("command", ["inspect", "eval", "pack", "push", "quantize"])
def test_a_shard_named_outside_the_checkpoint_is_refused_by_every_command(
    tmp_path, sharded, name, command, monkeypatch
):
    if name == "outside-link":  # a plain name, but a symlink leading out of the directory
        shutil.copy(next(sharded.glob("*.safetensors")), tmp_path / "elsewhere.safetensors")
    ckpt = with_shard_name(sharded, tmp_path / "ckpt", name)
    if name == "outside-link":
        (ckpt / name).symlink_to(tmp_path / "elsewhere.safetensors")
    monkeypatch.setenv("HF_TOKEN", "unused")
    args = {
        "inspect": ["inspect", ckpt],
        "eval": ["eval", ckpt, "--dataset", WORDS, "--seqlen", "32", "--limit", "1"],
        "pack": ["pack", ckpt, "-o", tmp_path / "packed"],
        "push": ["push", ckpt, "me/x", "--dry-run"],
        "quantize": ["quantize", ckpt, "--nsamples", "2", "--seqlen", "32", "-o", tmp_path / "q"],
    }[command]
    result = CliRunner().invoke(app, [str(a) for a in args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert f"names the shard {name!r}" in lines[0] and "not a file inside" in lines[0]
    assert not (tmp_path / "packed").exists() and not (tmp_path / "q").exists()


def test_the_loader_refuses_a_shard_outside_and_accepts_hub_cache_links(tmp_path, sharded):
    from gptq_cli.errors import UsageError
    from gptq_cli.format.reader import weight_files
    from gptq_cli.model.loader import load_quantized_model

    with pytest.raises(UsageError, match="names the shard '../x.safetensors'"):
        load_quantized_model(with_shard_name(sharded, tmp_path / "ckpt", "../x.safetensors"))
    # a Hub cache snapshot: every file a link into the repository's blobs/
    repo = tmp_path / "hub" / "models--me--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in sharded.iterdir():
        shutil.copy(f, repo / "blobs" / f.name)
        (snapshot / f.name).symlink_to(Path("../../blobs") / f.name)
    assert set(weight_files(snapshot)) == set(weight_files(sharded))
    load_quantized_model(snapshot)


def custom_code_model(src: Path, dst: Path, *, auto_map: bool = True) -> Path:
    """A copy of a Llama directory as model type "xmodel", whose code (a Llama subclass) ships in
    its files."""
    model = shutil.copytree(src, dst)
    (model / "configuration_x.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass XConfig(LlamaConfig):\n    model_type = "
        "'xmodel'\n"
    )
    (model / "modeling_x.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_x import "
        "XConfig\n\n\nclass XForCausalLM(LlamaForCausalLM):\n    config_class = XConfig\n"
    )
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="xmodel", architectures=["XForCausalLM"])
    if auto_map:
        config["auto_map"] = {
            "AutoConfig": "configuration_x.XConfig",
            "AutoModelForCausalLM": "modeling_x.XForCausalLM",
        }
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_a_model_with_its_own_code_runs_it_only_with_trust_remote_code(
    tmp_path, model_dir, calib_file, monkeypatch
):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    model = custom_code_model(model_dir, tmp_path / "custom")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, cli_args(model, calib_file, out))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "runs code from its own files" in lines[0] and "--trust-remote-code" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom"]  # nothing written

    result = CliRunner().invoke(app, [*cli_args(model, calib_file, out), "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "quant_log.json").read_text())["trust_remote_code"] is True
    # loads elsewhere too
    assert (out / "modeling_x.py").is_file() and (out / "configuration_x.py").is_file()
    eval_args = [
        "eval",
        str(out),
        "--dataset",
        str(WORDS),
        "--seqlen",
        "32",
        "--limit",
        "1",
        "--json",
    ]
    refused = CliRunner().invoke(app, eval_args)
    assert refused.exit_code == 2 and "--trust-remote-code" in refused.stderr
    result = CliRunner().invoke(app, [*eval_args, "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["quantized"] is True


def test_an_architecture_transformers_does_not_know_is_one_line(tmp_path, model_dir, calib_file):
    model = custom_code_model(model_dir, tmp_path / "unknown", auto_map=False)
    result = CliRunner().invoke(app, cli_args(model, calib_file, tmp_path / "out"))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "has no model type 'xmodel'" in lines[0], (
        result.output
    )


def test_a_name_too_long_anywhere_in_the_output_path_is_one_line(tmp_path, model_dir, calib_file):
    for out in (tmp_path / ("x" * 250), tmp_path / ("y" * 300) / "out"):
        result = CliRunner().invoke(app, cli_args(model_dir, calib_file, out))
        lines = result.stderr.strip().splitlines()
        assert (
            result.exit_code == 2
            and len(lines) == 1
            and "more than this file system allows" in lines[0]
        ), result.output
    assert list(tmp_path.iterdir()) == []
