"""`quantize --dry-run` against a real run of the same command: peak host memory and time within
1.5x."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import save_tiny_model

REPO = Path(__file__).resolve().parent.parent
# Run one command in a fresh interpreter and report its peak RSS and wall time: RUSAGE_CHILDREN is
# then the command's own (and its children's) maximum, not that of every process this test session
# has started.
MEASURE = (
    "import json, resource, subprocess, sys, time; t = time.perf_counter(); "
    "rc = subprocess.run(sys.argv[1:], capture_output=True).returncode; "
    "print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t, "
    "'peak_gb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9}))"
)


@pytest.mark.parametrize("method", ["gptq", "gptaq-ls"])
def test_dry_run_estimates_memory_and_time_of_the_real_run(tmp_path: Path, method: str) -> None:
    # Wide enough that the Hessians and the solver's buffer, not only the interpreter, show in the
    # peak.
    model = save_tiny_model(tmp_path / "m", "llama", hidden_size=512, intermediate_size=2048)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "gptq_cli.cli",
        "quantize",
        str(model),
        "-o",
        str(tmp_path / "out"),
        "--nsamples",
        "16",
        "--seqlen",
        "128",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--method",
        method,
    ]
    plan = json.loads(
        subprocess.run(
            cmd + ["--dry-run", "--json"], env=env, capture_output=True, text=True, check=True
        ).stdout
    )
    real = json.loads(
        subprocess.run(
            [sys.executable, "-c", MEASURE, *cmd, "--quiet"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert real["rc"] == 0 and (tmp_path / "out" / "config.json").is_file()
    memory_ratio = plan["peak_host_memory_gb"] / real["peak_gb"]
    time_ratio = plan["estimated_seconds"] / real["seconds"]
    assert 1 / 1.5 <= memory_ratio <= 1.5, (plan["peak_host_memory_gb"], real)
    assert 1 / 1.5 <= time_ratio <= 1.5, (plan["estimated_seconds"], plan["probe"], real)
    assert plan["peak_device_memory_gb"] is None  # a CPU run: the host is the device
    assert plan["method"] == method
