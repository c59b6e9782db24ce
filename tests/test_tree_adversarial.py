"""Bad and edge inputs for build_tree and tree_attention, as real engines feed them (issue 9).

One table: every case says what must happen, and each runs on both backends with the value checks
on (the CPU default) and forced off (the CUDA default, ``tests.common.value_checks_off``):

* ``error=(exc, regex)``: a clear error that names the op and the argument. A ``metadata`` error
  (rank, dtype, shape) is raised whatever the value checks; a value error (an index or length out
  of range) only with value checks on;
* otherwise, and for value errors with the checks off: a result equal to an oracle (the pure-Python
  / float64 oracles of tests/test_tree.py, or the reference with the kernels' clamping rules), and
  never a crash or an out-of-bounds access.

Garbage (NaN / inf) in never-written cache slots is part of the table: caches come from
``torch.empty`` and a padding node's slot is never written.
"""

import dataclasses
import math
from typing import Callable

import pytest
import torch

from loramix_kernels import build_tree, tree_attention
from loramix_kernels.reference.tree import build_tree_ref, tree_attention_ref

from tests.common import assert_close, backends, strided, to_device, value_checks_off, value_checks_on
from tests.test_tree import make_attention_case, make_parents, oracle_attention, oracle_tree

DT = torch.float16  # both backends take it on CPU; the Triton path's dtype on CUDA


@dataclasses.dataclass
class Case:
    name: str
    op: str                                   # "build_tree" | "tree_attention"
    make: Callable[[], list]                  # CPU arguments (fresh each call)
    error: tuple | None = None                # (exception type, regex)
    metadata: bool = False                    # the error does not depend on value checks
    expect: Callable[[list], object] | None = None  # oracle(args) for the result
    check: Callable | None = None             # check(got, args) instead of expect


# --------------------------------------------------------------------------------------------------
# build_tree
# --------------------------------------------------------------------------------------------------


def _sanitised(parents: torch.Tensor) -> torch.Tensor:
    """The kernels' rule with value checks off: a parent outside [0, i) counts as -1 (compared as
    Python ints: nothing wraps)."""
    rows = [[p if 0 <= p < i else -1 for i, p in enumerate(r)] for r in parents.tolist()]
    return torch.tensor(rows, dtype=torch.int64).reshape(parents.shape)


def _tree_oracle(args):
    return oracle_tree(_sanitised(args[0]))[0]


def _bt(name, rows, dtype=torch.int64, error=None):
    return Case(name, "build_tree", lambda: [torch.tensor(rows, dtype=dtype)],
                error=(ValueError, rf"build_tree: parents is not a tree: {error}") if error
                else None,
                expect=_tree_oracle)


BUILD_TREE = [
    Case("1-D parents", "build_tree", lambda: [torch.tensor([-1, 0])],
         error=(ValueError, r"build_tree: parents must have 2 dimensions"), metadata=True),
    Case("float parents", "build_tree", lambda: [torch.tensor([[-1.0, 0.0]])],
         error=(TypeError, r"build_tree: parents must have dtype"), metadata=True),
    Case("bool parents", "build_tree", lambda: [torch.tensor([[True, False]])],
         error=(TypeError, r"build_tree: parents must have dtype"), metadata=True),
    Case("no root column", "build_tree", lambda: [torch.zeros(2, 0, dtype=torch.int64)],
         error=(ValueError, r"build_tree: parents must have at least one node"), metadata=True),
    Case("empty batch", "build_tree", lambda: [torch.zeros(0, 5, dtype=torch.int64)],
         expect=_tree_oracle),
    _bt("root only", [[-1]]),
    _bt("child of a padding node", [[-1, 0, -1, 2, 3, 1]]),
    _bt("int32 padded", make_parents(3, 40, "padded", seed=9).tolist(), dtype=torch.int32),
    Case("strided parents", "build_tree", lambda: [strided(make_parents(2, 37, "random", seed=4))],
         expect=_tree_oracle),
    _bt("root with a parent", [[0, 0]], error=r"parents\[0, 0\] = 0, must be -1"),
    _bt("parent after its child", [[-1, 2, 0]], error=r"parents\[0, 1\] = 2"),
    _bt("own parent", [[-1, 1]], error=r"parents\[0, 1\] = 1"),
    _bt("parent below -1", [[-1, 0, -5]], error=r"parents\[0, 2\] = -5"),
    _bt("int32 min", [[-1, -2**31]], dtype=torch.int32, error=r"parents\[0, 1\] = -2147483648"),
    _bt("int64 2^32 + 1 (not parent 1)", [[-1, 0, 2**32 + 1, 2]],
        error=r"parents\[0, 2\] = 4294967297"),
    _bt("int64 -2^32 + 1 (not parent 1)", [[-1, 0, -(2**32) + 1]],
        error=r"parents\[0, 2\] = -4294967295"),
    _bt("int64 max", [[-1, 2**63 - 1]], error=r"parents\[0, 1\] = 9223372036854775807"),
]


