"""Multi-token acceptance: ``verify_greedy``, ``verify_sampling``, ``match_branch``.

``validate_<op>`` (checks, once per call), the Triton launchers ``<op>_triton`` (allocate, pick
tiles, launch ``kernels/verify.py``), the CPU kernels ``<op>_cpu``, the registration
(``ops/_registry.py``; no autograd: the outputs are indices) and the public functions. The
algorithm and the random stream are specified in ``reference/verify.py``.

Kernel choice per device
------------------------
* CUDA: one Triton program per request walks the draft tree in registers and, for sampling,
  finishes with one tiled exponential-race pass over the final node's row(s). No host sync: the
  launchers read only metadata.
* CPU: the native C++ walk (``csrc/verify.cpp``: the private ops
  ``torch.ops.loramix._verify_greedy_cpu`` / ``_verify_sampling_cpu``, which read int32 / int64
  indices and fp16 / bf16 / fp32 probabilities with their strides) when the extension is built,
  else the vectorised torch reference (with a one-time warning); both give the same outputs for
  the same (seed, offset). ``match_branch`` runs the reference (B x M integer compares:
  vectorised torch is as fast as a native loop). With ``LORAMIX_BACKEND=triton`` and
  ``TRITON_INTERPRET=1`` CPU tensors go through the Triton kernels instead (tests).

Every path sanitises values the validation would reject (CUDA skips value checks by default): a
parent outside ``[0, i)`` is padding, a token outside ``[0, V)`` is never accepted, ``accept_len``
is clamped to ``[0, N)``; comparisons run in the inputs' own width (never narrowed).
"""

from __future__ import annotations

import os

import functools

import torch

from .. import _backend, _native
from .._checks import (FLOAT_DTYPES, INDEX_DTYPES, check, check_index_range, check_parents,
                       check_shape, check_tensor, fail)
from .._tiles import cdiv, next_pow2, pow2_at_least
from ..reference.verify import match_branch_ref, rng_words, verify_greedy_ref, verify_sampling_ref
from ._registry import OPS, register_op

# Row sums of a probability row must be within this of 1 (fp32 sums over 256k entries stay far
# inside 1e-3; fp16 / bf16 rows carry ~2^-9 relative rounding per entry).
_SUM_TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 2e-2}

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


def _validate_tree_meta(op, tokens, parents):
    check_tensor(op, "tokens", tokens, ndim=2, dtypes=INDEX_DTYPES)
    B, N = tokens.shape
    check(N >= 1, op, "tokens", "must have at least one node (the root) per request, got N = 0")
    check_tensor(op, "parents", parents, ndim=2, dtypes=INDEX_DTYPES, device=tokens.device)
    check_shape(op, "parents", parents, (B, N))
    return B, N


def _reachable(parents: torch.Tensor) -> torch.Tensor:
    """[B, N] bool: nodes on a parent chain up to the root (padding nodes and nodes hanging from
    them are not). Pointer jumping: each node points at its parent (padding and the root at
    themselves); after ceil(log2 N) squarings it points at the top of its chain, which is the root
    exactly for reachable nodes. Call after :func:`check_parents`."""
    B, N = parents.shape
    idx = torch.arange(N, device=parents.device)
    up = torch.where(parents >= 0, parents.long(), idx)
    for _ in range(max(N - 1, 0).bit_length()):
        up = up.gather(1, up)
    return up == 0


def _check_prob_rows(op, arg, probs: torch.Tensor, used: torch.Tensor):
    """Value check of the rows ``probs[used]`` (``used [B, N]`` bool): every row finite, >= 0 and
    summing to 1 (within the dtype's tolerance). CPU tensors with the native extension: one SIMD
    pass (``loramix::_prob_rows_check``, csrc/probs.cpp) instead of indexing the rows out and four
    passes over them; the same rules, in the same order, with the same messages."""
    tol = _SUM_TOL[probs.dtype]
    native = _native.op("_prob_rows_check") if probs.device.type == "cpu" else None
    if native is not None:
        status, worst = native(probs, used, tol)
    else:
        rows = probs[used]
        if rows.numel() == 0:
            return
        r = rows.float()
        s = r.sum(-1)
        worst = float(s[int((s - 1).abs().argmax())])
        status = (1 if not bool(torch.isfinite(r).all()) else 2 if bool((r < 0).any())
                  else 0 if abs(worst - 1.0) <= tol else 3)
    if status == 1:
        fail(op, arg, "has NaN or infinite entries in a used row")
    if status == 2:
        fail(op, arg, "has negative entries in a used row")
    if status == 3:
        fail(op, arg, f"rows must be probability distributions summing to 1, a used row sums to "
                      f"{worst:.6g} (all-zero or unnormalised)")


