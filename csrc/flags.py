"""Compiler and linker flags of the native extension (csrc/*.cpp), shared by ``setup.py`` (built at
install) and ``loramix_kernels/_native.py`` (compiled on first import): loaded from this file's
path by both, so it needs nothing but the standard library.

OpenMP: ``at::parallel_for`` is inline code in torch's headers, over OpenMP in torch's Linux
builds (``torch.__config__.parallel_info()``). Compiled without ``-fopenmp`` its ``#pragma omp
parallel`` is ignored and every parallel loop of the kernels runs on one thread. The extension then
shares torch's own runtime: torch loads its ``libgomp.so.1`` first and the extension's dependency
on that soname resolves to it.
"""

from __future__ import annotations

import os
import sys


def _openmp() -> bool:
    """Linux with GCC (the compiler torch's Linux wheels are built with, and whose libgomp they
    ship): Clang's -fopenmp links LLVM's libomp, a second runtime beside torch's, or fails
    without it; such builds keep serial loops."""
    cxx = os.path.basename(os.environ.get("CXX", "c++"))
    return sys.platform.startswith("linux") and "clang" not in cxx


def compile_args() -> list[str]:
    """Flags for the C++ compiler (no ``-std``: torch's cpp_extension adds the one it needs)."""
    if os.name == "nt":
        return ["/O2", "/openmp"]
    return ["-O3", "-fopenmp"] if _openmp() else ["-O3"]


def link_args() -> list[str]:
    """Flags for the linker."""
    return ["-fopenmp"] if _openmp() else []
