"""`gptq push` end to end: the real huggingface_hub client against tests/hub_server.py on 127.0.0.1.

Every test points HF_ENDPOINT (and huggingface_hub's import-time copy of it) at the local server,
keeps the token file and caches in a temporary HF_HOME, and fails if anything tries to open a
connection to a host other than loopback. Files are compared byte for byte with the checkpoint on
disk; the card's metadata is read back with a YAML parser; the rebuilt quantize command is parsed by
the real `gptq quantize` parser.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gptq_cli.cli import app
from gptq_cli.format.reader import read_quantization_dict
from tests.hub_server import HubServer

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
QUANT_LOG = {
    "model": "org/tiny-base",
    "calibration": {"dataset": "wikitext2", "nsamples": 16, "seqlen": 64, "seed": 3},
    "modules": [],
}
EVAL_RESULTS = {
    "tool": "gptq_cli:0.1.0",
    "results": [
        {
            "dataset": "wikitext2",
            "seqlen": 64,
            "windows": 40,
            "ppl": 23.456789,
            "device": "cpu",
            "dtype": "float32",
        }
    ],
}


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Refuse (and record) any connection or name lookup that would leave this machine."""
    attempts: list[object] = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            attempts.append(address)
            raise OSError(f"test tried to reach {address}")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in LOOPBACK and host is not None:
            attempts.append(host)
            raise socket.gaierror(f"test tried to resolve {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    assert not attempts, f"a test tried to reach the network: {attempts}"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running local Hub, with the environment of a user logged in to it (HF_TOKEN) and Xet
    off."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf_home"
    with HubServer() as server:
        env = {
            "HF_ENDPOINT": server.url,
            "HF_TOKEN": server.token,
            "HF_HOME": str(home),
            "HF_HUB_DISABLE_XET": "1",
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        # huggingface_hub read these at import, before this test set the environment
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        server.env = env
        yield server
        assert not server.unhandled, (
            f"the client called endpoints the server does not know: {server.unhandled}"
        )


@pytest.fixture
def checkpoint(tiny_gptq_checkpoint, tmp_path) -> Path:
    path = shutil.copytree(tiny_gptq_checkpoint.path, tmp_path / "tiny-gptq")
    (path / "quant_log.json").write_text(json.dumps(QUANT_LOG))
    (path / "eval_results.json").write_text(json.dumps(EVAL_RESULTS))
    return path


def push_cli(*args: object):
    return CliRunner().invoke(app, ["push", *map(str, args)])


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4:].split("\n---\n", 1)[0])


def local_files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_push_sends_every_file_byte_identical_with_a_generated_card(hub, checkpoint):
    result = push_cli(checkpoint, "me/tiny-gptq", "--json")
    assert result.exit_code == 0, result.output

    remote = hub.files("me/tiny-gptq")
    card = remote.pop("README.md").decode()
    assert remote == local_files(checkpoint)
    # the card is sent, the directory is left as it was
    assert not (checkpoint / "README.md").exists()
    weights = (checkpoint / "model.safetensors").read_bytes()
    # the weights went through LFS, nothing else did
    assert list(hub.lfs_objects.values()) == [weights]
    called = hub.endpoints_called()
    assert called.index("create_repo") < called.index("lfs_upload") < called.index("commit")
    summary = json.loads(result.stdout)
    commit = hub.repos["me/tiny-gptq"].commits[-1]
    assert summary["commit_oid"] == commit["oid"] and summary["url"] == f"{hub.url}/me/tiny-gptq"
    assert commit["summary"] == "Upload 4-bit GPTQ checkpoint with gptq_cli 0.1.0"
    assert not hub.repos["me/tiny-gptq"].private

    meta = front_matter(card)
    assert meta["base_model"] == "org/tiny-base" and meta["library_name"] == "transformers"
    assert meta["tags"] == ["gptq", "4-bit", "quantized", "gptq_cli"] and "license" not in meta
    assert (
        "| bits | 4 |" in card
        and "| group size | 128 |" in card
        and "| act-order (desc_act) | yes |" in card
    )
    assert "| wikitext2 | 64 | 40 | 23.4568 |" in card
    assert 'from_pretrained("me/tiny-gptq"' in card


