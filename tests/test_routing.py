"""route_topk: fused softmax + top-k router (Triton kernel under the interpreter, CPU kernel,
reference), tie rule, strides, dtypes, autograd, compile, bad inputs.

The generic contract (opcheck of every sample, inductor compile, strided views, doctests) lives in
tests/test_contract.py, fed by :func:`sample_inputs`.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import loramix_kernels.ops.routing  # noqa: F401  (registers torch.ops.loramix.route_topk)
from loramix_kernels.ops.routing import MAX_EXPERTS, _tiles, route_topk
from loramix_kernels.reference.routing import route_topk_keyed, route_topk_ref

from tests.common import TOL, backends, reference_path, requires_triton, strided, triton_path

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EXPERTS = [1, 2, 3, 7, 8, 64, 256]
TRITON_PATH_OK = len(backends()) > 1


def sample_inputs(device):
    g = torch.Generator().manual_seed(11)

    def logits(T, E, dtype):
        return (torch.randn(T, E, generator=g) * 2).to(dtype).to(device)

    return [
        ("route_topk", (logits(5, 7, torch.float32), 3, True)),
        ("route_topk", (logits(4, 8, torch.bfloat16), 2, False)),
        ("route_topk", (logits(3, 6, torch.float16), 6, True)),
        ("route_topk", (logits(1, 1, torch.float32), 1, False)),
        ("route_topk", (logits(0, 4, torch.float32), 2, True)),
        ("route_topk", (logits(6, 64, torch.float32), 1, False)),
        # ties: equal logits, resolved to the lower index
        ("route_topk", (torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], device=device), 3, True)),
    ]


def grid_logits(T, E, dtype, seed, spread=32):
    """Logits on a 1/8 grid (exact in every dtype): equal logits are frequent (ties), and distinct
    ones differ by >= 1/8, so no two implementations can disagree on the order through rounding."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-spread, spread + 1, (T, E), generator=g).double() / 8).to(dtype)


