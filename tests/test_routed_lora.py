"""routed_lora / routed_lora_add_: correctness (reference vs float64 oracle, Triton vs oracle over
hypothesis-drawn shapes, both strategies), gradients, opcheck, compile, bad input, OOB safety.

Tolerances (see tests/common.py TOL, against a float64 oracle, scaled by the output magnitude):
fp32 1e-4, fp16 2e-2, bf16 6e-2 absolute on O(1) outputs. The kernels accumulate in fp32; the
gap for half types is the rounding of the gated shrink result to the weights' dtype before the
expand (as every LoRA kernel does) plus the final rounding of y.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import loramix_kernels  # noqa: F401
from loramix_kernels import _backend
from loramix_kernels.ops import routed_lora as rl
from loramix_kernels.reference.routed_lora import (
    dense_pack, routed_lora_backward_dense, routed_lora_backward_ref, routed_lora_dense, routed_lora_ref)
from loramix_kernels.bench.bench_routed_lora import routed_lora_two_launch
from tests.common import (TOL, TRITON_DEVICE, assert_close, backends, reference_path, requires_cuda,
                          requires_triton, strided, to_device, triton_path)

STRATEGIES = ["token_major", "expert_sorted", "dense_gemm"]


def oracle(x, lora_a, lora_b, ids, gates, scaling):
    """Independent float64 formulation (per-slot gathers and einsum), differentiable."""
    E = lora_a[0].shape[0]
    valid = (ids >= 0) & (ids < E)
    idc = ids.long().clamp(0, E - 1)
    w = gates.double() * valid
    x64 = x.double()
    outs = []
    for a, b in zip(lora_a, lora_b):
        h = torch.einsum("tkrd,td->tkr", a.double()[idc], x64)
        yk = torch.einsum("tkor,tkr->tko", b.double()[idc], h)
        outs.append(scaling * (yk * w[..., None]).sum(1))
    return torch.cat(outs, 1) if outs else x64.new_zeros(x.shape[0], 0)


def make_case(T, d_in, ranks, d_outs, E, k, dtype=torch.float32, device="cpu", empty_frac=0.2,
              seed=0, noncontig=False, dense=False, idx_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, d_in * (2 if noncontig else 1), generator=g).to(device=device, dtype=dtype)
    x = xs[:, ::2] if noncontig else xs
    if noncontig:  # weights as transposed views too (strides are passed to the kernels)
        lora_a = [torch.randn(E, d_in, r, generator=g).transpose(1, 2) / d_in ** 0.5 for r in ranks]
        lora_b = [torch.randn(o, E, r, generator=g).transpose(0, 1) / r ** 0.5 for r, o in zip(ranks, d_outs)]
    else:
        lora_a = [torch.randn(E, r, d_in, generator=g) / d_in ** 0.5 for r in ranks]
        lora_b = [torch.randn(E, o, r, generator=g) / r ** 0.5 for r, o in zip(ranks, d_outs)]
    if dense:
        ids = torch.arange(E).repeat(T, 1)[:, :k]
    else:
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
        ids = torch.where(torch.rand(T, k, generator=g) < empty_frac, -1, ids.long())
    gates = torch.rand(T, k, generator=g)
    cvt = lambda t: t.to(device=device, dtype=dtype) if t.device.type != device or t.dtype != dtype else t  # noqa: E731
    return (cvt(x), [cvt(a) for a in lora_a], [cvt(b) for b in lora_b],
            ids.to(device=device, dtype=idx_dtype), gates.to(device))


# ------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T, d_in, ranks, d_outs, E, k", [
    (0, 32, [8], [16], 4, 2),
    (1, 32, [8], [16], 4, 2),
    (5, 123, [7, 16, 3], [123, 40, 17], 6, 3),
    (33, 64, [16], [64], 8, 8),
    (17, 20, [1], [5], 64, 64),
])
def test_reference_matches_oracle(dtype, T, d_in, ranks, d_outs, E, k):
    args = make_case(T, d_in, ranks, d_outs, E, k, dtype=dtype)
    y = routed_lora_ref(*args, 0.5)
    assert y.dtype == dtype and y.shape == (T, sum(d_outs))
    assert_close(y, oracle(*args, 0.5), dtype)


@requires_triton
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T, d_in, ranks, d_outs, E, k, dense", [
    (1, 64, [16], [64], 8, 2, False),            # decode, one token
    (37, 70, [4, 16, 3], [50, 20, 33], 6, 3, False),  # packed q/k/v, unequal widths and ranks
    (20, 24, [8], [40], 6, 6, True),             # dense soft routing k = E
    (19, 40, [5, 6, 7, 9], [8, 9, 10, 11], 5, 2, False),  # 4 slices: two launches of <= 3
])
def test_triton_matches_oracle(strategy, dtype, T, d_in, ranks, d_outs, E, k, dense):
    args = make_case(T, d_in, ranks, d_outs, E, k, dtype=dtype, device=TRITON_DEVICE, dense=dense)
    y = rl.routed_lora_triton(*args, 0.75, strategy=strategy)
    assert y.dtype == dtype and y.shape == (T, sum(d_outs))
    assert_close(y, oracle(*to_device(args, "cpu"), 0.75), dtype)


@requires_triton
@pytest.mark.parametrize("strategy", ["token_major", "expert_sorted"])
@pytest.mark.parametrize("splits", [(1, 1), (3, 1), (1, 3), (2, 2)])
@pytest.mark.parametrize("k, out_dtype", [(1, None), (2, None), (1, torch.float32), (2, torch.bfloat16)])
@pytest.mark.parametrize("ranks", [[8, 4, 16], [8, 4, 16, 2]])
def test_triton_splits(strategy, splits, k, out_dtype, ranks):
    """Column shares (NSPLIT) and decode split-K (KSPLIT, fp32 atomics) give the same result, for
    y and for out += y with fp32 and bf16 outputs, also across two launches of slice groups."""
    dtype = torch.bfloat16
    d_outs = [40, 24, 33, 7][: len(ranks)]
    args = make_case(9, 100, ranks, d_outs, 6, k, dtype=dtype, device=TRITON_DEVICE)
    cpu = to_device(args, "cpu")
    expect = oracle(*cpu, 0.5)
    if out_dtype is None:
        y = rl.routed_lora_triton(*args, 0.5, strategy=strategy, splits=splits)
    else:
        base = torch.randn(9, sum(d_outs), device=TRITON_DEVICE).to(out_dtype)
        y = rl.routed_lora_triton(*args, 0.5, out=base.clone(), strategy=strategy, splits=splits)
        expect = expect + base.cpu().double()
    assert_close(y, expect, dtype)


@requires_triton
@settings(max_examples=80)
@given(
    T=st.sampled_from([0, 1, 2, 7, 16, 17, 40]),
    d_in=st.integers(1, 80),
    slices=st.lists(st.tuples(st.sampled_from([1, 2, 3, 8, 16, 31, 64]), st.integers(1, 70)),
                    min_size=1, max_size=3),
    E=st.sampled_from([1, 2, 6, 8, 13, 64]),
    k_frac=st.floats(0, 1),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    strategy=st.sampled_from(STRATEGIES + [None]),
    noncontig=st.booleans(),
    idx_dtype=st.sampled_from([torch.int32, torch.int64]),
    seed=st.integers(0, 2 ** 16),
    splits=st.sampled_from([None, (1, 1), (2, 3)]),
)
def test_triton_hypothesis(T, d_in, slices, E, k_frac, dtype, strategy, noncontig, idx_dtype, seed, splits):
    ranks = [r for r, _ in slices]
    d_outs = [o for _, o in slices]
    k = max(1, round(k_frac * E))
    if strategy == "token_major" and max(E * r for r in ranks) > 256:
        strategy = "expert_sorted"  # keep interpreter register tiles small
    args = make_case(T, d_in, ranks, d_outs, E, k, dtype=dtype, device=TRITON_DEVICE, seed=seed,
                     noncontig=noncontig, idx_dtype=idx_dtype)
    y = rl.routed_lora_triton(*args, 1.5, strategy=strategy, splits=splits)
    cpu = to_device(args, "cpu")
    assert_close(y, oracle(*cpu, 1.5), dtype)


@pytest.mark.parametrize("name, device, ctx", backends())
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_add_inplace(name, device, ctx, out_dtype):
    args = make_case(9, 48, [8, 4], [32, 16], 6, 2, dtype=torch.bfloat16, device=device)
    base = torch.randn(9, 48, device=device).to(out_dtype)
    out = base.clone()
    with ctx():
        ret = torch.ops.loramix.routed_lora_add_(out, *args, 2.0)
    assert ret is None
    cpu = to_device(args, "cpu")
    expect = base.cpu().double() + oracle(*cpu, 2.0)
    assert_close(out, expect, torch.bfloat16)


@pytest.mark.parametrize("name, device, ctx", backends())
@pytest.mark.parametrize("E, ranks, k", [(8, [8, 8, 4], 3), (64, [16], 2), (40, [8], 40)])
def test_op_dispatch_both_backends(name, device, ctx, E, ranks, k):
    """Through torch.ops on each backend, whichever strategy the shape selects."""
    args = make_case(12, 40, ranks, [40, 16, 16][: len(ranks)], E, k, device=device)
    with ctx():
        y = torch.ops.loramix.routed_lora(*args, 0.25)
    cpu = to_device(args, "cpu")
    assert_close(y, oracle(*cpu, 0.25), torch.float32)


def test_choose_strategy():
    assert rl.choose_strategy(8, [16]) == "token_major"
    assert rl.choose_strategy(8, [16, 16, 16]) == "token_major"      # 3 x 128 rows
    assert rl.choose_strategy(6, [16, 16, 16]) == "token_major"
    assert rl.choose_strategy(64, [16], k=3) == "expert_sorted"       # 1024 rows, sparse
    assert rl.choose_strategy(8, [64], k=2) == "expert_sorted"
    assert rl.choose_strategy(64, [16], k=64) == "dense_gemm"         # soft routing, large E*r
    assert rl.choose_strategy(64, [64], k=32) == "dense_gemm"
    assert rl.choose_strategy(64, [1], k=64) == "token_major"
    assert rl.choose_strategy(4, [64, 64, 64], k=2) == "token_major"   # 256 rows per slice
    assert rl.choose_strategy(16, [16, 32], k=2) == "expert_sorted"    # 512 rows in one slice


def test_dense_baseline_matches_oracle():
    args = make_case(10, 32, [8, 4], [16, 8], 6, 2)
    x, A, B, ids, g = args
    y = routed_lora_dense(x, dense_pack(A, B), ids, g, 0.5)
    assert_close(y, oracle(*args, 0.5), torch.float32)


@requires_triton
def test_two_launch_baseline_matches_oracle():
    args = make_case(21, 40, [8, 4], [24, 8], 6, 3, device=TRITON_DEVICE)
    y = routed_lora_two_launch(*args, 0.5)
    cpu = to_device(args, "cpu")
    assert_close(y, oracle(*cpu, 0.5), torch.float32)


@requires_triton
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_out_of_range_ids_never_read_out_of_bounds(monkeypatch, strategy):
    """With validation switched off (as on CUDA / in graph capture), ids outside [0, E) are empty slots."""
    x, A, B, ids, g = make_case(11, 32, [8], [24], 4, 3, device=TRITON_DEVICE, empty_frac=0.0)
    bad = ids.clone()
    bad[0, 0], bad[3, 1], bad[5, 2], bad[7, 0] = 4, 1 << 20, -7, -(1 << 30)
    bad[8, 1] = (1 << 32) + 2  # must not wrap to expert 2 in a 32-bit compare
    monkeypatch.setattr(_backend, "check_values", lambda t: False)
    y = rl.routed_lora_triton(x, A, B, bad, g, 1.0, strategy=strategy)
    masked = torch.where((bad >= 0) & (bad < 4), bad, -1)
    cpu = [t.cpu() for t in (x,)] + [[t.cpu() for t in A], [t.cpu() for t in B], masked.cpu(), g.cpu()]
    assert_close(y, oracle(*cpu, 1.0), torch.float32)


# ------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, device, ctx", backends())
def test_gradients_match_oracle(name, device, ctx):
    args = make_case(13, 24, [4, 8], [16, 8], 5, 3, device=device)
    x, A, B, ids, g = args
    leaves = [x, *A, *B, g]
    for t in leaves:
        t.requires_grad_(True)
    dy = torch.randn(13, 24, device=device)
    with ctx():
        y = torch.ops.loramix.routed_lora(x, A, B, ids, g, 0.5)
    grads = torch.autograd.grad(y, leaves, dy)
    cpu = [t.detach().cpu().double().requires_grad_(True) for t in leaves]
    xo, Ao, Bo, go = cpu[0], cpu[1:3], cpu[3:5], cpu[5]
    yo = oracle(xo, Ao, Bo, ids.cpu(), go, 0.5)
    expect = torch.autograd.grad(yo, [xo, *Ao, *Bo, go], dy.cpu().double())
    for got, exp in zip(grads, expect):
        assert_close(got, exp, torch.float32)


@pytest.mark.parametrize("fn", [routed_lora_backward_ref, routed_lora_backward_dense])
@pytest.mark.parametrize("E, k, dup", [(5, 3, False), (4, 4, False), (6, 3, True)])
def test_backward_formulations_match_oracle(fn, E, k, dup):
    x, A, B, ids, g = make_case(11, 20, [4, 8, 2], [16, 8, 5], E, k)
    if dup:  # the same expert in two slots of a token: gates add up, each slot gets its own grad
        ids[:, 1] = ids[:, 0]
    dy = torch.randn(11, 29)
    got = fn(dy, x, A, B, ids, g, 0.7)
    leaves = [t.double().requires_grad_(True) for t in (x, *A, *B, g)]
    yo = oracle(leaves[0], leaves[1:4], leaves[4:7], ids, leaves[7], 0.7)
    expect = torch.autograd.grad(yo, leaves, dy.double())
    flat = [got[0], *got[1], *got[2], got[3]]
    for a, b in zip(flat, expect):
        assert_close(a, b, torch.float32)


def test_backward_ref_direct_bf16():
    x, A, B, ids, g = make_case(7, 16, [4], [8], 3, 2, dtype=torch.bfloat16)
    gx, ga, gb, gg = routed_lora_backward_ref(torch.randn(7, 8).bfloat16(), x, A, B, ids, g, 1.0)
    assert gx.dtype == torch.bfloat16 and ga[0].dtype == torch.bfloat16 and gg.dtype == g.dtype


def _isolation_cases():
    """(name, dict of x, A, B, ids, g, dy): non-finite values a token / an expert must not see. Two
    slices (column offsets of dy / dB, A's bad columns OR-ed over slices); expert 3 is routed only
    by token 3, expert 2 by nobody."""
    x, A, B, ids, g = make_case(8, 16, [4, 3], [8, 6], 4, 2, empty_frac=0.0, seed=3)
    ids = torch.where(ids >= 2, 1 - (ids == 3).long(), ids)  # experts 0 / 1 only ...
    ids[3, 0] = 3  # ... but token 3 also routes to expert 3
    ids[6, 1] = -1  # an empty slot
    dy = torch.randn(8, 14, generator=torch.Generator().manual_seed(5))
    base = dict(x=x, A=A, B=B, ids=ids, g=g, dy=dy)

    def case(name, **edits):
        c = {k: ([t.clone() for t in v] if isinstance(v, list) else v.clone()) for k, v in base.items()}
        for key, fn in edits.items():
            fn(c[key])
        return (name, c)

    def put(idx, val):
        def fn(t):
            t[idx] = val
        return fn

    def put_slice(s, idx, val):
        def fn(ts):
            ts[s][idx] = val
        return fn

    inf, nan = float("inf"), float("nan")
    cases = [
        case("inf-in-x-row", x=put((5, 2), inf)),
        case("nan-row-in-grad_y", dy=put(4, nan)),
        case("inf-in-grad_y-slice-1", dy=put((6, 9), inf)),
        case("nan-A-unused-expert", A=put_slice(0, 2, nan)),
        case("inf-A-expert-of-token-3", A=put_slice(1, (3, 1, 7), inf)),
        case("nan-B-unused-expert", B=put_slice(1, 2, nan)),
        case("inf-B-expert-of-token-3", B=put_slice(0, (3, 5, 2), -inf)),
        case("nan-gate-routed-slot", g=put((2, 1), nan)),
        case("nan-gate-empty-slot", g=put((6, 1), nan)),
    ]
    return cases + [case("all-at-once", x=put((5, 2), inf), dy=put(4, nan), A=put_slice(0, 2, nan),
                         B=put_slice(0, (3, 5, 2), -inf), g=put((2, 1), nan))]


ISOLATION_CASES = _isolation_cases()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("needs", [None, [True, False, False, False], [False, True, False, False],
                                   [False, False, True, False], [False, False, False, True]])
@pytest.mark.parametrize("name, c", ISOLATION_CASES, ids=[n for n, _ in ISOLATION_CASES])
def test_backward_dense_isolation(name, c, needs, dtype):
    """issue 9 item 4: the dense masked backward itself (the code CUDA runs, no host sync, no
    fallback) is non-finite exactly where the per-expert float64 form is, and equal to it elsewhere."""
    x, dy = c["x"].to(dtype), c["dy"].to(dtype)
    A, B = [a.to(dtype) for a in c["A"]], [b.to(dtype) for b in c["B"]]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    got = routed_lora_backward_dense(dy, x, A, B, c["ids"], c["g"], 0.5, needs, acc)
    want = routed_lora_backward_ref(dy.double(), x.double(), [a.double() for a in A],
                                    [b.double() for b in B], c["ids"], c["g"].double(), 0.5, needs,
                                    torch.float64)
    flat_got, flat_want = [got[0], *got[1], *got[2], got[3]], [want[0], *want[1], *want[2], want[3]]
    if needs is None and "unused" not in name and "empty" not in name:  # a routed non-finite value
        assert any((~torch.isfinite(w)).any() for w in flat_want)
    for i, (a, w) in enumerate(zip(flat_got, flat_want)):
        assert a.shape == w.shape and a.dtype == (c["g"].dtype if i == len(flat_got) - 1 else dtype)
        bad = ~torch.isfinite(w)
        assert torch.equal(~torch.isfinite(a), bad), f"{name}: gradient {i}: non-finite pattern differs"
        assert_close(torch.where(bad, 0.0, a.double()), torch.where(bad, 0.0, w),
                     dtype if dtype in TOL else torch.float32)


# ------------------------------------------------------------------------------------------
# issue 10: the CPU kernels' fast dense forms (ops/routed_lora.py _dense_forward_cpu,
# _dense_backward_cpu) against the reference formulations
# ------------------------------------------------------------------------------------------


def _random_cpu_case(seed, dtype):
    """Random shapes, k from 1 to E, -1 padding, repeated experts, strided views, equal or
    unequal ranks."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    E = draw(1, 9)
    k = draw(1, E)
    n_slices = draw(1, 3) if seed < 12 else draw(2, 3)  # seeds >= 12: decode, several slices
    ranks = [draw(1, 8)] * n_slices if seed % 2 else [draw(1, 8) for _ in range(n_slices)]
    T, d_in = draw(1, 24) if seed < 12 else draw(1, 8), draw(1, 40)
    d_outs = [draw(1, 24) for _ in range(n_slices)]
    args = make_case(T, d_in, ranks, d_outs, E, k, dtype=dtype, seed=seed, noncontig=seed % 3 == 0,
                     empty_frac=0.3, idx_dtype=torch.int32 if seed % 4 == 1 else torch.int64)
    x, A, B, ids, gates = args
    if k > 1 and seed % 5 == 0:  # the same expert in two slots of a token
        ids[:, 1] = ids[:, 0]
    dy = torch.randn(T, sum(d_outs) * 2, generator=g)[:, ::2].to(dtype)  # strided too
    return (x, A, B, ids, gates), dy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(20))
