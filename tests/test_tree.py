"""build_tree and tree_attention: the reference and the fast CPU kernel against independent
float64 / pure-Python oracles, the Triton kernels (GPU, or CPU under the interpreter) against them,
the family's specific fixes (issues 8 / 9), bad input. ``sample_inputs`` feeds
tests/test_contract.py (opcheck, torch.compile, strided views of every argument); the table of bad
and edge inputs is tests/test_tree_adversarial.py.

Interpreter budget: most attention cases use D in {16, 32}, short prefixes and few heads; D = 128
and 256 appear with tiny prefixes only.
"""

import ast
import inspect
import math
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from loramix_kernels import _native, build_tree, tree_attention
from loramix_kernels.ops import tree as T
from loramix_kernels.reference.tree import build_tree_ref, tree_attention_ref

from tests.common import HAS_CUDA, TRITON_DEVICE, assert_close, backends, reference_path, \
    requires_cuda, requires_triton, strided, to_device, triton_path, value_checks_off, value_checks_on

# --------------------------------------------------------------------------------------------------
# Trees and oracles
# --------------------------------------------------------------------------------------------------


def make_parents(B: int, N: int, kind: str, seed: int = 0, dtype=torch.int64) -> torch.Tensor:
    """Draft trees: ``chain`` (one path), ``star`` (all children of the root), ``random`` (any
    earlier node), ``padded`` (random with about a third of the nodes unused, parent -1)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(B):
        p = [-1]
        for i in range(1, N):
            if kind == "chain":
                p.append(i - 1)
            elif kind == "star":
                p.append(0)
            elif kind == "random":
                p.append(rng.randrange(i))
            elif kind == "padded":
                p.append(-1 if rng.random() < 0.35 else rng.randrange(i))
            else:
                raise ValueError(kind)
        rows.append(p)
    return torch.tensor(rows, dtype=dtype)


def oracle_tree(parents: torch.Tensor):
    """Pure-Python build_tree: ancestor sets by walking up, packed words, child lists."""
    B, N = parents.shape
    W = (N + 31) // 32
    P = parents.tolist()
    anc = [[set() for _ in range(N)] for _ in range(B)]
    mask = torch.zeros(B, N, W, dtype=torch.int32)
    depth = torch.zeros(B, N, dtype=torch.int32)
    first = torch.full((B, N), -1, dtype=torch.int32)
    nsib = torch.full((B, N), -1, dtype=torch.int32)
    for b in range(B):
        for i in range(N):
            cur, d = i, -1
            while cur != -1:
                anc[b][i].add(cur)
                cur, d = P[b][cur], d + 1
            depth[b, i] = d
            for w in range(W):
                val = sum(1 << (j - 32 * w) for j in anc[b][i] if 32 * w <= j < 32 * w + 32)
                mask[b, i, w] = val - (1 << 32) if val >= 1 << 31 else val
            kids = [c for c in range(N) if P[b][c] == i]
            first[b, i] = kids[0] if kids else -1
            if P[b][i] >= 0:
                later = [c for c in range(i + 1, N) if P[b][c] == P[b][i]]
                nsib[b, i] = later[0] if later else -1
    return (mask, depth, first, nsib), anc


def make_attention_case(B, N, Hq, Hkv, D, block_size, prefix_lens, dtype, kind="random", seed=0,
                        device="cpu"):
    """Random q and paged cache with shuffled physical blocks; the block table has one spare
    column filled with -1 (never read) and the cache a few blocks nobody owns."""
    g = torch.Generator().manual_seed(seed)
    parents = make_parents(B, N, kind, seed)
    seq_lens = torch.tensor([p + N for p in prefix_lens], dtype=torch.int32)
    nblk = [(int(s) + block_size - 1) // block_size for s in seq_lens]
    num_blocks = sum(nblk) + 3
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.full((B, max(nblk) + 1), -1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(nblk):
        table[b, :n] = perm[at:at + n]
        at += n
    q = torch.randn(B, N, Hq, D, generator=g).to(dtype)
    k = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
    v = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
    tree_mask = build_tree_ref(parents)[0]
    args = [q, k, v, table, seq_lens, tree_mask]
    return parents, [a.to(device) for a in args]


def oracle_attention(q, k_cache, v_cache, block_table, seq_lens, parents, sm_scale):
    """Float64, request by request: gather the cache position by position; node i sees the
    prefix and the tree nodes on its root path (walked from ``parents``, not from the mask)."""
    B, N, Hq, D = q.shape
    Hkv, bs = k_cache.shape[2], k_cache.shape[1]
    G = Hq // Hkv
    out = torch.zeros(B, N, Hq, D, dtype=torch.float64)
    _, anc = oracle_tree(parents.cpu())
    for b in range(B):
        L = int(seq_lens[b])
        P = L - N
        blk = [int(block_table[b, t // bs]) for t in range(L)]
        K = torch.stack([k_cache[blk[t], t % bs] for t in range(L)]).double().cpu()  # [L, Hkv, D]
        V = torch.stack([v_cache[blk[t], t % bs] for t in range(L)]).double().cpu()
        for i in range(N):
            vis = list(range(P)) + sorted(P + j for j in anc[b][i])
            kh = K[vis].repeat_interleave(G, dim=1)  # [l, Hq, D]
            vh = V[vis].repeat_interleave(G, dim=1)
            s = torch.einsum("hd,lhd->hl", q[b, i].double().cpu(), kh) * sm_scale
            out[b, i] = torch.einsum("hl,lhd->hd", torch.softmax(s, -1), vh)
    return out


def sample_inputs(device):
    """(op name, args) pairs covering both ops: dtypes, int32 / int64 indices, N = 1 and N = 33 (two
    mask words), GQA, prefix 0, sm_scale given and None, a node hanging from a padding node."""
    out = [
        ("build_tree", (make_parents(2, 7, "random", seed=1, dtype=torch.int32).to(device),)),
        ("build_tree", (make_parents(3, 33, "padded", seed=2).to(device),)),
        ("build_tree", (torch.tensor([[-1]], device=device),)),
        ("build_tree", (torch.tensor([[-1, 0, -1, 2, 3]], device=device),)),
    ]
    dtypes = [torch.float16, torch.bfloat16] + ([torch.float32] if device == "cpu" else [])
    for i, dtype in enumerate(dtypes):
        _, args = make_attention_case(2, 5, 4, 2, 16, 16, [3, 18], dtype, "random", seed=i,
                                      device=device)
        out.append(("tree_attention", (*args, 0.25)))
    _, args = make_attention_case(2, 33, 4, 1, 16, 32, [0, 9], dtypes[0], "padded", seed=5,
                                  device=device)
    args[3], args[4] = args[3].long(), args[4].long()
    out.append(("tree_attention", (*args, None)))
    _, args = make_attention_case(1, 1, 2, 2, 32, 16, [0], dtypes[-1], "chain", device=device)
    out.append(("tree_attention", (*args, 0.5)))
    return out


# --------------------------------------------------------------------------------------------------
# build_tree
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, device, ctx", backends())
@pytest.mark.parametrize("kind", ["chain", "star", "random", "padded"])
@pytest.mark.parametrize("N", [1, 7, 32, 33, 64, 256])
def test_build_tree_matches_oracle(backend, device, ctx, kind, N):
    parents = make_parents(3, N, kind, seed=N)
    expected, _ = oracle_tree(parents)
    with ctx():
        got = build_tree(parents.to(device))
    for name, g, e in zip(["tree_mask", "depth", "first_child", "next_sibling"], got, expected):
        assert g.dtype == torch.int32, name
        assert torch.equal(g.cpu(), e), name


@pytest.mark.parametrize("backend, device, ctx", backends())
def test_build_tree_small_example_and_int32(backend, device, ctx):
    parents = torch.tensor([[-1, 0, 0, 1, -1, 3]], dtype=torch.int32, device=device)
    with ctx():
        mask, depth, first, nsib = build_tree(parents)
    # node 4 is padding: sees only itself, depth 0, nobody's child.
    assert mask[0, :, 0].tolist() == [0b1, 0b11, 0b101, 0b1011, 0b10000, 0b101011]
    assert depth.tolist() == [[0, 1, 1, 2, 0, 3]]
    assert first.tolist() == [[1, 3, -1, 5, -1, -1]]
    assert nsib.tolist() == [[-1, 2, -1, -1, -1, -1]]


@requires_triton
@given(st.data())
def test_build_tree_hypothesis(data):
    B = data.draw(st.integers(1, 3))
    N = data.draw(st.integers(1, 100))
    rows = []
    for _ in range(B):
        rows.append([-1] + [data.draw(st.integers(-1, i - 1)) for i in range(1, N)])
    parents = torch.tensor(rows, dtype=torch.int64)
    expected, _ = oracle_tree(parents)
    with reference_path():
        ref = build_tree(parents)
    with triton_path():
        got = build_tree(parents.to(TRITON_DEVICE))
    for g, r, e in zip(got, ref, expected):
        assert torch.equal(r, e)
        assert torch.equal(g.cpu(), e)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_build_tree_kernel_sanitises_bad_parents(dtype):
    """With value checks off (as on CUDA), bad parents act as -1 and nothing is read out of
    bounds: the kernel's output equals the oracle on the sanitised parents."""
    parents = torch.tensor([[-1, 5, 0, 3, -7, 2, 100, 1], [4, 0, 1, 1, 2, 9, 0, -1]], dtype=dtype)
    clean = torch.where((parents >= 0) & (parents < torch.arange(8)), parents, -1)
    expected, _ = oracle_tree(clean)
    with triton_path(), value_checks_off():
        got = build_tree(parents.to(TRITON_DEVICE))
    for g, e in zip(got, expected):
        assert torch.equal(g.cpu(), e)