def test_the_card_rebuilds_the_quantize_command_when_none_was_recorded(hub, checkpoint):
    import typer.main

    result = push_cli(checkpoint, "me/tiny-gptq", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)["card_text"]
    command = card.split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert "not recorded" in card and command.startswith("gptq quantize org/tiny-base ")

    quantize = typer.main.get_command(app).commands["quantize"]
    params = quantize.make_context("quantize", command.split()[2:]).params
    expected = dict(
        bits=4,
        group_size=128,
        desc_act=True,
        sym=True,
        damp_percent=0.01,
        dataset="wikitext2",
        nsamples=16,
        seqlen=64,
        seed=3,
        fmt="gptq",
        model="org/tiny-base",
        method="gptq",
        # a file without a method in its meta is plain GPTQ, not the default
        gptaq_alpha=None,
    )
    assert {k: params[k] for k in expected} == expected
    assert "| method | gptq |" in card
    assert params["output"] == Path("tiny-gptq")
    # the parser is strict: the check above means something
    with pytest.raises(Exception, match="No such option"):
        quantize.make_context("quantize", ["m", "--no-such-flag"])


def test_the_card_names_a_gptaq_checkpoints_method_and_alpha(hub, checkpoint):
    import typer.main

    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"]["meta"].update(method="gptaq-ls", gptaq_alpha=1.0)
    (checkpoint / "config.json").write_text(json.dumps(config))
    (checkpoint / "quantize_config.json").write_text(json.dumps(config["quantization_config"]))
    result = push_cli(checkpoint, "me/tiny-gptq", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)["card_text"]
    assert "| method | gptaq-ls, alpha 1 |" in card
    command = card.split("```bash\n", 1)[1].split("\n```", 1)[0]
    params = (
        typer.main.get_command(app)
        .commands["quantize"]
        .make_context("quantize", command.split()[2:])
        .params
    )
    assert params["method"] == "gptaq-ls" and params["gptaq_alpha"] == 1.0


def test_a_recorded_command_and_a_known_license_go_into_the_card(hub, checkpoint, tmp_path):
    base = tmp_path / "base-model"
    base.mkdir()
    (base / "README.md").write_text(
        "---\nlicense: apache-2.0\nlanguage: en\n---\n# The base model\n"
    )
    recorded = ["gptq", "quantize", str(base), "--bits", "4", "--desc-act", "-o", "tiny-gptq"]
    (checkpoint / "quant_log.json").write_text(
        json.dumps({**QUANT_LOG, "model": str(base), "command": recorded})
    )
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(
        json.dumps({**config, "_name_or_path": "org/tiny-base"})
    )

    result = push_cli(checkpoint, "me/tiny-gptq", "--quiet")
    assert result.exit_code == 0, result.output
    card = hub.files("me/tiny-gptq")["README.md"].decode()
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "org/tiny-base"
    assert (
        f"Made with:\n\n```bash\ngptq quantize {base} --bits 4 --desc-act -o tiny-gptq\n```" in card
    )


