"""routed_lora_shrink / routed_lora_expand_ / routed_lora_expand (docs/API.md, "Sharding"):
Triton (interpreter on CPU) and the PyTorch kernels against an independent float64 oracle, the
identity ``routed_lora_add_ == routed_lora_expand_(routed_lora_shrink)``, gradients (gradcheck in
float64), bad inputs. The generic opcheck / compile / strided-view tests come from
tests/test_contract.py through ``sample_inputs``.
"""

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import loramix_kernels  # noqa: F401
import loramix_kernels.ops.sharding as sh
from loramix_kernels.ops.routed_lora import routed_lora, routed_lora_add_
from loramix_kernels.ops.sharding import routed_lora_expand, routed_lora_expand_, routed_lora_shrink
from loramix_kernels.reference.sharding import (expand_dense, routed_lora_expand_ref,
                                                routed_lora_shrink_ref, shrink_dense)
from tests.common import (TRITON_DEVICE, assert_close, backends, reference_path, requires_triton,
                          strided, strided_outer, triton_path, value_checks_off)


def oracle_shrink(x, lora_a, ids):
    """float64 einsum over gathered experts (independent of the reference's bmm loop)."""
    E = lora_a[0].shape[0]
    valid = ((ids >= 0) & (ids < E)).cpu()
    idc = ids.long().cpu().clamp(0, E - 1)
    r_max = max(a.shape[1] for a in lora_a)
    h = torch.zeros(len(lora_a), *ids.shape, r_max, dtype=torch.float64)
    for s, a in enumerate(lora_a):
        hs = torch.einsum("tkrd,td->tkr", a.cpu().double()[idc], x.cpu().double())
        h[s, :, :, : a.shape[1]] = hs * valid[..., None]
    return h


def oracle_expand(h, lora_b, ids, gates, scaling):
    E = lora_b[0].shape[0]
    valid = ((ids >= 0) & (ids < E)).cpu()
    idc = ids.long().cpu().clamp(0, E - 1)
    w = gates.cpu().double() * valid * scaling
    outs = []
    for s, b in enumerate(lora_b):
        r = b.shape[2]
        yk = torch.einsum("tkor,tkr->tko", b.cpu().double()[idc], h[s, :, :, :r].cpu().double())
        outs.append((yk * w[..., None]).sum(1))
    return torch.cat(outs, 1)


def make_case(T, d_in, ranks, d_outs, E, k, dtype=torch.float32, device="cpu", seed=0,
              idx_dtype=torch.int64, empty_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g)
    A = [torch.randn(E, r, d_in, generator=g) / d_in ** 0.5 for r in ranks]
    B = [torch.randn(E, o, r, generator=g) / r ** 0.5 for r, o in zip(ranks, d_outs)]
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
    ids = torch.where(torch.rand(T, k, generator=g) < empty_frac, -1, ids.long())
    gates = torch.rand(T, k, generator=g)
    cvt = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cvt(x), [cvt(a) for a in A], [cvt(b) for b in B], ids.to(device, idx_dtype), gates.to(device)


case_strategy = st.tuples(
    st.sampled_from([0, 1, 5, 33]),                          # T
    st.integers(1, 40),                                      # d_in
    st.lists(st.tuples(st.integers(1, 16), st.integers(1, 40)), min_size=1, max_size=3),  # (r, n)
    st.integers(1, 16),                                      # E
    st.integers(1, 16),                                      # k (clipped to E)
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    st.sampled_from([torch.int32, torch.int64]),
)


# ------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, device, ctx", backends())
@settings(max_examples=12)
@given(case=case_strategy)
def test_shrink_expand_match_oracle(name, device, ctx, case):
    T, d_in, rn, E, k, dtype, idt = case
    k = min(k, E)
    x, A, B, ids, g = make_case(T, d_in, [r for r, _ in rn], [n for _, n in rn], E, k, dtype, device,
                                idx_dtype=idt)
    with ctx():
        h = routed_lora_shrink(x, A, ids)
        assert h.dtype == torch.float32 and h.shape == (len(A), T, k, max(r for r, _ in rn))
        assert_close(h, oracle_shrink(x, A, ids), dtype)
        base = torch.randn(T, sum(n for _, n in rn)).to(device, dtype)
        out = routed_lora_expand_(base.clone(), h, B, ids, g, 0.75)
        want = oracle_expand(h, B, ids, g, 0.75)
        assert_close(out, want + base.cpu().double(), dtype)
        y = routed_lora_expand(h, B, ids, g, 0.75)
        assert y.dtype == dtype and y.is_contiguous()
        assert_close(y, want, dtype)