def validate_verify_greedy(tokens, parents, target_ids):
    """Metadata checks, plus (where ``check_values`` allows) the parents rule. Returns (B, N)."""
    op = "verify_greedy"
    B, N = _validate_tree_meta(op, tokens, parents)
    check_tensor(op, "target_ids", target_ids, ndim=2, dtypes=INDEX_DTYPES, device=tokens.device)
    check_shape(op, "target_ids", target_ids, (B, N))
    if _backend.check_values(parents):
        check_parents(op, parents)
    return B, N


def validate_verify_sampling(tokens, parents, target_probs, draft_probs, seed, offset):
    """Metadata checks, plus (where ``check_values`` allows) the parents rule, the tokens of
    reachable nodes in [0, V), the probability rows the walk can read, and q(x) > 0 for every
    reachable proposal. Returns (B, N, V)."""
    op = "verify_sampling"
    B, N = _validate_tree_meta(op, tokens, parents)
    dev = tokens.device
    check_tensor(op, "target_probs", target_probs, ndim=3, dtypes=FLOAT_DTYPES, device=dev)
    check(target_probs.shape[0] == B and target_probs.shape[1] == N, op, "target_probs",
          f"must have shape [B={B}, N={N}, V], got {list(target_probs.shape)}")
    V = target_probs.shape[2]
    check(V >= 1, op, "target_probs", "must have a vocabulary of at least one token (V >= 1)")
    if draft_probs is not None:
        check_tensor(op, "draft_probs", draft_probs, ndim=3, dtypes=FLOAT_DTYPES, device=dev)
        check_shape(op, "draft_probs", draft_probs, (B, N, V))
    for name, val in (("seed", seed), ("offset", offset)):
        # (a SymInt under torch.compile with dynamic shapes; the int64 range is checked by the
        # public function, as the dispatcher cannot carry a wider int)
        check(isinstance(val, (int, torch.SymInt)) and not isinstance(val, bool), op, name,
              f"must be an int, got {type(val).__name__}", TypeError)
    if _backend.check_values(tokens) and B > 0:
        check_parents(op, parents)
        real = _reachable(parents)  # the nodes a walk can visit: any of them can be the final node
        idx = torch.arange(N, device=dev)
        drafted = real & (idx > 0)
        if bool(drafted.any()):
            t = tokens[drafted]  # compared in the input's own width
            check(bool(((t >= 0) & (t < V)).all()), op, "tokens",
                  f"entries of reachable nodes must lie in [0, V={V}), found range "
                  f"[{int(t.min())}, {int(t.max())}]")
        _check_prob_rows(op, "target_probs", target_probs, real)
        if draft_probs is not None:
            p = parents.long()
            kids = torch.zeros(B, N, dtype=torch.int64, device=dev)
            kids.scatter_add_(1, torch.where(drafted, p, 0), drafted.long())
            has_child = kids > 0
            _check_prob_rows(op, "draft_probs", draft_probs, has_child)
            if bool(drafted.any()):
                bb, ii = drafted.nonzero(as_tuple=True)
                tok = tokens.long()
                qx = draft_probs[bb, p[bb, ii], tok[bb, ii]]
                zero = qx <= 0
                if bool(zero.any()):
                    k = int(zero.nonzero()[0, 0])
                    fail(op, "draft_probs", f"gives proposed token {int(tok[bb[k], ii[k]])} of node "
                                            f"{int(ii[k])} (request {int(bb[k])}) zero probability: "
                                            "it cannot have been drawn from the draft")
    return B, N, V


