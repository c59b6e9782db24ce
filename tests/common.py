"""Helpers shared by the tests: where the Triton kernels run, and tolerances per dtype."""

import contextlib

import pytest
import torch

from loramix_kernels import _backend, use_backend

HAS_CUDA = torch.cuda.is_available()
#: Where Triton kernels run in this session: the GPU, or CPU tensors under the interpreter.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
TRITON_OK = HAS_CUDA or (_backend.INTERPRET and _backend.backend() == "triton")

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
requires_triton = pytest.mark.skipif(
    not TRITON_OK, reason="needs CUDA, or LORAMIX_BACKEND=triton with TRITON_INTERPRET=1")

#: (atol, rtol) of our kernels (fp32 accumulation) against a float64 oracle, per input dtype.
TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (6e-2, 4e-2),
}


@contextlib.contextmanager
def triton_path():
    """Run ops through the Triton kernels (GPU, or interpreter on CPU)."""
    with use_backend("triton" if not HAS_CUDA else "auto"):
        yield


@contextlib.contextmanager
def reference_path():
    """Run ops through the plain-PyTorch reference kernels."""
    with use_backend("reference"):
        yield


def backends():
    """The (name, device, context) triples every op is tested on."""
    out = [pytest.param("reference", "cpu", reference_path, id="reference-cpu")]
    if TRITON_OK:
        out.append(pytest.param("triton", TRITON_DEVICE, triton_path, id=f"triton-{TRITON_DEVICE}"))
    return out