@pytest.mark.parametrize("backend, device, ctx", backends())
def test_build_tree_int64_parents_do_not_wrap(backend, device, ctx):
    """Issue 9.6: 2^32 + 1 (and -2^32 + 1) are not parent 1. With value checks off they count as
    -1 (no parent) on both paths; the Triton kernel used to narrow them to int32 first
    (parent 1)."""
    parents = torch.tensor([[-1, 0, 2**32 + 1, -(2**32) + 1, 1]], dtype=torch.int64)
    expected, _ = oracle_tree(torch.tensor([[-1, 0, -1, -1, 1]]))
    with ctx(), value_checks_off():
        got = build_tree(parents.to(device))
    for name, g, e in zip(["tree_mask", "depth", "first_child", "next_sibling"], got, expected):
        assert torch.equal(g.cpu(), e), name
    with ctx(), value_checks_on(), pytest.raises(ValueError, match=r"build_tree: parents .*\[0, 2\] = "
                                               r"4294967297"):
        build_tree(parents.to(device))


@pytest.mark.parametrize("backend, device, ctx", backends())
def test_build_tree_child_of_padding_node(backend, device, ctx):
    """The one parents rule (docs/API.md): a node hanging from a padding node is accepted, and its
    mask row holds its own ancestors as the parents array says (node 3 -> 2 (padding); 4 -> 3)."""
    parents = torch.tensor([[-1, 0, -1, 2, 3, 1]], device=device)
    with ctx(), value_checks_on():
        mask, depth, first, nsib = build_tree(parents)
    assert mask[0, :, 0].tolist() == [0b1, 0b11, 0b100, 0b1100, 0b11100, 0b100011]
    assert depth.tolist() == [[0, 1, 0, 1, 2, 2]]
    assert first.tolist() == [[1, 5, 3, 4, -1, -1]]
    assert nsib.tolist() == [[-1, -1, -1, -1, -1, -1]]