@pytest.mark.parametrize("name, device, ctx", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T, ranks, d_outs, E, k", [
    (5, [4, 16, 3], [24, 8, 8], 6, 3),           # packed q/k/v, unequal ranks and widths
    (33, [8], [20], 16, 16),                     # dense k = E
    (9, [5, 6, 7, 2], [8, 9, 10, 11], 5, 1),     # 4 slices: two launches; k = 1 (no atomics)
])
def test_add_equals_expand_of_shrink(name, device, ctx, dtype, T, ranks, d_outs, E, k):
    """routed_lora_add_(out, x, ...) == routed_lora_expand_(out, routed_lora_shrink(x, ...), ...)."""
    x, A, B, ids, g = make_case(T, 24, ranks, d_outs, E, k, dtype, device)
    base = torch.randn(T, sum(d_outs)).to(device, dtype)
    with ctx():
        want = routed_lora_add_(base.clone(), x, A, B, ids, g, 0.5)
        got = routed_lora_expand_(base.clone(), routed_lora_shrink(x, A, ids), B, ids, g, 0.5)
        # and the functional pair equals routed_lora
        y = routed_lora_expand(routed_lora_shrink(x, A, ids), B, ids, g, 0.5)
        ref = routed_lora(x, A, B, ids, g, 0.5)
    assert_close(got, want.double(), dtype)
    assert_close(y, ref.double(), dtype)


@requires_triton
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_expand_out_dtype_and_strides(out_dtype):
    """out of another float dtype than the weights, and strided views of every argument."""
    x, A, B, ids, g = make_case(7, 20, [4, 8], [12, 6], 5, 2, torch.bfloat16, TRITON_DEVICE)
    h = routed_lora_shrink(strided(x), strided(A), strided(ids))
    assert_close(h, oracle_shrink(x, A, ids), torch.bfloat16)
    base = torch.randn(7, 18).to(TRITON_DEVICE, out_dtype)
    with triton_path():
        out = routed_lora_expand_(strided(base.clone()), strided(h), strided(B), strided(ids), strided(g), 2.0)
    assert_close(out, oracle_expand(h, B, ids, g, 2.0) + base.cpu().double(), torch.bfloat16)


@requires_triton
@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 2])
def test_triton_splits(splits, k):
    """d_in chunks of the shrink (fp32 atomics into h) and column shares of the expand give the
    same result, across two launches of slice groups (4 slices)."""
    x, A, B, ids, g = make_case(9, 100, [8, 4, 16, 2], [40, 24, 33, 7], 6, k, torch.bfloat16, TRITON_DEVICE)
    h = sh.routed_lora_shrink_triton(x, A, ids, splits=splits)
    assert_close(h, oracle_shrink(x, A, ids), torch.bfloat16)
    out = torch.zeros(9, 104, device=TRITON_DEVICE)
    sh.routed_lora_expand_inplace_triton(out, h, B, ids, g, 0.5, splits=splits)
    assert_close(out, oracle_expand(h, B, ids, g, 0.5), torch.bfloat16)


def test_autocast_keeps_h_fp32():
    """Under autocast x / lora_a / lora_b run in the autocast dtype, h stays fp32, gates as given,
    and fp32 master weights get fp32 gradients."""
    x, A, B, ids, g = make_case(6, 16, [4], [8], 4, 2, torch.float32)
    A = [a.requires_grad_(True) for a in A]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = routed_lora_shrink(x, A, ids)
        y = routed_lora_expand(h, B, ids, g, 0.5)
    assert h.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert_close(y, oracle_expand(oracle_shrink(x, A, ids), B, ids, g, 0.5), torch.bfloat16)
    y.float().sum().backward()
    assert A[0].grad.dtype == torch.float32


def test_dense_forms_match_reference():
    x, A, B, ids, g = make_case(11, 16, [3, 5], [7, 4], 6, 3, torch.float64)
    h = routed_lora_shrink_ref(x, A, ids)
    torch.testing.assert_close(shrink_dense(x, A, ids), h)
    torch.testing.assert_close(expand_dense(h, B, ids, g, 0.3), routed_lora_expand_ref(h, B, ids, g, 0.3))
    torch.testing.assert_close(h, oracle_shrink(x, A, ids))


