"""Adversarial table: bad and edge inputs for verify_greedy, verify_sampling, match_branch and
compact_kv_, each with its classified outcome.

Every row is one input and one of

* ``Error(exc, "arg")``: a metadata error (shape, dtype, device, aliasing): raises ``exc`` whose
  message starts with ``<op>: <arg>`` on every path, value checks on or off;
* ``ValueBad("arg", unchecked)``: a value the validation rejects (out-of-range index, not a
  tree, not a distribution): with value checks on (CPU) it raises ``ValueError`` naming the
  argument; with value checks off (CUDA's default, forced here on the Triton path) the kernels must
  sanitise it, and the result is ``unchecked``: ``"ref"`` = equal to the reference function's
  result on the same values (the reference sanitises as the kernels do), ``"wellformed"`` = only
  well-formed outputs are promised (NaN / negative probabilities: a valid path, a token in
  [0, V));
* ``"ref"``: valid (edge) input: the result equals the reference function's on every path.

Paths: ``tests.common.backends()`` -- the reference backend (the CPU ops: native C++ for
verify_*) with value checks on, and the Triton kernels with value checks forced off -- plus the
CPU ops with value checks off (``cpu-unchecked``), which shows the C++ kernels sanitise too
(compact_kv_'s CPU kernel is the reference itself and is not run unchecked on bad values).
"""

import dataclasses
import re

import pytest
import torch

from loramix_kernels import compact_kv_, match_branch, verify_greedy, verify_sampling
from loramix_kernels.reference.kv import compact_kv_ref_
from loramix_kernels.reference.verify import match_branch_ref, verify_greedy_ref, verify_sampling_ref

from tests.common import backends, reference_path, strided, to_device, value_checks_off

BIG = 2 ** 32


@dataclasses.dataclass(frozen=True)
class Error:
    exc: type
    arg: str


@dataclasses.dataclass(frozen=True)
class ValueBad:
    arg: str
    unchecked: str = "ref"  # or "wellformed"


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------

B, N, V = 3, 6, 7


def _tree():
    par = torch.tensor([[-1, 0, 0, 1, 1, 3], [-1, 0, 1, 2, 3, 4], [-1, 0, -1, 2, 0, 4]])
    tok = torch.tensor([[0, 2, 3, 2, 4, 1], [0, 3, 3, 3, 3, 3], [0, 3, 1, 2, 5, 6]])
    return tok, par


def _probs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(B, N, V, generator=g) * 2, -1).to(dtype)


def greedy(tok=None, par=None, tgt=None, dev="cpu", view=None):
    t, p = _tree()
    tok = t if tok is None else tok
    par = p if par is None else par
    tgt = torch.tensor([[2, 4, 3, 0, 1, 5], [3, 3, 3, 3, 3, 9], [3, 2, 6, 1, 6, 0]]) if tgt is None else tgt
    args = to_device((tok, par, tgt), dev)
    return tuple(view(a) for a in args) if view else args


def sampling(tok=None, par=None, p=None, q="default", seed=3, offset=5, dev="cpu", view=None):
    t, pr = _tree()
    tok = t if tok is None else tok
    par = pr if par is None else par
    p = _probs(0) if p is None else p
    q = _probs(1) if isinstance(q, str) else q
    args = to_device((tok, par, p, q), dev)
    if view:
        args = tuple(None if a is None else view(a) for a in args)
    return (*args, seed, offset)


def _greedy_out():
    return verify_greedy_ref(*greedy())


def match(acc=None, ln=None, nxt=None, anchor=None, btok=None, dev="cpu", view=None):
    a, n, x = _greedy_out()
    acc = a if acc is None else acc
    ln = n if ln is None else ln
    nxt = x if nxt is None else nxt
    anchor = torch.tensor([[-1, 1, 0, 4], [0, 5, 5, 5], [0, 0, 1, 2]]) if anchor is None else anchor
    btok = torch.tensor([[3, 3, 3, 1], [9, 9, 9, 9], [3, 2, 2, 2]]) if btok is None else btok
    args = to_device((acc, ln, nxt, anchor, btok), dev)
    return tuple(view(a) for a in args) if view else args