@pytest.mark.parametrize("backend, device, ctx", backends())
@pytest.mark.parametrize("parents, match", [
    ([[-1, 1, 0]], r"parents\[0, 1\] = 1, must be -1 \(padding\) or lie in \[0, 1\)"),
    ([[-1, 0, 3, 1]], r"parents\[0, 2\] = 3"),
    ([[-1, 0], [0, 0]], r"parents\[1, 0\] = 0, must be -1 \(node 0 is the root\)"),
    ([[-1, -2]], r"parents\[0, 1\] = -2"),
])
def test_build_tree_bad_values(backend, device, ctx, parents, match):
    with ctx(), value_checks_on(), pytest.raises(
            ValueError, match=r"build_tree: parents is not a tree: " + match):
        build_tree(torch.tensor(parents, device=device))


@pytest.mark.parametrize("backend, device, ctx", backends())
def test_build_tree_bad_metadata(backend, device, ctx):
    with ctx():
        with pytest.raises(ValueError, match="build_tree: parents must have 2 dimensions"):
            build_tree(torch.tensor([-1, 0], device=device))
        with pytest.raises(TypeError, match="build_tree: parents must have dtype"):
            build_tree(torch.tensor([[-1.0, 0.0]], device=device))
        with pytest.raises(ValueError, match="build_tree: parents must have at least one node"):
            build_tree(torch.zeros(2, 0, dtype=torch.int64, device=device))