def test_expand_isolation_cpu():
    """An unused expert's inf in B does not reach a token (the dense CPU form falls back)."""
    x, A, B, ids, g = make_case(4, 8, [2], [5], 4, 1, torch.float32, empty_frac=0)
    ids = torch.tensor([[0], [1], [0], [-1]])
    B[0][3, 0, 0] = float("inf")
    y = routed_lora_expand(routed_lora_shrink(x, A, ids), B, ids, g)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("form", ["gathered", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("checked", [True, False])
@settings(max_examples=8, deadline=None)
@given(T=st.sampled_from([1, 2, 7]), d_in=st.integers(1, 24),
       rn=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 20)), min_size=1, max_size=3),
       E=st.integers(1, 12), k=st.integers(1, 4), idx_dtype=st.sampled_from([torch.int32, torch.int64]),
       seed=st.integers(0, 99))
def test_cpu_forms_match_reference(form, dtype, checked, T, d_in, rn, E, k, idx_dtype, seed):
    """Both CPU formulations (the gathered per-slot one for decode, the dense one for prefill),
    called directly whatever the size would pick, against the per-slot reference: -1 padding
    slots, strided inputs, unequal ranks, int32 / int64 ids; ``checked=False``: unvalidated ids
    (out of range, as on CUDA) count as empty slots."""
    ranks, d_outs = [r for r, _ in rn], [n for _, n in rn]
    k = min(k, E)
    x, A, B, ids, g = make_case(T, d_in, ranks, d_outs, E, k, dtype, seed=seed, idx_dtype=idx_dtype)
    if not checked:
        ids = ids.clone()
        ids[0, 0] = E + 3
        ids[-1, -1] = -5
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    shrink = sh._shrink_gathered if form == "gathered" else sh._shrink_dense_cpu
    expand = sh._expand_gathered if form == "gathered" else sh._expand_dense_cpu
    xs, As, Bs, idss, gs = strided(x), strided(A), strided(B), strided(ids), strided(g)
    with (contextlib.nullcontext() if checked else value_checks_off()):
        h = shrink(xs, As, idss, acc)
        y = expand(strided(h), Bs, idss, gs, 0.7, acc)
    h_ref = routed_lora_shrink_ref(x, A, ids)
    assert h.dtype == h_ref.dtype and h.shape == h_ref.shape
    torch.testing.assert_close(h, h_ref, atol=1e-5 if acc == torch.float32 else 1e-12, rtol=1e-5)
    torch.testing.assert_close(y, routed_lora_expand_ref(h_ref, B, ids, g, 0.7),
                               atol=1e-5 if acc == torch.float32 else 1e-12, rtol=1e-5)
    if form == "gathered":  # in place into a strided out of the accumulation dtype
        base = torch.randn(T, sum(d_outs), dtype=acc)
        out = strided(base)
        with (contextlib.nullcontext() if checked else value_checks_off()):
            assert sh._expand_gathered(strided(h), Bs, idss, gs, 0.7, acc, out) is None
        torch.testing.assert_close(out, base + routed_lora_expand_ref(h_ref, B, ids, g, 0.7),
                                   atol=1e-5 if acc == torch.float32 else 1e-12, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 9])  # the gathered (T * k < E) and the dense CPU form
def test_cpu_forms_isolation_and_nan_gates(T):
    """An unused expert's inf in A or B, and a NaN gate on an empty slot, reach no token."""
    x, A, B, ids, g = make_case(T, 8, [2], [5], 6, 1, torch.float32, empty_frac=0)
    ids = torch.tensor([[0], [1], [0], [-1], [2], [1], [0], [-1], [1]])[:T]
    A[0][3, 0, 0] = float("inf")
    B[0][3, 0, 0] = float("inf")
    B[0][0, 1, 1] = float("nan") if T == 9 else B[0][0, 1, 1]  # expert 0 routed at T = 9 only
    g = g.clone()
    g[ids < 0] = float("nan")
    h = routed_lora_shrink(x, A, ids)
    assert torch.isfinite(h).all()
    y = routed_lora_expand(h, B, ids, g)
    want = routed_lora_expand_ref(h, B, ids, g, 1.0)
    torch.testing.assert_close(y, want, equal_nan=True)
    assert torch.isfinite(y[ids[:, 0] != 0]).all()


LAYOUTS = {"contiguous": lambda t: t, "strided": strided, "outer": strided_outer}


