"""A wheel install (not the source tree) has what the CLI reads from beside the code: the
--config presets and the built-in calibration text."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_ships_the_presets_and_an_install_of_it_finds_them(tmp_path):
    env = {**os.environ, "GPTQ_BUILD_EXT": "0"}
    # a copy, because pip builds a local directory in place (build/, *.egg-info)
    src = shutil.copytree(
        ROOT,
        tmp_path / "src",
        ignore=shutil.ignore_patterns(
            ".git", "build", "*.egg-info", ".pytest_cache", ".hypothesis", "__pycache__", "presets"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("gptq_cli-*.whl")
    presets = sorted(p.name for p in (ROOT / "configs").glob("*.json"))
    assert {"llama-4bit-g128.json", "llama-3bit-g128.json", "llama-4bit-desc-act.json"} <= set(
        presets
    )
    with zipfile.ZipFile(wheel) as z:
        for name in presets:
            assert z.read(f"gptq_cli/presets/{name}") == (ROOT / "configs" / name).read_bytes()
        assert "gptq_cli/data/calibration.txt" in z.namelist()
        z.extractall(tmp_path / "site")

    # the installed package, run from elsewhere, resolves a preset by name
    probe = (
        "from gptq_cli.settings import CONFIG_DIR, load_preset; "
        "print(CONFIG_DIR); print(load_preset('llama-3bit-g128')['bits'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(tmp_path / "site")},
        check=True,
    ).stdout.split()
    assert out == [str(tmp_path / "site" / "gptq_cli" / "presets"), "3"]