def test_cpu_dense_forward_matches_reference(seed, dtype):
    """The fast dense forward (all slices' A in one GEMM, no route mask) against the per-expert
    reference and the float64 oracle, whatever the cost model would pick."""
    args, _ = _random_cpu_case(seed, dtype)
    got = rl._dense_forward_cpu(*args, 0.7, torch.float32)
    want = routed_lora_ref(*args, 0.7, keep_acc=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert_close(got, oracle(*args, 0.7), torch.float32)
    out = torch.randn(got.shape).to(dtype)
    expect = out.double() + oracle(*args, 0.7)
    rl.routed_lora_add_cpu(out, *args, 0.7)
    assert_close(out, expect, dtype)


NEEDS = [None, [True, False, False, False], [False, True, False, False], [False, False, True, False],
         [False, False, False, True], [True, False, False, True], [False, True, True, False]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(20))
def test_cpu_dense_backward_matches_reference(seed, dtype):
    """The fast dense backward (one workspace, one finiteness check) against the per-expert
    reference for every ``needs`` pattern: same gradients, dtypes, shapes, contiguous outputs
    that share no memory."""
    args, dy = _random_cpu_case(seed, dtype)
    needs = NEEDS[seed % len(NEEDS)]
    got = rl._dense_backward_cpu(dy, *args, 0.7, rl._needs(needs), torch.float32)
    want = routed_lora_backward_ref(dy, *args, 0.7, needs)
    flat_got, flat_want = [got[0], *got[1], *got[2], got[3]], [want[0], *want[1], *want[2], want[3]]
    ptrs = [t.data_ptr() for t in flat_got if t.numel()]
    assert len(set(ptrs)) == len(ptrs)
    for a, w in zip(flat_got, flat_want):
        assert a.shape == w.shape and a.dtype == w.dtype and a.is_contiguous()
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(a.float(), w.float(), **tol)
    expect = _oracle_grads(args, dy, 0.7)
    flat_expect = [expect[0], *expect[1], *expect[2], expect[3]]
    for a, w in zip(flat_got, flat_expect):
        if a.numel():
            assert_close(a, w, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("needs", [None, [True, False, False, False], [False, True, False, False],
                                   [False, False, True, False], [False, False, False, True]])
@pytest.mark.parametrize("name, c", ISOLATION_CASES, ids=[n for n, _ in ISOLATION_CASES])
def test_cpu_backward_isolation(name, c, needs, dtype, monkeypatch):
    """The CPU backward kernel with the cost model forced to the dense form: the fast dense
    backward gives up on a non-finite result (returns None) and the isolated form runs, so the
    kernel is non-finite exactly where the per-expert float64 form is."""
    monkeypatch.setattr(rl, "dense_cheaper_cpu", lambda *a, **kw: True)
    x, dy = c["x"].to(dtype), c["dy"].to(dtype)
    A, B = [a.to(dtype) for a in c["A"]], [b.to(dtype) for b in c["B"]]
    got = rl.routed_lora_backward_cpu(dy, x, A, B, c["ids"], c["g"], 0.5, needs)
    want = routed_lora_backward_ref(dy.double(), x.double(), [a.double() for a in A],
                                    [b.double() for b in B], c["ids"], c["g"].double(), 0.5, needs,
                                    torch.float64)
    flat_got, flat_want = [got[0], *got[1], *got[2], got[3]], [want[0], *want[1], *want[2], want[3]]
    for i, (a, w) in enumerate(zip(flat_got, flat_want)):
        bad = ~torch.isfinite(w)
        assert torch.equal(~torch.isfinite(a), bad), f"{name}: gradient {i}: non-finite pattern differs"
        assert_close(torch.where(bad, 0.0, a.double()), torch.where(bad, 0.0, w), dtype)


@pytest.mark.parametrize("form", ["dense", "grouped"])
@pytest.mark.parametrize("name, c", ISOLATION_CASES, ids=[n for n, _ in ISOLATION_CASES])
def test_cpu_forward_isolation(name, c, form, monkeypatch):
    """The CPU forward with the dense or the expert-grouped form forced (``forward_form_cpu``; the
    real cap accepted): a non-finite result is redone per expert, so a token's output is
    non-finite exactly where the per-expert form's is."""
    monkeypatch.setattr(rl, "forward_form_cpu", lambda *a: form)
    monkeypatch.setattr(rl, "grouped_accepts", lambda *a: True)
    got = rl.routed_lora_cpu(c["x"], c["A"], c["B"], c["ids"], c["g"], 0.5)
    want = routed_lora_ref(c["x"].double(), [a.double() for a in c["A"]], [b.double() for b in c["B"]],
                           c["ids"], c["g"].double(), 0.5, acc_dtype=torch.float64)
    bad = ~torch.isfinite(want)
    assert torch.equal(~torch.isfinite(got), bad)
    assert_close(torch.where(bad, 0.0, got.double()), torch.where(bad, 0.0, want), torch.float32)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_cpu_forward_forms_agree(data):
    """Every CPU forward form (dense, grouped, per-expert loop) against the float64 per-expert
    reference on random shapes, ids (empty slots -1 and repeated experts included), fp32 and bf16
    (bf16: the dense and grouped forms' GEMMs run in bf16 once large enough, ``_gemm_dtype``; the
    shapes reach both sides of its threshold), through ``routed_lora`` and ``routed_lora_add_``."""
    T = data.draw(st.sampled_from([1, 3, 40, 300]), "T")
    d_in = data.draw(st.sampled_from([8, 64, 520]), "d_in")
    E = data.draw(st.integers(1, 12), "E")
    k = data.draw(st.integers(1, 4), "k")
    ranks = data.draw(st.sampled_from([(4,), (8, 8, 8), (4, 2)]), "ranks")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), "dtype")
    form = data.draw(st.sampled_from(["dense", "grouped", "loop"]), "form")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 999), "seed"))
    x = torch.randn(T, d_in, generator=g).to(dtype)
    A = [(torch.randn(E, r, d_in, generator=g) / d_in ** 0.5).to(dtype) for r in ranks]
    B = [(torch.randn(E, 24 + 8 * i, r, generator=g) / r ** 0.5).to(dtype) for i, r in enumerate(ranks)]
    ids = torch.randint(-1, E, (T, k), generator=g)
    gates = torch.rand(T, k, generator=g)
    want = routed_lora_ref(x.double(), [a.double() for a in A], [b.double() for b in B], ids,
                           gates.double(), 0.7, acc_dtype=torch.float64)
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(rl, "forward_form_cpu", lambda *a: form)
        mp.setattr(rl, "grouped_accepts", lambda *a: True)
        with reference_path():
            got = rl.routed_lora(x, A, B, ids, gates, 0.7)
            out = torch.ones(T, want.shape[1], dtype=dtype)
            rl.routed_lora_add_(out, x, A, B, ids, gates, 0.7)
    finally:
        mp.undo()
    assert got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(out.double(), want + 1, atol=tol, rtol=tol)