def validate_match_branch(accept_index, accept_len, next_token, branch_anchor, branch_token):
    """Metadata checks, plus (where ``check_values`` allows) ``accept_len`` in [0, N). Returns
    (B, N, M)."""
    op = "match_branch"
    check_tensor(op, "accept_index", accept_index, ndim=2, dtypes=INDEX_DTYPES)
    B, N = accept_index.shape
    dev = accept_index.device
    check(N >= 1, op, "accept_index", "must have at least one column (the root)")
    check_tensor(op, "accept_len", accept_len, ndim=1, dtypes=INDEX_DTYPES, device=dev)
    check_shape(op, "accept_len", accept_len, (B,))
    check_tensor(op, "next_token", next_token, ndim=1, dtypes=INDEX_DTYPES, device=dev)
    check_shape(op, "next_token", next_token, (B,))
    check_tensor(op, "branch_anchor", branch_anchor, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    check(branch_anchor.shape[0] == B, op, "branch_anchor",
          f"must have shape [B={B}, M], got {list(branch_anchor.shape)}")
    M = branch_anchor.shape[1]
    check_tensor(op, "branch_token", branch_token, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    check_shape(op, "branch_token", branch_token, (B, M))
    if _backend.check_values(accept_len):
        check_index_range(op, "accept_len", accept_len, 0, N)
    return B, N, M


# ------------------------------------------------------------------------------------------
# Triton launchers (called after validation)
# ------------------------------------------------------------------------------------------


def _race_config(V: int) -> tuple[int, int]:
    """(QV, num_warps): the race / residual pass reads [QV, 4] entries of a row per step.

    4096 entries per step on a GPU keep ~32 KB of p and q loads in flight per program, enough
    (with 2+ programs per SM at B >= 256) to cover HBM latency; smaller V get one exact tile.
    The interpreter prefers big tiles too (fewer Python-level steps) but small V stay small.
    """
    qv = min(RACE_ROWS_MAX, pow2_at_least(cdiv(V, 4), 16))
    return qv, (8 if qv >= 512 else 4)


#: Largest QV: a [1024, 4] tile = 4096 vocabulary entries per race step.
RACE_ROWS_MAX = 1024


def _as_int32(word: int) -> int:
    """A uint32 word as the signed int32 with the same bits: the kernels take every RNG word as
    int32 (one specialisation for all seeds and offsets) and bitcast it back."""
    return word - (1 << 32) if word >= (1 << 31) else word


def _alloc_outputs(B, N, dev):
    """accept_index [B, N] int32, accept_len [B] int32, next_token [B] int64 (contiguous)."""
    return (torch.empty(B, N, dtype=torch.int32, device=dev), torch.empty(B, dtype=torch.int32, device=dev),
            torch.empty(B, dtype=torch.int64, device=dev))


#: Trees up to this many nodes walk in one warp (the walk is a chain of dependent reductions, so
#: more warps only add synchronisation).
GREEDY_ONE_WARP_NODES = 64


def verify_greedy_triton(tokens, parents, target_ids):
    """Launcher: allocate, one program per request (``_verify_greedy_kernel``)."""
    from ..kernels.verify import _verify_greedy_kernel

    B, N = tokens.shape
    acc, acc_len, nxt = _alloc_outputs(B, N, tokens.device)
    if B == 0:
        return acc, acc_len, nxt
    _verify_greedy_kernel[(B,)](
        tokens, parents, target_ids, acc, acc_len, nxt, N,
        tokens.stride(0), tokens.stride(1), parents.stride(0), parents.stride(1),
        target_ids.stride(0), target_ids.stride(1), acc.stride(0), acc.stride(1),
        acc_len.stride(0), nxt.stride(0),
        BLOCK_N=pow2_at_least(N), num_warps=1 if N <= GREEDY_ONE_WARP_NODES else 4,
    )
    return acc, acc_len, nxt


def verify_sampling_triton(tokens, parents, target_probs, draft_probs, seed, offset):
    """Launcher: allocate, derive the Philox words from (seed, offset), one program per request
    (``_verify_sampling_kernel``)."""
    from ..kernels.verify import _verify_sampling_kernel

    B, N = tokens.shape
    V = target_probs.shape[2]
    acc, acc_len, nxt = _alloc_outputs(B, N, tokens.device)
    if B == 0:
        return acc, acc_len, nxt
    words = [_as_int32(w) for w in rng_words(seed, offset)]
    has_q = draft_probs is not None
    q = draft_probs if has_q else target_probs  # never read when HAS_DRAFT is False
    qv, warps = _race_config(V)
    _verify_sampling_kernel[(B,)](
        tokens, parents, target_probs, q, acc, acc_len, nxt, N, V, *words,
        tokens.stride(0), tokens.stride(1), parents.stride(0), parents.stride(1),
        *target_probs.stride(), *q.stride(), acc.stride(0), acc.stride(1),
        acc_len.stride(0), nxt.stride(0),
        HAS_DRAFT=has_q, BLOCK_N=pow2_at_least(N), QV=qv, num_warps=warps,
    )
    return acc, acc_len, nxt


#: match_branch tile: requests per program, and the widest slot tile.
MATCH_BLOCK_B, MATCH_BLOCK_M_MAX = 16, 64


def match_branch_triton(accept_index, accept_len, next_token, branch_anchor, branch_token):
    """Launcher: a [16, <= 64] tile of requests x branch slots per program."""
    from ..kernels.verify import _match_branch_kernel

    B, N = accept_index.shape
    M = branch_anchor.shape[1]
    out = torch.empty(B, dtype=torch.int32, device=accept_index.device)
    if B == 0:
        return out
    if M == 0:
        return out.fill_(-1)
    block_m = min(MATCH_BLOCK_M_MAX, max(2, next_pow2(M)))
    _match_branch_kernel[(cdiv(B, MATCH_BLOCK_B),)](
        accept_index, accept_len, next_token, branch_anchor, branch_token, out, B, N, M,
        accept_index.stride(0), accept_index.stride(1), accept_len.stride(0), next_token.stride(0),
        branch_anchor.stride(0), branch_anchor.stride(1), branch_token.stride(0), branch_token.stride(1),
        out.stride(0), BLOCK_B=MATCH_BLOCK_B, BLOCK_M=block_m,
    )
    return out


# ------------------------------------------------------------------------------------------
# CPU kernels (called after validation): C++ when built, else the vectorised reference
# ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def native_available() -> bool:
    """Whether the native extension registered ``loramix::_verify_*_cpu`` (csrc/verify.cpp)."""
    try:
        torch.ops.loramix._verify_greedy_cpu
        torch.ops.loramix._verify_sampling_cpu
    except (AttributeError, RuntimeError):
        return False
    return True


def _use_native(t: torch.Tensor) -> bool:
    if t.device.type != "cpu":  # CUDA tensors with LORAMIX_BACKEND=reference: plain torch
        return False
    if native_available():
        return True
    if os.environ.get("LORAMIX_NATIVE", "1") != "0":  # switched off on purpose: no warning
        _backend.warn_once("the native extension loramix_kernels._C is not built: verify_greedy / "
                           "verify_sampling on CPU run the slower vectorised PyTorch reference "
                           "(build it with `pip install --no-build-isolation -e .`)")
    return False


def verify_greedy_cpu(tokens, parents, target_ids):
    if _use_native(tokens):
        return torch.ops.loramix._verify_greedy_cpu(tokens, parents, target_ids)
    return verify_greedy_ref(tokens, parents, target_ids)


def verify_sampling_cpu(tokens, parents, target_probs, draft_probs, seed, offset):
    if _use_native(tokens):
        return torch.ops.loramix._verify_sampling_cpu(tokens, parents, target_probs, draft_probs,
                                                       seed, offset)
    return verify_sampling_ref(tokens, parents, target_probs, draft_probs, seed, offset)


# ------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------


def _fake_walk_outputs(info, tokens, *args):
    B, N = info[0], info[1]
    return (tokens.new_empty(B, N, dtype=torch.int32), tokens.new_empty(B, dtype=torch.int32),
            tokens.new_empty(B, dtype=torch.int64))


register_op(
    "verify_greedy",
    "(Tensor tokens, Tensor parents, Tensor target_ids) -> (Tensor, Tensor, Tensor)",
    validate=validate_verify_greedy,
    triton=verify_greedy_triton,
    cpu=verify_greedy_cpu,
    fake=_fake_walk_outputs,
)

register_op(
    "verify_sampling",
    "(Tensor tokens, Tensor parents, Tensor target_probs, Tensor? draft_probs, int seed, int offset)"
    " -> (Tensor, Tensor, Tensor)",
    validate=validate_verify_sampling,
    triton=verify_sampling_triton,
    cpu=verify_sampling_cpu,
    fake=_fake_walk_outputs,
)

register_op(
    "match_branch",
    "(Tensor accept_index, Tensor accept_len, Tensor next_token, Tensor branch_anchor, "
    "Tensor branch_token) -> Tensor",
    validate=validate_match_branch,
    triton=match_branch_triton,
    # B x M integer compares: vectorised torch is as fast as a native loop.
    cpu=match_branch_ref,
    fake=lambda info, accept_index, *args: accept_index.new_empty(info[0], dtype=torch.int32),
)


# ------------------------------------------------------------------------------------------
# public functions
# ------------------------------------------------------------------------------------------


def verify_greedy(tokens, parents, target_ids):
    """Greedy acceptance of a scored draft tree (a chain is ``parents[b, i] = i - 1``).

    Walk from the root ``u = 0``: take the lowest-index child ``c`` of ``u`` whose draft token
    equals the target's greedy token after ``u`` (``tokens[b, c] == target_ids[b, u]``); repeat
    from ``c``; stop when no child matches.

    Parameters
    ----------
    tokens : torch.Tensor
        ``[B, N]`` int32 / int64 draft token of each node (``tokens[b, 0]`` unused).
    parents : torch.Tensor
        ``[B, N]`` int32 / int64: ``parents[b, i]`` in ``[0, i)``, or ``-1`` for the root
        (``i = 0``) and for unused padding nodes. A node hanging from a padding node is
        unreachable and never accepted.
    target_ids : torch.Tensor
        ``[B, N]`` int32 / int64: the target's next token after each node.

    Returns
    -------
    accept_index : torch.Tensor
        ``[B, N]`` int32 accepted path ``[0, c1, ..., cn, -1, ...]``.
    accept_len : torch.Tensor
        ``[B]`` int32 number ``n`` of accepted draft tokens.
    next_token : torch.Tensor
        ``[B]`` int64 ``target_ids[b, cn]``: the correction, or the bonus token at a leaf.

    Every argument may have any strides. Contract: ``docs/API.md``.

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels import verify_greedy
    >>> tokens = torch.tensor([[0, 5, 7, 9]]); parents = torch.tensor([[-1, 0, 0, 1]])
    >>> target = torch.tensor([[7, 1, 4, 2]])
    >>> verify_greedy(tokens, parents, target)
    (tensor([[ 0,  2, -1, -1]], dtype=torch.int32), tensor([1], dtype=torch.int32), tensor([4]))
    """
    return OPS["verify_greedy"](tokens, parents, target_ids)


def verify_sampling(tokens, parents, target_probs, draft_probs=None, seed=0, offset=0):
    """Lossless acceptance of a draft tree by sampling: the emitted tokens (accepted path, then
    ``next_token``) are distributed exactly as sampling the target one token at a time.

    With ``draft_probs`` (children of ``u`` drawn i.i.d. from ``q_u``): SpecInfer / EAGLE
    recursive rejection over the children in index order -- accept child token ``x`` with
    probability ``min(1, r(x) / q_u(x))`` where ``r`` starts at ``p_u`` and becomes
    ``norm(max(r - q_u, 0))`` after each rejection; if every child is rejected, the correction is
    drawn from the final ``r``. Without (deterministic proposals: top-k, n-gram): sample
    ``y ~ p_u`` and accept the lowest child whose token is ``y``, else emit ``y``. At a leaf the
    bonus token is drawn from ``p`` of the leaf. One launch, no normalisation pass (exponential
    race), no host sync.

    Parameters
    ----------
    tokens : torch.Tensor
        ``[B, N]`` int32 / int64 draft tokens in ``[0, V)`` (``tokens[b, 0]`` unused).
    parents : torch.Tensor
        ``[B, N]`` int32 / int64 tree (see :func:`verify_greedy`).
    target_probs : torch.Tensor
        ``[B, N, V]`` fp32 / fp16 / bf16: the target's next-token distribution after each node
        (temperature, top-k, top-p applied; rows sum to 1).
    draft_probs : torch.Tensor, optional
        ``[B, N, V]`` the draft distribution the children of each node were drawn from; ``None``
        (default) for deterministic proposals.
    seed, offset : int
        Philox key and stream offset, any int64 (negative values included); the result is
        deterministic for fixed (seed, offset) and the same on every path (CUDA, C++ CPU,
        reference) up to rare fp32 rounding ties. Advance ``offset`` every call.

    Returns
    -------
    accept_index, accept_len, next_token
        As :func:`verify_greedy`: ``[B, N]`` int32, ``[B]`` int32, ``[B]`` int64.

    Notes
    -----
    Losslessness holds only for valid probability rows. On CPU every row the walk can read is
    checked (finite, >= 0, sums to 1 within the dtype's tolerance, ``q(x) > 0`` for every
    proposal). On CUDA these value checks are off by default (they cost a host sync): rows that
    do not sum to 1 -- e.g. logits or unnormalised top-k weights passed by mistake -- are used
    as given, and the result is then silently NOT distributed as the target. When results look
    wrong, first rerun with ``LORAMIX_VALIDATE=1`` (or
    ``loramix_kernels.set_value_validation(True)``), which turns every such mistake into an error
    naming the argument. Every argument may have any strides. Contract: ``docs/API.md``.

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels import verify_sampling
    >>> p = torch.softmax(torch.randn(2, 3, 10), -1); q = torch.softmax(torch.randn(2, 3, 10), -1)
    >>> tokens = torch.multinomial(q[:, 0], 2, replacement=True)  # two i.i.d. draws at the root
    >>> tokens = torch.cat([torch.zeros(2, 1, dtype=torch.long), tokens], 1)
    >>> parents = torch.tensor([[-1, 0, 0]] * 2)
    >>> idx, n, nxt = verify_sampling(tokens, parents, p, q, seed=1, offset=0)
    >>> idx.shape, n.shape, nxt.dtype
    (torch.Size([2, 3]), torch.Size([2]), torch.int64)
    """
    for name, val in (("seed", seed), ("offset", offset)):
        check(isinstance(val, int) and not isinstance(val, bool), "verify_sampling", name,
              f"must be an int, got {type(val).__name__}", TypeError)
        check(_INT64_MIN <= val <= _INT64_MAX, "verify_sampling", name, f"must fit in int64, got {val}")
    return OPS["verify_sampling"](tokens, parents, target_probs, draft_probs, seed, offset)


def match_branch(accept_index, accept_len, next_token, branch_anchor, branch_token):
    """Mirror-SD branch reuse: the first precomputed draft branch consistent with the outcome.

    Parameters
    ----------
    accept_index, accept_len, next_token : torch.Tensor
        Outputs of :func:`verify_greedy` / :func:`verify_sampling` (``[B, N]``, ``[B]``, ``[B]``;
        int32 or int64).
    branch_anchor : torch.Tensor
        ``[B, M]`` int32 / int64: the tree node each precomputed branch hangs from, ``-1`` = unused.
    branch_token : torch.Tensor
        ``[B, M]`` int32 / int64: the correction token each branch assumed.

    Returns
    -------
    torch.Tensor
        ``[B]`` int32: the lowest ``m`` with ``branch_anchor[b, m] == accept_index[b,
        accept_len[b]]`` and ``branch_token[b, m] == next_token[b]``, else ``-1``.

    Every argument may have any strides. Contract: ``docs/API.md``.

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels import match_branch
    >>> match_branch(torch.tensor([[0, 2, -1]]), torch.tensor([1]), torch.tensor([4]),
    ...              torch.tensor([[0, 2, 2]]), torch.tensor([[4, 3, 4]]))
    tensor([2], dtype=torch.int32)
    """
    return OPS["match_branch"](accept_index, accept_len, next_token, branch_anchor, branch_token)