# --------------------------------------------------------------------------------------------------
# tree_attention: reference against the float64 oracle
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["chain", "star", "random", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_attention_matches_oracle(kind, dtype):
    parents, args = make_attention_case(3, 9, 8, 2, 16, 16, [0, 5, 40], dtype, kind, seed=1)
    scale = 0.3
    expected = oracle_attention(*args[:5], parents, scale)
    got = tree_attention_ref(*args, scale)
    assert got.dtype == dtype and got.shape == args[0].shape
    assert_close(got, expected, dtype)


def test_reference_empty_row_is_zero():
    """A mask row without any bit (and no prefix) sees nothing: zeros, not NaN (as the kernel)."""
    _, args = make_attention_case(1, 3, 2, 1, 16, 16, [0], torch.float32, "chain")
    args[5] = torch.tensor([[[0b1], [0], [0b111]]], dtype=torch.int32)
    out = tree_attention_ref(*args, 0.5)
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------
# tree_attention: Triton kernels against the reference
# --------------------------------------------------------------------------------------------------

# (B, N, Hq, Hkv, D, block_size, prefix_lens, kind)
ATTN_CASES = [
    pytest.param(1, 1, 4, 4, 16, 16, [0], "chain", id="N1-prefix0"),
    pytest.param(2, 1, 8, 1, 32, 16, [23, 70], "chain", id="N1-gqa8"),
    pytest.param(3, 7, 4, 1, 32, 16, [0, 17, 64], "random", id="N7-gqa4-mixed"),
    pytest.param(2, 7, 2, 2, 16, 48, [5, 100], "star", id="N7-star-bs48"),
    pytest.param(2, 32, 2, 2, 16, 16, [31, 3], "chain", id="N32-chain"),
    pytest.param(2, 33, 4, 1, 16, 32, [0, 50], "padded", id="N33-padded-words2"),
    pytest.param(1, 64, 8, 1, 16, 16, [40], "random", id="N64-gqa8-two-row-tiles"),
    pytest.param(2, 64, 2, 2, 32, 64, [130, 1], "star", id="N64-star-bs64"),
]


@requires_triton
@pytest.mark.parametrize("B, N, Hq, Hkv, D, block_size, prefix_lens, kind", ATTN_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tree_attention_triton_vs_reference(B, N, Hq, Hkv, D, block_size, prefix_lens, kind,
                                            dtype):
    _, args = make_attention_case(B, N, Hq, Hkv, D, block_size, prefix_lens, dtype, kind,
                                  seed=N + D, device=TRITON_DEVICE)
    scale = 1.0 / math.sqrt(D)
    with reference_path():
        expected = tree_attention(*[a.cpu() for a in args], sm_scale=scale)
    with triton_path():
        got = tree_attention(*args, sm_scale=scale)
    assert got.dtype == dtype and got.shape == args[0].shape
    assert_close(got, expected, dtype)


@requires_triton
@pytest.mark.parametrize("num_splits", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tree_attention_split_kv_merge(num_splits, dtype):
    """Flash-decoding path: several programs share each prefix and their partials are merged.
    Prefixes of 0 and of less than one split leave some splits empty (lse = -inf)."""
    parents, args = make_attention_case(4, 6, 4, 2, 32, 16, [0, 9, 100, 187], dtype, "random",
                                        seed=7, device=TRITON_DEVICE)
    expected = oracle_attention(*[a.cpu() for a in args[:5]], parents, 0.2)
    with triton_path():
        got = T.tree_attention_triton(*args, 0.2, num_splits=num_splits)
    assert_close(got, expected, dtype)


@requires_triton
def test_tree_attention_heuristic_splits_on_long_prefix():
    """A single request with a long prefix: the launcher's own heuristic splits the KV."""
    B, N, Hq, Hkv, D = 1, 4, 2, 1, 16
    M = N * Hq // Hkv
    cfg = T._attention_config(M, D)
    assert T._num_splits(1, 1024, M, cfg["BLOCK_KV"], 132) == 4
    parents, args = make_attention_case(B, N, Hq, Hkv, D, 256, [1000], torch.float16, "random",
                                        seed=2, device=TRITON_DEVICE)
    expected = oracle_attention(*[a.cpu() for a in args[:5]], parents, 0.25)
    with triton_path():
        got = tree_attention(*args, sm_scale=0.25)
    assert_close(got, expected, torch.float16)


@requires_triton
@pytest.mark.parametrize("D, Hq, Hkv, num_splits", [(128, 8, 2, 1), (256, 4, 4, 2), (80, 2, 1, 1)])
def test_tree_attention_large_head_dims(D, Hq, Hkv, num_splits):
    """Head dims 128 / 256 (the GPU tile table) and a non-power-of-two 80 (masked head dim)."""
    parents, args = make_attention_case(2, 5, Hq, Hkv, D, 16, [3, 20], torch.bfloat16, "random",
                                        seed=D, device=TRITON_DEVICE)
    expected = oracle_attention(*[a.cpu() for a in args[:5]], parents, 1 / math.sqrt(D))
    with triton_path():
        got = T.tree_attention_triton(*args, 1 / math.sqrt(D), num_splits=num_splits)
    assert_close(got, expected, torch.bfloat16)


@requires_triton
def test_tree_attention_noncontiguous_inputs():
    """q sliced out of a fused qkv buffer, a transposed block table and strided seq_lens."""
    B, N, Hq, Hkv, D = 2, 7, 4, 2, 32
    parents, args = make_attention_case(B, N, Hq, Hkv, D, 16, [12, 33], torch.float16, "random",
                                        seed=5, device=TRITON_DEVICE)
    q, k, v, table, lens, mask = args
    qkv = torch.randn(B, N, 3 * Hq, D, dtype=q.dtype, device=q.device)
    qkv[:, :, Hq:2 * Hq] = q
    q_nc = qkv[:, :, Hq:2 * Hq]
    table_nc = table.t().contiguous().t()
    lens_nc = torch.stack([lens, lens], 1)[:, 0]
    assert not q_nc.is_contiguous() and not table_nc.is_contiguous() and lens_nc.stride(0) == 2
    expected = oracle_attention(q.cpu(), k.cpu(), v.cpu(), table.cpu(), lens.cpu(), parents, 0.3)
    with triton_path():
        got = tree_attention(q_nc, k, v, table_nc, lens_nc, mask, sm_scale=0.3)
    assert_close(got, expected, torch.float16)


@requires_triton
def test_tree_attention_int64_indices_and_big_group():
    """int64 block table / seq_lens; N = 64 x G = 4 = 256 rows (two row tiles) with splits."""
    parents, args = make_attention_case(2, 64, 8, 2, 64, 16, [200, 0], torch.float16, "padded",
                                        seed=9, device=TRITON_DEVICE)
    args[3], args[4] = args[3].long(), args[4].long()
    expected = oracle_attention(*[a.cpu() for a in args[:5]], parents, 0.125)
    with triton_path():
        for splits in (None, 3):
            got = T.tree_attention_triton(*args, 0.125, num_splits=splits)
            assert_close(got, expected, torch.float16)


@requires_triton
@pytest.mark.parametrize("num_splits", [1, 2])
def test_tree_attention_arbitrary_mask_bits(num_splits):
    """Any int32 mask (sign bit, bits past N, rows without their diagonal) decodes like the
    reference: bit j of word j // 32; rows that see nothing (prefix 0) give zeros."""
    g = torch.Generator().manual_seed(4)
    _, args = make_attention_case(3, 33, 2, 1, 16, 16, [0, 20, 0], torch.float16, "random",
                                  device=TRITON_DEVICE)
    mask = torch.randint(-2**31, 2**31, (3, 33, 2), generator=g, dtype=torch.int64)
    mask[0, :5] = 0  # no visible key at all for these rows of request 0
    args[5] = mask.to(torch.int32).to(TRITON_DEVICE)
    with reference_path():
        expected = tree_attention(*[a.cpu() for a in args], sm_scale=0.3)
    with triton_path():
        got = T.tree_attention_triton(*args, 0.3, num_splits=num_splits)
    assert torch.equal(got[0, :5].cpu(), torch.zeros_like(got[0, :5].cpu()))
    assert_close(got, expected, torch.float16)


@requires_triton
@given(st.data())
def test_tree_attention_hypothesis(data):
    B = data.draw(st.integers(1, 3), label="B")
    N = data.draw(st.sampled_from([1, 2, 5, 16, 33]), label="N")
    Hkv = data.draw(st.sampled_from([1, 2]), label="Hkv")
    G = data.draw(st.sampled_from([1, 4, 8]), label="G")
    D = data.draw(st.sampled_from([16, 32]), label="D")
    bs = data.draw(st.sampled_from([16, 32, 24]), label="block_size")
    prefixes = data.draw(st.lists(st.integers(0, 90), min_size=B, max_size=B), label="prefix")
    kind = data.draw(st.sampled_from(["chain", "star", "random", "padded"]), label="kind")
    dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16]), label="dtype")
    splits = data.draw(st.sampled_from([None, 1, 3]), label="splits")
    parents, args = make_attention_case(B, N, G * Hkv, Hkv, D, bs, prefixes, dtype, kind,
                                        seed=len(prefixes) + sum(prefixes), device=TRITON_DEVICE)
    expected = oracle_attention(*[a.cpu() for a in args[:5]], parents, 0.25)
    with triton_path():
        got = T.tree_attention_triton(*args, 0.25, num_splits=splits)
    assert_close(got, expected, dtype)


