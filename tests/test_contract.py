"""The contract every registered op keeps, checked once for all of them.

Each family's test module provides ``sample_inputs(device) -> [(op_name, args), ...]``; here every
op registered through ``ops/_registry.py`` is run, on both backends (the reference / native CPU
kernels, and the Triton kernels: on CUDA, or under the interpreter on CPU), through:

* ``torch.library.opcheck`` (schema, fake kernel, autograd registration);
* ``torch.compile(fullgraph=True)`` with the default inductor backend, which checks that the fake
  kernel's output strides equal the real kernel's: forward, and forward + backward for the
  differentiable ops;
* strided views of every tensor argument (1-D ones included; innermost and outermost dimension
  strided) against the contiguous call: a kernel that ignores a stride reads the wrong element;
* the docstring examples of every public module (doctest), on the default backend.
"""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

import loramix_kernels
from loramix_kernels.ops._registry import OPS

from tests.common import TOL, backends, strided, strided_outer, to_device

FAMILIES = ("routed_lora", "tree", "verify", "kv", "kv_cache_ops", "lm_head", "routing", "sharding")


def _samples(device):
    out = []
    for fam in FAMILIES:
        mod = importlib.import_module(f"tests.test_{fam}")
        for name, args in getattr(mod, "sample_inputs", lambda device: [])(device):
            out.append((name, args))
    return out


def _sample_params():
    """(op name, sample index) pairs; the samples themselves are built on the test's device."""
    counts = {}
    for name, _ in _samples("cpu"):
        counts[name] = counts.get(name, 0) + 1
    return [pytest.param(n, i, id=f"{n}-{i}") for n in counts for i in range(counts[n])]


PARAMS = _sample_params()


def _get(device, name, i):
    return [a for n, a in _samples(device) if n == name][i]


def test_every_op_has_samples():
    have = {p.values[0] for p in PARAMS}
    assert set(OPS) <= have, f"ops without sample_inputs: {sorted(set(OPS) - have)}"


def _clone(args):
    if isinstance(args, torch.Tensor):
        return args.clone()
    if isinstance(args, (list, tuple)):
        return type(args)(_clone(a) for a in args)
    return args


def _results(name, args, out):
    """What a call produced: its outputs, plus the arguments it writes in place."""
    written = [args[i] for i in OPS[name].mutates]
    outs = list(out) if isinstance(out, (tuple, list)) else [] if out is None else [out]
    return _flatten(outs + written)


def _flatten(v):
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for u in v for t in _flatten(u)]
    return []


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        if g.is_floating_point():
            atol, rtol = TOL.get(g.dtype, TOL[torch.float32])
            scale = max(1.0, float(w.detach().abs().nan_to_num().max())) if w.numel() else 1.0
            torch.testing.assert_close(g.detach().cpu(), w.detach().cpu(), atol=atol * scale,
                                       rtol=rtol, equal_nan=True)
        else:
            assert torch.equal(g.cpu(), w.cpu())


@pytest.mark.parametrize("backend, device, ctx", backends())
@pytest.mark.parametrize("name, i", PARAMS)
def test_opcheck(backend, device, ctx, name, i):
    args = _get(device, name, i)
    with ctx():
        torch.library.opcheck(OPS[name].op, _clone(args))


@pytest.mark.parametrize("backend, device, ctx", backends())
@pytest.mark.parametrize("name, i", PARAMS)
@pytest.mark.parametrize("view", [strided, strided_outer], ids=["inner", "outer"])
def test_strided_views(backend, device, ctx, name, i, view):
    args = _get(device, name, i)
    with ctx():
        a = _clone(args)
        want = _results(name, a, OPS[name].op(*a))
        s = view(_clone(args))
        got = _results(name, s, OPS[name].op(*s))
    _assert_same(got, want)


def _grad_leaves(args):
    """Floating tensors (also inside lists) made leaves that require grad."""
    def leaf(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.detach().clone().requires_grad_(True)
        if isinstance(t, (list, tuple)):
            return type(t)(leaf(u) for u in t)
        return t
    return tuple(leaf(a) for a in args)


@pytest.mark.parametrize("backend, device, ctx", backends())
@pytest.mark.parametrize("name, i", PARAMS)
def test_compile_inductor(backend, device, ctx, name, i):
    """Default inductor backend (it checks output strides against the fake kernel; aot_eager does
    not): forward for every op, forward + backward for the differentiable ones."""
    args = _get(device, name, i)
    op = OPS[name].op
    differentiable = OPS[name].differentiable

    def run(fn, a):
        out = fn(*a)
        res = _results(name, a, out)
        if not differentiable:
            return res, []
        loss = sum((t.float() * torch.linspace(-1, 1, t.numel(), device=t.device).view(t.shape)).sum()
                   for t in res if t.is_floating_point())
        leaves = [t for t in _flatten(list(a)) if t.requires_grad]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return [t.detach() for t in res], [g if g is not None else torch.zeros_like(t)
                                           for g, t in zip(grads, leaves)]

    def prep():
        a = _clone(args)
        return _grad_leaves(a) if differentiable else a

    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: op(*a), fullgraph=True)
    with ctx():
        want, want_g = run(op, prep())
        got, got_g = run(compiled, prep())
    _assert_same(got, want)
    _assert_same(got_g, want_g)


DOC_MODULES = ["loramix_kernels.ops.routed_lora", "loramix_kernels.ops.tree",
               "loramix_kernels.ops.verify", "loramix_kernels.ops.kv", "loramix_kernels.ops.lm_head",
               "loramix_kernels.ops.routing", "loramix_kernels.ops.sharding",
               "loramix_kernels.losses"]


@pytest.mark.parametrize("module", DOC_MODULES)
def test_docstring_examples(module):
    """Every ``>>>`` example in the public docstrings runs as written (default backend)."""
    mod = importlib.import_module(module)
    with loramix_kernels.use_backend("auto"):
        res = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert res.attempted > 0, f"{module} has no docstring examples"
    assert res.failed == 0


def test_public_functions_exported():
    for name in (n for n in OPS if not n.endswith("_backward")):  # backward ops: autograd calls them
        assert callable(getattr(loramix_kernels, name)), name
        assert getattr(loramix_kernels, name).__doc__, f"{name} has no docstring"


def test_invalid_backend_is_an_error_at_use(monkeypatch):
    from loramix_kernels import _backend

    monkeypatch.setattr(_backend, "_backend", None)
    monkeypatch.setenv("LORAMIX_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LORAMIX_BACKEND"):
        loramix_kernels.compact_kv_(*to_device(_get("cpu", "compact_kv_", 0), "cpu"))
    monkeypatch.setattr(_backend, "_backend", None)


def test_triton_backend_without_interpreter_says_so(monkeypatch):
    from loramix_kernels import _backend

    if torch.cuda.is_available():
        pytest.skip("CUDA present: the Triton backend is valid")
    monkeypatch.setattr(_backend, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with loramix_kernels.use_backend("triton"):
            pass
