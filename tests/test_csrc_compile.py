"""Every source in csrc/ compiles with nvcc -c, for sm_80 and sm_90, against the installed torch's
headers.

No GPU is needed: nvcc compiles without linking. The kernels (.cu) must compile without a warning
and without register spills; ext.cpp (host code, arch-independent) is compiled once. A CPU build of
torch ships the c10/cuda headers but not the c10/cuda/impl/cuda_cmake_macros.h that CUDA builds
generate, which -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE makes unnecessary. Skipped only where nvcc is not
installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from functools import cache
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CUDA_SOURCES = sorted(CSRC.glob("*.cu"))
ARCHS = ("80", "90")


def _find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return shutil.which("nvcc") or shutil.which("nvcc", path=os.path.join(cuda_home, "bin"))


NVCC = _find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")


@cache
def compile_source(source: Path, arch: str | None, out_dir: Path) -> tuple[Path, str]:
    """nvcc -c `source` (for `arch`, or host code when None) -> (object file, compiler output)."""
    out = out_dir / f"{source.stem}_{arch or 'host'}.o"
    cmd = [NVCC, "-c", str(source), "-o", str(out), "-std=c++20", "-O3", f"-I{CSRC}"]
    if arch is None:
        from torch.utils.cpp_extension import include_paths

        cmd += [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
        cmd += ["-Xcompiler", "-fPIC", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
    else:
        # what setup.py's CUDAExtension adds
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

        cmd += [
            *COMMON_NVCC_FLAGS,
            f"-gencode=arch=compute_{arch},code=sm_{arch}",
            "-Xptxas=-warn-spills,-Werror",
            "--Werror",
            "all-warnings",
        ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}{done.stderr}"
    return out, done.stdout + done.stderr


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("csrc_objects")


def _symbols(obj: Path, which: str) -> set[str]:
    """Demangled symbol names of an object file; `which` is nm's --defined-only or
    --undefined-only."""
    done = subprocess.run(["nm", "-C", which, str(obj)], capture_output=True, text=True, check=True)
    return {
        m.group(1)
        for m in re.finditer(r"^\s*(?:[0-9a-f]+\s+)?[A-Za-z]\s+(.+)$", done.stdout, re.MULTILINE)
    }


def test_csrc_has_the_kernels_and_the_bindings() -> None:
    assert {p.name for p in CUDA_SOURCES} >= {"gptq_block.cu", "gemv_4bit.cu"}
    assert (CSRC / "ext.cpp").is_file()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_kernel_compiles_without_warnings_or_spills(source: Path, arch: str, out_dir: Path) -> None:
    obj, output = compile_source(source, arch, out_dir)
    assert obj.stat().st_size > 0
    assert "warning" not in output.lower(), output


def test_bindings_compile_and_call_only_what_the_kernels_define(out_dir: Path) -> None:
    ext, _ = compile_source(CSRC / "ext.cpp", None, out_dir)
    if shutil.which("nm") is None:
        pytest.skip("nm is not installed")
    assert "PyInit__C" in _symbols(ext, "--defined-only")  # importable as gptq_cli._C
    needed = {s for s in _symbols(ext, "--undefined-only") if s.startswith("gptq::")}
    assert needed, "ext.cpp calls no kernel launcher"
    defined: set[str] = set()
    for source in CUDA_SOURCES:
        obj, _ = compile_source(source, ARCHS[0], out_dir)
        defined |= _symbols(obj, "--defined-only")
    assert needed <= defined, (
        f"declared in kernels.h but defined in no .cu file: {needed - defined}"
    )