# --------------------------------------------------------------------------------------------------
# tree_attention
# --------------------------------------------------------------------------------------------------

SCALE = 0.25


def _base(dtype=DT, seed=0, B=2, N=5, Hq=4, Hkv=2, D=16, bs=16, prefixes=(3, 18), kind="random"):
    """prefixes 3 and 18 with N = 5: seq_lens [8, 23] use 1 and 2 blocks of 16; the table has 3
    columns (a spare -1 column) and the cache 3 blocks nobody owns."""
    parents, args = make_attention_case(B, N, Hq, Hkv, D, bs, list(prefixes), dtype, kind,
                                        seed=seed)
    return parents, args + [SCALE]


def _with(i, fn, **kw):
    def make():
        _, args = _base(**kw)
        args[i] = fn(args[i], args)
        return args
    return make


def _oracle_of(**kw):
    """The float64 oracle (walks the parents) of the unmodified base case."""
    def expect(args):
        parents, _ = _base(**kw)
        return oracle_attention(*args[:5], parents, SCALE if args[6] is None else args[6])
    return expect


def _reference(args):
    """The reference with the kernels' clamping rules (for bad values with the checks off)."""
    with value_checks_off():
        return tree_attention_ref(*args)


def _owned_slots(k, table, lens):
    bs = k.shape[1]
    owned = torch.zeros(k.shape[0] * bs, dtype=torch.bool)
    for b in range(table.shape[0]):
        for t in range(int(lens[b])):
            owned[int(table[b, t // bs]) * bs + t % bs] = True
    return owned


def _garbage_everywhere_unused(value):
    """NaN / inf in every cache slot no request owns (past each length, blocks nobody owns), and
    junk in the block table's unused tail: the oracle does not change."""
    def make():
        _, args = _base(seed=3)
        q, k, v, table, lens, mask, scale = args
        free = ~_owned_slots(k, table, lens)
        for cache in (k, v):
            cache.view(-1, *cache.shape[2:])[free] = value
        table[0, 1:] = 10**9
        table[1, 2:] = -(2**31)
        return args
    return make


def _garbage_in_padding_slots():
    """A padded tree: inf in K and V of the padding nodes' own (never-written) slots. Only the
    padding nodes see them: every other row equals the oracle, the padding rows are non-finite."""
    parents = torch.tensor([[-1, 0, -1, 1, -1], [-1, -1, 0, 2, 0]])

    def make():
        _, args = _base(seed=6)
        q, k, v, table, lens, mask, scale = args
        args[5] = build_tree_ref(parents)[0]
        bs = k.shape[1]
        for b in range(2):
            for j in range(1, 5):
                if int(parents[b, j]) == -1:
                    t = int(lens[b]) - 5 + j
                    for cache in (k, v):
                        cache[int(table[b, t // bs]), t % bs] = float("inf")
        return args

    def check(got, args):
        pad = parents == -1
        pad[:, 0] = False
        expected = oracle_attention(*args[:5], parents, SCALE)
        assert_close(got[~pad], expected[~pad], DT)
        assert not torch.isfinite(got[pad].float()).all(-1).all(-1).any()

    return make, check


_pad_make, _pad_check = _garbage_in_padding_slots()


def _dead_rows(args):
    args[4] = torch.tensor([5, 5], dtype=torch.int32)  # no prefix at all
    args[5] = args[5].clone()
    args[5][0, 1:3] = 0  # rows without any bit (not even their own): they see nothing
    return args


def _check_dead_rows(got, args):
    assert torch.equal(got[0, 1:3].float(), torch.zeros_like(got[0, 1:3].float()))
    assert_close(got, _reference(args), DT)


def _mask_junk_bits(args):
    """Bits past N (and the sign bit) set in every row: they name no node and are ignored."""
    args[5] = args[5] | torch.tensor(-(2**31) | (1 << 20) | (1 << 5), dtype=torch.int32)
    return args


def _bad_tensor(i, make_value, exc, regex):
    return dict(make=_with(i, lambda t, a: make_value(t)), error=(exc, regex), metadata=True)


TREE_ATTENTION = [
    # metadata errors
    Case("q 3-D", "tree_attention", **_bad_tensor(0, lambda t: t[0], ValueError,
                                                  r"tree_attention: q must have 4 dimensions")),
    Case("q int", "tree_attention", **_bad_tensor(0, lambda t: t.int(), TypeError,
                                                  r"tree_attention: q must have dtype")),
    Case("q without nodes", "tree_attention", **_bad_tensor(
        0, lambda t: t[:, :0], ValueError, r"tree_attention: q must hold at least one tree node")),
    Case("q head dim 0", "tree_attention", **_bad_tensor(
        0, lambda t: t[..., :0], ValueError, r"tree_attention: q must have a non-empty head dim")),
    Case("k_cache dtype", "tree_attention", **_bad_tensor(
        1, lambda t: t.float(), TypeError, r"tree_attention: k_cache must have q's dtype")),
    Case("k_cache head dim", "tree_attention", **_bad_tensor(
        1, lambda t: t[..., :8], ValueError, r"tree_attention: k_cache head dim")),
    Case("k_cache no blocks", "tree_attention", **_bad_tensor(
        1, lambda t: t[:0], ValueError, r"tree_attention: k_cache must be non-empty")),
    Case("v_cache shape", "tree_attention", **_bad_tensor(
        2, lambda t: t[:, :8], ValueError, r"tree_attention: v_cache must have shape")),
    Case("heads not a multiple (GQA)", "tree_attention", make=_with(0, lambda t, a: t[:, :, :3]),
         error=(ValueError, r"tree_attention: q heads \(3\) must be a multiple of k_cache's KV "
                r"heads \(2\)"), metadata=True),
    Case("block_table float", "tree_attention", **_bad_tensor(
        3, lambda t: t.float(), TypeError, r"tree_attention: block_table must have dtype")),
    Case("block_table rows", "tree_attention", **_bad_tensor(
        3, lambda t: t[:1], ValueError, r"tree_attention: block_table must have shape")),
    Case("block_table no column", "tree_attention", **_bad_tensor(
        3, lambda t: t[:, :0], ValueError, r"tree_attention: block_table must have at least one")),
    Case("seq_lens 2-D", "tree_attention", **_bad_tensor(
        4, lambda t: t[:, None], ValueError, r"tree_attention: seq_lens must have 1 dimensions")),
    Case("seq_lens float", "tree_attention", **_bad_tensor(
        4, lambda t: t.float(), TypeError, r"tree_attention: seq_lens must have dtype")),
    Case("tree_mask int64", "tree_attention", **_bad_tensor(
        5, lambda t: t.long(), TypeError, r"tree_attention: tree_mask must have dtype")),
    Case("tree_mask words", "tree_attention", **_bad_tensor(
        5, lambda t: torch.cat([t, t], 2), ValueError,
        r"tree_attention: tree_mask must have shape")),
    Case("sm_scale NaN", "tree_attention", **_bad_tensor(
        6, lambda t: float("nan"), ValueError, r"tree_attention: sm_scale must be a finite")),
    Case("sm_scale inf", "tree_attention", **_bad_tensor(
        6, lambda t: float("inf"), ValueError, r"tree_attention: sm_scale must be a finite")),
    # value errors: a clear error with the checks on, the reference's clamped result without
    Case("seq_lens < N", "tree_attention",
         make=_with(4, lambda t, a: torch.tensor([4, 23], dtype=torch.int32)),
         error=(ValueError, r"tree_attention: seq_lens \[0\] = 4 is shorter than the 5 tree nodes"),
         expect=_reference),
    Case("seq_lens negative", "tree_attention",
         make=_with(4, lambda t, a: torch.tensor([-3, 23], dtype=torch.int32)),
         error=(ValueError, r"tree_attention: seq_lens \[0\] = -3 is shorter"), expect=_reference),
    Case("seq_lens past the table", "tree_attention",
         make=_with(4, lambda t, a: torch.tensor([8, 50], dtype=torch.int32)),
         error=(ValueError, r"tree_attention: block_table is too short: row 1 maps 48 positions"),
         expect=_reference),
    Case("seq_lens int64 2^32 + 8 (not 8)", "tree_attention",
         make=_with(4, lambda t, a: torch.tensor([2**32 + 8, 23])),
         error=(ValueError, r"tree_attention: block_table is too short: row 0 .* = 4294967304"),
         expect=_reference),
    Case("block id past num_blocks", "tree_attention",
         make=_with(3, lambda t, a: torch.where(torch.arange(3) == 0, 99, t)),
         error=(ValueError, r"tree_attention: block_table \[0, 0\] = 99 must lie in"),
         expect=_reference),
    Case("block id negative", "tree_attention",
         make=_with(3, lambda t, a: torch.tensor([[0, -1, -1], [1, -7, -1]], dtype=torch.int32)),
         error=(ValueError, r"tree_attention: block_table \[1, 1\] = -7 must lie in"),
         expect=_reference),
    Case("block id int64 2^32 (not 0)", "tree_attention",
         make=_with(3, lambda t, a: torch.tensor([[2**32, -1, -1], [1, 2, -1]])),
         error=(ValueError, r"tree_attention: block_table \[0, 0\] = 4294967296 must lie in"),
         expect=_reference),
    # valid edge cases: the oracle's result
    Case("NaN in never-written slots", "tree_attention",
         make=_garbage_everywhere_unused(float("nan")), expect=_oracle_of(seed=3)),
    Case("-inf in never-written slots", "tree_attention",
         make=_garbage_everywhere_unused(float("-inf")), expect=_oracle_of(seed=3)),
    Case("inf in padding nodes' own slots", "tree_attention", make=_pad_make, check=_pad_check),
    Case("no prefix, rows that see nothing", "tree_attention",
         make=lambda: _dead_rows(_base()[1]), check=_check_dead_rows),
    Case("mask bits past N and the sign bit", "tree_attention",
         make=lambda: _mask_junk_bits(_base()[1]), expect=_oracle_of()),
    Case("empty batch", "tree_attention", make=lambda: [
        torch.randn(0, 5, 4, 16).to(DT), torch.randn(4, 16, 2, 16).to(DT),
        torch.randn(4, 16, 2, 16).to(DT), torch.zeros(0, 2, dtype=torch.int32),
        torch.zeros(0, dtype=torch.int32), torch.zeros(0, 5, 1, dtype=torch.int32), SCALE],
        check=lambda got, args: got.shape == (0, 5, 4, 16) or pytest.fail(str(got.shape))),
    Case("all prefixes 0", "tree_attention", make=lambda: _base(prefixes=(0, 0))[1],
         expect=_oracle_of(prefixes=(0, 0))),
    Case("N = 1", "tree_attention", make=lambda: _base(N=1, kind="chain")[1],
         expect=_oracle_of(N=1, kind="chain")),
    Case("N = 33 (two mask words), padded", "tree_attention",
         make=lambda: _base(N=33, kind="padded")[1], expect=_oracle_of(N=33, kind="padded")),
    Case("GQA 8, one KV head", "tree_attention", make=lambda: _base(Hq=8, Hkv=1)[1],
         expect=_oracle_of(Hq=8, Hkv=1)),
    Case("int64 indices", "tree_attention",
         make=lambda: [a.long() if i in (3, 4) else a for i, a in enumerate(_base()[1])],
         expect=_oracle_of()),
    Case("strided views of every tensor", "tree_attention",
         make=lambda: strided(_base()[1]), expect=_oracle_of()),
    Case("sm_scale None (1 / sqrt(D))", "tree_attention",
         make=_with(6, lambda t, a: None),
         expect=lambda args: oracle_attention(*args[:5], _base()[0], 1 / math.sqrt(16))),
    Case("sm_scale 0 (uniform)", "tree_attention", make=_with(6, lambda t, a: 0.0),
         expect=lambda args: oracle_attention(*args[:5], _base()[0], 0.0)),
    Case("large scores", "tree_attention", make=_with(0, lambda t, a: (t.float() * 30).to(DT)),
         expect=lambda args: oracle_attention(*args[:5], _base()[0], SCALE)),
]

CASES = BUILD_TREE + TREE_ATTENTION
OPS = {"build_tree": build_tree, "tree_attention": tree_attention}


def _run(case, args):
    if case.op == "tree_attention":
        *tensors, scale = args
        return tree_attention(*tensors, sm_scale=scale)
    return build_tree(*args)


@pytest.mark.parametrize("checks", ["checks-on", "checks-off"])
@pytest.mark.parametrize("backend, device, ctx", backends())
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}: {c.name}")
def test_adversarial(case, backend, device, ctx, checks):
    args = to_device(case.make(), device)
    off = checks == "checks-off"
    with ctx(), (value_checks_off() if off else value_checks_on()):
        if case.error is not None and (case.metadata or not off):
            exc, regex = case.error
            with pytest.raises(exc, match=regex):
                _run(case, args)
            return
        got = _run(case, args)
    cpu_args = case.make()
    if case.check is not None:
        case.check(_to_cpu(got), cpu_args)
    elif case.op == "build_tree":
        for name, g, e in zip(["tree_mask", "depth", "first_child", "next_sibling"], got,
                              case.expect(cpu_args)):
            assert torch.equal(g.cpu(), e), name
    else:
        want = case.expect(cpu_args)
        assert torch.isfinite(want).all(), "the oracle of a compared case must be finite"
        assert_close(got, want, DT)


def _to_cpu(x):
    return [t.cpu() for t in x] if isinstance(x, (list, tuple)) else x.cpu()


def test_table_covers_both_outcomes():
    """The table classifies every case: both ops have error cases and result cases."""
    for op in OPS:
        cases = [c for c in CASES if c.op == op]
        assert any(c.error for c in cases) and any(c.error is None for c in cases)
        assert all(c.error or c.expect or c.check for c in cases)
        assert all(c.metadata or c.expect or c.check for c in cases if c.error)
