"""The CPU ops with and without their native kernels (csrc/): same outputs, same errors.

Where the C++ extension is built, the CPU ops run its kernels (kv_write_, compact_kv_,
compact_kv_layers_, tree_attention's fast path, lm_head_topk, route_topk, verify_*); without it
(``LORAMIX_NATIVE=0``, no compiler) they run the vectorised PyTorch kernels. Both are real paths,
so each is checked against the other here, on the same random valid inputs, and on invalid values
both must raise the same message (the native kernels check values in their walk and let the
Python checks name the offending entry).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from loramix_kernels import (_native, compact_kv_, compact_kv_layers_, kv_write_, lm_head_topk,
                             route_topk, tree_attention)
from tests.common import reference_path, strided
from tests.test_tree import make_attention_case

NATIVE_OPS = ("_kv_write_cpu", "_compact_kv_cpu", "_tree_attention_cpu", "_lm_head_topk_cpu",
              "_route_topk_cpu")
pytestmark = pytest.mark.skipif(not all(_native.has_op(n) for n in NATIVE_OPS),
                                reason="C++ extension not built")


@contextlib.contextmanager
def without_native():
    """The plain-PyTorch CPU kernels, as without the extension."""
    mp = pytest.MonkeyPatch()
    mp.setattr(_native, "op", lambda name: None)
    try:
        yield
    finally:
        mp.undo()


def both(fn):
    """``fn()`` with the native kernels and without them (CPU kernels, not the interpreter)."""
    with reference_path():
        a = fn()
        with without_native():
            b = fn()
    return a, b


def _kv_inputs(g, L=None, nb=12, bs=4, H=2, D=8, dtype=torch.float32):
    shape = (nb, bs, H, D) if L is None else (L, nb, bs, H, D)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("idx", [torch.int32, torch.int64])
def test_kv_write_native_equals_torch(dtype, idx):
    g = torch.Generator().manual_seed(1)
    kc, vc = _kv_inputs(g, dtype=dtype)
    T = 9
    slots = torch.randperm(kc.shape[0] * kc.shape[1], generator=g)[:T].to(idx)
    slots[3] = -1
    k = torch.randn(T, 2, 8, generator=g).to(dtype)
    v = -k

    def run(strided_inputs=False):
        kd, vd = kc.clone(), vc.clone()
        args = (k, v, slots)
        if strided_inputs:
            args = tuple(strided(t) for t in args)
        kv_write_(kd, vd, *args)
        return kd, vd

    for s in (False, True):
        a, b = both(lambda: run(s))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    bad = slots.clone()
    bad[0] = bad[1]
    for ctx in (contextlib.nullcontext, without_native):
        with reference_path(), ctx(), pytest.raises(ValueError, match="kv_write_: slot_mapping must not write"):
            kv_write_(kc.clone(), vc.clone(), k, v, bad)


@pytest.mark.parametrize("layers", [None, 3])
def test_compact_native_equals_torch(layers):
    g = torch.Generator().manual_seed(2)
    B, N, bs, mb = 3, 6, 4, 4
    kc, vc = _kv_inputs(g, L=layers, nb=B * mb + 2, bs=bs)
    table = torch.randperm(B * mb + 2, generator=g)[:B * mb].view(B, mb).to(torch.int32)
    seq = torch.tensor([9, 16, 6], dtype=torch.int32)
    acc = torch.tensor([[0, 2, 3, 5, -1, -1], [0, 1, 4, -1, -1, -1], [0, -1, -1, -1, -1, -1]])
    n = torch.tensor([3, 2, 0])
    op = compact_kv_ if layers is None else compact_kv_layers_

    def run():
        kd, vd = kc.clone(), vc.clone()
        op(kd, vd, table, seq, acc, n)
        return kd, vd

    a, b = both(run)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], kc)
    bad = acc.clone()
    bad[0, 2] = 1  # not increasing
    for ctx in (contextlib.nullcontext, without_native):
        with reference_path(), ctx(), pytest.raises(ValueError, match="accept_index.*increasing"):
            op(kc.clone(), vc.clone(), table, seq, bad, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tree_attention_native_equals_torch(dtype):
    _, args = make_attention_case(3, 7, 8, 2, 16, 8, [21, 0, 9], dtype, "random", seed=9)
    a, b = both(lambda: tree_attention(*args, 0.2))
    torch.testing.assert_close(a, b, atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=1e-3)
    bad = args[4].clone()
    bad[1] = 3  # shorter than the 7 tree nodes
    for ctx in (contextlib.nullcontext, without_native):
        with reference_path(), ctx(), pytest.raises(ValueError, match="tree_attention: seq_lens"):
            tree_attention(*args[:4], bad, args[5])


def test_lm_head_topk_and_route_topk_native_equal_torch():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(5, 16, generator=g)
    w = torch.randn(300, 16, generator=g)
    w[7] = w[3]  # a tie: the lower index first on both paths
    a, b = both(lambda: lm_head_topk(h, w, 9))
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    logits = torch.randn(6, 8, generator=g)
    logits[2, 5] = logits[2, 1]
    for renorm in (False, True):
        a, b = both(lambda: route_topk(logits, 3, renorm))
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
        torch.testing.assert_close(a[0], b[0], atol=0, rtol=2.4e-7)