def test_the_license_comes_from_the_base_models_card_in_the_local_cache(hub, checkpoint):
    import huggingface_hub.constants as constants

    snapshot = Path(constants.HF_HUB_CACHE) / "models--org--tiny-base" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: llama2\n---\n# Base\n")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)

    result = push_cli(checkpoint, "me/tiny-gptq", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert front_matter(json.loads(result.stdout)["card_text"])["license"] == "llama2"


def test_the_users_readme_is_kept(hub, checkpoint):
    mine = "---\nlicense: mit\n---\n# My own card\n\nHand-written.\n"
    (checkpoint / "README.md").write_text(mine)

    result = push_cli(checkpoint, "me/tiny-gptq", "--quiet")
    assert result.exit_code == 0, result.output
    assert hub.files("me/tiny-gptq") == local_files(checkpoint)
    assert hub.files("me/tiny-gptq")["README.md"].decode() == mine


def test_private_revision_and_commit_message(hub, checkpoint):
    result = push_cli(
        checkpoint,
        "org/tiny",
        "--private",
        "--revision",
        "4bit-g128",
        "--commit-message",
        "first cut",
        "--json",
    )
    assert result.exit_code == 0, result.output
    repo = hub.repos["org/tiny"]
    assert repo.private and repo.branches["main"] == {}
    assert (
        hub.files("org/tiny", "4bit-g128")["model.safetensors"]
        == (checkpoint / "model.safetensors").read_bytes()
    )
    assert [(c["branch"], c["summary"]) for c in repo.commits] == [("4bit-g128", "first cut")]
    assert json.loads(result.stdout)["revision"] == "4bit-g128"

    # the repo exists now: exist_ok, a second commit on main
    again = push_cli(checkpoint, "org/tiny", "--quiet")
    assert again.exit_code == 0, again.output
    assert [c["branch"] for c in repo.commits] == ["4bit-g128", "main"]


def test_dry_run_lists_files_and_card_and_sends_nothing(hub, checkpoint, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")  # no token is needed to look
    result = push_cli(checkpoint, "me/tiny-gptq", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    listed = {f["path"]: f["size"] for f in plan["files"]}
    assert listed == {
        **{name: len(data) for name, data in local_files(checkpoint).items()},
        "README.md": len(plan["card_text"].encode()),
    }
    assert plan["bytes"] == sum(listed.values()) and plan["card"] == "generated"
    assert front_matter(plan["card_text"])["tags"][1] == "4-bit"
    assert hub.requests == []

    shown = push_cli(checkpoint, "me/tiny-gptq", "--dry-run")
    assert (
        shown.exit_code == 0
        and "model.safetensors" in shown.stderr
        and "base_model: org/tiny-base" in shown.stderr
    )
    assert hub.requests == []


def test_no_token_is_a_usage_error(hub, checkpoint, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = push_cli(checkpoint, "me/tiny-gptq")
    assert result.exit_code == 2 and "HF_TOKEN" in one_error_line(result)
    assert hub.requests == []


def test_a_token_the_hub_refuses_is_a_usage_error(hub, checkpoint, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    result = push_cli(checkpoint, "me/tiny-gptq")
    assert result.exit_code == 2 and "refused the token (401" in one_error_line(result)


@pytest.mark.parametrize("repo_id", ["just-a-name", "a/b/c", "org/bad name", "org/x..y", "org/-x"])
def test_invalid_repo_id_is_a_usage_error(hub, checkpoint, repo_id):
    result = push_cli(checkpoint, repo_id)
    assert result.exit_code == 2 and "repo id" in one_error_line(result)
    assert hub.requests == []


def test_a_broken_checkpoint_is_refused_before_any_request(hub, checkpoint):
    # v1 zero points labelled v2: inspect's check finds it, so nothing may reach the Hub
    broken = {**read_quantization_dict(checkpoint), "checkpoint_format": "gptq_v2"}
    (checkpoint / "quantize_config.json").write_text(json.dumps(broken))

    result = push_cli(checkpoint, "me/tiny-gptq")
    assert result.exit_code == 1
    assert "fails the validity check" in result.stderr and "nothing was sent" in result.stderr
    assert "problem:" in result.stderr and "labelled checkpoint_format 'gptq_v2'" in result.stderr
    assert hub.requests == []


def test_a_server_error_on_commit_fails_with_one_line(hub, checkpoint):
    hub.fail("commit", 500)
    result = push_cli(checkpoint, "me/tiny-gptq")
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "push to me/tiny-gptq failed" in line and "500" in line and "/commit/main" in line
    assert "injected failure of commit" in line
    assert hub.repos["me/tiny-gptq"].commits == [] and hub.files("me/tiny-gptq") == {}


def test_an_unreachable_hub_fails_with_one_line(hub, checkpoint, monkeypatch):
    import huggingface_hub.constants as constants

    with socket.socket() as probe:  # a loopback port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", closed)
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    result = push_cli(checkpoint, "me/tiny-gptq")
    assert result.exit_code == 2
    line = one_error_line(result)
    assert (
        f"cannot reach the Hub at {closed}" in line
        and "ConnectError" in line
        and "HF_ENDPOINT" in line
    )


def test_a_hub_that_never_answers_is_given_up_after_the_timeout(hub, checkpoint, monkeypatch):
    """A server that accepts the connection and never replies (issue 30: the push waited until
    killed)."""
    import huggingface_hub.constants as constants

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        # connections are accepted by the kernel; nothing is ever read or answered
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        t0 = time.perf_counter()
        result = push_cli(checkpoint, "me/tiny-gptq", "--timeout", "1")
        waited = time.perf_counter() - t0
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert f"the Hub at {endpoint} did not answer within 1 s" in line and "--timeout" in line
    assert waited < 30  # bounded: a few requests of 1 s each, retries included


def test_the_installed_command_honours_hf_endpoint_from_its_environment(hub, checkpoint):
    """A separate process: huggingface_hub reads HF_ENDPOINT and HF_HUB_DISABLE_XET at import, as
    for users."""
    env = {
        **os.environ,
        **hub.env,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "gptq_cli.cli", "push", str(checkpoint), "me/from-env", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = hub.files("me/from-env")
    assert remote.pop("README.md").startswith(b"---\n") and remote == local_files(checkpoint)
    assert json.loads(proc.stdout)["url"] == f"{hub.url}/me/from-env"
