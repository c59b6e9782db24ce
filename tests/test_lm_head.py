"""Tests for lm_head_topk: the k largest logits of hidden @ weight.T per row, ties to the lower
vocabulary index, on both backends (the chunked CPU kernel, the Triton kernels).

Oracles: torch.topk of float64 logits (values within TOL; indices where the float64 logits leave
no near-tie), and, on small-integer inputs whose logits are exact in every dtype and full of ties,
the plain-PyTorch reference's stable-sort order, element for element.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from loramix_kernels import _backend, _native
from loramix_kernels.ops.lm_head import MAX_TRITON_K, lm_head_topk, lm_head_topk_triton, validate_lm_head_topk
from loramix_kernels.reference.lm_head import lm_head_topk_chunked, lm_head_topk_ref

from tests.common import TOL, TRITON_DEVICE, TRITON_OK, assert_close, backends, requires_triton, strided, triton_path

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _int_inputs(M, V, H, dtype, gen, lo=-3, hi=4):
    """Small integers: every product and fp32 sum is exact (|logit| <= 9 H), so every backend
    must return exactly the reference's values and tie order; the narrow range makes ties
    common."""
    h = torch.randint(lo, hi, (M, H), generator=gen).to(dtype)
    w = torch.randint(lo, hi, (V, H), generator=gen).to(dtype)
    return h, w


def _check_against_fp64(values, indices, hidden, weight, k, dtype):
    """Values within TOL of torch.topk over float64 logits; each returned index's float64 logit
    equals its value within TOL (so a swap is allowed only between near-equal logits); indices
    exactly equal on rows without a near-tie around the top k."""
    logits = hidden.double().cpu() @ weight.double().cpu().T
    want = torch.topk(logits, k, dim=1)
    values, indices = values.cpu(), indices.cpu()
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert values.shape == indices.shape == (hidden.shape[0], k)
    scale = max(1.0, float(logits.abs().max())) if logits.numel() else 1.0
    assert_close(values, want.values, dtype, scale=scale)
    assert_close(logits.gather(1, indices), want.values, dtype, scale=scale)
    atol = TOL[dtype][0] * scale
    srt = logits.sort(dim=1, descending=True).values[:, : k + 1]
    gaps = (srt[:, :-1] - srt[:, 1:]).min(1).values if srt.shape[1] > 1 else torch.full((len(srt),), 1e9)
    clear = gaps > 4 * atol
    assert torch.equal(indices[clear], want.indices[clear])
    for row in indices.tolist():
        assert len(set(row)) == k  # no index twice


@pytest.mark.parametrize("name, device, ctx", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, V, H, k", [(3, 1000, 64, 8), (1, 77, 33, 1), (17, 300, 16, 16), (2, 5, 1, 5)])
def test_matches_fp64_topk(name, device, ctx, dtype, M, V, H, k):
    g = torch.Generator().manual_seed(M * 1000 + V)
    h = torch.randn(M, H, generator=g).to(dtype)
    w = torch.randn(V, H, generator=g).to(dtype)
    with ctx():
        values, indices = lm_head_topk(h.to(device), w.to(device), k)
    _check_against_fp64(values, indices, h, w, k, dtype)


@pytest.mark.parametrize("name, device, ctx", backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_ties_go_to_the_lower_index(name, device, ctx, dtype):
    """Duplicate weight rows across vocabulary tiles and splits: equal logits, lower index first,
    on every backend and split count."""
    g = torch.Generator().manual_seed(1)
    V, H = 300, 16
    w = torch.randn(V, H, generator=g)
    h = torch.randn(4, H, generator=g)
    best = (h @ w.T).argmax(1)
    h[:] = h[0]  # every row has the same top row...
    top = int(best[0])
    dup = sorted({top, 3, 40, 131, 299})  # ...duplicated at indices in different tiles
    w[dup] = w[top].clone()
    second = [i for i in (1, 7, 250) if i not in dup]
    w[second] = w[second[0]].clone()  # a second group of ties further down
    h, w = h.to(dtype), w.to(dtype)
    logits = (h.double() @ w.double().T)[0]
    want = sorted(dup)
    k = len(dup)
    cases = [None] if name == "reference" else [None, 1, 2, 5, 100]
    for splits in cases:
        with ctx():
            if splits is None:
                values, indices = lm_head_topk(h.to(device), w.to(device), k)
            else:
                values, indices = lm_head_topk_triton(h.to(device), w.to(device), k, splits=splits)
        assert indices.cpu().tolist() == [want] * 4, splits
        assert torch.equal(values.cpu(), values.cpu()[:, :1].expand(4, k))  # bit-identical ties
        assert_close(values[0].cpu(), logits[want], dtype)
    # all logits equal: the first k indices
    with ctx():
        _, indices = lm_head_topk(torch.ones(2, 3, dtype=dtype, device=device),
                                  torch.ones(50, 3, dtype=dtype, device=device), 6)
    assert indices.cpu().tolist() == [list(range(6))] * 2


@pytest.mark.parametrize("name, device, ctx", backends())
def test_all_equal_rows_with_ties_on_the_kth(name, device, ctx):
    """Ties straddling the k-th place: the selected ones are the lowest indices of the tie."""
    w = torch.tensor([[1.0], [3.0], [2.0], [3.0], [2.0], [2.0], [1.0], [2.0]])
    h = torch.ones(1, 1)
    with ctx():
        values, indices = lm_head_topk(h.to(device), w.to(device), 4)
    assert indices.cpu().tolist() == [[1, 3, 2, 4]]
    assert values.cpu().tolist() == [[3.0, 3.0, 2.0, 2.0]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_kernel_chunks_match_reference(dtype):
    """The CPU kernel's topk + tie repair, chunk by chunk (ties across chunk boundaries), equals
    the stable-sort reference exactly on tie-heavy integer inputs."""
    g = torch.Generator().manual_seed(2)
    for M, V, H, k in [(5, 200, 3, 7), (1, 31, 2, 31), (4, 64, 1, 10)]:
        h, w = _int_inputs(M, V, H, dtype, g, -1, 2)
        want = lm_head_topk_ref(h, w, k)
        for chunk in (None, 7, 16, 64):
            got = lm_head_topk_chunked(h, w, k, chunk=chunk)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), chunk
            ref_chunked = lm_head_topk_ref(h, w, k, chunk=chunk)
            assert torch.equal(ref_chunked[1], want[1])


@requires_triton
def test_many_splits_merge_in_chunks():
    """More split candidates than one merge chunk holds (splits * k > BLOCK_C): ties between
    chunks still go to the lower index."""
    g = torch.Generator().manual_seed(7)
    h, w = _int_inputs(3, 2000, 2, torch.float32, g, -1, 2)
    want = lm_head_topk_ref(h, w, 16)
    with triton_path():
        got = lm_head_topk_triton(h.to(TRITON_DEVICE), w.to(TRITON_DEVICE), 16, splits=40)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 in padding
@pytest.mark.parametrize("name, device, ctx", backends())
def test_infinite_logits(name, device, ctx):
    """+-inf logits rank like numbers: -inf ones still fill the k (no empty slot wins)."""
    h = torch.tensor([[float("inf")], [1.0]])
    w = torch.tensor([[1.0], [-1.0], [1.0]])
    with ctx():
        values, indices = lm_head_topk(h.to(device), w.to(device), 3)
    inf = float("inf")
    assert values.cpu().tolist() == [[inf, inf, -inf], [1.0, 1.0, -1.0]]
    assert indices.cpu().tolist() == [[0, 2, 1], [0, 2, 1]]


@requires_triton
def test_large_k_runs_the_chunked_kernel():
    g = torch.Generator().manual_seed(3)
    h, w = _int_inputs(3, 100, 8, torch.float32, g)
    k = MAX_TRITON_K + 6
    with triton_path():
        values, indices = lm_head_topk(h.to(TRITON_DEVICE), w.to(TRITON_DEVICE), k)
    want = lm_head_topk_ref(h, w, k)
    assert torch.equal(values.cpu(), want[0]) and torch.equal(indices.cpu(), want[1])


@pytest.mark.parametrize("name, device, ctx", backends())
def test_bad_inputs(name, device, ctx):
    h = torch.randn(2, 4, device=device)
    w = torch.randn(10, 4, device=device)
    with ctx():
        with pytest.raises(ValueError, match=r"lm_head_topk: k must lie in \[1, V=10\], got 0"):
            lm_head_topk(h, w, 0)
        with pytest.raises(ValueError, match=r"lm_head_topk: k must lie in \[1, V=10\], got 11"):
            lm_head_topk(h, w, 11)
        with pytest.raises(ValueError, match=r"lm_head_topk: weight must have shape \[V, H=4\]"):
            lm_head_topk(h, w[:, :3], 2)
        with pytest.raises(TypeError, match="lm_head_topk: weight must have hidden's dtype"):
            lm_head_topk(h, w.half(), 2)
        with pytest.raises(TypeError, match="lm_head_topk: hidden must have dtype"):
            lm_head_topk(h.long(), w, 2)
        with pytest.raises(ValueError, match="lm_head_topk: hidden must have 2 dimensions"):
            lm_head_topk(h[None], w, 2)
        with pytest.raises(ValueError, match="lm_head_topk: weight must have 2 dimensions"):
            lm_head_topk(h, w[None], 2)
        with pytest.raises(ValueError, match="lm_head_topk: weight must be on meta"):
            lm_head_topk(h.to("meta"), w, 2)


def test_autocast_runs_in_the_region_dtype():
    """Inside autocast, fp32 hidden and a bf16 head are both cast to the region's dtype."""
    g = torch.Generator().manual_seed(4)
    h, w = _int_inputs(3, 40, 8, torch.float32, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values, indices = lm_head_topk(h, w.bfloat16(), 3)
    want = lm_head_topk_ref(h, w, 3)
    assert torch.equal(values, want[0]) and torch.equal(indices, want[1])


def test_empty_rows():
    for ctx in (p.values[2] for p in backends()):
        with ctx():
            values, indices = lm_head_topk(torch.empty(0, 5), torch.randn(9, 5), 3)
        assert values.shape == indices.shape == (0, 3)


@given(M=st.sampled_from([0, 1, 3, 17]), V=st.sampled_from([1, 5, 64, 300, 1000]),
       H=st.sampled_from([1, 16, 33, 64]), dtype=st.sampled_from(DTYPES),
       strided_inputs=st.booleans(), transposed_weight=st.booleans(),
       splits=st.sampled_from([None, 1, 2, 3, 7]), data=st.data())
def test_hypothesis_exact_on_integer_logits(M, V, H, dtype, strided_inputs, transposed_weight, splits, data):
    """Integer inputs (exact logits, many ties): the Triton kernels (any split count) and the CPU
    kernel equal the reference element for element, for strided and transposed layouts."""
    k = data.draw(st.integers(1, min(V, 16)), label="k")
    g = torch.Generator().manual_seed(M * 7919 + V * 31 + H + k)
    h, w = _int_inputs(M, V, H, dtype, g)
    want = lm_head_topk_ref(h, w, k)
    if transposed_weight:  # a [V, H] view of an [H, V] tensor (tied embedding layouts)
        w = w.T.contiguous().T
    if strided_inputs:
        h, w = strided(h), strided(w)
    validate_lm_head_topk(h, w, k)
    got_cpu = lm_head_topk_chunked(h, w, k)
    assert torch.equal(got_cpu[0], want[0]) and torch.equal(got_cpu[1], want[1])
    if TRITON_OK:
        with triton_path():
            got = lm_head_topk_triton(h.to(TRITON_DEVICE), w.to(TRITON_DEVICE), k, splits=splits)
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@pytest.mark.parametrize("name, device, ctx", backends())
def test_fp64_oracle_on_strided_inputs(name, device, ctx):
    g = torch.Generator().manual_seed(6)
    h = torch.randn(5, 40, generator=g)
    w = torch.randn(120, 40, generator=g)
    with ctx():
        values, indices = lm_head_topk(strided(h.to(device)), w.to(device).T.contiguous().T, 6)
    _check_against_fp64(values, indices, h, w, 6, torch.float32)


def sample_inputs(device):
    """(op name, args) for tests/test_contract.py."""
    g = torch.Generator().manual_seed(0)
    out = []
    for M, V, H, k, dtype in [(3, 70, 16, 4, torch.float32), (2, 33, 8, 1, torch.bfloat16),
                              (5, 20, 24, 20, torch.float16)]:
        h = torch.randn(M, H, generator=g).to(dtype)
        w = torch.randn(V, H, generator=g).to(dtype)
        out.append(("lm_head_topk", (h.to(device), w.to(device), k)))
    return out


@pytest.mark.parametrize("name, device, ctx", backends())
def test_nan_logits_rank_as_minus_inf(name, device, ctx):
    """A row with fewer than k non-NaN logits (a NaN hidden row, NaN weights) still returns real
    token ids in [0, V), the same on every path: NaN ranks as -inf."""
    V, H = 40, 8
    w = torch.full((V, H), float("nan"))
    w[3] = 1.0
    w[17] = 2.0
    h = torch.ones(3, H)
    h[2] = float("nan")  # every logit of row 2 is NaN
    with ctx():
        vals, idx = lm_head_topk(h.to(device), w.to(device), 4)
    idx, vals = idx.cpu(), vals.cpu()
    assert int(idx.max()) < V and int(idx.min()) >= 0
    assert idx[0].tolist() == [17, 3, 0, 1] and idx[1].tolist() == [17, 3, 0, 1]
    assert idx[2].tolist() == [0, 1, 2, 3]
    assert vals[0, :2].tolist() == [16.0, 8.0] and bool(torch.isinf(vals[:, 2:]).all())


@pytest.mark.skipif(not _native.has_op("_lm_head_topk_cpu"), reason="C++ extension not built")
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_cpu_kernel_matches_reference(dtype):
    """The native CPU kernel (one pass per row with the tie rule built in) equals the stable-sort
    reference exactly: tie-heavy integer logits, NaN and infinite logits, strided and transposed
    operands, k from 1 to the largest native k; larger k falls back to the chunked kernel."""
    from loramix_kernels.ops.lm_head import NATIVE_MAX_K, lm_head_topk_cpu

    g = torch.Generator().manual_seed(7)
    for M, V, H, k in [(1, 1, 1, 1), (3, 50, 2, 1), (5, 200, 3, 7), (2, 64, 1, NATIVE_MAX_K),
                       (4, 300, 2, NATIVE_MAX_K + 1)]:
        h, w = _int_inputs(M, V, H, dtype, g, -1, 2)
        if V > 10:
            w[3] = float("nan")
            w[5] = float("inf")
            w[7] = -float("inf")
        wt = w.t().contiguous().t()  # same values, transposed strides
        hs = torch.stack([h, torch.zeros_like(h)], -1).flatten(1)[:, ::2]  # h, element stride 2
        want = lm_head_topk_ref(h, w, k)
        for hh, ww in ((h, w), (hs, wt)):
            got = lm_head_topk_cpu(hh, ww, k)
            assert torch.equal(got[1], want[1]), (M, V, H, k)
            torch.testing.assert_close(got[0], want[0], equal_nan=True)