def test_forward_form_cpu():
    """The forward's cost model (measured crossovers in its docstring): small decode shapes run
    dense, soft routing dense, sparse routing over many tokens grouped, decode over 64 large
    experts per expert; an unbalanced routing (one expert with every token) is not grouped."""
    qkv, small, r3 = (4096, 1024, 1024), (64, 16, 16), (16, 16, 16)
    assert rl.forward_form_cpu(16, 64, 8, r3, small, 2) == "dense"
    assert rl.forward_form_cpu(2048, 256, 8, r3, small, 8) == "dense"
    assert rl.forward_form_cpu(512, 512, 8, r3, small, 2) == "grouped"
    assert rl.forward_form_cpu(4096, 256, 8, r3, (256, 64, 64), 2) == "loop"
    assert rl.forward_form_cpu(2048, 256, 64, r3, small, 2) == "grouped"
    assert rl.forward_form_cpu(2048, 256, 6, r3, (256, 64, 64), 3) == "dense"
    assert rl.forward_form_cpu(64, 4096, 64, (16,), (4096,), 2) == "grouped"
    assert rl.forward_form_cpu(16, 4096, 64, (16,), (4096,), 2) == "loop"
    assert rl.forward_form_cpu(1, 4096, 8, r3, qkv, 2) == "loop"
    assert rl.grouped_accepts(512, 512, 8, r3, small, 2, 140)
    assert not rl.grouped_accepts(512, 512, 8, r3, small, 2, 512)


def test_dense_cheaper_cpu():
    """The cost model (measured crossovers in its docstring): the benchmark's small shapes and
    dense routing run dense; decode over large experts and long prefills with sparse routing run
    per expert."""
    qkv, small, r3 = (4096, 1024, 1024), (64, 16, 16), (16, 16, 16)
    assert rl.dense_cheaper_cpu(1, 64, 8, r3, small, 2)
    assert rl.dense_cheaper_cpu(64, 64, 8, r3, small, 8)
    assert rl.dense_cheaper_cpu(16, 64, 32, r3, small, 2, backward=True)
    assert rl.dense_cheaper_cpu(2048, 4096, 8, r3, qkv, 8)  # soft routing k = E
    assert not rl.dense_cheaper_cpu(1, 4096, 8, r3, qkv, 2)  # converting all 8 experts' weights
    assert not rl.dense_cheaper_cpu(1, 4096, 64, (64,) * 3, qkv, 3)
    assert not rl.dense_cheaper_cpu(2048, 4096, 64, r3, qkv, 3, backward=True)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------


