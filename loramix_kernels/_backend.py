"""Backend selection, validation switches and device facts shared by every op family.

Test switch (documented in the README): with ``LORAMIX_BACKEND=triton`` and ``TRITON_INTERPRET=1``
set before import, CPU tensors go through the Triton kernels (run by Triton's interpreter), so CI
exercises the real kernels without a GPU. ``LORAMIX_BACKEND=reference`` sends CUDA tensors through
the plain-PyTorch reference instead (a debugging aid). The default, ``auto``, uses Triton for CUDA
tensors and the reference (or native C++) kernels for CPU tensors.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings

import torch

_BACKENDS = ("auto", "triton", "reference")
# Read from LORAMIX_BACKEND at the first op call (an invalid value is an error there, not at import).
_backend: str | None = None

#: True when Triton kernels run under the interpreter (CPU tensors, no GPU limits enforced).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Whether triton can be imported (it is a dependency only where it exists: Linux x86-64 / aarch64).
HAS_TRITON = importlib.util.find_spec("triton") is not None

# Value checks read tensor data, which costs a host-device sync on CUDA and breaks CUDA-graph
# capture. They always run on CPU tensors; on CUDA they are off unless switched on (debugging).
# Kernels never rely on them: every index is masked or clamped in the kernel itself.
_validate_cuda_values = os.environ.get("LORAMIX_VALIDATE", "0") == "1"


#: Called after the backend changes (``use_backend``): the native direct kernels follow it.
_on_change: list = []


def _changed() -> None:
    for f in _on_change:
        f()


def backend() -> str:
    """The selected backend: ``use_backend``'s, else ``LORAMIX_BACKEND`` (default ``auto``)."""
    global _backend
    if _backend is None:
        name = os.environ.get("LORAMIX_BACKEND", "auto").strip().lower() or "auto"
        if name not in _BACKENDS:
            raise ValueError(f"LORAMIX_BACKEND must be one of {_BACKENDS}, got {name!r}")
        _backend = name
        _changed()
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily select ``auto`` / ``triton`` / ``reference`` (tests and benchmarks).

    ``triton`` needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before triton is
    imported (the test switch); asking for it where neither can work is an error, not a silent
    fallback to the reference.
    """
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    if name == "triton":
        _require_triton()
        if not INTERPRET and not torch.cuda.is_available():
            raise RuntimeError(
                "use_backend('triton'): no CUDA device, and CPU tensors run the Triton kernels only "
                "under the interpreter: set TRITON_INTERPRET=1 before importing loramix_kernels")
    old = backend()
    _backend = name
    _changed()
    try:
        yield
    finally:
        _backend = old
        _changed()


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("the Triton kernels need the `triton` package, which is not installed "
                           "(pip install triton; it exists for Linux x86-64 / aarch64)")


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    """One warning per distinct message and process (a slower path is in use, and why)."""
    warnings.warn(f"loramix_kernels: {message}", RuntimeWarning, stacklevel=3)


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensors living where ``t`` lives should launch its Triton kernel."""
    name = backend()
    if name == "reference":
        return False
    if t.device.type == "cuda":
        if HAS_TRITON:
            return True
        if name == "triton":
            _require_triton()
        warn_once("triton is not installed: CUDA tensors run the plain-PyTorch kernels "
                  "(pip install triton for the fast path)")
        return False
    if name == "triton" and t.device.type == "cpu":
        if not INTERPRET:
            raise RuntimeError("LORAMIX_BACKEND=triton on CPU tensors needs Triton's interpreter: "
                               "set TRITON_INTERPRET=1 before importing loramix_kernels")
        return True
    return False


_deterministic = os.environ.get("LORAMIX_DETERMINISTIC", "0") == "1"


def set_deterministic(enabled: bool) -> None:
    """Bit-reproducible results (training runs): no fp32 atomics in any kernel, so two runs on the
    same inputs give identical outputs and gradients. Also on while
    ``torch.use_deterministic_algorithms(True)`` is (which makes torch's own ops deterministic too).

    What it costs (``routed_lora``): no d_in split at decode (fewer programs in flight), the
    expert-sorted regime with k > 1 runs the dense form (two GEMMs over every expert), and the
    backward runs the dense masked form instead of the sorted Triton kernels (E / k times the
    FLOPs of routed-only work where E * r is large). Environment: ``LORAMIX_DETERMINISTIC=1``.
    torch's own ops stay as torch makes them: the one that matters here is the gate matrix's
    ``scatter_add_``, which is exact unless a token lists one expert in two slots (then its two
    gates may add in either order on CUDA); ``torch.use_deterministic_algorithms(True)`` covers
    that too.
    """
    global _deterministic
    _deterministic = bool(enabled)


def deterministic() -> bool:
    """Whether kernels must avoid atomics (``set_deterministic`` or torch's deterministic mode)."""
    return _deterministic or torch.are_deterministic_algorithms_enabled()


def set_value_validation(enabled: bool) -> None:
    """Switch data-dependent checks (index ranges, finite probabilities) on for CUDA tensors.

    They cost a host-device sync per op, so they are off by default on CUDA and must stay off
    during CUDA-graph capture. CPU tensors are always checked.
    """
    global _validate_cuda_values
    _validate_cuda_values = bool(enabled)


def check_values(t: torch.Tensor) -> bool:
    """Whether data-dependent validation should run for tensors on ``t``'s device."""
    if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
        return False
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cuda":
        return _validate_cuda_values and not torch.cuda.is_current_stream_capturing()
    return True


def dot_fp32(dtype: torch.dtype) -> bool:
    """Constexpr flag for kernels: upcast bf16 ``tl.dot`` operands to fp32.

    Triton's interpreter returns garbage for bf16 ``tl.dot`` (seen with triton 3.6 to 3.9), while
    fp16 and fp32 are right; on the GPU bf16 stays on the tensor cores.
    """
    return INTERPRET and dtype == torch.bfloat16


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int | None) -> int:
    """Streaming multiprocessors of a CUDA device; a nominal 132 (H100) when interpreting."""
    if device_index is None or not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    return num_sms(t.device.index if t.device.type == "cuda" else None)