@settings(max_examples=25, deadline=None)
@given(T=st.sampled_from([1, 2, 5, 40]), d_in=st.integers(1, 24),
       rn=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 20)), min_size=1, max_size=3),
       E=st.integers(1, 12), k=st.integers(1, 4),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
       idx_dtype=st.sampled_from([torch.int32, torch.int64]), empty=st.booleans(),
       layout=st.sampled_from(sorted(LAYOUTS)), seed=st.integers(0, 99))
def test_cpu_fast_entry_matches_reference(T, d_in, rn, E, k, dtype, idx_dtype, empty, layout, seed):
    """The CPU fast entry of the three ops (the registry's ``checked_cpu``: the validator's checks
    in one pass, the ids read once, unmasked kernels when every slot is valid) is taken for valid
    inputs, contiguous or not, with and without -1 slots, both CPU forms (T * k < E or not), ids
    read as a list (few) or through aminmax, and gives the per-slot reference's h, y and
    out += y (out of the accumulation dtype, added in place, or bf16); the public functions on
    CPU give the same."""
    ranks, d_outs = [r for r, _ in rn], [n for _, n in rn]
    k = min(k, E)
    x, A, B, ids, g = make_case(T, d_in, ranks, d_outs, E, k, dtype, seed=seed, idx_dtype=idx_dtype,
                                empty_frac=0.25 if empty else 0.0)
    view = LAYOUTS[layout]
    xs, As, Bs, idss, gs = view(x), view(A), view(B), view(ids), view(g)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = dict(atol=1e-5 if acc == torch.float32 else 1e-12, rtol=1e-5)

    h = sh._shrink_checked(xs, As, idss)
    assert h is not NotImplemented
    h_ref = routed_lora_shrink_ref(x, A, ids)
    assert h.dtype == acc and h.shape == h_ref.shape and h.is_contiguous()
    torch.testing.assert_close(h, h_ref, **tol)

    y_ref = routed_lora_expand_ref(h_ref, B, ids, g, 0.7)
    y = sh._expand_checked(view(h), Bs, idss, gs, 0.7)
    assert y is not NotImplemented and y.dtype == dtype and y.is_contiguous()
    assert_close(y, y_ref, dtype) if dtype != torch.float64 else torch.testing.assert_close(y, y_ref, **tol)
    for out_dtype in (acc, torch.bfloat16):
        base = torch.randn(T, sum(d_outs), dtype=acc).to(out_dtype)
        out = view(base.clone())
        assert sh._expand_inplace_checked(out, view(h), Bs, idss, gs, 0.7) is None
        if out_dtype == acc:
            torch.testing.assert_close(out, base + y_ref, **tol)
        else:
            assert_close(out, base.double() + y_ref, torch.bfloat16)

    with reference_path():
        torch.testing.assert_close(routed_lora_shrink(xs, As, idss), h, atol=0, rtol=0)
        torch.testing.assert_close(routed_lora_expand(view(h), Bs, idss, gs, 0.7), y, atol=0, rtol=0)
        out = view(base.clone())
        assert routed_lora_expand_(out, view(h), Bs, idss, gs, 0.7) is out
        assert_close(out, base.double() + y_ref, torch.bfloat16)