def _bad_cases():
    x, A, B, ids, g = make_case(4, 16, [4], [8], 3, 2)
    A3, B3 = [A[0], A[0][:, :2]], [B[0], B[0][:, :, :2]]
    yield "x", (x[0], A, B, ids, g, 1.0), ValueError
    yield "x", (x.long(), A, B, ids, g, 1.0), TypeError
    yield "lora_a", (x, [], [], ids, g, 1.0), ValueError
    yield "lora_b", (x, A, B + B, ids, g, 1.0), ValueError
    yield r"lora_a\[0\]", (x, [A[0][:, :, :5]], B, ids, g, 1.0), ValueError
    yield r"lora_a\[0\]", (x, [A[0].half()], B, ids, g, 1.0), TypeError
    yield r"lora_b\[0\]", (x, A, [B[0][:2]], ids, g, 1.0), ValueError       # experts differ
    yield r"lora_b\[0\]", (x, A, [B[0][:, :, :3]], ids, g, 1.0), ValueError  # ranks differ
    yield r"lora_a\[1\]", (x, [A[0], A[0][:2]], B3, ids, g, 1.0), ValueError
    yield r"lora_b\[1\]", (x, A3, [B[0], B[0][:, :, :3]], ids, g, 1.0), ValueError
    yield "expert_ids", (x, A, B, ids.float(), g, 1.0), TypeError
    yield "expert_ids", (x, A, B, ids[:3], g, 1.0), ValueError
    yield "expert_ids", (x, A, B, torch.full_like(ids, 3), g, 1.0), ValueError   # id == E
    yield "expert_ids", (x, A, B, torch.full_like(ids, -2), g, 1.0), ValueError  # id < -1
    yield "gates", (x, A, B, ids, g[:, :1], 1.0), ValueError
    yield "gates", (x, A, B, ids, g.long(), 1.0), TypeError
    yield "scaling", (x, A, B, ids, g, float("nan")), ValueError
    yield "scaling", (x, A, B, ids, g, float("inf")), ValueError


@pytest.mark.parametrize("name, device, ctx", backends())
@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_bad_input(name, device, ctx, case):
    arg, args, exc = case
    with ctx(), pytest.raises(exc, match=f"routed_lora: {arg}"):
        torch.ops.loramix.routed_lora(*args)


def test_bad_out_for_add():
    x, A, B, ids, g = make_case(4, 16, [4], [8], 3, 2)
    with pytest.raises(ValueError, match="routed_lora_add_: out"):
        torch.ops.loramix.routed_lora_add_(torch.zeros(4, 9), x, A, B, ids, g, 1.0)


@pytest.mark.parametrize("arg", ["lora_a", "lora_b", "expert_ids", "gates"])
def test_device_mix_rejected_meta(arg):
    """A tensor on another device (meta stands in for one on CPU-only machines) is named."""
    x, A, B, ids, g = make_case(4, 16, [4], [8], 3, 2)
    args = dict(x=x, lora_a=A, lora_b=B, expert_ids=ids, gates=g)
    v = args[arg]
    args[arg] = [t.to("meta") for t in v] if isinstance(v, list) else v.to("meta")
    with pytest.raises(ValueError, match=f"routed_lora: {arg}.* must be on cpu"):
        rl.validate_routed_lora(*args.values(), 1.0)


@requires_cuda
def test_device_mix_rejected():
    x, A, B, ids, g = make_case(4, 16, [4], [8], 3, 2, device="cuda")
    with pytest.raises(ValueError, match="expert_ids"):
        torch.ops.loramix.routed_lora(x, A, B, ids.cpu(), g, 1.0)


@requires_cuda
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cuda_graph_capture(strategy):
    args = make_case(16, 256, [16, 8], [256, 64], 8, 2, device="cuda", dtype=torch.bfloat16)
    rl.routed_lora_triton(*args, 1.0, strategy=strategy)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = rl.routed_lora_triton(*args, 1.0, strategy=strategy)
    graph.replay()
    torch.cuda.synchronize()
    cpu = to_device(args, "cpu")
    assert_close(y, oracle(*cpu, 1.0), torch.bfloat16)


@requires_cuda
@pytest.mark.parametrize("T, E, r, k", [(16, 8, 16, 2), (300, 64, 64, 3), (64, 6, 16, 6)])
def test_cuda_bench_shapes(T, E, r, k):
    args = make_case(T, 512, [r, r, r], [512, 128, 128], E, k, device="cuda", dtype=torch.bfloat16)
    y = torch.ops.loramix.routed_lora(*args, 1.0)
    cpu = to_device(args, "cpu")
    assert_close(y, oracle(*cpu, 1.0), torch.bfloat16)


# ------------------------------------------------------------------------------------------
# Triton backward of the expert-sorted regime (routed_lora_backward_sorted)
# ------------------------------------------------------------------------------------------


def _oracle_grads(args, dy, scaling):
    """float64 autograd through ``oracle``: (dx, [dA_s], [dB_s], d_gates)."""
    x, A, B, ids, g = to_device(args, "cpu")
    n = len(A)
    leaves = [t.double().requires_grad_(True) for t in (x, *A, *B, g)]
    yo = oracle(leaves[0], leaves[1:1 + n], leaves[1 + n:1 + 2 * n], ids, leaves[-1], scaling)
    got = torch.autograd.grad(yo, leaves, dy.cpu().double(), allow_unused=True)
    got = [torch.zeros_like(t) if d is None else d for d, t in zip(got, leaves)]
    return got[0], got[1:1 + n], got[1 + n:1 + 2 * n], got[-1]


def assert_grads_close(got, expect, dtype):
    """Each gradient against the float64 one, TOL scaled by that gradient's own magnitude."""
    atol, rtol = TOL[dtype]
    gx, ga, gb, gg = got
    ex, ea, eb, eg = expect
    names = ["dx"] + [f"dA[{s}]" for s in range(len(ga))] + [f"dB[{s}]" for s in range(len(gb))] + ["d_gates"]
    for name, a, b in zip(names, [gx, *ga, *gb, gg], [ex, *ea, *eb, eg]):
        assert a.shape == b.shape, name
        scale = b.abs().max().item() if b.numel() else 0.0
        torch.testing.assert_close(a.cpu().double(), b, atol=atol * max(scale, 1e-3), rtol=rtol,
                                   msg=lambda m: f"{name}: {m}")


def _sorted_case(T, d_in, ranks, d_outs, E, k, dtype=torch.float32, dup=False, seed=0, **kw):
    assert rl.choose_strategy(E, ranks, k) == "expert_sorted"
    args = make_case(T, d_in, ranks, d_outs, E, k, dtype=dtype, device=TRITON_DEVICE, seed=seed, **kw)
    if dup and k > 1 and T:  # the same expert in two slots of a token (gates add in the forward)
        args[3][:, 1] = args[3][:, 0]
    dy = torch.randn(T, sum(d_outs), generator=torch.Generator().manual_seed(seed + 1))
    return args, dy.to(device=TRITON_DEVICE, dtype=dtype)


SORTED_BWD_CASES = [
    # T, d_in, ranks, d_outs, E, k, dup
    (0, 40, [64], [24], 8, 2, False),                      # no tokens
    (1, 50, [32, 8], [40, 24], 64, 1, False),              # one token, k = 1
    (7, 70, [4, 16, 3], [50, 20, 33], 64, 3, True),        # packed q/k/v, odd T, duplicate experts
    (9, 45, [64], [37], 8, 3, False),                      # rank 64 (RP 64), d_in / d_out off tiles
    (5, 33, [5, 6, 7, 9], [8, 9, 10, 11], 64, 2, False),   # 4 slices: two launch groups
]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T, d_in, ranks, d_outs, E, k, dup", SORTED_BWD_CASES)
def test_triton_backward_sorted_matches_oracle(dtype, T, d_in, ranks, d_outs, E, k, dup):
    args, dy = _sorted_case(T, d_in, ranks, d_outs, E, k, dtype=dtype, dup=dup)
    got = rl.routed_lora_backward_sorted(dy, *args, 0.7)
    assert got[0].dtype == dtype and all(t.dtype == dtype for t in got[1] + got[2])
    assert got[3].dtype == args[4].dtype and got[3].shape == (T, k)
    assert_grads_close(got, _oracle_grads(args, dy, 0.7), dtype)
    if T:  # empty slots get a zero gate gradient
        assert (got[3].cpu()[args[3].cpu() < 0] == 0).all()


@requires_triton
@pytest.mark.parametrize("splits", [(3, 2), (1, 4), (5, 1)])
def test_triton_backward_sorted_splits(splits):
    """Column / d_in shares (NSPLIT) of the expand and split-K (KSPLIT, fp32 atomics into h, u) of
    the shrink give the same gradients."""
    args, dy = _sorted_case(6, 100, [8, 16, 4], [40, 24, 33], 64, 3, dup=True, seed=3)
    got = rl.routed_lora_backward_sorted(dy, *args, 1.3, splits=splits)
    assert_grads_close(got, _oracle_grads(args, dy, 1.3), torch.float32)


