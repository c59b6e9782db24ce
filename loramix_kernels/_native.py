"""The native CPU kernels (``csrc/*.cpp``, module ``loramix_kernels._C``): found, compiled once, or absent.

``load()`` returns the module from the first source that works:

1. **Built at install time**, when the build could import torch (``pip install --no-build-isolation
   .`` or ``-e .``): ``loramix_kernels/_C*.so``, compiled against that environment's torch. In a
   source checkout it is skipped when a ``csrc/*.cpp`` is newer than it (rebuild with
   ``pip install --no-build-isolation -e .``).
2. **Compiled on first import** when there is no such module or it does not load (a plain
   ``pip install .``, whose isolated build has no torch; or torch changed since the build):
   ``torch.utils.cpp_extension`` compiles the shipped sources against the running torch (its
   headers pick the C++ standard), once, about a minute, into
   ``$LORAMIX_CACHE_DIR/<key>`` (default ``~/.cache/loramix_kernels``); the key covers the sources,
   torch and Python, so later imports load it directly and an upgrade recompiles. Needs a C++
   compiler (``$CXX``, else ``c++``) and ninja (a dependency). A failed compile is remembered
   (``failed.txt`` there) and not retried on every import: delete that directory to retry.
3. **None**: the CPU ops use their plain-PyTorch paths, and one RuntimeWarning says why.

``LORAMIX_NATIVE=0`` skips all of it (plain PyTorch, no warning).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import runpy
import sys
import sysconfig
import time
from pathlib import Path
from types import ModuleType

import torch

from . import _backend
from ._backend import warn_once

NAME = f"{__package__}._C"
_PKG = Path(__file__).resolve().parent
#: A compile lock older than this was left by a killed process (torch's lock has no timeout).
_STALE_LOCK_S = 900.0


def source_dir() -> Path | None:
    """Where the C++ sources are: inside an installed package, else a source checkout's csrc/."""
    for d in (_PKG / "csrc", _PKG.parent / "csrc"):
        if any(d.glob("*.cpp")):
            return d
    return None


