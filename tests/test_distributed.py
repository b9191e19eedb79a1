"""`torchrun --nproc-per-node 2 gptq quantize` on CPU (gloo): the run's bytes, against one
process, and a rank that dies."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    "OMP_NUM_THREADS": "1",
}


def quantize_args(model: Path, out: Path) -> list[str]:
    return [
        "-m",
        "gptq_cli.cli",
        "quantize",
        str(model),
        "-o",
        str(out),
        "--nsamples",
        "8",
        "--seqlen",
        "32",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--desc-act",
        "--quiet",
    ]


def torchrun(nproc: int, model: Path, out: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *quantize_args(model, out),
    ]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir) -> Path:
    root = tmp_path_factory.mktemp("dist")
    torchrun(2, tiny_llama_dir, root / "two")
    torchrun(2, tiny_llama_dir, root / "two-again")
    subprocess.run(
        [sys.executable, *quantize_args(tiny_llama_dir, root / "one")],
        env=ENV,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return root


def test_two_processes_write_one_checkpoint_deterministically(runs: Path) -> None:
    for name in ("model.safetensors", "config.json", "quantize_config.json"):
        assert (runs / "two" / name).read_bytes() == (runs / "two-again" / name).read_bytes()
    assert not list(runs.glob("*.work"))  # rank 0 removed the work dir, no other rank made one


def test_two_processes_match_one(runs: Path) -> None:
    """Not byte for byte: the Hessians are combined from two partial means instead of one running
    mean, equal up to float32 rounding, and that moves act-order's near-tied columns and rounding
    ties (here ~0.5-1.5% of g_idx and up to ~15% of packed words of a module differ). The
    quantization losses agree within 2%."""
    two, one = (
        load_file(str(runs / "two" / "model.safetensors")),
        load_file(str(runs / "one" / "model.safetensors")),
    )
    assert two.keys() == one.keys()
    for key, t in one.items():
        if key.endswith(".g_idx"):
            assert (two[key] != t).float().mean() <= 0.02, key
        elif not key.endswith((".qweight", ".scales", ".qzeros")):
            assert (two[key] == t).all(), key  # the unquantized tensors
    log_two, log_one = (
        json.loads((runs / r / "quant_log.json").read_text())["modules"] for r in ("two", "one")
    )
    assert [m["name"] for m in log_two] == [m["name"] for m in log_one]
    # every token counted once
    assert [m["tokens"] for m in log_two] == [m["tokens"] for m in log_one]
    for a, b in zip(log_two, log_one):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.02), a["name"]


def test_combined_hessians_equal_one_running_mean_up_to_float32_rounding() -> None:
    """What N ranks change: the Hessian comes from N partial means instead of one running mean
    over all batches. The two differ by float32 rounding only (measured ~1e-7 relative; bound
    1e-5); different bytes downstream come from that alone."""
    from gptq_cli.quantization.distributed import combine_means
    from gptq_cli.quantization.solver import accumulate_hessian

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 64, 256, generator=gen) * (1 + i) for i in range(8)]
    one, n_one = None, 0
    for X in batches:
        one, n_one = accumulate_hessian(one, n_one, X)
    for world in (2, 3):
        parts, counts = [], []
        for rank in range(world):
            H, n = None, 0
            for X in batches[rank::world]:
                H, n = accumulate_hessian(H, n, X)
            parts.append(H)
            counts.append(n)
        combined, total = combine_means(parts, counts)
        assert total == n_one
        rel = ((combined - one).abs().max() / one.abs().max()).item()
        assert rel < 1e-5, rel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_meeting_through_the_rendezvous_write_what_two_local_processes_write(
    runs: Path, tmp_path: Path, tiny_llama_dir
) -> None:
    """`--nnodes 2`: two torchrun agents, as on two machines sharing a file system (here both on
    loopback), find each other through torchrun's c10d rendezvous; the run is the same 2-rank
    run, byte for byte."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--rdzv-id=gptq-test",
        *quantize_args(tiny_llama_dir, tmp_path / "out"),
    ]
    agents = [
        subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for agent in agents:
        _, err = agent.communicate(timeout=600)
        assert agent.returncode == 0, err[-2000:]
    for name in ("model.safetensors", "quantize_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (runs / "two" / name).read_bytes()
    assert not (tmp_path / "out.work").exists()


def test_a_dying_rank_makes_the_other_exit_with_one_line(tmp_path: Path, tiny_llama_dir) -> None:
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    rank0 = subprocess.Popen(
        [sys.executable, *quantize_args(tiny_llama_dir, tmp_path / "out")],
        env={**env, "RANK": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Rank 1 joins the group, then dies before its first collective.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, torch.distributed as d; d.init_process_group('gloo'); os._exit(3)",
        ],
        env={**env, "RANK": "1"},
        timeout=120,
    )
    t0 = time.monotonic()
    _, err = rank0.communicate(timeout=120)
    assert time.monotonic() - t0 < 60
    assert rank0.returncode == 1
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "lost the other processes" in lines[0], err[-2000:]
    assert not (tmp_path / "out").exists()
    # no block was finished: nothing kept to resume from
    assert not (tmp_path / "out.work").exists()


RESUME_MODEL = dict(
    num_hidden_layers=4,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
)


def launch(nproc: int, model: Path, out: Path) -> list[subprocess.Popen]:
    """`nproc` ranks of one run, started as torchrun would start them (environment variables)."""
    env = {
        **ENV,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(nproc),
    }
    args = [sys.executable, *quantize_args(model, out), "--group-size", "32"]
    return [
        subprocess.Popen(
            args,
            env={**env, "RANK": str(r)} if nproc > 1 else ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(nproc)
    ]


def kill_when(procs: list[subprocess.Popen], path: Path) -> None:
    while not path.exists():
        assert all(p.poll() is None for p in procs), f"the run ended before {path.name} appeared"
        time.sleep(0.002)
    for p in procs:
        p.kill()
        p.communicate(timeout=60)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_a_killed_run_resumes_with_another_number_of_processes(
    tmp_path: Path, before: int, after: int
) -> None:
    from tests.tiny_models import save_tiny_model

    model = save_tiny_model(tmp_path / "model", "llama", **RESUME_MODEL)
    out, blocks = tmp_path / "out", tmp_path / "out.work" / "blocks"
    kill_when(launch(before, model, out), blocks / "block-00001.safetensors")
    kept = {p.name: load_file(str(p)) for p in blocks.glob("block-*.safetensors")}
    assert 2 <= len(kept) < 4 and not out.exists()
    procs = launch(after, model, out)
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    final = load_file(str(out / "model.safetensors"))
    # the finished blocks were taken from the work dir, not solved again
    for block in kept.values():
        for key, t in block.items():
            assert key in final and torch.equal(final[key], t), key
    log = json.loads((out / "quant_log.json").read_text())["modules"]
    # every token counted once
    assert len(log) == 4 * 7 and all(m["tokens"] == 8 * 32 for m in log)
    assert not (tmp_path / "out.work").exists()


def _reduce_on_rank(rank: int, world: int, port: int, results) -> None:
    """One rank of test_ranks_combine_gptaq_crosses_with_their_hessians: rank r holds H and ΔX
    X̃ᵀ of its own tokens (running means over n_r = 8·(r + 1) tokens) and reduces them."""
    import torch.distributed as dist

    from gptq_cli.quantization.distributed import Ranks, reduce_hessians

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(rank)
    H, D = torch.randn(6, 6, generator=gen), torch.randn(6, 6, generator=gen)
    # "other" belongs to no Hessian here: left as it is
    crosses = {"q": D, "other": torch.ones(3, 3)}
    out = reduce_hessians(Ranks(rank, world), [(["q", "k"], H, 8 * (rank + 1))], crosses)
    results[rank] = (out[0][1], out[0][2], crosses["q"], crosses["other"])
    dist.destroy_process_group()


def test_ranks_combine_gptaq_crosses_with_their_hessians() -> None:
    """GPTAQ under torchrun: each rank's ΔX X̃ᵀ is a running mean over its own tokens, like its
    Hessian; both are combined with the same token counts (a rank that solved with its own share
    of ΔX X̃ᵀ would aim at another target than one process)."""
    import torch.multiprocessing as mp

    from gptq_cli.quantization.distributed import combine_means

    world, port = 2, free_port()
    results = mp.Manager().dict()
    mp.spawn(_reduce_on_rank, args=(world, port, results), nprocs=world)
    parts = [
        (torch.randn(6, 6, generator=g), torch.randn(6, 6, generator=g))
        for g in (torch.Generator().manual_seed(r) for r in range(world))
    ]
    counts = [8 * (r + 1) for r in range(world)]
    H, total = combine_means([h for h, _ in parts], counts)
    D, _ = combine_means([d for _, d in parts], counts)
    for rank in range(world):
        got_H, got_n, got_D, other = results[rank]
        assert torch.equal(got_H, H) and got_n == total == 24
        assert torch.equal(got_D, D) and not torch.equal(got_D, parts[rank][1])
        assert torch.equal(other, torch.ones(3, 3))


def test_gptaq_under_torchrun_matches_one_process(tmp_path: Path, tiny_llama_dir) -> None:
    """`torchrun --nproc-per-node 2 gptq quantize --method gptaq-ls`: both streams split by
    batches, Hessians and ΔX X̃ᵀ combined; the result agrees with one process as plain GPTQ's
    does (losses within 2%; bytes differ by float32 rounding of the combined means), and GPTAQ's
    meta is recorded."""
    args = ["--method", "gptaq-ls", "--gptaq-alpha", "0.5"]
    two = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        *quantize_args(tiny_llama_dir, tmp_path / "two"),
        *args,
    ]
    for cmd in (two, [sys.executable, *quantize_args(tiny_llama_dir, tmp_path / "one"), *args]):
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads((tmp_path / "two" / "config.json").read_text())["quantization_config"]["meta"]
    assert meta["method"] == "gptaq-ls" and meta["gptaq_alpha"] == 0.5
    log_two, log_one = (
        json.loads((tmp_path / r / "quant_log.json").read_text())["modules"] for r in ("two", "one")
    )
    assert (
        [m["tokens"] for m in log_two] == [m["tokens"] for m in log_one] == [8 * 32] * len(log_one)
    )
    for a, b in zip(log_two, log_one):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.02), a["name"]