@requires_triton
def test_triton_backward_sorted_noncontiguous():
    """Strided x / weights (transposed views) and a non-contiguous grad_y."""
    args, _ = _sorted_case(5, 40, [16, 32], [24, 17], 64, 2, seed=5, noncontig=True)
    dy = torch.randn(41, 5, device=TRITON_DEVICE).t()  # [5, 41], strides (1, 5)
    assert not dy.is_contiguous()
    got = rl.routed_lora_backward_sorted(dy, *args, 0.5)
    assert_grads_close(got, _oracle_grads(args, dy, 0.5), torch.float32)


@requires_triton
@settings(max_examples=10)
@given(
    T=st.sampled_from([0, 1, 3, 8]),
    d_in=st.integers(1, 70),
    slices=st.lists(st.tuples(st.sampled_from([1, 3, 8, 16, 40, 64]), st.integers(1, 50)),
                    min_size=1, max_size=3),
    E=st.sampled_from([8, 13, 64]),
    k=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    dup=st.booleans(),
    idx_dtype=st.sampled_from([torch.int32, torch.int64]),
    splits=st.sampled_from([None, (2, 3)]),
    seed=st.integers(0, 2 ** 16),
)
def test_triton_backward_sorted_hypothesis(T, d_in, slices, E, k, dtype, dup, idx_dtype, splits, seed):
    ranks = [r for r, _ in slices]
    d_outs = [o for _, o in slices]
    if rl.choose_strategy(E, ranks, k) != "expert_sorted":
        ranks[0] = 64  # E * 64 >= 512 rows: always the expert-sorted regime (2 k < E holds)
    args, dy = _sorted_case(T, d_in, ranks, d_outs, E, k, dtype=dtype, dup=dup, seed=seed,
                            idx_dtype=idx_dtype)
    got = rl.routed_lora_backward_sorted(dy, *args, 0.9, splits=splits)
    assert_grads_close(got, _oracle_grads(args, dy, 0.9), dtype)


@requires_triton
def test_triton_backward_sorted_through_autograd(monkeypatch):
    """torch.ops.loramix.routed_lora on the Triton path at an expert-sorted shape: the backward op
    runs the sorted kernels (the per-expert loop is not called) and matches the oracle's grads."""
    def no_loop(*a, **kw):
        raise AssertionError("the Triton path must not run the per-expert loop")

    monkeypatch.setattr(rl, "routed_lora_backward_ref", no_loop)
    args, dy = _sorted_case(9, 48, [16, 8], [32, 16], 64, 3, dup=True, seed=7)
    x, A, B, ids, g = args
    leaves = [t.clone().requires_grad_(True) for t in (x, *A, *B, g)]
    with triton_path():
        y = torch.ops.loramix.routed_lora(leaves[0], leaves[1:3], leaves[3:5], ids, leaves[5], 0.5)
    grads = torch.autograd.grad(y, leaves, dy)
    expect = _oracle_grads(args, dy, 0.5)
    assert_grads_close((grads[0], grads[1:3], grads[3:5], grads[5]), expect, torch.float32)


@requires_triton
def test_triton_backward_sorted_out_of_range_ids(monkeypatch):
    """Unvalidated ids outside [0, E) (as on CUDA) are empty slots: no gradient, no OOB access."""
    args, dy = _sorted_case(6, 32, [64], [24], 8, 3, empty_frac=0.0, seed=11)
    x, A, B, ids, g = args
    bad = ids.clone()
    bad[0, 0], bad[2, 1], bad[4, 2], bad[5, 0] = 8, 1 << 20, -5, (1 << 32) + 1
    monkeypatch.setattr(_backend, "check_values", lambda t: False)
    got = rl.routed_lora_backward_sorted(dy, x, A, B, bad, g, 1.0)
    masked = torch.where((bad >= 0) & (bad < 8), bad, -1)
    assert_grads_close(got, _oracle_grads((x, A, B, masked, g), dy, 1.0), torch.float32)
    assert (got[3].cpu()[masked.cpu() < 0] == 0).all()


@requires_cuda
def test_cuda_graph_capture_backward_sorted():
    """No host sync in the sorted backward: it can be captured in a CUDA graph and replayed."""
    args, dy = _sorted_case(32, 256, [16, 16], [256, 64], 64, 3, dtype=torch.bfloat16)
    rl.routed_lora_backward_sorted(dy, *args, 1.0)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = rl.routed_lora_backward_sorted(dy, *args, 1.0)
    graph.replay()
    torch.cuda.synchronize()
    assert_grads_close(got, _oracle_grads(args, dy, 1.0), torch.bfloat16)


@requires_cuda
@pytest.mark.parametrize("T", [16, 2048])
def test_cuda_backward_sorted_bench_shapes(T):
    args, dy = _sorted_case(T, 1024, [16, 16, 16], [1024, 256, 256], 64, 3, dtype=torch.bfloat16)
    got = rl.routed_lora_backward_sorted(dy, *args, 1.0)
    assert_grads_close(got, _oracle_grads(args, dy, 1.0), torch.bfloat16)


# ------------------------------------------------------------------------------------------
# sample inputs (tests/test_contract.py runs opcheck, compile and strided views on them)
# ------------------------------------------------------------------------------------------


def sample_inputs(device):
    """(op name, args) covering every op of the family: both Triton strategies' shapes (token-major
    E*r <= 256, expert-sorted E = 64), packed slices, empty slots, fp32 / bf16, T = 0, and the
    backward with all and with partial ``needs``."""
    out = []
    for dtype, (T, d_in, ranks, d_outs, E, k) in [
        (torch.float32, (6, 32, [8, 4], [16, 8], 4, 2)),       # token-major, two slices
        (torch.bfloat16, (5, 24, [4], [12], 6, 3)),            # token-major, bf16
        (torch.float32, (5, 20, [16, 8], [12, 8], 64, 2)),     # expert-sorted
        (torch.float32, (0, 16, [4], [8], 3, 2)),              # no tokens
    ]:
        x, A, B, ids, g = make_case(T, d_in, ranks, d_outs, E, k, dtype=dtype, device=device)
        args = (x, A, B, ids, g, 0.5)
        out.append(("routed_lora", args))
        out.append(("routed_lora_add_", (torch.randn(T, sum(d_outs), device=device).to(dtype), *args)))
        dy = torch.randn(T, sum(d_outs), device=device).to(dtype)
        out.append(("routed_lora_backward", (dy, *args)))
        out.append(("routed_lora_backward", (dy, *args, [True, False, False, True])))
    return out


# ------------------------------------------------------------------------------------------
# torch.compile (inductor), autocast, float64, double backward
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, device, ctx", backends())
@pytest.mark.parametrize("E, ranks, k", [(4, [8], 2), (64, [16], 2)])  # dense / expert-sorted backward
def test_compile_inductor_training_step(name, device, ctx, E, ranks, k):
    """Regression: the default inductor backend checks the fake kernels' strides against the real
    ones; the dense backward used to return dB as a permuted view ("incorrect fake kernel")."""
    x, A, B, ids, g = make_case(6, 32, ranks, [16], E, k, device=device)
    leaves = [t.clone().requires_grad_(True) for t in (x, A[0], B[0], g)]

    def f(x, a, b, g):
        return (torch.ops.loramix.routed_lora(x, [a], [b], ids, g, 0.5) ** 2).sum()

    torch._dynamo.reset()
    with ctx():
        loss = torch.compile(f, fullgraph=True)(*leaves)
        loss.backward()
    ref = [t.detach().double().requires_grad_(True) for t in leaves]
    (oracle(ref[0], [ref[1]], [ref[2]], ids, ref[3], 0.5) ** 2).sum().backward()
    for got, want in zip(leaves, ref):
        assert_close(got.grad, want.grad, torch.float32)


