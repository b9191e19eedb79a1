"""Finding the compiled CUDA kernels: the `gptq_cli._C` that setup.py built, else (opt-in) a JIT
build of csrc/.

Loading `gptq_cli._C` registers the operators torch.ops.gptq_cli.gptq_block and
torch.ops.gptq_cli.gemv_4bit. Nothing is loaded at import time and nothing is compiled unless
GPTQ_JIT=1, so `import gptq_cli` never stalls; the first CUDA call decides once per process.
"""

from __future__ import annotations

import logging
import os
import shutil
from functools import cache
from pathlib import Path

import torch

from gptq_cli.errors import GptqError

log = logging.getLogger(__name__)

# csrc/ beside the package: present in a source checkout and an editable install, not in a wheel.
CSRC = Path(__file__).resolve().parents[2] / "csrc"
JIT_ENV = "GPTQ_JIT"


def _import_prebuilt() -> bool:
    try:
        import gptq_cli._C  # noqa: F401  (registers the operators)
    except ModuleNotFoundError:  # installed without the extension
        return False
    # built, but it does not load (e.g. torch was upgraded since)
    except (ImportError, OSError) as e:
        log.warning("gptq_cli._C is installed but does not load (%s); using the torch kernels", e)
        return False
    return True


def _jit_build() -> None:
    """Compile csrc/ for the local GPU with torch.utils.cpp_extension.load (cached in torch's
    extension dir)."""
    from torch.utils import cpp_extension

    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None or shutil.which("nvcc", path=os.path.join(cuda_home, "bin")) is None:
        raise GptqError(
            f"{JIT_ENV}=1 but no CUDA toolkit (nvcc) was found; install one or unset {JIT_ENV}"
        )
    sources = sorted(str(p) for p in CSRC.glob("*.cu")) + [str(CSRC / "ext.cpp")]
    if len(sources) < 2 or not (CSRC / "ext.cpp").is_file():
        raise GptqError(
            f"{JIT_ENV}=1 but the CUDA sources are not in {CSRC} (only a source checkout has "
            f"them); unset {JIT_ENV}"
        )
    log.warning(
        "building the CUDA kernels (%s=1); this takes a few minutes the first time", JIT_ENV
    )
    try:
        cpp_extension.load(
            name="gptq_cli_C",
            sources=sources,
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3"],
            is_python_module=False,
        )
    except (RuntimeError, OSError) as e:
        raise GptqError(
            f"building the CUDA kernels failed ({str(e).splitlines()[-1] if str(e) else e}); "
            f"unset {JIT_ENV} to use the torch kernels"
        ) from e


@cache
def extension_loaded() -> bool:
    """True when the CUDA kernels are registered in torch.ops.gptq_cli (loading or JIT-building
    them once)."""
    if not torch.cuda.is_available():
        return False
    if _import_prebuilt():
        return True
    if os.environ.get(JIT_ENV) == "1":
        _jit_build()
        return True
    return False