@requires_triton
@pytest.mark.skipif(HAS_CUDA, reason="fp32 is a CPU-only dtype of tree_attention")
def test_tree_attention_fp32_interpreter():
    """fp32 is accepted on CPU (the interpreter runs fp32 dots exactly)."""
    parents, args = make_attention_case(2, 5, 4, 2, 16, 16, [3, 30], torch.float32, "padded",
                                        seed=11, device=TRITON_DEVICE)
    expected = oracle_attention(*args[:5], parents, 0.4)
    with triton_path():
        got = tree_attention(*args, sm_scale=0.4)
    assert_close(got, expected, torch.float32)


@requires_triton
def test_tree_attention_kernel_survives_bad_values():
    """With value checks off (as on CUDA): seq_lens shorter than N or longer than the table, and
    block ids out of range are clamped in the kernel: no crash, and the result equals the
    reference's (which applies the same clamping)."""
    _, args = make_attention_case(3, 4, 2, 1, 16, 16, [10, 20, 5], torch.float16, "random",
                                  device=TRITON_DEVICE)
    q, k, v, table, lens, mask = args
    table = table.clone()
    table[0, 0] = 10_000
    table[1, 0] = -5
    lens = torch.tensor([2, 10_000, 9], dtype=torch.int32, device=lens.device)
    bad = to_device([q, k, v, table, lens, mask], "cpu")
    with value_checks_off():
        expected = tree_attention_ref(*bad, 0.3)
        with reference_path():
            cpu = tree_attention(*bad, sm_scale=0.3)
        assert_close(cpu, expected, torch.float16)
        with triton_path():
            for splits in (1, 3):
                out = T.tree_attention_triton(q, k, v, table, lens, mask, 0.3, num_splits=splits)
                assert torch.isfinite(out.float()).all()
                assert_close(out, expected, torch.float16)


# --------------------------------------------------------------------------------------------------
# The fast CPU kernel against the float64 oracle and the reference
# --------------------------------------------------------------------------------------------------

# (B, N, Hq, Hkv, D, block_size, prefix_lens, kind)
CPU_CASES = [
    pytest.param(1, 1, 4, 4, 16, 16, [0], "chain", id="N1-prefix0"),
    pytest.param(2, 1, 8, 1, 32, 16, [23, 70], "chain", id="N1-gqa8-mixed"),
    pytest.param(3, 7, 4, 1, 32, 16, [0, 17, 64], "random", id="N7-gqa4-prefix0-mixed"),
    pytest.param(2, 7, 2, 2, 16, 48, [5, 100], "star", id="N7-star-bs48"),
    pytest.param(4, 8, 8, 2, 64, 16, [128, 128, 128, 128], "random", id="decode-equal-prefix"),
    pytest.param(2, 33, 4, 1, 16, 32, [0, 50], "padded", id="N33-padded-words2"),
    pytest.param(2, 64, 16, 4, 80, 16, [130, 1], "random", id="N64-D80"),
    pytest.param(1, 16, 32, 8, 128, 256, [700], "random", id="long-prefix-one-block"),
]


@pytest.fixture(params=["folded", "per-head"])
def cpu_layout(request, monkeypatch):
    """Both layouts of the CPU kernel: GQA group folded into the query rows (small trees), or
    one [N, L] problem per query head with SDPA's GQA (wide trees)."""
    monkeypatch.setattr(T, "_FOLD_MAX_ROWS", 10**9 if request.param == "folded" else 0)
    return request.param


