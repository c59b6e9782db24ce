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
import os

import torch

_BACKENDS = ("auto", "triton", "reference")
_backend = os.environ.get("LORAMIX_BACKEND", "auto").strip().lower() or "auto"
if _backend not in _BACKENDS:
    raise ValueError(f"LORAMIX_BACKEND must be one of {_BACKENDS}, got {_backend!r}")

#: True when Triton kernels run under the interpreter (CPU tensors, no GPU limits enforced).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Value checks read tensor data, which costs a host-device sync on CUDA and breaks CUDA-graph
# capture. They always run on CPU tensors; on CUDA they are off unless switched on (debugging).
# Kernels never rely on them: every index is masked or clamped in the kernel itself.
_validate_cuda_values = os.environ.get("LORAMIX_VALIDATE", "0") == "1"


def backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily select ``auto`` / ``triton`` / ``reference`` (tests and benchmarks)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    old, _backend = _backend, name
    try:
        yield
    finally:
        _backend = old


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensors living where ``t`` lives should launch its Triton kernel."""
    if _backend == "reference":
        return False
    if t.device.type == "cuda":
        return True
    return _backend == "triton" and t.device.type == "cpu" and INTERPRET


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
