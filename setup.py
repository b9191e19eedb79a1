"""Builds the optional compiled parts from csrc/; the package itself is declared in pyproject.toml.

`gptq_cli._cpu_columns`: GPTQ's column loop in plain C for CPUs (csrc/cpu_columns.c, loaded by
ctypes from gptq_cli/kernels/cpu_columns.py), and `gptq_cli._cpu_xtx`: the Hessian's XᵀX of bf16
activations by AVX512-BF16 (csrc/cpu_xtx.c, gptq_cli/kernels/cpu_xtx.py). They need only a C
compiler, no torch, so they build in an isolated build environment too; where one fails to build,
the install goes on and the torch (or MKL) route runs instead.

`gptq_cli._C`: the CUDA extension.

GPTQ_BUILD_EXT=1 builds it or fails, GPTQ_BUILD_EXT=0 never builds it, unset builds it when it can:
torch is importable at build time with CUDA support (so use `pip install --no-build-isolation`; an
isolated build env has no torch) and nvcc is found; a compiler error then fails the install
(GPTQ_BUILD_EXT=0 skips it). Without the extension everything runs on the torch kernels
(gptq_cli/kernels/).
Architectures: sm_80, sm_89, sm_90 (+ PTX for newer GPUs), unless TORCH_CUDA_ARCH_LIST says
otherwise.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
ARCH_FLAGS = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ("80", "89", "90")] + [
    "-gencode=arch=compute_90,code=compute_90"
]


def cuda_build() -> tuple[dict, str]:
    """setup() arguments that build the extension, or ({}, why it cannot be built here)."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return {}, "torch is not importable at build time (install with --no-build-isolation)"
    if torch.version.cuda is None:
        return {}, f"torch {torch.__version__} is built without CUDA"
    if CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        return {}, "nvcc was not found (set CUDA_HOME)"
    sources = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").glob("*.cu")) + [
        "csrc/ext.cpp"
    ]
    # No --use_fast_math: the block kernel reproduces the torch solver bit for bit.
    nvcc_flags = ["-O3"] + ([] if os.environ.get("TORCH_CUDA_ARCH_LIST") else ARCH_FLAGS)
    extension = CUDAExtension(
        "gptq_cli._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags}
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}, ""


class BuildPyWithPresets(build_py):
    """Also ships configs/*.json (the --config presets) inside the package as gptq_cli/presets/,
    so that a wheel install finds them; an editable install reads configs/ where it is."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "gptq_cli" / "presets"
        target.mkdir(parents=True, exist_ok=True)
        for preset in sorted((ROOT / "configs").glob("*.json")):
            self.copy_file(str(preset), str(target / preset.name))


# No -ffast-math, and no fused multiply-add: the C loop reproduces the torch loop's float32
# roundings bit for bit.
CPU_COLUMNS = Extension(
    "gptq_cli._cpu_columns",
    ["csrc/cpu_columns.c"],
    optional=True,
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math"],
)


# XᵀY of bf16 activations by AVX512-BF16 (the functions carry their own target attributes and run
# only where the CPU reports it): the Hessian on CPUs whose MKL has no fast bf16 GEMM.
CPU_XTX = Extension(
    "gptq_cli._cpu_xtx", ["csrc/cpu_xtx.c"], optional=True, extra_compile_args=["-O3"]
)


def extension_args() -> dict:
    mode = os.environ.get("GPTQ_BUILD_EXT", "")
    if mode == "0":
        return {}
    args, reason = cuda_build()
    if reason and mode == "1":
        sys.exit(f"GPTQ_BUILD_EXT=1 but the CUDA extension cannot be built: {reason}")
    if reason:
        print(f"gptq_cli: building without the CUDA extension: {reason}", file=sys.stderr)
    return args


args = extension_args()
setup(
    **{
        **args,
        "ext_modules": [CPU_COLUMNS, CPU_XTX] + args.get("ext_modules", []),
        "cmdclass": {**args.get("cmdclass", {}), "build_py": BuildPyWithPresets},
    }
)