KV_N, KV_BS = 4, 4


def compact(acc=None, ln=None, seq=None, bt=None, k=None, v=None, dev="cpu", view=None):
    g = torch.Generator().manual_seed(7)
    k = torch.randn(6, KV_BS, 2, 3, generator=g) if k is None else k
    v = torch.randn(6, KV_BS, 2, 3, generator=g) if v is None else v
    bt = torch.tensor([[4, 1, 0], [2, 5, 3]]) if bt is None else bt
    seq = torch.tensor([7, 9]) if seq is None else seq
    acc = torch.tensor([[0, 2, 3, -1], [0, 1, 3, -1]]) if acc is None else acc
    ln = torch.tensor([2, 2]) if ln is None else ln
    args = to_device((k.clone(), v.clone(), bt, seq, acc, ln), dev)
    if view:
        args = args[:2] + tuple(view(a) for a in args[2:])
    return args


def _with(t, idx, val, dtype=None):
    t = t.clone() if dtype is None else t.to(dtype).clone()
    t[idx] = val
    return t


def _unnormalised():
    p = _probs(0)
    p[0, 0] *= 0.5
    return p


def _row(fill, at=(0, 0)):
    p = _probs(0)
    p[at] = fill
    return p


def _zero_q_for_proposal():
    q = _probs(1)
    q[0, 0, 2] = 0.0  # node 1 (token 2, parent 0) cannot have been drawn
    q[0, 0] /= q[0, 0].sum()
    return q


def _expand_tok():
    return torch.tensor([[0, 3, 3, 3, 3, 3]]).expand(B, N)


def _row_expanded_probs():
    return torch.full((1, 1, 1), 1.0 / V).expand(B, N, V)  # stride 0 everywhere


tok0, par0 = _tree()