@pytest.mark.parametrize("B, N, Hq, Hkv, D, block_size, prefix_lens, kind", CPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_kernel_matches_oracle(B, N, Hq, Hkv, D, block_size, prefix_lens, kind, dtype,
                                   cpu_layout):
    """``tree_attention_cpu`` (the fused CPU path) against the float64 oracle that walks the
    parents, and against the fp32 reference."""
    parents, args = make_attention_case(B, N, Hq, Hkv, D, block_size, prefix_lens, dtype, kind,
                                        seed=N + D)
    scale = 1.0 / math.sqrt(D)
    expected = oracle_attention(*args[:5], parents, scale)
    with reference_path():
        got = tree_attention(*args)  # sm_scale None: 1 / sqrt(D)
    assert got.dtype == dtype and got.shape == args[0].shape and got.is_contiguous()
    assert_close(got, expected, dtype)
    assert_close(got, tree_attention_ref(*args, scale).double(), dtype)


def test_cpu_kernel_arbitrary_mask_bits_and_dead_rows(cpu_layout):
    """Any int32 mask (sign bit, bits past N, rows without their diagonal) decodes like the
    reference; rows that see nothing (prefix 0, no bit) give zeros, not NaN."""
    g = torch.Generator().manual_seed(4)
    _, args = make_attention_case(3, 33, 4, 2, 16, 16, [0, 20, 0], torch.float32, "random")
    mask = torch.randint(-2**31, 2**31, (3, 33, 2), generator=g, dtype=torch.int64)
    mask[0, :5] = 0
    args[5] = mask.to(torch.int32)
    got = T.tree_attention_cpu(*args, 0.3)
    assert torch.equal(got[0, :5], torch.zeros_like(got[0, :5]))
    assert_close(got, tree_attention_ref(*args, 0.3).double(), torch.float32)


@pytest.mark.skipif(not _native.has_op("_tree_attention_cpu"), reason="C++ extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_fast_path_taken_and_declines_garbage(dtype, cpu_layout):
    """The native fast path (csrc/tree.cpp) answers valid inputs itself (ok), with strided caches
    and q, and declines (not ok: the Python kernel's careful path runs) when garbage could reach
    a row or a length lies outside the table."""
    _, args = make_attention_case(3, 9, 8, 2, 32, 16, [37, 5, 0], dtype, "random", seed=5)
    q, k, v, table, lens, mask = args
    args_s = [strided(t) for t in args]
    for a in (args, args_s):
        out, status = torch.ops.loramix._tree_attention_cpu(*a, 0.3, True, True)
        assert status == 0
        assert_close(out, tree_attention_ref(*args, 0.3).double(), dtype)
    parents, gargs, sees = _garbage_in_unseen_slots(dtype, "cpu")
    _, status = torch.ops.loramix._tree_attention_cpu(*gargs, 0.3, True, True)
    assert status == 1 and bool(sees.any())
    too_long = lens.clone()
    too_long[0] = table.shape[1] * k.shape[1] + 1
    args_long = (q, k, v, table, too_long, mask, 0.3)
    assert torch.ops.loramix._tree_attention_cpu(*args_long, True, True)[1] == 2  # checked: invalid
    assert torch.ops.loramix._tree_attention_cpu(*args_long, False, True)[1] == 1  # unchecked: fallback
    bad_block = table.clone()
    bad_block[1, 0] = k.shape[0]
    args_bad = (q, k, v, bad_block, lens, mask, 0.3)
    assert torch.ops.loramix._tree_attention_cpu(*args_bad, True, True)[1] == 2
    bad_meta = (q, k, v, table, lens, mask[:, :, :0], 0.3)  # mask words missing
    assert torch.ops.loramix._tree_attention_cpu(*bad_meta, True, True)[1] == 2


@given(st.data())
def test_cpu_kernel_hypothesis(data):
    B = data.draw(st.integers(1, 4), label="B")
    N = data.draw(st.sampled_from([1, 2, 5, 16, 33]), label="N")
    Hkv = data.draw(st.sampled_from([1, 2, 3]), label="Hkv")
    G = data.draw(st.sampled_from([1, 4, 8]), label="G")
    D = data.draw(st.sampled_from([16, 40, 64]), label="D")
    bs = data.draw(st.sampled_from([16, 32, 24]), label="block_size")
    prefixes = data.draw(st.lists(st.integers(0, 90), min_size=B, max_size=B), label="prefix")
    kind = data.draw(st.sampled_from(["chain", "star", "random", "padded"]), label="kind")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
    parents, args = make_attention_case(B, N, G * Hkv, Hkv, D, bs, prefixes, dtype, kind,
                                        seed=len(prefixes) + sum(prefixes))
    expected = oracle_attention(*args[:5], parents, 0.25)
    assert_close(T.tree_attention_cpu(*args, 0.25), expected, dtype)


# --------------------------------------------------------------------------------------------------
# Issue 9 fixes, each on both paths
# --------------------------------------------------------------------------------------------------


def _garbage_in_unseen_slots(dtype, device, what=("k", "v"), value=float("nan")):
    """A padded tree over a ``torch.empty``-like cache: NaN / inf in every slot nobody may read
    (past each length, blocks nobody owns) and in the padding nodes' own tree slots (seen only by
    the padding node itself). Returns (parents, args, rows that see garbage [B, N] bool)."""
    parents = torch.tensor([[-1, 0, -1, 1, 0, -1, 3], [-1, -1, 0, 2, -1, 0, 5]])
    B, N = parents.shape
    _, args = make_attention_case(B, N, 4, 2, 16, 16, [5, 20], dtype, "chain", seed=3)
    q, k, v, table, lens, _ = args
    args[5] = build_tree_ref(parents)[0]
    bs = k.shape[1]
    for name in what:
        cache = k if name == "k" else v
        owned = torch.zeros(cache.shape[0] * bs, dtype=torch.bool)
        for b in range(B):
            for t in range(int(lens[b])):
                owned[int(table[b, t // bs]) * bs + t % bs] = True
        flat = cache.view(-1, *cache.shape[2:])
        flat[~owned] = value
        for b in range(B):
            for j in range(N):
                if int(parents[b, j]) == -1 and j > 0:
                    t = int(lens[b]) - N + j
                    flat[int(table[b, t // bs]) * bs + t % bs] = value
    sees = torch.zeros(B, N, dtype=torch.bool)
    _, anc = oracle_tree(parents)
    for b in range(B):
        for i in range(N):
            sees[b, i] = any(j > 0 and int(parents[b, j]) == -1 for j in anc[b][i])
    return parents, to_device(args, device), sees


@pytest.mark.parametrize("what, value", [(("v",), float("inf")), (("k", "v"), float("nan")),
                                         (("k",), float("-inf"))])
def test_cpu_kernel_unseen_garbage_both_layouts(what, value, cpu_layout):
    """Issue 9.3 on both layouts of the CPU kernel (as in
    test_unseen_garbage_does_not_reach_a_node)."""
    parents, args, sees = _garbage_in_unseen_slots(torch.float32, "cpu", what, value)
    expected = oracle_attention(*args[:5], parents, 0.3)
    got = T.tree_attention_cpu(*args, 0.3)
    assert_close(got[~sees], expected[~sees], torch.float32)
    assert not torch.isfinite(got[sees]).all(-1).all(-1).any()


@pytest.mark.parametrize("backend, device, ctx", backends())
@pytest.mark.parametrize("what, value", [(("v",), float("inf")), (("v",), float("nan")),
                                         (("k", "v"), float("nan")), (("k",), float("-inf"))])
@pytest.mark.parametrize("splits", [None, 3])
def test_unseen_garbage_does_not_reach_a_node(backend, device, ctx, what, value, splits):
    """Issue 9.3: a NaN / inf V (or K) at a position a node must not see leaves its output
    untouched (masked probability 0 times inf was NaN on both paths); a node that does see
    garbage (a padding node, its own never-written slot) gets a non-finite output."""
    if splits is not None and backend != "triton":
        pytest.skip("num_splits is a Triton launcher knob")
    dtype = torch.float16 if device != "cpu" or backend == "triton" else torch.float32
    parents, args, sees = _garbage_in_unseen_slots(dtype, device, what, value)
    expected = oracle_attention(*to_device(args[:5], "cpu"), parents, 0.3)
    with ctx(), value_checks_off():
        if splits is None:
            got = tree_attention(*args, sm_scale=0.3)
        else:
            got = T.tree_attention_triton(*args, 0.3, num_splits=splits)
    got = got.cpu()
    assert_close(got[~sees], expected[~sees], dtype)
    if "v" in what:  # a NaN K at a seen slot may also come out as garbage: only V is promised
        assert not torch.isfinite(got[sees].float()).all(-1).all(-1).any()
    with reference_path():
        ref = tree_attention_ref(*to_device(args, "cpu"), 0.3)
    assert_close(ref[~sees], expected[~sees], dtype)


@pytest.mark.parametrize("backend, device, ctx", backends())
def test_int64_seq_lens_do_not_wrap(backend, device, ctx):
    """Issue 9.6: an int64 seq_lens of 2^32 + 10 is a length past the block table (rejected by
    the value checks; clamped to the table, as the reference does, with them off), not 10."""
    _, args = make_attention_case(2, 4, 2, 1, 16, 16, [6, 20], torch.float16, "random", seed=8)
    args[4] = torch.tensor([2**32 + 10, 24], dtype=torch.int64)
    with value_checks_off():
        expected = tree_attention_ref(*args, 0.3)
    wrapped = args[:4] + [torch.tensor([10, 24])] + args[5:]
    assert not torch.allclose(expected[0].float(), tree_attention_ref(*wrapped, 0.3)[0].float())
    args = to_device(args, device)
    with ctx(), value_checks_off():
        got = tree_attention(*args, sm_scale=0.3)
    assert_close(got, expected, torch.float16)
    with ctx(), value_checks_on(), pytest.raises(ValueError, match=r"tree_attention: block_table is "
                                               r"too short: .* seq_lens\[0\] = 4294967306"):
        tree_attention(*args, sm_scale=0.3)


@pytest.mark.parametrize("backend, device, ctx", backends())
@pytest.mark.parametrize("Hq", [4, 0])
def test_empty_batch(backend, device, ctx, Hq):
    """Issue 9.7: B = 0 (and Hq = 0) return an empty [B, N, Hq, D] tensor on both paths (the CPU
    path raised a reshape error)."""
    B = 0 if Hq else 2
    q = torch.randn(B, 3, Hq, 16, device=device, dtype=torch.float16)
    k = torch.randn(4, 16, 2 if Hq else 1, 16, device=device, dtype=torch.float16)
    table = torch.zeros(B, 2, dtype=torch.int32, device=device)
    lens = torch.full((B,), 5, dtype=torch.int32, device=device)
    mask = torch.ones(B, 3, 1, dtype=torch.int32, device=device)
    with ctx():
        out = tree_attention(q, k, k, table, lens, mask)
        assert out.shape == (B, 3, Hq, 16) and out.dtype == torch.float16
        tree = build_tree(torch.zeros(0, 5, dtype=torch.int64, device=device))
        assert [tuple(t.shape) for t in tree] == [(0, 5, 1), (0, 5), (0, 5), (0, 5)]


@pytest.mark.parametrize("backend, device, ctx", backends())
def test_strided_views_of_every_argument(backend, device, ctx):
    """Both kernels honour the strides of every tensor argument, 1-D seq_lens included (each
    view holds its values in every other element, so an ignored stride reads the wrong one)."""
    dtype = torch.float32 if backend == "reference" else torch.float16
    parents, args = make_attention_case(2, 7, 4, 2, 16, 16, [12, 33], dtype, "padded", seed=5,
                                        device=device)
    expected = oracle_attention(*to_device(args[:5], "cpu"), parents, 0.3)
    views = strided(args)
    assert all(not t.is_contiguous() for t in views)
    pview = strided(parents.to(device))
    with ctx():
        got = tree_attention(*views, sm_scale=0.3)
        tree = build_tree(pview)
    assert_close(got, expected, dtype)
    for g, e in zip(tree, oracle_tree(parents)[0]):
        assert torch.equal(g.cpu(), e)


@pytest.mark.parametrize("backend, device, ctx", backends())
def test_raw_op_accepts_sm_scale_none(backend, device, ctx):
    """The schema says ``float? sm_scale=None``: the raw op accepts what the wrapper accepts."""
    _, args = make_attention_case(1, 3, 2, 1, 16, 16, [4], torch.float16, "chain", device=device)
    with ctx():
        default = torch.ops.loramix.tree_attention(*args)
        none = torch.ops.loramix.tree_attention(*args, None)
        explicit = torch.ops.loramix.tree_attention(*args, 0.25)
    assert torch.equal(default, none) and torch.equal(none, explicit)


@pytest.mark.parametrize("backend, device, ctx", backends())
def test_validation_runs_once_per_call(backend, device, ctx, monkeypatch):
    """One validation per call (issue 8): the value checks of each op run exactly once (those of
    tree_attention inside the native kernel's walk when it runs the call)."""
    calls = []
    for name in ("check_parents", "_check_tree_attention_values"):
        real = getattr(T, name)
        monkeypatch.setattr(T, name, lambda *a, _real=real, _n=name: (calls.append(_n), _real(*a)))
    parents, args = make_attention_case(2, 5, 4, 2, 16, 16, [3, 18], torch.float16, "random",
                                        device=device)
    with ctx(), value_checks_on():
        build_tree(parents.to(device))
        tree_attention(*args)
        native = _native.runs_on(args[4], "_tree_attention_cpu")
    assert calls == ["check_parents"] + ([] if native else ["_check_tree_attention_values"])


def test_ops_module_imports_without_triton():
    """ops/tree.py imports triton and the jit kernels lazily, inside the launchers only."""
    tree = ast.parse(inspect.getsource(T))
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any("triton" in n or "kernels" in n for n in names), ast.dump(node)


# --------------------------------------------------------------------------------------------------
# Registration: compile, bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, device, ctx", backends())
def test_compile_build_then_attend(backend, device, ctx):
    """The usual pipeline, build_tree -> tree_attention, in one fullgraph inductor graph."""
    dtype = torch.float32 if device == "cpu" else torch.float16
    _, args = make_attention_case(2, 5, 4, 2, 16, 16, [3, 18], dtype, "random", device=device)
    parents = make_parents(2, 5, "random").to(device)

    def step(parents, q, k, v, table, lens):
        mask = build_tree(parents)[0]
        return tree_attention(q, k, v, table, lens, mask, sm_scale=0.25)

    compiled = torch.compile(step, fullgraph=True)
    with ctx():
        expected = step(parents, *args[:5])
        got = compiled(parents, *args[:5])
    torch.testing.assert_close(got, expected)


def _bad(args, i, value):
    args = list(args)
    args[i] = value
    return args


BAD_ATTENTION = [
    (lambda a: _bad(a, 0, a[0][0]), ValueError, r"tree_attention: q must have 4 dimensions"),
    (lambda a: _bad(a, 0, a[0].int()), TypeError, r"tree_attention: q must have dtype"),
    (lambda a: _bad(a, 1, a[1].double()), TypeError,
     r"tree_attention: k_cache must have q's dtype"),
    (lambda a: _bad(a, 2, a[2][:, :8]), ValueError, r"tree_attention: v_cache must have shape"),
    (lambda a: _bad(a, 1, a[1][..., :8]), ValueError, r"tree_attention: k_cache head dim"),
    (lambda a: _bad(_bad(a, 1, a[1][:, :, :1].expand(-1, -1, 3, -1)), 2,
                    a[2][:, :, :1].expand(-1, -1, 3, -1)),
     ValueError, r"tree_attention: q heads \(4\) must be a multiple of k_cache's KV heads \(3\)"),
    (lambda a: _bad(a, 3, a[3][:1]), ValueError, r"tree_attention: block_table must have shape"),
    (lambda a: _bad(a, 3, a[3].float()), TypeError, r"tree_attention: block_table must have dtype"),
    (lambda a: _bad(a, 4, a[4][:1]), ValueError, r"tree_attention: seq_lens must have shape"),
    (lambda a: _bad(a, 5, a[5].long()), TypeError, r"tree_attention: tree_mask must have dtype"),
    (lambda a: _bad(a, 5, a[5][:, :3]), ValueError, r"tree_attention: tree_mask must have shape"),
    (lambda a: _bad(a, 4, torch.tensor([4, 20], dtype=torch.int32)), ValueError,
     r"tree_attention: seq_lens \[0\] = 4 is shorter than the 5 tree nodes"),
    (lambda a: _bad(a, 4, torch.tensor([8, 50], dtype=torch.int32)), ValueError,
     r"tree_attention: block_table is too short: row 1 maps 48 positions"),
    (lambda a: _bad(a, 3, torch.tensor([[99, 0, -1], [1, 2, 3]], dtype=torch.int32)), ValueError,
     r"tree_attention: block_table \[0, 0\] = 99 must lie in"),
    (lambda a: a[:6] + [float("nan")], ValueError, r"tree_attention: sm_scale must be a finite"),
    (lambda a: _bad(a, 4, torch.tensor([2**32 + 8, 23])), ValueError,
     r"tree_attention: block_table is too short: row 0"),
]


@pytest.mark.parametrize("backend, device, ctx", backends())
@pytest.mark.parametrize("mutate, exc, match", BAD_ATTENTION)
def test_tree_attention_bad_input(backend, device, ctx, mutate, exc, match):
    # prefixes 3 and 18 with N = 5: seq_lens [8, 23] need 1 and 2 blocks of 16; the table has 3.
    dtype = torch.float32 if device == "cpu" else torch.float16
    _, args = make_attention_case(2, 5, 4, 2, 16, 16, [3, 18], dtype, "random")
    args = mutate(args + [0.25])
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    with ctx(), value_checks_on(), pytest.raises(exc, match=match):
        torch.ops.loramix.tree_attention(*args)


# --------------------------------------------------------------------------------------------------
# CUDA only: graph capture and no host sync on the launch path
# --------------------------------------------------------------------------------------------------


@requires_cuda
def test_tree_attention_cuda_graph_no_sync():
    parents, args = make_attention_case(4, 16, 8, 2, 64, 16, [0, 100, 700, 2000], torch.bfloat16,
                                        "random", device="cuda")
    parents = parents.cuda()
    tree_attention(*args, sm_scale=0.125)  # compile outside capture
    build_tree(parents)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        build_tree(parents)
        tree_attention(*args, sm_scale=0.125)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mask = build_tree(parents)[0]
        out = tree_attention(args[0], *args[1:5], mask, sm_scale=0.125)
    args[0].normal_()
    graph.replay()
    expected = oracle_attention(*[a.cpu() for a in args[:5]], parents.cpu(), 0.125)
    assert_close(out, expected, torch.bfloat16)
