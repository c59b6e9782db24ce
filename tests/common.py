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


def assert_close(got, want, dtype, scale=None, **kw):
    """``got`` (any device / dtype) against a float64 oracle ``want`` with the tolerance of the
    input ``dtype`` from :data:`TOL`. ``scale`` multiplies atol (default: the oracle's magnitude,
    at least 1, so large outputs are judged relative to their size)."""
    atol, rtol = TOL[dtype]
    want = want.detach().cpu().double()
    if scale is None:
        scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.detach().cpu().double(), want, atol=atol * scale, rtol=rtol, **kw)


def to_device(args, device):
    """Tensors (also inside lists) moved to ``device``; other values unchanged."""
    if isinstance(args, torch.Tensor):
        return args.to(device)
    if isinstance(args, (list, tuple)):
        return type(args)(to_device(a, device) for a in args)
    return args


def strided(t):
    """A non-contiguous view with ``t``'s values, in every dimension (1-D tensors included): the
    values live in the first slot of an extra trailing pair, so a kernel that ignores a stride
    reads the wrong element. Lists are converted element-wise."""
    if isinstance(t, (list, tuple)):
        return type(t)(strided(u) for u in t)
    if not isinstance(t, torch.Tensor):
        return t
    pad = torch.empty(*t.shape, 2, dtype=t.dtype, device=t.device)
    pad[..., 1] = pad[..., 0].new_full((), 0) if t.dtype != torch.bool else False
    pad[..., 0] = t
    view = pad[..., 0]
    assert t.dim() == 0 or not view.is_contiguous() or t.numel() <= 1
    return view


def strided_outer(t):
    """A view with ``t``'s values whose OUTERMOST dimension is strided (every other row of a twice
    as tall buffer) and whose innermost stays contiguous: catches a kernel that derives an outer
    stride from the sizes instead of reading it (which :func:`strided` alone would not)."""
    if isinstance(t, (list, tuple)):
        return type(t)(strided_outer(u) for u in t)
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    pad = torch.zeros(2 * t.shape[0], *t.shape[1:], dtype=t.dtype, device=t.device)
    pad[::2] = t
    return pad[::2]


@contextlib.contextmanager
def value_checks_on():
    """Value checks on for CUDA tensors too (they are always on for CPU tensors; opt-in on CUDA,
    where they cost a host sync)."""
    from loramix_kernels import _backend as b

    old = b._validate_cuda_values
    b.set_value_validation(True)
    try:
        yield
    finally:
        b.set_value_validation(old)


@contextlib.contextmanager
def value_checks_off():
    """Run with the kernels' value checks switched off, as on CUDA by default: bad indices reach
    the kernels, which must mask or clamp them (no out-of-bounds access, no crash)."""
    from loramix_kernels import _backend as b

    old = b.check_values
    b.check_values = lambda t: False
    try:
        yield
    finally:
        b.check_values = old
