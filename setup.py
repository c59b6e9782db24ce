"""Build loramix_kernels: the Python package, and the native CPU kernels when torch is importable.

Metadata lives in pyproject.toml; this file only decides about the C++ extension
``loramix_kernels._C`` (csrc/*.cpp, torch.utils.cpp_extension).

* ``pip install --no-build-isolation .`` (or ``-e .``): the build sees the environment's torch, so
  the extension is compiled here, against exactly that torch.
* ``pip install .``: pip builds in an isolated environment without torch (pyproject.toml lists
  none, on purpose), so the wheel is pure Python. It ships csrc/ as ``loramix_kernels/csrc`` and
  ``loramix_kernels._native`` compiles the extension on first import against the torch that is
  installed, caching it (see that module).

No ``-std=`` flag is passed: torch.utils.cpp_extension appends the C++ standard that the installed
torch's headers require (``-std=c++17`` for older releases, ``-std=c++20`` for those needing it).

``LORAMIX_BUILD_NATIVE``: unset (default) = build when torch is importable, and if compiling fails
(e.g. no C++ compiler) install anyway without it (the package then tries again on first import,
else uses its plain-PyTorch paths and says so); ``1`` = the build must succeed (CI); ``0`` = never
build here (a pure-Python wheel, as with build isolation).
"""

import glob
import os
import runpy
import sys

from setuptools import find_packages, setup

MODE = os.environ.get("LORAMIX_BUILD_NATIVE", "").strip().lower()
if MODE not in ("", "auto", "0", "1"):
    sys.exit(f"LORAMIX_BUILD_NATIVE must be 0, 1 or unset, got {MODE!r}")
SOURCES = sorted(glob.glob(os.path.join("csrc", "*.cpp")))


def native_extension():
    """(ext_modules, cmdclass) for loramix_kernels._C, or nothing when it is not built here."""
    if MODE == "0" or not SOURCES:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        if MODE == "1":
            sys.exit("LORAMIX_BUILD_NATIVE=1 but torch is not importable here "
                     "(use pip install --no-build-isolation)")
        print("loramix_kernels: torch is not importable in this build environment (pip's build "
              "isolation): building without the native extension; it compiles on first import "
              "against the installed torch", file=sys.stderr)
        return [], {}

    class BuildNative(BuildExtension):
        """torch's BuildExtension; a failed compile is a warning unless LORAMIX_BUILD_NATIVE=1."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler missing or failing: the package still works
                if MODE == "1":
                    raise
                print(f"loramix_kernels: WARNING: could not compile the native CPU kernels ({exc}); "
                      "installing without them (the package retries on first import, else "
                      "uses its plain-PyTorch paths)", file=sys.stderr)

    # No -std flag: cpp_extension appends the standard the installed torch requires. The flags
    # (optimisation, OpenMP for at::parallel_for) are shared with the compile-on-import path.
    flags = runpy.run_path(os.path.join("csrc", "flags.py"))
    ext = CppExtension("loramix_kernels._C", SOURCES, extra_compile_args={"cxx": flags["compile_args"]()},
                       extra_link_args=flags["link_args"]())
    ext.optional = MODE != "1"  # setuptools then tolerates the missing output (in-place copies)
    return [ext], {"build_ext": BuildNative.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extension()

setup(
    # csrc/ is installed as loramix_kernels/csrc (data only) so an installed package can compile it.
    packages=find_packages(include=["loramix_kernels", "loramix_kernels.*"]) + ["loramix_kernels.csrc"],
    package_dir={"loramix_kernels.csrc": "csrc"},
    package_data={"loramix_kernels": ["py.typed"], "loramix_kernels.csrc": ["*.cpp", "*.h", "*.py"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