# (id, op, make(dev) -> args, expected)
TABLE = [
    # ---------------- verify_greedy ----------------
    ("g-basic", "verify_greedy", lambda d: greedy(dev=d), "ref"),
    ("g-int32-mixed", "verify_greedy", lambda d: greedy(tok0.int(), par0, None, dev=d), "ref"),
    ("g-strided", "verify_greedy", lambda d: greedy(dev=d, view=strided), "ref"),
    ("g-transposed", "verify_greedy", lambda d: greedy(dev=d, view=lambda t: t.t().contiguous().t()), "ref"),
    ("g-expanded", "verify_greedy", lambda d: greedy(_expand_tok(), torch.arange(-1, N - 1).expand(B, N), dev=d), "ref"),
    ("g-root-only", "verify_greedy", lambda d: to_device((tok0[:, :1], par0[:, :1], tok0[:, :1] + 1), d), "ref"),
    ("g-empty-batch", "verify_greedy", lambda d: to_device((tok0[:0], par0[:0], tok0[:0]), d), "ref"),
    ("g-under-padding", "verify_greedy", lambda d: greedy(par=_with(par0, (0, 3), 2), dev=d), "ref"),
    ("g-huge-tokens", "verify_greedy", lambda d: greedy(tok0 + 2 ** 40, None, tok0.roll(1, 1) + 2 ** 40, dev=d), "ref"),
    ("g-negative-target", "verify_greedy", lambda d: greedy(tgt=-tok0, dev=d), "ref"),
    ("g-parent-wide", "verify_greedy", lambda d: greedy(par=_with(par0, (0, 2), BIG + 1), dev=d), ValueBad("parents")),
    ("g-root-parent", "verify_greedy", lambda d: greedy(par=_with(par0, (1, 0), 0), dev=d), ValueBad("parents")),
    ("g-forward-parent", "verify_greedy", lambda d: greedy(par=_with(par0, (1, 2), 4), dev=d), ValueBad("parents")),
    ("g-self-parent", "verify_greedy", lambda d: greedy(par=_with(par0, (1, 2), 2), dev=d), ValueBad("parents")),
    ("g-parent-minus5", "verify_greedy", lambda d: greedy(par=_with(par0, (2, 3), -5), dev=d), ValueBad("parents")),
    ("g-parent-int32-min", "verify_greedy", lambda d: greedy(par=_with(par0.int(), (2, 3), -2 ** 31), dev=d),
     ValueBad("parents")),
    ("g-tokens-float", "verify_greedy", lambda d: greedy(tok0.float(), dev=d), Error(TypeError, "tokens")),
    ("g-tokens-1d", "verify_greedy", lambda d: greedy(tok0[0], dev=d), Error(ValueError, "tokens")),
    ("g-no-nodes", "verify_greedy", lambda d: to_device((tok0[:, :0],) * 3, d), Error(ValueError, "tokens")),
    ("g-parents-shape", "verify_greedy", lambda d: greedy(par=par0[:, :4], dev=d), Error(ValueError, "parents")),
    ("g-target-shape", "verify_greedy", lambda d: greedy(tgt=tok0[:2], dev=d), Error(ValueError, "target_ids")),
    ("g-target-bool", "verify_greedy", lambda d: greedy(tgt=tok0 > 0, dev=d), Error(TypeError, "target_ids")),
    ("g-parents-meta", "verify_greedy", lambda d: (tok0.to(d), par0.to("meta"), tok0.to(d)),
     Error(ValueError, "parents")),
    # ---------------- verify_sampling ----------------
    ("s-basic", "verify_sampling", lambda d: sampling(dev=d), "ref"),
    ("s-no-draft", "verify_sampling", lambda d: sampling(q=None, dev=d), "ref"),
    ("s-fp16-int32", "verify_sampling", lambda d: sampling(tok0.int(), par0.int(), _probs(0, torch.float16),
                                                          _probs(1, torch.float16), dev=d), "ref"),
    ("s-bf16-mixed", "verify_sampling", lambda d: sampling(p=_probs(0, torch.bfloat16), dev=d), "ref"),
    ("s-strided", "verify_sampling", lambda d: sampling(dev=d, view=strided), "ref"),
    ("s-vocab-major", "verify_sampling", lambda d: sampling(dev=d, view=lambda t: t.transpose(0, -1).contiguous()
                                                          .transpose(0, -1)), "ref"),
    ("s-expanded-probs", "verify_sampling", lambda d: sampling(p=_row_expanded_probs(), q=None, dev=d), "ref"),
    ("s-vocab-1", "verify_sampling", lambda d: sampling(tok0 * 0, p=torch.ones(B, N, 1), q=torch.ones(B, N, 1), dev=d),
     "ref"),
    ("s-root-only", "verify_sampling", lambda d: to_device((tok0[:, :1], par0[:, :1], _probs(0)[:, :1], None, 1, 2), d),
     "ref"),
    ("s-empty-batch", "verify_sampling", lambda d: to_device((tok0[:0], par0[:0], _probs(0)[:0], None, 1, 2), d), "ref"),
    ("s-under-padding", "verify_sampling", lambda d: sampling(par=_with(par0, (0, 3), -1), dev=d), "ref"),
    ("s-under-padding-bad-token", "verify_sampling",
     lambda d: sampling(_with(tok0, (2, 3), 99), _with(par0, (2, 3), 2), dev=d), "ref"),
    ("s-padding-bad-token", "verify_sampling", lambda d: sampling(_with(tok0, (2, 2), -7), dev=d), "ref"),
    ("s-unreachable-row-nan", "verify_sampling", lambda d: sampling(p=_row(float("nan"), (2, 3)), dev=d), "ref"),
    *[(f"s-offset-{o}", "verify_sampling", (lambda o: lambda d: sampling(offset=o, dev=d))(o), "ref")
      for o in (2 ** 31, 2 ** 32 - 1, 2 ** 62 + 5, -1, -(2 ** 63))],
    *[(f"s-seed-{s_}", "verify_sampling", (lambda s_: lambda d: sampling(seed=s_, q=None, dev=d))(s_), "ref")
      for s_ in (2 ** 31, 2 ** 63 - 1, -1, -(2 ** 63))],
    ("s-token-above-V", "verify_sampling", lambda d: sampling(_with(tok0, (0, 1), V), dev=d), ValueBad("tokens")),
    ("s-token-negative", "verify_sampling", lambda d: sampling(_with(tok0, (1, 2), -3), q=None, dev=d),
     ValueBad("tokens")),
    ("s-token-wide", "verify_sampling", lambda d: sampling(_with(tok0, (0, 1), BIG + 2), dev=d), ValueBad("tokens")),
    ("s-parent-wide", "verify_sampling", lambda d: sampling(par=_with(par0, (0, 2), BIG + 1), dev=d),
     ValueBad("parents")),
    ("s-parent-forward", "verify_sampling", lambda d: sampling(par=_with(par0.int(), (1, 3), 5), q=None, dev=d),
     ValueBad("parents")),
    ("s-unnormalised", "verify_sampling", lambda d: sampling(p=_unnormalised(), dev=d), ValueBad("target_probs")),
    ("s-zero-row", "verify_sampling", lambda d: sampling(p=_row(0.0), q=None, dev=d), ValueBad("target_probs")),
    ("s-nan-row", "verify_sampling", lambda d: sampling(p=_row(float("nan")), dev=d),
     ValueBad("target_probs", "wellformed")),
    ("s-inf-row", "verify_sampling", lambda d: sampling(p=_row(float("inf"), (1, 0)), q=None, dev=d),
     ValueBad("target_probs", "wellformed")),
    ("s-negative-row", "verify_sampling", lambda d: sampling(p=_row(-0.5, (0, 0, 3)), dev=d),
     ValueBad("target_probs", "wellformed")),
    ("s-draft-zero-row", "verify_sampling", lambda d: sampling(q=_row(0.0), dev=d), ValueBad("draft_probs")),
    ("s-draft-zero-for-proposal", "verify_sampling", lambda d: sampling(q=_zero_q_for_proposal(), dev=d),
     ValueBad("draft_probs")),
    ("s-tokens-float", "verify_sampling", lambda d: sampling(tok0.float(), dev=d), Error(TypeError, "tokens")),
    ("s-probs-int", "verify_sampling", lambda d: sampling(p=tok0[..., None].expand(B, N, V), dev=d),
     Error(TypeError, "target_probs")),
    ("s-probs-fp64", "verify_sampling", lambda d: sampling(p=_probs(0).double(), dev=d),
     Error(TypeError, "target_probs")),
    ("s-probs-2d", "verify_sampling", lambda d: sampling(p=_probs(0)[0], dev=d), Error(ValueError, "target_probs")),
    ("s-probs-rows", "verify_sampling", lambda d: sampling(p=_probs(0)[:, :4], dev=d),
     Error(ValueError, "target_probs")),
    ("s-vocab-0", "verify_sampling", lambda d: sampling(p=_probs(0)[..., :0], q=None, dev=d),
     Error(ValueError, "target_probs")),
    ("s-draft-shape", "verify_sampling", lambda d: sampling(q=_probs(1)[..., :5], dev=d),
     Error(ValueError, "draft_probs")),
    ("s-draft-dtype", "verify_sampling", lambda d: sampling(q=_probs(1).double(), dev=d),
     Error(TypeError, "draft_probs")),
    ("s-draft-meta", "verify_sampling", lambda d: sampling(dev=d)[:3] + (_probs(1).to("meta"), 3, 5),
     Error(ValueError, "draft_probs")),
    ("s-seed-float", "verify_sampling", lambda d: sampling(seed=1.5, dev=d), Error(TypeError, "seed")),
    ("s-offset-2^64", "verify_sampling", lambda d: sampling(offset=2 ** 64, dev=d), Error(ValueError, "offset")),
    ("s-seed-below-int64", "verify_sampling", lambda d: sampling(seed=-(2 ** 63) - 1, dev=d),
     Error(ValueError, "seed")),
    # ---------------- match_branch ----------------
    ("m-basic", "match_branch", lambda d: match(dev=d), "ref"),
    ("m-strided", "match_branch", lambda d: match(dev=d, view=strided), "ref"),
    ("m-expanded-1d", "match_branch", lambda d: match(ln=torch.tensor([1]).expand(B), nxt=torch.tensor([3]).expand(B),
                                                      dev=d), "ref"),
    ("m-no-slots", "match_branch", lambda d: match(anchor=torch.zeros(B, 0, dtype=torch.long),
                                                   btok=torch.zeros(B, 0, dtype=torch.long), dev=d), "ref"),
    ("m-empty-batch", "match_branch", lambda d: to_device(tuple(t[:0] for t in match()), d), "ref"),
    ("m-int32", "match_branch", lambda d: match(dev=d, view=lambda t: t.int()), "ref"),
    # (the greedy walks end at nodes 4, 5, 1 with next tokens 1, 9, 2: narrowed, these would match)
    ("m-wide-anchor", "match_branch", lambda d: match(anchor=torch.tensor([[BIG + 4], [BIG + 5], [BIG + 1]]),
                                                      btok=torch.tensor([[1], [9], [2]]), dev=d), "ref"),
    ("m-wide-token", "match_branch", lambda d: match(anchor=torch.tensor([[4], [5], [1]]),
                                                     btok=torch.tensor([[BIG + 1], [BIG + 9], [BIG + 2]]), dev=d),
     "ref"),
    ("m-negative-anchor", "match_branch", lambda d: match(anchor=torch.full((B, 4), -2), dev=d), "ref"),
    ("m-len-N", "match_branch", lambda d: match(ln=torch.tensor([N, 0, 1]), dev=d), ValueBad("accept_len")),
    ("m-len-negative", "match_branch", lambda d: match(ln=torch.tensor([0, -1, 1]), dev=d), ValueBad("accept_len")),
    ("m-len-wide", "match_branch", lambda d: match(ln=torch.tensor([BIG, 0, BIG + 1]), dev=d), ValueBad("accept_len")),
    ("m-len-shape", "match_branch", lambda d: match(ln=torch.tensor([0, 1]), dev=d), Error(ValueError, "accept_len")),
    ("m-next-2d", "match_branch", lambda d: match(nxt=torch.zeros(B, 1, dtype=torch.long), dev=d),
     Error(ValueError, "next_token")),
    ("m-index-float", "match_branch", lambda d: match(acc=torch.zeros(B, N), dev=d),
     Error(TypeError, "accept_index")),
    ("m-index-no-cols", "match_branch", lambda d: match(acc=torch.zeros(B, 0, dtype=torch.long), dev=d),
     Error(ValueError, "accept_index")),
    ("m-token-shape", "match_branch", lambda d: match(btok=torch.zeros(B, 3, dtype=torch.long), dev=d),
     Error(ValueError, "branch_token")),
    ("m-anchor-rows", "match_branch", lambda d: match(anchor=torch.zeros(2, 4, dtype=torch.long), dev=d),
     Error(ValueError, "branch_anchor")),
    # ---------------- compact_kv_ ----------------
    ("c-basic", "compact_kv_", lambda d: compact(dev=d), "ref"),
    ("c-strided-indices", "compact_kv_", lambda d: compact(dev=d, view=strided), "ref"),
    ("c-int32", "compact_kv_", lambda d: compact(dev=d, view=lambda t: t.int()), "ref"),
    ("c-nothing-accepted", "compact_kv_", lambda d: compact(ln=torch.tensor([0, 0]), dev=d), "ref"),
    ("c-empty-batch", "compact_kv_", lambda d: compact(dev=d)[:2] + tuple(t[:0] for t in compact(dev=d)[2:]), "ref"),
    ("c-half-cache", "compact_kv_", lambda d: compact(k=torch.randn(6, KV_BS, 2, 3).half(),
                                                      v=torch.randn(6, KV_BS, 2, 3).half(), dev=d), "ref"),
    ("c-len-N", "compact_kv_", lambda d: compact(ln=torch.tensor([KV_N, 1]), dev=d), ValueBad("accept_len")),
    ("c-len-wide", "compact_kv_", lambda d: compact(ln=torch.tensor([BIG + 1, 1]), dev=d), ValueBad("accept_len")),
    ("c-path-not-increasing", "compact_kv_", lambda d: compact(acc=torch.tensor([[0, 3, 2, -1], [0, 1, 3, -1]]), dev=d),
     ValueBad("accept_index")),
    ("c-path-wide", "compact_kv_", lambda d: compact(acc=torch.tensor([[0, BIG + 2, 3, -1], [0, 1, 3, -1]]), dev=d),
     ValueBad("accept_index")),
    ("c-seq-short", "compact_kv_", lambda d: compact(seq=torch.tensor([3, 9]), dev=d), ValueBad("seq_lens")),
    ("c-block-out", "compact_kv_", lambda d: compact(bt=torch.tensor([[4, 9, 0], [2, 5, 3]]), dev=d),
     ValueBad("block_table")),
    ("c-v-shape", "compact_kv_", lambda d: compact(v=torch.randn(6, KV_BS, 2, 2), dev=d), Error(ValueError, "v_cache")),
    ("c-k-int", "compact_kv_", lambda d: compact(k=torch.zeros(6, KV_BS, 2, 3, dtype=torch.int32),
                                                 v=torch.zeros(6, KV_BS, 2, 3, dtype=torch.int32), dev=d),
     Error(TypeError, "k_cache")),
    ("c-k-expanded", "compact_kv_", lambda d: (torch.zeros(1, KV_BS, 2, 3, device=d).expand(6, KV_BS, 2, 3),)
     + compact(dev=d)[1:], Error(ValueError, "k_cache")),
    ("c-k-is-v", "compact_kv_", lambda d: (lambda a: (a[0], a[0]) + a[2:])(compact(dev=d)), Error(ValueError, "k_cache")),
    ("c-seq-shape", "compact_kv_", lambda d: compact(seq=torch.tensor([7]), dev=d), Error(ValueError, "seq_lens")),
]