def check_against_reference(logits, k, renormalize, got):
    """ids exactly, probs and gates against the float64 reference of the same logits."""
    gates, ids, probs = got
    T, E = logits.shape
    want_g, want_i, want_p = route_topk_ref(logits.double().cpu(), k, renormalize)
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert gates.shape == (T, k) and ids.shape == (T, k) and probs.shape == (T, E)
    assert gates.dtype == probs.dtype == cdt and ids.dtype == torch.int32
    assert gates.is_contiguous() and ids.is_contiguous() and probs.is_contiguous()
    assert torch.equal(ids.cpu(), want_i)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(probs.cpu().double(), want_p, atol=atol, rtol=rtol)
    torch.testing.assert_close(gates.cpu().double(), want_g, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend, device, ctx", backends())
@settings(max_examples=20)
@given(E=st.sampled_from(EXPERTS), T=st.sampled_from([0, 1, 5, 33]), data=st.data(),
       dtype=st.sampled_from(DTYPES), renormalize=st.booleans(), seed=st.integers(0, 2**16),
       layout=st.sampled_from(["contiguous", "strided", "transposed"]))
def test_matches_reference(backend, device, ctx, E, T, data, dtype, renormalize, seed, layout):
    # k up to E, biased to the small k routers use
    k = data.draw(st.one_of(st.integers(1, min(E, 8)), st.integers(1, E)), label="k")
    x = grid_logits(T, E, dtype, seed).to(device)
    if layout == "strided":
        x = strided(x)
    elif layout == "transposed":
        x = x.t().contiguous().t()
    with ctx():
        got = route_topk(x, k, renormalize)
    check_against_reference(x, k, renormalize, got)


@pytest.mark.parametrize("backend, device, ctx", backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_continuous_logits(backend, device, ctx, dtype):
    """Random continuous logits: probabilities within the dtype's tolerance of the float64
    oracle, and the chosen experts are a true top-k of the oracle (a near-tie may order two
    experts whose probabilities agree to rounding either way, so compare the chosen values)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(37, 64, generator=g) * 3).to(dtype).to(device)
    with ctx():
        gates, ids, probs = route_topk(x, 5, False)
    want_g, _, want_p = route_topk_ref(x.double().cpu(), 5, False)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(probs.cpu().double(), want_p, atol=atol, rtol=rtol)
    torch.testing.assert_close(want_p.gather(1, ids.cpu().long()), want_g, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gates.cpu().double(), want_g, atol=atol, rtol=rtol)
    assert all(len(set(r)) == 5 for r in ids.tolist())


@pytest.mark.parametrize("backend, device, ctx", backends())
def test_ties_go_to_lower_index(backend, device, ctx):
    x = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0],
                      [5.0, 1.0, 5.0, 1.0, 5.0],
                      [-1.0, 2.0, -1.0, 2.0, -1.0]], device=device)
    with ctx():
        _, ids2, _ = route_topk(x, 2, False)
        g4, ids4, _ = route_topk(x, 4, True)
        _, ids5, _ = route_topk(x, 5, False)
    assert ids2.tolist() == [[1, 2], [0, 1], [0, 2], [1, 3]]
    assert ids4.tolist() == [[1, 2, 3, 0], [0, 1, 2, 3], [0, 2, 4, 1], [1, 3, 0, 2]]
    assert ids5.tolist() == [[1, 2, 3, 0, 4], [0, 1, 2, 3, 4], [0, 2, 4, 1, 3], [1, 3, 0, 2, 4]]
    torch.testing.assert_close(g4[1].cpu(), torch.full((4,), 0.25))


@pytest.mark.parametrize("kernel", ["keyed", "native"])
def test_cpu_kernel_tie_rule_is_the_references(kernel):
    """The CPU kernels (route_topk_keyed's integer key; the native one-pass selection) against
    the stable sort, on many tied rows (grid logits), with a row of -inf logits and a NaN logit
    (NaN probabilities rank below every real one, in index order)."""
    from loramix_kernels import _native
    from loramix_kernels.ops.routing import route_topk_cpu

    if kernel == "native" and not _native.has_op("_route_topk_cpu"):
        pytest.skip("C++ extension not built")
    fn = route_topk_keyed if kernel == "keyed" else route_topk_cpu
    for E, k in [(1, 1), (6, 3), (64, 8), (256, 256), (256, 7)]:
        x = grid_logits(50, E, torch.float32, E + k, spread=4)
        x[3] = -float("inf")
        x[7, E // 2] = float("nan")
        for xx in (x, x.t().contiguous().t(), x.to(torch.bfloat16)):
            for r in (False, True):
                a, b = fn(xx, k, r), route_topk_ref(xx, k, r)
                assert torch.equal(a[1], b[1])
                # renormalised gates: the sum of k floats may be taken in another order (1 ulp)
                tol = dict(atol=0, rtol=2.4e-7) if r else dict(atol=0, rtol=0)
                torch.testing.assert_close(a[0], b[0], equal_nan=True, **tol)
                torch.testing.assert_close(a[2], b[2], atol=0, rtol=0, equal_nan=True)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's NaN row
@pytest.mark.parametrize("backend, device, ctx", backends())
def test_masked_and_nan_rows(backend, device, ctx):
    """-inf masks an expert (probability 0, never chosen while a finite one is left); a row of
    all -inf gives NaN probabilities but still k distinct ids in index order, on both paths."""
    inf = float("inf")
    x = torch.tensor([[-inf, 0.0, -inf, 1.0], [-inf, -inf, -inf, -inf]], device=device)
    with ctx():
        gates, ids, probs = route_topk(x, 3, False)
    assert ids.tolist() == [[3, 1, 0], [0, 1, 2]]
    assert probs[0, 0] == 0 and gates[0, 2] == 0
    assert torch.isnan(probs[1]).all() and torch.isnan(gates[1]).all()


@pytest.mark.parametrize("backend, device, ctx", backends())
@pytest.mark.parametrize("view", ["transposed", "every_other_column", "expanded_rows", "offset"])
def test_strided_logits(backend, device, ctx, view):
    g = torch.Generator().manual_seed(5)
    base = (torch.randint(-16, 17, (9, 24), generator=g) / 8).to(device)
    x = {"transposed": base.t().contiguous().t()[:, :7],
         "every_other_column": base[:, ::2],
         "expanded_rows": base[2:3].expand(9, 24),
         "offset": base[3:, 5:]}[view]
    assert not x.is_contiguous()
    with ctx():
        got = route_topk(x, 3, True)
        want = route_topk(x.contiguous(), 3, True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    check_against_reference(x, 3, True, got)


@requires_triton
def test_many_programs_and_tail_rows():
    """T large enough for the largest row tile (BLOCK_T = 128) and a partial last program."""
    T, E, k = 128 * 256 + 5, 5, 2
    assert _tiles(T, E, k)[0] == 128
    x = grid_logits(T, E, torch.float32, 7)
    with triton_path():
        got = route_topk(x, k, True)
    check_against_reference(x, k, True, got)


def test_tiles():
    for T in (1, 64, 4096, 32768):
        for E in (1, 6, 8, 64, 256, 1024):
            bt, be, bk, nw = _tiles(T, E, min(8, E))
            assert be >= E and be & (be - 1) == 0 and bt & (bt - 1) == 0 and bk >= min(8, E)
            assert bt * be <= 2048 or bt == 1
    # decode spreads over one program per row; long prefills take many rows per program
    assert _tiles(64, 8, 2)[0] == 1 and _tiles(32768, 8, 2)[0] == 128


# ------------------------------------------------------------------------------------------------
# autograd


@pytest.mark.parametrize("backend, device, ctx", backends())
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_gradcheck_float64(backend, device, ctx, renormalize, k):
    if device != "cpu":
        pytest.skip("float64 logits are CPU-only")
    g = torch.Generator().manual_seed(k)
    # distinct logits (spaced by >= 0.3): the top-k set is constant within gradcheck's eps
    x = (torch.randperm(12, generator=g).double().view(3, 4) * 0.3).requires_grad_(True)
    with ctx():
        assert torch.autograd.gradcheck(lambda z: route_topk(z, k, renormalize)[::2], (x,))
        if k % 2:
            return
        # gates only and probs only (the other gradient arrives as None)
        assert torch.autograd.gradcheck(lambda z: route_topk(z, k, renormalize)[0], (x,))
        assert torch.autograd.gradcheck(lambda z: route_topk(z, k, renormalize)[2], (x,))


@pytest.mark.parametrize("backend, device, ctx", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [False, True])
def test_backward_matches_autograd_of_reference(backend, device, ctx, dtype, renormalize):
    g = torch.Generator().manual_seed(1)
    x0 = (torch.randn(17, 8, generator=g) * 2).to(dtype)
    wg, wp = torch.randn(17, 3, generator=g), torch.randn(17, 8, generator=g)
    x = x0.clone().to(device).requires_grad_(True)
    with ctx():
        gates, ids, probs = route_topk(x, 3, renormalize)
        ((gates * wg.to(device)).sum() + (probs * wp.to(device)).sum()).backward()
    assert x.grad.dtype == dtype
    xr = x0.double().requires_grad_(True)
    rg, ri, rp = route_topk_ref(xr, 3, renormalize)  # autograd through its torch ops
    assert torch.equal(ids.cpu(), ri)
    ((rg * wg.double()).sum() + (rp * wp.double()).sum()).backward()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(x.grad.cpu().double(), xr.grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend, device, ctx", backends())
def test_top1_renormalised_gate_has_no_gradient(backend, device, ctx):
    """k = 1 with renormalisation: the gate is the constant 1 (the router learns only through
    probs); without renormalisation the gate is p_max and the router gets a real gradient."""
    x = torch.tensor([[0.3, 1.2, -0.5]], device=device, requires_grad=True)
    with ctx():
        g, _, _ = route_topk(x, 1, True)
        assert g.item() == 1.0
        (dx,) = torch.autograd.grad(g.sum(), x)
        assert dx.abs().max() == 0
        g, _, p = route_topk(x, 1, False)
        (dx,) = torch.autograd.grad(g.sum(), x)
    p = p.detach()
    want = p[0, 1] * ((torch.arange(3, device=device) == 1).float() - p[0])
    torch.testing.assert_close(dx[0], want)


@pytest.mark.parametrize("backend, device, ctx", backends())
@pytest.mark.parametrize("T", [0, 1])
def test_backward_edge_rows(backend, device, ctx, T):
    x = torch.randn(T, 5, device=device, requires_grad=True)
    with ctx():
        gates, ids, probs = route_topk(x, 5, True)
        (gates.sum() + probs.square().sum()).backward()
    assert x.grad.shape == (T, 5) and torch.isfinite(x.grad).all()
    if T:  # k = E with renormalisation: gates are the probabilities, sorted; sum 1 = const
        torch.testing.assert_close(gates.sum(-1), torch.ones(T, device=device))


# ------------------------------------------------------------------------------------------------
# opcheck with gradients, compile with changing shapes (the contract covers the plain cases)


@pytest.mark.parametrize("backend, device, ctx", backends())
@pytest.mark.parametrize("renormalize", [False, True])
def test_opcheck_with_grad(backend, device, ctx, renormalize):
    x = (torch.randn(6, 7) * 2).to(device).requires_grad_(True)
    with ctx():
        torch.library.opcheck(torch.ops.loramix.route_topk.default, (x, 3, renormalize))


@pytest.mark.parametrize("backend, device, ctx", backends())
def test_compile_dynamic_forward_backward(backend, device, ctx):
    """Inductor with dynamic T: one graph for several token counts, forward and backward."""
    def step(x, w):
        gates, ids, probs = route_topk(x, 2, True)
        return (gates * w[: x.shape[0]]).sum() + (probs * probs).sum(), ids

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    w = torch.randn(20, 2, device=device)
    with ctx():
        for T in (3, 9, 20):
            x0 = grid_logits(T, 6, torch.float32, T).to(device)
            a = x0.clone().requires_grad_(True)
            b = x0.clone().requires_grad_(True)
            la, ia = step(a, w)
            lb, ib = compiled(b, w)
            la.backward()
            lb.backward()
            assert torch.equal(ia, ib)
            torch.testing.assert_close(la, lb)
            torch.testing.assert_close(a.grad, b.grad)


# ------------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize("args, exc, match", [
    ((torch.randn(4, 3), 0, False), ValueError, r"route_topk: k must lie in \[1, E=3\], got 0"),
    ((torch.randn(4, 3), 4, True), ValueError, r"route_topk: k must lie in \[1, E=3\], got 4"),
    ((torch.randn(4, 3), -1, True), ValueError, r"route_topk: k must lie"),
    ((torch.randn(12), 1, False), ValueError, r"route_topk: logits must have 2 dimensions"),
    ((torch.randn(2, 3, 4), 1, False), ValueError, r"route_topk: logits must have 2 dimensions"),
    ((torch.randint(0, 3, (4, 3)), 1, False), TypeError, r"route_topk: logits must have dtype"),
    ((torch.ones(4, 3, dtype=torch.bool), 1, False), TypeError, r"route_topk: logits must have dtype"),
    ((torch.randn(4, 0), 1, False), ValueError, r"route_topk: logits must have at least one expert"),
    ((torch.randn(2, MAX_EXPERTS + 1), 1, False), ValueError, r"route_topk: logits must have at most"),
])
@pytest.mark.parametrize("path", [reference_path, triton_path], ids=["reference", "triton"])
def test_bad_inputs(args, exc, match, path):
    if path is triton_path and not TRITON_PATH_OK:
        pytest.skip("no Triton path")
    with path():
        with pytest.raises(exc, match=match):
            route_topk(*args)


def test_bad_inputs_fake():
    """The fake kernel (torch.compile, meta tensors) raises the same errors."""
    with pytest.raises(ValueError, match=r"route_topk: k must lie in \[1, E=3\], got 5"):
        torch.ops.loramix.route_topk(torch.empty(4, 3, device="meta"), 5, False)
    g, i, p = torch.ops.loramix.route_topk(torch.empty(4, 3, device="meta", dtype=torch.bfloat16), 2, False)
    assert (g.shape, i.shape, p.shape) == ((4, 2), (4, 2), (4, 3))
    assert (g.dtype, i.dtype, p.dtype) == (torch.float32, torch.int32, torch.float32)
    assert g.is_contiguous() and i.is_contiguous() and p.is_contiguous()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_float64_rejected_on_cuda():
    with pytest.raises(ValueError, match="route_topk: logits may be float64 only on CPU"):
        route_topk(torch.randn(2, 3, device="cuda", dtype=torch.float64), 1)


def test_k_must_be_int():
    with pytest.raises((TypeError, RuntimeError)):
        route_topk(torch.randn(2, 3), 1.5)