@pytest.mark.parametrize("T", [1, 40])  # ids read as a list / through aminmax
def test_cpu_fast_entry_hands_over(T):
    """What the fast entry does not accept goes to the validator (it names the error) or, values
    unchecked (as on CUDA), to the general kernel: out-of-range ids count as empty slots."""
    x, A, B, ids, g = make_case(T, 8, [2, 3], [5, 4], 4, 2, empty_frac=0)
    h = routed_lora_shrink_ref(x, A, ids)
    bad = ids.clone()
    bad[0, 0], bad[-1, -1] = 4, -2
    assert sh._shrink_checked(x, A, bad) is NotImplemented
    assert sh._expand_checked(h, B, bad, g, 1.0) is NotImplemented
    assert sh._expand_inplace_checked(torch.zeros(T, 9), h, B, bad, g, 1.0) is NotImplemented
    with reference_path():
        with pytest.raises(ValueError, match=r"routed_lora_shrink: expert_ids entries must lie in \[-1, 4\)"):
            routed_lora_shrink(x, A, bad)
        with pytest.raises(ValueError, match=r"routed_lora_expand_: expert_ids entries must lie"):
            routed_lora_expand_(torch.zeros(T, 9), h, B, bad, g)
        with value_checks_off():
            torch.testing.assert_close(routed_lora_shrink(x, A, bad), routed_lora_shrink_ref(x, A, bad))
            torch.testing.assert_close(routed_lora_expand(h, B, bad, g, 0.5),
                                       routed_lora_expand_ref(h, B, bad, g, 0.5))
    # an out whose bytes meet an input's: the validator decides (here: they do share memory)
    buf = torch.zeros(h.numel() + T * 9)
    hb = buf[:h.numel()].view_as(h)
    hb.copy_(h)
    out = buf[h.numel() - 1:h.numel() - 1 + T * 9].view(T, 9)
    assert sh._expand_inplace_checked(out, hb, B, ids, g, 1.0) is NotImplemented
    with reference_path(), pytest.raises(ValueError, match="routed_lora_expand_: out is written in place "
                                                            "and must not share memory with h"):
        routed_lora_expand_(out, hb, B, ids, g)
    # two halves of one allocation do not meet: accepted by the fast entry
    pair = torch.zeros(2, T, 9)
    assert sh._expand_inplace_checked(pair[0], h, B, ids, g, 1.0) is None


# ------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------


def test_gradcheck_shrink():
    x, A, B, ids, g = make_case(5, 6, [2, 3], [4, 3], 4, 2, torch.float64)
    x.requires_grad_(True)
    A = [a.requires_grad_(True) for a in A]
    assert torch.autograd.gradcheck(lambda x, a0, a1: routed_lora_shrink(x, [a0, a1], ids), (x, *A))


def test_gradcheck_expand():
    x, A, B, ids, g = make_case(5, 6, [2, 3], [4, 3], 4, 2, torch.float64)
    h = routed_lora_shrink(x, A, ids).requires_grad_(True)
    B = [b.requires_grad_(True) for b in B]
    g = g.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda h, b0, b1, g: routed_lora_expand(h, [b0, b1], ids, g, 0.7),
                                    (h, *B, g))


@pytest.mark.parametrize("name, device, ctx", backends())
def test_chain_grads_equal_routed_lora(name, device, ctx):
    """expand(shrink(x)) has routed_lora's gradients (fp32), partial needs included."""
    x, A, B, ids, g = make_case(6, 12, [3, 4], [5, 6], 5, 2, torch.float32, device)
    leaves = [x, *A, *B, g]
    grads = []
    for f in (lambda: routed_lora_expand(routed_lora_shrink(x, A, ids), B, ids, g, 0.5),
              lambda: routed_lora(x, A, B, ids, g, 0.5)):
        for t in leaves:
            t.grad = None
            t.requires_grad_(True)
        with ctx():
            y = f()
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y).to(device))
        grads.append([t.grad.clone() for t in leaves])
    for a, b in zip(*grads):
        assert_close(a, b.double(), torch.float32)
    # frozen weights: no gradient asked, none given
    with ctx():
        y = routed_lora_expand(routed_lora_shrink(x, [a.detach() for a in A], ids), [b.detach() for b in B],
                               ids, g.detach(), 0.5)
    x.grad = None
    y.sum().backward()
    assert x.grad is not None


