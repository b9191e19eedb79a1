"""The plain C libraries setup.py builds beside the package (gptq_cli._cpu_columns, _cpu_xtx):
optional, so every caller has a route for when one is missing; and torch's OpenMP runtime, for
their work to run on torch's threads."""

from __future__ import annotations

import ctypes
import importlib.util
import os
from dataclasses import dataclass
from functools import cache

__all__ = ["OpenMP", "load_function", "torch_openmp"]


def load_function(
    library: str, name: str, argtypes: list, restype: object = None
) -> ctypes._CFuncPtr | None:
    """Function `name` of the library gptq_cli.<library>, typed; None where the library was not
    built, does not load, or lacks the function."""
    spec = importlib.util.find_spec(f"gptq_cli.{library}")
    if spec is None or spec.origin is None:
        return None
    try:
        fn = getattr(ctypes.CDLL(spec.origin), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn


@dataclass(frozen=True)
class OpenMP:
    """The OpenMP runtime torch's CPU operators run on, for a C function to run as a parallel
    region of it: parallel(fn, data, threads, 0) calls fn(data) on each thread of the team (the
    threads torch's operators use, not a second set competing with them for the cores); the other
    three are for fn to call."""

    parallel: ctypes._CFuncPtr  # GOMP_parallel(fn, data, num_threads, flags)
    thread_num: int  # the address of omp_get_thread_num
    num_threads: int  # of omp_get_num_threads
    barrier: int  # of GOMP_barrier


@cache
def torch_openmp() -> OpenMP | None:
    """torch's OpenMP runtime (libgomp, or Intel's libiomp5, which offers the same entry points),
    found among the libraries this process has loaded; None where torch's parallel backend is not
    OpenMP or the runtime is not found."""
    import torch

    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/lib" in line}
    except OSError:
        return None
    runtimes = sorted(
        (not p.startswith(os.path.dirname(torch.__file__)), p)  # torch's own first
        for p in paths
        if os.path.basename(p).startswith(("libgomp", "libiomp5"))
    )
    for _, path in runtimes:
        try:
            lib = ctypes.CDLL(path)
            parallel = lib.GOMP_parallel
            parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
            parallel.restype = None
            address = [
                ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
                for name in ("omp_get_thread_num", "omp_get_num_threads", "GOMP_barrier")
            ]
        except (OSError, AttributeError):
            continue
        return OpenMP(parallel, *address)
    return None