OPS = {"verify_greedy": verify_greedy, "verify_sampling": verify_sampling, "match_branch": match_branch,
       "compact_kv_": compact_kv_}
REFS = {"verify_greedy": verify_greedy_ref, "verify_sampling": verify_sampling_ref,
        "match_branch": match_branch_ref}


def _compact_sanitised(k, v, bt, seq, acc, ln):
    """compact_kv_ on unchecked values, as the kernel documents it (kernels/kv.py): entries off
    the strictly increasing path in [j, N) are skipped, base < 0 skips the request, accept_len is
    clamped to N - 1; a move whose position lies past the block table or whose block id lies
    outside [0, num_blocks) is skipped (never clamped into another request's block); moves in
    increasing j."""
    k, v = k.clone(), v.clone()
    Bq, Nq = acc.shape
    nb, bs = k.shape[:2]
    mb = bt.shape[1]
    for b in range(Bq):
        base = int(seq[b]) - Nq
        n = min(int(ln[b]), Nq - 1) if base >= 0 else -1
        prev = -1
        for j in range(n + 1):
            a = int(acc[b, j])
            ok = a > prev and j <= a < Nq
            if not ok:
                continue
            prev = a
            if a == j:
                continue
            src, dst = base + a, base + j
            if src // bs >= mb or dst // bs >= mb:
                continue
            sb, db = int(bt[b, src // bs]), int(bt[b, dst // bs])
            if not (0 <= sb < nb and 0 <= db < nb):
                continue
            for c in (k, v):
                c[db, dst % bs] = c[sb, src % bs]
    return k, v


def _expected(op, args, sanitising):
    """The reference result on CPU copies of ``args``."""
    cpu = to_device(args, "cpu")
    if op == "compact_kv_":
        if sanitising:
            return _compact_sanitised(*cpu)
        k, v = cpu[0].clone(), cpu[1].clone()
        compact_kv_ref_(k, v, *cpu[2:])
        return k, v
    out = REFS[op](*cpu)
    return out if isinstance(out, tuple) else (out,)


def _result(op, args):
    out = OPS[op](*args)
    if op == "compact_kv_":
        return args[0], args[1]
    return out if isinstance(out, tuple) else (out,)


def _assert_wellformed(op, args, out):
    acc, n, nxt = (t.cpu() for t in out)
    Vq = args[2].shape[-1]
    assert bool(((nxt >= 0) & (nxt < Vq)).all())
    assert bool(((n >= 0) & (n < acc.shape[1])).all())
    for b in range(acc.shape[0]):
        path = acc[b, : int(n[b]) + 1].tolist()
        assert path[0] == 0 and path == sorted(set(path)) and bool((acc[b, int(n[b]) + 1:] == -1).all())


def _exec_paths():
    out = []
    for p in backends():
        name, device, ctx = p.values
        out.append(pytest.param(name, device, ctx, name == "triton", id=p.id))
        if name == "reference":
            out.append(pytest.param("cpu-unchecked", device, ctx, True, id="cpu-unchecked"))
    return out


@pytest.mark.parametrize("path, device, ctx, unchecked", _exec_paths())
@pytest.mark.parametrize("case_id, op, make, expect", TABLE, ids=[row[0] for row in TABLE])
def test_adversarial(case_id, op, make, expect, path, device, ctx, unchecked):
    if path == "cpu-unchecked" and op == "compact_kv_" and isinstance(expect, ValueBad):
        pytest.skip("compact_kv_'s CPU kernel is the reference, which assumes validated values "
                    "(CPU values are always checked)")
    args = make(device)
    checks = value_checks_off() if unchecked else _nullcontext()
    compare = expect == "ref" or (isinstance(expect, ValueBad) and unchecked and expect.unchecked == "ref")
    # (before the call: compact_kv_ writes its caches in place)
    want = _expected(op, args, sanitising=isinstance(expect, ValueBad)) if compare else None
    with ctx(), checks:
        if isinstance(expect, Error):
            with pytest.raises(expect.exc, match=rf"^{op}: {re.escape(expect.arg)}\b"):
                _result(op, args)
            return
        if isinstance(expect, ValueBad) and not unchecked:
            with pytest.raises(ValueError, match=rf"^{op}: {re.escape(expect.arg)}\b"):
                _result(op, args)
            return
        out = _result(op, args)
    if isinstance(expect, ValueBad) and expect.unchecked == "wellformed":
        _assert_wellformed(op, args, out)
        return
    for g, w in zip(out, want):
        assert torch.equal(g.cpu(), w), (case_id, path, g, w)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_table_covers_every_op_and_outcome():
    kinds = {(op, type(e).__name__ if not isinstance(e, str) else e) for _, op, _, e in TABLE}
    for op in OPS:
        for kind in ("ref", "Error", "ValueBad"):
            assert (op, kind) in kinds, (op, kind)
    assert len({row[0] for row in TABLE}) == len(TABLE)


def test_reference_backend_is_checked():
    """Sanity of the table's premise: on CPU the value checks are on unless switched off."""
    with reference_path():
        with pytest.raises(ValueError, match="^match_branch: accept_len"):
            match_branch(*match(ln=torch.tensor([N, 0, 1])))