# ------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, device, ctx", backends())
def test_bad_inputs(name, device, ctx):
    """Every bad input raises the validator's error, on the CPU path too (where the fast entry
    hands it over to the validator)."""
    x, A, B, ids, g = make_case(4, 8, [2, 3], [5, 4], 4, 2, device=device)
    h = routed_lora_shrink(x, A, ids)
    cases = [
        (lambda: routed_lora_shrink(x.half(), A, ids), TypeError, "routed_lora_shrink: lora_a[0]"),
        (lambda: routed_lora_shrink(x, [], ids), ValueError, "routed_lora_shrink: lora_a"),
        (lambda: routed_lora_shrink(x, [A[0][:3], A[1]], ids), ValueError, "routed_lora_shrink: lora_a[1]"),
        (lambda: routed_lora_shrink(x, A, ids.float()), TypeError, "routed_lora_shrink: expert_ids"),
        (lambda: routed_lora_shrink(x, A, ids[:3]), ValueError, "routed_lora_shrink: expert_ids"),
        (lambda: routed_lora_shrink(x, A, ids + 4), ValueError, "routed_lora_shrink: expert_ids"),
        (lambda: routed_lora_expand(h.half(), B, ids, g), TypeError, "routed_lora_expand: h"),
        (lambda: routed_lora_expand(h[:1], B, ids, g), ValueError, "routed_lora_expand: h"),
        (lambda: routed_lora_expand(h[..., :2], B, ids, g), ValueError, "routed_lora_expand: h"),
        (lambda: routed_lora_expand(h, [B[0], B[1].half()], ids, g), TypeError, "routed_lora_expand: lora_b[1]"),
        (lambda: routed_lora_expand(h, B, ids, g[:, :1]), ValueError, "routed_lora_expand: gates"),
        (lambda: routed_lora_expand(h, B, ids, g, float("nan")), ValueError, "routed_lora_expand: scaling"),
        (lambda: routed_lora_expand(h, B, ids - 2, g), ValueError, "routed_lora_expand: expert_ids"),
        (lambda: routed_lora_expand_(torch.zeros(4, 8), h, B, ids, g), ValueError, "routed_lora_expand_: out"),
        (lambda: routed_lora_expand_(torch.zeros(1, 9).expand(4, 9), h, B, ids, g), ValueError,
         "routed_lora_expand_: out"),
        (lambda: routed_lora_expand_(torch.zeros(4, 9, dtype=torch.int32), h, B, ids, g), TypeError,
         "routed_lora_expand_: out"),
    ]
    gw = torch.zeros(4, 9, device=device)
    cases.append((lambda: routed_lora_expand_(gw[:, :2], h, B, ids, gw[:, 2:4]), ValueError,
                  "routed_lora_expand_: out"))  # shape first
    alias = torch.zeros(4, 11, device=device)
    cases.append((lambda: routed_lora_expand_(alias[:, :9], h, B, ids, alias[:, 8:10]), ValueError,
                  "routed_lora_expand_: out is written in place and must not share memory with gates"))
    bb = torch.zeros(4 * 5 * 2 + 4 * 9, device=device)
    b_alias = [bb[:40].view(4, 5, 2), B[1]]
    cases.append((lambda: routed_lora_expand_(bb[36:72].view(4, 9), h, b_alias, ids, g), ValueError,
                  "routed_lora_expand_: out is written in place and must not share memory with lora_b[0]"))
    cases.append((lambda: routed_lora_expand(h, [B[0], B[1]], ids, g.to(torch.int32)), TypeError,
                  "routed_lora_expand: gates"))
    cases.append((lambda: routed_lora_expand(h, [B[0]], ids, g), ValueError, "routed_lora_expand: h"))
    cases.append((lambda: routed_lora_shrink(x, [A[0], A[1].double()], ids), TypeError,
                  "routed_lora_shrink: lora_a[1]"))
    cases.append((lambda: routed_lora_shrink(x, A, ids[:, :, None]), ValueError,
                  "routed_lora_shrink: expert_ids"))
    cases.append((lambda: routed_lora_expand(h[:0], [], ids, g), ValueError, "routed_lora_expand: lora_b"))
    cases.append((lambda: routed_lora_expand_(torch.zeros(4, 0, device=device), h[:0], [], ids, g), ValueError,
                  "routed_lora_expand_: lora_b"))
    for i, (f, exc, msg) in enumerate(cases):
        with ctx(), pytest.raises(exc, match=msg.replace("[", r"\[").replace("]", r"\]")):
            f()


# ------------------------------------------------------------------------------------------
# for tests/test_contract.py
# ------------------------------------------------------------------------------------------


def sample_inputs(device):
    """(op name, args) for every op of the family: packed slices with unequal ranks, empty slots,
    fp32 / bf16, k = 1 and k > 1, T = 0."""
    out = []
    for dtype, (T, d_in, ranks, d_outs, E, k) in [
        (torch.float32, (6, 16, [4, 2], [8, 6], 4, 2)),
        (torch.bfloat16, (5, 12, [3], [10], 6, 1)),
        (torch.float32, (0, 8, [2], [4], 3, 2)),
    ]:
        x, A, B, ids, g = make_case(T, d_in, ranks, d_outs, E, k, dtype, device)
        h = oracle_shrink(x, A, ids).float().to(device)
        out.append(("routed_lora_shrink", (x, A, ids)))
        out.append(("routed_lora_expand", (h, B, ids, g, 0.5)))
        out.append(("routed_lora_expand_", (torch.randn(T, sum(d_outs), device=device).to(dtype),
                                            h, B, ids, g, 0.5)))
    return out