def test_autocast_bf16_cpu_master_weights():
    """fp32 master weights under CPU bf16 autocast: runs in bf16 (gates stay fp32) and the fp32
    leaves get fp32 gradients."""
    x, A, B, ids, g = make_case(7, 32, [8, 4], [16, 8], 4, 2)
    leaves = [t.clone().requires_grad_(True) for t in (x, *A, *B, g)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.ops.loramix.routed_lora(leaves[0], leaves[1:3], leaves[3:5], ids, leaves[5], 0.5)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    for t in leaves:
        assert t.grad is not None and t.grad.dtype == torch.float32
    ref = [t.detach().double().requires_grad_(True) for t in leaves]
    oracle(ref[0], ref[1:3], ref[3:5], ids, ref[5], 0.5).sum().backward()
    assert_close(y, oracle(*[t.detach() for t in leaves[:1]], [t.detach() for t in leaves[1:3]],
                           [t.detach() for t in leaves[3:5]], ids, leaves[5].detach(), 0.5),
                 torch.bfloat16)
    for got, want in zip(leaves, ref):
        assert_close(got.grad, want.grad, torch.bfloat16)


@pytest.mark.parametrize("name, device, ctx", backends())
@pytest.mark.parametrize("E, ranks, k", [(4, [3, 2], 2), (64, [8], 2)])
def test_gradcheck_float64(name, device, ctx, E, ranks, k):
    """float64 runs (the PyTorch kernels, on every backend) so that users can gradcheck."""
    x, A, B, ids, g = make_case(5, 6, ranks, [4, 3][: len(ranks)], E, k, dtype=torch.float64,
                                device=device)
    ids[1, 1] = ids[1, 0]  # a duplicate expert in two slots of one token
    g = g.double()
    n = len(ranks)
    leaves = [t.clone().requires_grad_(True) for t in (x, *A, *B, g)]

    def f(x, *rest):
        return torch.ops.loramix.routed_lora(x, list(rest[:n]), list(rest[n:2 * n]), ids, rest[-1], 0.7)

    with ctx():
        assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("name, device, ctx", backends())
def test_double_backward_raises(name, device, ctx):
    x, A, B, ids, g = make_case(4, 16, [4], [8], 3, 2, device=device)
    x.requires_grad_(True)
    A[0].requires_grad_(True)
    with ctx():
        y = torch.ops.loramix.routed_lora(x, A, B, ids, g, 1.0)
        (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="routed_lora: double backward"):
            torch.autograd.grad(gx.sum(), A[0])


# ------------------------------------------------------------------------------------------
# backward: only what is needed
# ------------------------------------------------------------------------------------------


def _mm_flops(fn):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        out = fn()
    return fc.get_total_flops(), out


@pytest.mark.parametrize("name, device, ctx", backends())
@pytest.mark.parametrize("E, ranks, k", [(4, [8, 4], 2), (64, [16, 8], 2)])  # dense / sorted regimes
@pytest.mark.parametrize("frozen", ["experts", "input", "router", "all_but_gates"])
def test_backward_needs(monkeypatch, name, device, ctx, E, ranks, k, frozen):
    """Frozen experts => no dA / dB, frozen x => no dx: the op is told (``needs``), returns empty
    tensors for what is not needed, and the needed gradients are right."""
    x, A, B, ids, g = make_case(9, 24, ranks, [16, 8], E, k, device=device)
    n = len(ranks)
    grad = dict(x=frozen != "input" and frozen != "all_but_gates",
                w=frozen not in ("experts", "all_but_gates"), g=frozen != "router")
    x.requires_grad_(grad["x"])
    for t in A + B:
        t.requires_grad_(grad["w"])
    g.requires_grad_(grad["g"])
    seen = []
    real = torch.ops.loramix.routed_lora_backward

    class Spy:
        def __call__(self, *args):
            out = real(*args)
            seen.append((list(args[-1]), out))
            return out

        def __getattr__(self, attr):
            return getattr(real, attr)

    monkeypatch.setattr(torch.ops.loramix, "routed_lora_backward", Spy())
    dy = torch.randn(9, 24, device=device)
    with ctx():
        y = torch.ops.loramix.routed_lora(x, A, B, ids, g, 0.5)
        leaves = [t for t in (x, *A, *B, g) if t.requires_grad]
        got = torch.autograd.grad(y, leaves, dy)
    want_needs = [grad["x"], grad["w"], grad["w"], grad["g"]]
    (needs, (gx, ga, gb, gg)), = seen
    assert needs == want_needs
    for flag, ts in zip(want_needs, [[gx], ga, gb, [gg]]):
        assert all((t.numel() > 0) == flag for t in ts)  # not needed: an empty tensor
    expect = _oracle_grads((x.detach(), [a.detach() for a in A], [b.detach() for b in B], ids,
                            g.detach()), dy, 0.5)
    flat_expect = [expect[0], *expect[1], *expect[2], expect[3]]
    flat_req = [grad["x"]] + [grad["w"]] * 2 * n + [grad["g"]]
    for got_t, want_t in zip(got, [w for w, r in zip(flat_expect, flat_req) if r]):
        assert_close(got_t, want_t, torch.float32)


@pytest.mark.parametrize("E, ranks, k", [(4, [8, 4], 2), (64, [16, 8], 2)])
def test_backward_needs_skips_the_work_cpu(E, ranks, k):
    """On the CPU kernels a gradient that is not needed costs no GEMM: the FLOPs of the backward
    with frozen experts are those of dx + d_gates only, below the full backward's."""
    x, A, B, ids, g = make_case(33, 64, ranks, [48, 16], E, k)
    dy = torch.randn(33, 64)
    # The CPU kernel itself (a dispatch mode does not look inside a custom op).
    full, all_grads = _mm_flops(lambda: rl.routed_lora_backward_cpu(dy, x, A, B, ids, g, 0.5))
    frozen, part = _mm_flops(lambda: rl.routed_lora_backward_cpu(
        dy, x, A, B, ids, g, 0.5, [True, False, False, True]))
    none_x, _ = _mm_flops(lambda: rl.routed_lora_backward_cpu(
        dy, x, A, B, ids, g, 0.5, [False, True, True, False]))
    assert 0 < frozen < full and 0 < none_x < full
    assert [t.numel() for t in part[1] + part[2]] == [0] * 4
    torch.testing.assert_close(part[0], all_grads[0])
    torch.testing.assert_close(part[3], all_grads[3])


@requires_triton
def test_backward_needs_sorted_kernels_skip_work(monkeypatch):
    """The Triton expert-sorted backward compiles the dA / dB code out (NEED_* constexprs) and
    allocates no workspace for them when the experts are frozen."""
    from loramix_kernels.kernels import routed_lora as kern

    launched = []
    real = kern._routed_lora_bwd_expand_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(**kw):
                launched.append({k: kw[k] for k in ("NEED_DX", "NEED_DA", "NEED_DB", "NEED_DG")})
                assert kw["da0_ptr"] is kw["x_ptr"] and kw["db0_ptr"] is kw["x_ptr"]  # placeholders
                return real[grid](**kw)
            return launch

    monkeypatch.setattr(kern, "_routed_lora_bwd_expand_kernel", Spy())
    args, dy = _sorted_case(5, 40, [16, 8], [24, 16], 64, 2, seed=4)
    got = rl.routed_lora_backward_sorted(dy, *args, 0.5, needs=[True, False, False, True])
    assert launched == [dict(NEED_DX=True, NEED_DA=False, NEED_DB=False, NEED_DG=True)]
    expect = _oracle_grads(args, dy, 0.5)
    assert_close(got[0], expect[0], torch.float32)
    assert_close(got[3], expect[3], torch.float32)
    assert all(t.numel() == 0 for t in got[1] + got[2])


# ------------------------------------------------------------------------------------------
# robustness (issue 9): precision, empty reductions
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, device, ctx", backends())
@pytest.mark.parametrize("strategy_shape", [(4, [8], 1), (64, [16], 1), (64, [16], 64)])
def test_fp16_rank_intermediate_does_not_overflow(name, device, ctx, strategy_shape):
    """x = 200, A = 30 (fp16): h = 96000 overflows fp16 although y = 384 fits. Every path keeps the
    rank-sized intermediate in fp32 (token-major, expert-sorted, dense GEMM)."""
    E, ranks, k = strategy_shape
    d_in, r = 16, ranks[0]
    x = torch.full((3, d_in), 200.0, dtype=torch.float16, device=device)
    A = [torch.full((E, r, d_in), 30.0, dtype=torch.float16, device=device)]
    B = [torch.full((E, 8, r), 1.0 / (r * 250), dtype=torch.float16, device=device)]
    ids = torch.arange(k, device=device).repeat(3, 1) % E
    g = torch.full((3, k), 1.0 / k, device=device)
    with ctx():
        y = torch.ops.loramix.routed_lora(x, A, B, ids, g, 1.0)
        dy = torch.full((3, 8), 0.1, dtype=torch.float16, device=device)  # every gradient fits fp16
        got = torch.ops.loramix.routed_lora_backward(dy, x, A, B, ids, g, 1.0)
    want = oracle(*to_device((x, A, B, ids, g), "cpu"), 1.0)
    assert torch.isfinite(y).all()
    assert_close(y, want, torch.float16)
    expect = _oracle_grads((x, A, B, ids, g), dy, 1.0)
    for a, b in zip([got[0], *got[1], *got[2], got[3]], [expect[0], *expect[1], *expect[2], expect[3]]):
        assert torch.isfinite(a).all()
        assert_close(a, b, torch.float16)


@pytest.mark.parametrize("name, device, ctx", backends())
@pytest.mark.parametrize("E, ranks, k", [(4, [8], 2), (64, [16], 2), (64, [16], 64)])
def test_empty_d_in_is_zero(name, device, ctx, E, ranks, k):
    """d_in = 0: an empty reduction, y = 0 (out unchanged); the Triton launcher used to divide by 0."""
    x, A, B, ids, g = make_case(5, 0, ranks, [8], E, k, device=device)
    with ctx():
        y = torch.ops.loramix.routed_lora(x, A, B, ids, g, 1.0)
        out = torch.ones(5, 8, device=device)
        torch.ops.loramix.routed_lora_add_(out, x, A, B, ids, g, 1.0)
        gx, ga, gb, gg = torch.ops.loramix.routed_lora_backward(torch.ones(5, 8, device=device),
                                                                x, A, B, ids, g, 1.0)
    assert y.shape == (5, 8) and (y == 0).all() and (out == 1).all()
    assert gx.shape == (5, 0) and (gg == 0).all() and all((t == 0).all() for t in gb)


# ------------------------------------------------------------------------------------------
# deterministic mode (issue 11): no fp32 atomics, bit-identical gradients across runs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, device, ctx", backends())
@pytest.mark.parametrize("E, r, k", [(4, 8, 2), (64, 16, 3)])  # token-major; expert-sorted regime
def test_deterministic_mode(name, device, ctx, E, r, k, monkeypatch):
    """With ``set_deterministic(True)`` the d_in split (fp32 atomics) is off, the expert-sorted
    forward with k > 1 and the sorted backward kernels (atomic scatters) are not launched, and two
    forward + backward runs give bit-identical outputs and gradients."""
    def forbidden(*a, **kw):
        raise AssertionError("an atomic kernel path ran in deterministic mode")

    x, A, B, ids, g = make_case(4, 64, [r, r], [32, 16], E, k, device=device)
    with ctx():  # the default mode's values, and it does split d_in at decode
        ref = loramix_kernels.routed_lora(x, A, B, ids, g, 0.5)
        assert rl.plan_splits(x, 1, 4, 4096, 32, 8.0)[1] > 1
    monkeypatch.setattr(rl, "routed_lora_backward_sorted", forbidden)
    monkeypatch.setitem(rl._STRATEGIES, "expert_sorted", forbidden)

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, *A, *B, g)]
        xx, aa, bb, gg = leaves[0], leaves[1:3], leaves[3:5], leaves[5]
        y = loramix_kernels.routed_lora(xx, aa, bb, ids, gg, 0.5)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view(y.shape).to(y)).sum(), leaves)
        return [y.detach(), *grads]

    loramix_kernels.set_deterministic(True)
    try:
        with ctx():
            assert rl.plan_splits(x, 1, 4, 4096, 32, 8.0)[1] == 1  # decode shapes: no d_in split
            first, second = run(), run()
    finally:
        loramix_kernels.set_deterministic(False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert_close(first[0], ref, torch.float32)


def test_torch_deterministic_algorithms_imply_ours():
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert _backend.deterministic()
    finally:
        torch.use_deterministic_algorithms(old)
    assert _backend.deterministic() == old


# ------------------------------------------------------------------------------------------
# CPU training path (routed_lora with grad: _RoutedLoraTrain, the forward's saved tensors)
# ------------------------------------------------------------------------------------------

NEEDS_PATTERNS = [tuple(bool(m >> i & 1) for i in range(4)) for m in range(1, 16)]


def _train_case(seed, dtype):
    """Random shapes: 1-3 slices with equal or mixed ranks and widths, k from 1 to E, -1 slots,
    half of the tensors strided views."""
    g = torch.Generator().manual_seed(seed)

    def ri(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    T, d_in, E, S = ri(1, 40), ri(1, 24), ri(1, 7), ri(1, 3)
    ranks = [ri(1, 5) for _ in range(S)] if seed % 2 else [ri(1, 5)] * S
    widths = [ri(1, 20) for _ in range(S)]
    k = ri(1, E)
    x = torch.randn(T, d_in, generator=g)
    A = [torch.randn(E, r, d_in, generator=g) / d_in ** 0.5 for r in ranks]
    B = [torch.randn(E, n, r, generator=g) for r, n in zip(ranks, widths)]
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(
        torch.int32 if seed % 3 else torch.int64)
    ids[torch.rand(T, k, generator=g) < 0.25] = -1
    gates = torch.rand(T, k, generator=g)
    dy = torch.randn(T, sum(widths), generator=g)
    x, dy = x.to(dtype), dy.to(dtype)
    A, B = [a.to(dtype) for a in A], [b.to(dtype) for b in B]
    gates = gates.double() if dtype == torch.float64 else gates  # fp32 otherwise, as route_topk
    if seed % 4 == 1:
        x, A, B, gates, dy = strided(x), strided(A), strided(B), strided(gates), strided(dy)
    return x, A, B, ids, gates, dy


def _train_leaves(x, A, B, gates, needs):
    x.requires_grad_(needs[0])
    for a in A:
        a.requires_grad_(needs[1])
    for b in B:
        b.requires_grad_(needs[2])
    gates.requires_grad_(needs[3])
    return [t for t in (x, *A, *B, gates) if t.requires_grad]


@pytest.fixture
def saved_path_calls(monkeypatch):
    """Counts the backwards that ran on the forward's saved tensors (and gave a result)."""
    calls = []
    orig = rl._train_backward

    def counted(*args):
        got = orig(*args)
        calls.append(got is not None)
        return got

    monkeypatch.setattr(rl, "_train_backward", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("needs", NEEDS_PATTERNS, ids=lambda n: "".join("xabg"[i] for i in range(4) if n[i]))
def test_cpu_training_path_matches_oracle(dtype, needs, saved_path_calls):
    """Every needs pattern, random shapes: y and the gradients autograd asks for equal the float64
    oracle's, in the inputs' dtypes, contiguous, and the saved-tensor backward ran."""
    for seed in range(6):
        x, A, B, ids, gates, dy = _train_case(seed + 10 * needs.index(True), dtype)
        leaves = _train_leaves(x, A, B, gates, needs)
        with loramix_kernels.use_backend("auto"):
            y = loramix_kernels.routed_lora(x, A, B, ids, gates, 0.7)
            got = torch.autograd.grad(y, leaves, dy)
        ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
        sub = dict(zip(map(id, leaves), ref_leaves))
        rx, rA, rB, rg = ([sub.get(id(t), t) for t in ts] for ts in ([x], A, B, [gates]))
        want_y = oracle(rx[0], rA, rB, ids, rg[0], 0.7)
        want = torch.autograd.grad(want_y, ref_leaves, dy.double())
        assert y.dtype == dtype and y.is_contiguous()
        assert_close(y, want_y, dtype)
        for t, gr, w in zip(leaves, got, want):
            assert gr.dtype == t.dtype and gr.shape == t.shape and gr.is_contiguous()
            assert_close(gr, w, dtype)
    assert saved_path_calls and all(saved_path_calls)


def test_cpu_training_path_retain_graph_and_float64_gradcheck(saved_path_calls):
    """A second backward through the same graph (retain_graph) reads unchanged saved tensors; the
    float64 path passes gradcheck."""
    x, A, B, ids, gates, dy = _train_case(3, torch.float32)
    leaves = _train_leaves(x, A, B, gates, (True, True, True, True))
    with loramix_kernels.use_backend("auto"):
        y = loramix_kernels.routed_lora(x, A, B, ids, gates, 1.5)
        first = torch.autograd.grad(y, leaves, dy, retain_graph=True)
        second = torch.autograd.grad(y, leaves, dy)
        for a, b in zip(first, second):
            assert torch.equal(a, b)
        x, A, B, ids, gates, _ = _train_case(5, torch.float64)
        leaves = _train_leaves(x, A, B, gates, (True, True, True, True))
        n = len(A)
        assert torch.autograd.gradcheck(
            lambda x, g, *w: loramix_kernels.routed_lora(x, list(w[:n]), list(w[n:]), ids, g, 0.5),
            [x, gates, *A, *B])
    assert saved_path_calls and all(saved_path_calls)


def test_cpu_training_path_isolation_and_double_backward(saved_path_calls):
    """Non-finite grad_y rows: the saved backward declines and the isolated form runs (experts and
    tokens that do not touch the row stay finite, equal to the per-expert reference); an inf
    weight of an unused expert: the forward keeps nothing and the op backward runs; create_graph:
    double backward raises as on the registered path."""
    x, A, B, ids, g = make_case(6, 16, [4, 2], [8, 5], 4, 1)
    ids = torch.tensor([[0], [1], [1], [2], [-1], [0]], dtype=torch.int32)
    dy = torch.randn(6, 13)
    dy[3, 2] = float("inf")  # token 3 routes to expert 2 only
    leaves = _train_leaves(x, A, B, g, (True, True, True, True))
    with loramix_kernels.use_backend("auto"):
        y = loramix_kernels.routed_lora(x, A, B, ids, g, 1.0)
        got = torch.autograd.grad(y, leaves, dy)
    assert saved_path_calls == [False]
    want = routed_lora_backward_ref(dy, *(t.detach() for t in (x,)), [a.detach() for a in A],
                                    [b.detach() for b in B], ids, g.detach(), 1.0)
    want = [want[0], *want[1], *want[2], want[3]]
    for gr, w in zip(got, want):  # the same non-finite entries (inf or NaN), equal elsewhere
        fin = torch.isfinite(w)
        assert torch.equal(torch.isfinite(gr), fin)
        torch.testing.assert_close(gr[fin], w[fin])
    assert torch.isfinite(got[0][[0, 1, 2, 4, 5]]).all() and torch.isfinite(got[1][[0, 1, 3]]).all()

    saved_path_calls.clear()
    A2 = [a.detach().clone() for a in A]
    A2[0][3, 0, 0] = float("inf")  # expert 3: no token
    leaves = _train_leaves(x, A2, B, g, (True, True, True, True))
    with loramix_kernels.use_backend("auto"):
        y = loramix_kernels.routed_lora(x, A2, B, ids, g, 1.0)
        got = torch.autograd.grad(y, leaves, torch.ones_like(y))
    assert saved_path_calls == [] and torch.isfinite(y).all()
    assert all(torch.isfinite(t).all() for t in (got[0], got[-1]))

    with loramix_kernels.use_backend("auto"):
        y = loramix_kernels.routed_lora(x, A, B, ids, g, 1.0)
        (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="routed_lora: double backward"):
            torch.autograd.grad(gx.sum(), A[0])


def _train_grads(x, A, B, ids, gates, dy, scaling, needs):
    """y and the gradients autograd asks for, through routed_lora's CPU training path."""
    leaves = _train_leaves(x, A, B, gates, needs)
    with loramix_kernels.use_backend("auto"):
        y = loramix_kernels.routed_lora(x, A, B, ids, gates, scaling)
        got = torch.autograd.grad(y, leaves, dy)
    return y, leaves, got


def _assert_matches_oracle(y, leaves, got, x, A, B, ids, gates, dy, scaling, dtype):
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    sub = dict(zip(map(id, leaves), ref_leaves))
    rx, rA, rB, rg = ([sub.get(id(t), t) for t in ts] for ts in ([x], A, B, [gates]))
    want_y = oracle(rx[0], rA, rB, ids, rg[0], scaling)
    want = torch.autograd.grad(want_y, ref_leaves, dy.double())
    close = ((lambda a, b: torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)) if dtype == torch.float64
             else (lambda a, b: assert_close(a, b, dtype)))
    assert y.dtype == dtype and y.is_contiguous()
    close(y, want_y)
    for t, gr, w in zip(leaves, got, want):
        assert gr.dtype == t.dtype and gr.shape == t.shape and gr.is_contiguous()
        close(gr, w)


@pytest.fixture
def train_modes(monkeypatch):
    """Which backward ran on the forward's saved tensors: 'dense' (_train_backward) or 'grouped'
    (_sparse_backward), and whether it gave a result."""
    calls = []
    for name, tag in (("_train_backward", "dense"), ("_sparse_backward", "grouped")):
        orig = getattr(rl, name)

        def counted(*args, _orig=orig, _tag=tag):
            got = _orig(*args)
            calls.append((_tag, got is not None))
            return got

        monkeypatch.setattr(rl, name, counted)
    return calls


def _grouped_case(seed, dtype, T=48, E=16, k=2, S=2, equal=True, widths=(12, 7), dup=False):
    """Sparse routing that takes the expert-grouped path (3 k <= E, every expert at most T / 3
    tokens): -1 slots, int32 or int64 ids; with ``dup``, every third token lists its first expert
    twice."""
    g = torch.Generator().manual_seed(seed)
    d_in = 10
    ranks = [3] * S if equal else [3, 5, 2][:S]
    x = torch.randn(T, d_in, generator=g).to(dtype)
    A = [(torch.randn(E, r, d_in, generator=g) / d_in ** 0.5).to(dtype) for r in ranks]
    B = [torch.randn(E, n, r, generator=g).to(dtype) for r, n in zip(ranks, widths[:S])]
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    if dup:
        ids[::3, 1] = ids[::3, 0]
    ids[torch.rand(T, k, generator=g) < 0.2] = -1
    ids = ids.to(torch.int32 if seed % 2 else torch.int64)
    gates = torch.rand(T, k, generator=g)
    gates = gates.double() if dtype == torch.float64 else gates
    dy = torch.randn(T, sum(widths[:S]), generator=g).to(dtype)
    return x, A, B, ids, gates, dy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("needs", NEEDS_PATTERNS, ids=lambda n: "".join("xabg"[i] for i in range(4) if n[i]))
def test_cpu_training_grouped_path_matches_oracle(dtype, needs, train_modes):
    """Sparse routing (top-2 of 16, the expert-grouped bmm path): y and every needed gradient
    equal the float64 oracle's, contiguous, in the inputs' dtypes; 1 or 2 slices, equal or
    mixed ranks, -1 slots, an expert listed twice for a token, contiguous and strided inputs."""
    for seed, (S, equal, strided_in, E, dup) in enumerate([
            (1, True, False, 16, False), (2, True, True, 16, False), (2, False, False, 16, False),
            (2, False, True, 16, False), (2, True, False, 32, True)]):
        x, A, B, ids, gates, dy = _grouped_case(seed, dtype, S=S, equal=equal, E=E, dup=dup)
        if strided_in:
            x, A, B, gates, dy = strided(x), strided(A), strided(B), strided(gates), strided(dy)
        assert rl._sparse_plan(ids, E, 48) is not None
        y, leaves, got = _train_grads(x, A, B, ids, gates, dy, 0.7, needs)
        _assert_matches_oracle(y, leaves, got, x, A, B, ids, gates, dy, 0.7, dtype)
    assert train_modes and all(m == ("grouped", True) for m in train_modes)


def test_cpu_training_unbalanced_sparse_routing_takes_the_op_path(train_modes, monkeypatch):
    """Sparse routing over large experts (the cost model rules the dense form out: "sparse") whose
    real cap also rules the grouped form out (every token on experts 0 and 1 of 16): the op's
    forward and backward run, not the dense form over every expert; the values equal the
    oracle's."""
    assert rl._train_choice(512, 4096, 256, (16,), (4096,), 2, (True,) * 4) == "sparse"
    monkeypatch.setattr(rl, "_train_choice", lambda *a: "sparse")
    x, A, B, _, gates, dy = _grouped_case(0, torch.float32)
    ids = torch.tensor([[0, 1]] * x.shape[0])
    assert rl._sparse_plan(ids, 16, 48) is None
    y, leaves, got = _train_grads(x, A, B, ids, gates, dy, 0.7, (True,) * 4)
    _assert_matches_oracle(y, leaves, got, x, A, B, ids, gates, dy, 0.7, torch.float32)
    assert train_modes == []
    balanced = _grouped_case(1, torch.float32)  # the grouped form when the real cap allows
    _train_grads(*balanced[:5], balanced[5], 0.7, (True,) * 4)
    assert train_modes == [("grouped", True)]


def test_cpu_training_grouped_path_isolation_and_retain_graph(train_modes):
    """Grouped path: an inf weight of an expert no token uses gives a finite y and gradients equal
    to the per-expert reference (the forward declines, the op runs); a non-finite grad_y row
    reaches only its token's experts (the backward declines); a second backward (retain_graph)
    equals the first."""
    x, A, B, ids, gates, dy = _grouped_case(0, torch.float32)
    unused = sorted(set(range(16)) - set(ids.unique().tolist()))
    needs = (True, True, True, True)
    leaves = _train_leaves(x, A, B, gates, needs)
    with loramix_kernels.use_backend("auto"):
        y = loramix_kernels.routed_lora(x, A, B, ids, gates, 1.5)
        first = torch.autograd.grad(y, leaves, dy, retain_graph=True)
        second = torch.autograd.grad(y, leaves, dy)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert train_modes == [("grouped", True)] * 2
    _assert_matches_oracle(y, leaves, first, x, A, B, ids, gates, dy, 1.5, torch.float32)

    if unused:  # an expert with no token: its inf never reaches y or any gradient
        train_modes.clear()
        A2 = [a.detach().clone() for a in A]
        A2[0][unused[0], 0, 0] = float("inf")
        leaves = _train_leaves(x.detach().clone(), A2, [b.detach() for b in B], gates.detach().clone(), needs)
        with loramix_kernels.use_backend("auto"):
            y2 = loramix_kernels.routed_lora(leaves[0], A2, leaves[3:5], ids, leaves[-1], 1.5)
            got = torch.autograd.grad(y2, leaves, dy)
        assert train_modes == [] and torch.isfinite(y2).all()
        torch.testing.assert_close(y2, y.detach())
        for gr, w in zip(got, first):
            fin = torch.isfinite(w)
            torch.testing.assert_close(gr[fin], w[fin])

    train_modes.clear()
    dy2 = dy.clone()
    dy2[5, 1] = float("nan")
    leaves = _train_leaves(x, A, B, gates, needs)
    with loramix_kernels.use_backend("auto"):
        y = loramix_kernels.routed_lora(x, A, B, ids, gates, 1.5)
        got = torch.autograd.grad(y, leaves, dy2)
    assert train_modes == [("grouped", False)]
    want = routed_lora_backward_ref(dy2, x.detach(), [a.detach() for a in A], [b.detach() for b in B],
                                    ids, gates.detach(), 1.5)
    want = [want[0], *want[1], *want[2], want[3]]
    for gr, w in zip(got, want):
        fin = torch.isfinite(w)
        assert torch.equal(torch.isfinite(gr), fin)
        torch.testing.assert_close(gr[fin], w[fin])


@pytest.mark.parametrize("path", ["dense", "grouped", "soft"])
@pytest.mark.parametrize("bad", [-2, 16, 1000])
def test_cpu_training_path_rejects_out_of_range_ids(path, bad):
    """The training path checks the expert-id range by its scatter / bincount instead of
    validate_routed_lora's aminmax: an id below -1 or >= E still raises the op's error."""
    if path == "grouped":
        x, A, B, ids, gates, _ = _grouped_case(0, torch.float32)
    else:
        x, A, B, ids, gates, _ = _grouped_case(0, torch.float32, T=6, E=16, k=16)
    if path == "soft":  # arange(E) expanded but for one id: not taken for soft routing
        row = torch.arange(16)
        row[1] = bad
        ids = row.expand(6, 16)
    else:
        ids = ids.clone()
        ids[3, 1] = bad
    x.requires_grad_(True)
    with loramix_kernels.use_backend("auto"), pytest.raises(Exception, match=r"routed_lora: expert_ids"):
        loramix_kernels.routed_lora(x, A, B, ids, gates, 1.0)


@pytest.mark.parametrize("strided_in", [False, True])
def test_cpu_training_soft_routing_fast_path(strided_in, train_modes):
    """Dense soft routing passed as arange(E) expanded over the tokens (LoRAMixerLinear's form):
    the gates are used directly (no scatter); the result equals the oracle's and that of the same
    ids materialised (the scatter path), including strided gates and weights."""
    E, T = 6, 20
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, 12, generator=g)
    A = [torch.randn(E, 4, 12, generator=g) / 12 ** 0.5 for _ in range(3)]
    B = [torch.randn(E, n, 4, generator=g) for n in (10, 5, 5)]
    gates = torch.softmax(torch.randn(T, E, generator=g), -1)
    dy = torch.randn(T, 20, generator=g)
    ids = torch.arange(E, dtype=torch.int32).expand(T, E)
    assert rl._train_gates(ids, gates, E, 1.0, torch.float32)[1] is None  # no scatter
    assert rl._train_gates(ids.clone(), gates, E, 1.0, torch.float32)[1] is not None
    if strided_in:
        x, A, B, gates, dy = strided(x), strided(A), strided(B), strided(gates), strided(dy)
    needs = (True, True, True, True)
    y, leaves, got = _train_grads(x, A, B, ids, gates, dy, 0.5, needs)
    _assert_matches_oracle(y, leaves, got, x, A, B, ids, gates, dy, 0.5, torch.float32)
    y2, _, got2 = _train_grads(x, A, B, ids.contiguous().clone(), gates, dy, 0.5, needs)
    torch.testing.assert_close(y, y2)
    for a, b in zip(got, got2):
        torch.testing.assert_close(a, b)
    assert train_modes == [("dense", True)] * 2