def cache_root() -> Path:
    env = os.environ.get("LORAMIX_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "loramix_kernels"


def _sources(src: Path) -> list[Path]:
    """Every file the build reads: the .cpp files, the headers they include, the flags."""
    return sorted(src.glob("*.cpp")) + sorted(src.glob("*.h")) + [src / "flags.py"]


def build_dir(sources: list[Path]) -> Path:
    """The cache directory of one (sources, torch, Python, compiler) combination."""
    h = hashlib.sha256()
    for s in sources:
        h.update(s.name.encode() + b"\0" + s.read_bytes() + b"\0")
    for part in (torch.__version__, torch.version.git_version, sysconfig.get_config_var("EXT_SUFFIX"),
                 str(torch._C._GLIBCXX_USE_CXX11_ABI), os.environ.get("CXX", "")):
        h.update(str(part).encode() + b"\0")
    tag = torch.__version__.replace("+", "_")
    return cache_root() / f"torch{tag}-{sys.implementation.cache_tag}-{h.hexdigest()[:16]}"


def _import_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[NAME] = module
    return module


def _prebuilt() -> tuple[ModuleType | None, str]:
    """The extension built at install time, or (None, why not)."""
    spec = importlib.util.find_spec(NAME)
    # Only this package's own build: an import hook of another copy (e.g. an editable install seen
    # through --system-site-packages) could otherwise offer that copy's _C.
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != _PKG:
        return None, "no native extension was built at install time"
    src = _PKG.parent / "csrc"
    if not (_PKG / "csrc").is_dir() and src.is_dir():  # a source checkout: is the build current?
        built = os.path.getmtime(spec.origin)
        if any(os.path.getmtime(s) > built for s in _sources(src)):
            return None, f"{spec.origin} is older than csrc/ (rebuild: pip install --no-build-isolation -e .)"
    try:
        return importlib.import_module(NAME), ""
    except ImportError as exc:  # e.g. an undefined symbol: built against another torch
        return None, f"the built extension does not load ({exc})"


def _compile(why_not_prebuilt: str) -> tuple[ModuleType | None, str]:
    """Compile the shipped sources against the running torch (cached), or (None, why not)."""
    src = source_dir()
    if src is None:
        return None, f"{why_not_prebuilt}, and the C++ sources are not there to compile"
    import shutil

    cxx = os.environ.get("CXX") or ("cl" if os.name == "nt" else "c++")
    if shutil.which(cxx) is None:
        return None, f"{why_not_prebuilt}, and no C++ compiler to build it ({cxx!r} not found; set CXX)"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return None, f"{why_not_prebuilt}, and ninja, needed to build it, is missing (pip install ninja)"
    sources = sorted(src.glob("*.cpp"))
    build = build_dir(_sources(src))
    done, failed = build / "built.txt", build / "failed.txt"
    if done.is_file():
        try:
            return _import_file(build / done.read_text().strip()), ""
        except (ImportError, OSError):
            pass  # removed or damaged: compile again below
    if failed.is_file():
        return None, (f"{why_not_prebuilt}, and compiling it failed before (see {failed}; delete "
                      f"{build} to try again)")
    build.mkdir(parents=True, exist_ok=True)
    lock = build / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
        lock.unlink(missing_ok=True)
    print(f"loramix_kernels: compiling the native CPU kernels for torch {torch.__version__} "
          f"(once, about a minute; cached in {build})", file=sys.stderr, flush=True)
    try:
        # is_python_module=False: build, then dlopen once (op registrations run); imported below
        # under its package name. No -std flag: cpp_extension adds the one this torch needs.
        flags = runpy.run_path(str(src / "flags.py"))  # the flags of setup.py
        path = cpp_extension.load(
            name="_C", sources=[str(s) for s in sources], build_directory=str(build),
            extra_cflags=flags["compile_args"](), extra_ldflags=flags["link_args"](),
            is_python_module=False)
        module = _import_file(Path(path))
    except Exception as exc:
        failed.write_text(f"torch {torch.__version__}, {cxx}\n{type(exc).__name__}: {exc}\n")
        return None, f"{why_not_prebuilt}, and compiling it failed ({type(exc).__name__}; see {failed})"
    tmp = build / f"built.txt.{os.getpid()}"
    tmp.write_text(Path(path).name)
    os.replace(tmp, done)
    return module, ""


@functools.lru_cache(maxsize=None)
def load() -> ModuleType | None:
    """The native module (see the module docstring), or None after one warning saying why."""
    if os.environ.get("LORAMIX_NATIVE", "").strip().lower() in ("0", "off", "false", "no"):
        return None
    module, why = _prebuilt()
    if module is None:
        module, why = _compile(why)
    if module is None:
        warn_once(f"native CPU kernels unavailable: {why}. The CPU ops use their plain-PyTorch "
                  "paths (slower); LORAMIX_NATIVE=0 silences this")
        return None
    package = sys.modules.get(__package__)
    if package is not None:
        package._C = module
    return module


@functools.lru_cache(maxsize=None)
def op(name: str):
    """``torch.ops.loramix.<name>.default``, a private CPU op of ``csrc/`` registered by the loaded
    native module; None without the module, or with a stale one built before that op existed."""
    try:
        return getattr(torch.ops.loramix, name).default
    except (AttributeError, RuntimeError):
        return None


def has_op(name: str) -> bool:
    """Whether the native op ``name`` is there (see :func:`op`)."""
    return op(name) is not None


def runs_on(t: torch.Tensor, name: str) -> bool:
    """Whether an op's CPU kernel runs the native op ``name`` for tensors like ``t``: CPU tensors
    not routed to Triton's interpreter (``LORAMIX_BACKEND=triton``), extension built. Such ops make
    their value checks inside the native walk instead of in the validator's vectorised torch."""
    return t.device.type == "cpu" and not _backend.use_triton(t) and has_op(name)


# Direct CPU kernels (csrc/direct.h): C++ kernels registered for a public op's CPU key.
_direct_enabled = True


def install_direct(name: str) -> bool:
    """Register the direct CPU kernel of public op ``name`` (defined, with its Python kernel as
    ``loramix::_<name>_py``, by ``ops/_registry.py``); False when this build has none."""
    install = op("_direct_install")
    if install is None or not install(name):
        return False
    sync_direct()
    return True


@torch.compiler.disable
def sync_direct() -> None:
    """Tell the direct kernels whether to hand every call to the Python kernel: while they are
    switched off (:func:`set_direct`), while the backend is not decided yet (``LORAMIX_BACKEND``
    is read, and an invalid value reported, at the first op call, which then runs in Python), and
    while it is ``triton`` (CPU tensors take the Triton kernels under the interpreter, or the
    Python kernel reports that they cannot). Called at install and whenever the backend is set
    (``_backend.backend``'s first read, ``use_backend``)."""
    delegate = op("_direct_delegate")
    if delegate is None:
        return
    name = _backend._backend  # not backend(): that would read the environment now, at import
    delegate(not _direct_enabled or name is None or name == "triton")


def set_direct(enabled: bool) -> bool:
    """Switch the direct CPU kernels on or off (tests: off runs the Python kernel, as without the
    extension); returns the previous setting."""
    global _direct_enabled
    old, _direct_enabled = _direct_enabled, bool(enabled)
    sync_direct()
    return old


_backend._on_change.append(sync_direct)


def disagrees(op: str):
    """The error when a native kernel rejected an argument that the op's Python checks accept."""
    return RuntimeError(f"{op}: the native CPU kernel rejected an argument that the Python checks "
                        "accept (a bug: please report it; LORAMIX_NATIVE=0 avoids the native kernels)")
