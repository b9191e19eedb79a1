"""Shared test setup: GPTQModel limited to this machine's cores, CUDA tests skipped without a
GPU, and the session-wide tiny models and checkpoints that several test files use."""

from __future__ import annotations

import os

# Tiny test models are all small ops: a second OpenMP thread per op costs more than it brings, and
# on a busy 2-core machine spinning threads slow the suite down 30x. Subprocesses the tests start
# inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# GPTQModel (the independent reference in the interop tests) spawns one worker per core by default.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Llama (hidden 256, 2 layers, MLP 768, vocab 512) saved in fp16 with a
    tokenizer."""
    from tests.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama") / "model", "llama")


@pytest.fixture(scope="session")
def tiny_gptq_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir):
    """A GPTQ checkpoint (4-bit, group 128, v1, act-order g_idx) of the tiny Llama written by
    gptq_cli from known random codes: a RandomGptqCheckpoint with .path, .weights,
    .reference_model(). Do not modify it."""
    from gptq_cli.format.config import QuantConfig
    from tests.tiny_models import write_random_gptq_checkpoint

    out = tmp_path_factory.mktemp("tiny_gptq") / "ckpt"
    return write_random_gptq_checkpoint(
        out, tiny_llama_dir, QuantConfig(bits=4, group_size=128, desc_act=True)
    )
