"""Multi-token acceptance: ``verify_greedy``, ``verify_sampling``, ``match_branch``.

Registration (schema, CPU / CUDA / fake kernels; no autograd: the outputs are indices), the
launchers that validate, allocate, pick tiles and launch the Triton kernels, and the public
functions. The algorithm and random stream are specified in ``reference/verify.py``.

Kernel choice per device
------------------------
* CUDA: one Triton program per request (``kernels/verify.py``) walks the draft tree in registers
  and, for sampling, finishes with one tiled exponential-race pass over the final node's row(s).
  No host sync: the launchers read only metadata.
* CPU: the native C++ walk (``csrc/verify.cpp``, ``loramix_kernels._C``) when the extension is
  built, else the vectorised torch reference; both produce the same outputs for the same
  (seed, offset). With ``LORAMIX_BACKEND=triton`` and ``TRITON_INTERPRET=1``, CPU tensors go
  through the Triton kernels instead (tests).
"""

from __future__ import annotations

import torch
import triton

from .. import _backend
from .._checks import FLOAT_DTYPES, INDEX_DTYPES, check, check_index_range, check_shape, check_tensor, fail
from ..reference.verify import (
    match_branch_ref,
    rng_words,
    verify_greedy_ref,
    verify_sampling_ref,
)

torch.library.define(
    "loramix::verify_greedy",
    "(Tensor tokens, Tensor parents, Tensor target_ids) -> (Tensor, Tensor, Tensor)",
)
torch.library.define(
    "loramix::verify_sampling",
    "(Tensor tokens, Tensor parents, Tensor target_probs, Tensor? draft_probs, int seed, int offset)"
    " -> (Tensor, Tensor, Tensor)",
)
torch.library.define(
    "loramix::match_branch",
    "(Tensor accept_index, Tensor accept_len, Tensor next_token, Tensor branch_anchor, "
    "Tensor branch_token) -> Tensor",
)

# Row sums of a probability row must be within this of 1 (fp32 sums over 256k entries stay far
# inside 1e-3; fp16 / bf16 rows carry ~2^-9 relative rounding per entry).
_SUM_TOL = {torch.float32: 1e-3, torch.float64: 1e-3, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def _cext():
    from .. import _C

    return _C if (_C is not None and hasattr(_C, "verify_sampling_cpu")) else None


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


def check_tree_values(op, parents):
    """parents[b, 0] = -1; parents[b, i] in [0, i) or -1 (padding); no node hangs from padding."""
    if parents.numel() == 0:
        return
    p = parents.long()
    N = p.shape[1]
    idx = torch.arange(N, device=p.device)
    bad = torch.where(idx == 0, p != -1, (p != -1) & ((p < 0) | (p >= idx)))
    if bool(bad.any()):
        b, i = (int(t) for t in bad.nonzero()[0])
        want = "-1 (node 0 is the root)" if i == 0 else f"in [0, {i}) or -1 (padding)"
        fail(op, "parents", f"is not a tree: parents[{b}, {i}] = {int(p[b, i])}, must be {want}")
    grand = p.gather(1, p.clamp_min(0))
    orphan = (p >= 1) & (grand == -1)
    if bool(orphan.any()):
        b, i = (int(t) for t in orphan.nonzero()[0])
        fail(op, "parents", f"is not a tree: node {i} of request {b} hangs from padding node "
                            f"{int(p[b, i])} (its parent is -1)")


def _check_prob_rows(op, arg, rows: torch.Tensor, dtype):
    """Value check: every row finite, >= 0 and summing to 1 (within the dtype's tolerance)."""
    if rows.numel() == 0:
        return
    r = rows.float()
    if not bool(torch.isfinite(r).all()):
        fail(op, arg, "has NaN or infinite entries in a used row")
    if bool((r < 0).any()):
        fail(op, arg, "has negative entries in a used row")
    s = r.sum(-1)
    tol = _SUM_TOL.get(dtype, 2e-2)
    worst = int((s - 1).abs().argmax())
    if not abs(float(s[worst]) - 1.0) <= tol:
        fail(op, arg, f"rows must be probability distributions summing to 1, a used row sums to "
                      f"{float(s[worst]):.6g} (all-zero or unnormalised)")


def validate_greedy(tokens, parents, target_ids, op="verify_greedy"):
    B, N = _validate_tree_meta(op, tokens, parents)
    check_tensor(op, "target_ids", target_ids, ndim=2, dtypes=INDEX_DTYPES, device=tokens.device)
    check_shape(op, "target_ids", target_ids, (B, N))
    if _backend.check_values(parents):
        check_tree_values(op, parents)
    return B, N


def validate_sampling(tokens, parents, target_probs, draft_probs, seed, offset, op="verify_sampling"):
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
        check(isinstance(val, int) and not isinstance(val, bool), op, name,
              f"must be an int, got {type(val).__name__}", TypeError)
    if _backend.check_values(tokens) and B > 0:
        check_tree_values(op, parents)
        p = parents.long()
        idx = torch.arange(N, device=dev)
        real = (p != -1) | (idx == 0)  # non-padding nodes: any of them can be the final node
        drafted = real & (idx > 0)
        tok = tokens.long()
        if bool(drafted.any()):
            t = tok[drafted]
            check(bool(((t >= 0) & (t < V)).all()), op, "tokens",
                  f"entries of non-padding nodes must lie in [0, V={V}), found range "
                  f"[{int(t.min())}, {int(t.max())}]")
        _check_prob_rows(op, "target_probs", target_probs[real], target_probs.dtype)
        if draft_probs is not None:
            has_child = torch.zeros(B, N, dtype=torch.bool, device=dev)
            has_child.scatter_(1, torch.where(drafted, p, 0), drafted)
            _check_prob_rows(op, "draft_probs", draft_probs[has_child], draft_probs.dtype)
            if bool(drafted.any()):
                bb, ii = drafted.nonzero(as_tuple=True)
                qx = draft_probs[bb, p[bb, ii], tok[bb, ii]]
                zero = qx <= 0
                if bool(zero.any()):
                    k = int(zero.nonzero()[0, 0])
                    fail(op, "draft_probs", f"gives proposed token {int(tok[bb[k], ii[k]])} of node "
                                            f"{int(ii[k])} (request {int(bb[k])}) zero probability: "
                                            "it cannot have been drawn from the draft")
    return B, N, V


def validate_match(accept_index, accept_len, next_token, branch_anchor, branch_token, op="match_branch"):
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
# launchers
# ------------------------------------------------------------------------------------------


def _block_n(N: int) -> int:
    return max(16, triton.next_power_of_2(N))


def _race_tile(V: int) -> tuple[int, int]:
    """(QV, num_warps): the race / residual pass reads [QV, 4] entries of a row per step.

    4096 entries per step on a GPU keep ~32 KB of p and q loads in flight per program, enough
    (with 2+ programs per SM at B >= 256) to cover HBM latency; smaller V get one exact tile.
    The interpreter prefers big tiles too (fewer Python-level steps) but small V stay small.
    """
    qv = min(1024, max(16, triton.next_power_of_2(triton.cdiv(V, 4))))
    return qv, (8 if qv >= 512 else 4)


def _signed64(x: int) -> int:
    return x - (1 << 64) if x >= (1 << 63) else x


def _alloc_outputs(B, N, dev):
    """accept_index [B, N] int32, accept_len [B] int32, next_token [B] int64."""
    return (torch.empty(B, N, dtype=torch.int32, device=dev), torch.empty(B, dtype=torch.int32, device=dev),
            torch.empty(B, dtype=torch.int64, device=dev))


def verify_greedy_forward(tokens, parents, target_ids):
    """Launcher: validate, allocate, one program per request."""
    from ..kernels.verify import _verify_greedy_kernel

    B, N = validate_greedy(tokens, parents, target_ids)
    acc, acc_len, nxt = _alloc_outputs(B, N, tokens.device)
    if B == 0:
        return acc, acc_len, nxt
    _verify_greedy_kernel[(B,)](
        tokens, parents, target_ids, acc, acc_len, nxt, N,
        tokens.stride(0), tokens.stride(1), parents.stride(0), parents.stride(1),
        target_ids.stride(0), target_ids.stride(1), acc.stride(0), acc.stride(1),
        BLOCK_N=_block_n(N), num_warps=1 if N <= 64 else 4,
    )
    return acc, acc_len, nxt


def verify_sampling_forward(tokens, parents, target_probs, draft_probs, seed, offset):
    """Launcher: validate, allocate, derive the Philox words from (seed, offset), one program per
    request (``kernels/verify.py::_verify_sampling_kernel``)."""
    from ..kernels.verify import _verify_sampling_kernel

    B, N, V = validate_sampling(tokens, parents, target_probs, draft_probs, seed, offset)
    acc, acc_len, nxt = _alloc_outputs(B, N, tokens.device)
    if B == 0:
        return acc, acc_len, nxt
    k0, k1, c2a, c2r, c3 = rng_words(seed, offset)
    has_q = draft_probs is not None
    q = draft_probs if has_q else target_probs  # never read when HAS_DRAFT is False
    qv, warps = _race_tile(V)
    _verify_sampling_kernel[(B,)](
        tokens, parents, target_probs, q, acc, acc_len, nxt,
        N, V, _signed64((k1 << 32) | k0), c2a, c2r, c3,
        tokens.stride(0), tokens.stride(1), parents.stride(0), parents.stride(1),
        *target_probs.stride(), *q.stride(), acc.stride(0), acc.stride(1),
        HAS_DRAFT=has_q, BLOCK_N=_block_n(N), QV=qv, num_warps=warps,
    )
    return acc, acc_len, nxt


def match_branch_forward(accept_index, accept_len, next_token, branch_anchor, branch_token):
    from ..kernels.verify import _match_branch_kernel

    B, N, M = validate_match(accept_index, accept_len, next_token, branch_anchor, branch_token)
    out = torch.empty(B, dtype=torch.int32, device=accept_index.device)
    if B == 0:
        return out
    if M == 0:
        return out.fill_(-1)
    block_b = 16
    block_m = min(64, max(2, triton.next_power_of_2(M)))
    _match_branch_kernel[(triton.cdiv(B, block_b),)](
        accept_index, accept_len, next_token, branch_anchor, branch_token, out, B, N, M,
        accept_index.stride(0), accept_index.stride(1), branch_anchor.stride(0), branch_anchor.stride(1),
        branch_token.stride(0), branch_token.stride(1), BLOCK_B=block_b, BLOCK_M=block_m,
    )
    return out


# ------------------------------------------------------------------------------------------
# CPU kernels (C++ when built, else the vectorised reference)
# ------------------------------------------------------------------------------------------


def verify_greedy_cpu(tokens, parents, target_ids):
    validate_greedy(tokens, parents, target_ids)
    ext = _cext()
    if ext is None or tokens.device.type != "cpu":
        return verify_greedy_ref(tokens, parents, target_ids)
    return ext.verify_greedy_cpu(tokens.long().contiguous(), parents.long().contiguous(),
                                 target_ids.long().contiguous())


def verify_sampling_cpu(tokens, parents, target_probs, draft_probs, seed, offset):
    validate_sampling(tokens, parents, target_probs, draft_probs, seed, offset)
    ext = _cext()
    if ext is None or tokens.device.type != "cpu":
        return verify_sampling_ref(tokens, parents, target_probs, draft_probs, seed, offset)
    q = None if draft_probs is None else draft_probs.float().contiguous()
    return ext.verify_sampling_cpu(tokens.long().contiguous(), parents.long().contiguous(),
                                   target_probs.float().contiguous(), q, *rng_words(seed, offset))


# ------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------


def _verify_greedy_impl(tokens, parents, target_ids):
    # Both devices: Triton where it runs, else verify_greedy_cpu (C++ on CPU tensors, the
    # vectorised reference elsewhere, validated either way).
    if _backend.use_triton(tokens):
        return verify_greedy_forward(tokens, parents, target_ids)
    return verify_greedy_cpu(tokens, parents, target_ids)


torch.library.register_kernel("loramix::verify_greedy", "cpu", _verify_greedy_impl)
torch.library.register_kernel("loramix::verify_greedy", "cuda", _verify_greedy_impl)


@torch.library.register_fake("loramix::verify_greedy")
def _verify_greedy_fake(tokens, parents, target_ids):
    B, N = validate_greedy(tokens, parents, target_ids)
    return (tokens.new_empty(B, N, dtype=torch.int32), tokens.new_empty(B, dtype=torch.int32),
            tokens.new_empty(B, dtype=torch.int64))


def _verify_sampling_impl(tokens, parents, target_probs, draft_probs, seed, offset):
    if _backend.use_triton(tokens):
        return verify_sampling_forward(tokens, parents, target_probs, draft_probs, seed, offset)
    return verify_sampling_cpu(tokens, parents, target_probs, draft_probs, seed, offset)


torch.library.register_kernel("loramix::verify_sampling", "cpu", _verify_sampling_impl)
torch.library.register_kernel("loramix::verify_sampling", "cuda", _verify_sampling_impl)


@torch.library.register_fake("loramix::verify_sampling")
def _verify_sampling_fake(tokens, parents, target_probs, draft_probs, seed, offset):
    B, N, _ = validate_sampling(tokens, parents, target_probs, draft_probs, seed, offset)
    return (tokens.new_empty(B, N, dtype=torch.int32), tokens.new_empty(B, dtype=torch.int32),
            tokens.new_empty(B, dtype=torch.int64))


def _match_branch_impl(accept_index, accept_len, next_token, branch_anchor, branch_token):
    if _backend.use_triton(accept_index):
        return match_branch_forward(accept_index, accept_len, next_token, branch_anchor, branch_token)
    validate_match(accept_index, accept_len, next_token, branch_anchor, branch_token)
    # B x M integer compares: vectorised torch is as fast as a native loop here.
    return match_branch_ref(accept_index, accept_len, next_token, branch_anchor, branch_token)


torch.library.register_kernel("loramix::match_branch", "cpu", _match_branch_impl)
torch.library.register_kernel("loramix::match_branch", "cuda", _match_branch_impl)


@torch.library.register_fake("loramix::match_branch")
def _match_branch_fake(accept_index, accept_len, next_token, branch_anchor, branch_token):
    B, _, _ = validate_match(accept_index, accept_len, next_token, branch_anchor, branch_token)
    return accept_index.new_empty(B, dtype=torch.int32)


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
        (``i = 0``) and for unused padding nodes.
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

    Examples
    --------
    >>> import torch, loramix_kernels
    >>> from loramix_kernels.ops.verify import verify_greedy
    >>> tokens = torch.tensor([[0, 5, 7, 9]]); parents = torch.tensor([[-1, 0, 0, 1]])
    >>> target = torch.tensor([[7, 1, 4, 2]])
    >>> verify_greedy(tokens, parents, target)
    (tensor([[ 0,  2, -1, -1]], dtype=torch.int32), tensor([1], dtype=torch.int32), tensor([4]))
    """
    return torch.ops.loramix.verify_greedy(tokens, parents, target_ids)


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
        Philox key and stream offset; the result is deterministic for fixed (seed, offset) on
        one device. Advance ``offset`` every call.

    Returns
    -------
    accept_index, accept_len, next_token
        As :func:`verify_greedy`: ``[B, N]`` int32, ``[B]`` int32, ``[B]`` int64.

    Examples
    --------
    >>> import torch, loramix_kernels
    >>> from loramix_kernels.ops.verify import verify_sampling
    >>> p = torch.softmax(torch.randn(2, 3, 10), -1); q = torch.softmax(torch.randn(2, 3, 10), -1)
    >>> tokens = torch.multinomial(q[:, 0], 2, replacement=True)  # two i.i.d. draws at the root
    >>> tokens = torch.cat([torch.zeros(2, 1, dtype=torch.long), tokens], 1)
    >>> parents = torch.tensor([[-1, 0, 0]] * 2)
    >>> idx, n, nxt = verify_sampling(tokens, parents, p, q, seed=1, offset=0)
    >>> idx.shape, n.shape, nxt.dtype
    (torch.Size([2, 3]), torch.Size([2]), torch.int64)
    """
    return torch.ops.loramix.verify_sampling(tokens, parents, target_probs, draft_probs, int(seed), int(offset))


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

    Examples
    --------
    >>> import torch, loramix_kernels
    >>> from loramix_kernels.ops.verify import match_branch
    >>> match_branch(torch.tensor([[0, 2, -1]]), torch.tensor([1]), torch.tensor([4]),
    ...              torch.tensor([[0, 2, 2]]), torch.tensor([[4, 3, 4]]))
    tensor([2], dtype=torch.int32)
    """
    return torch.ops.loramix.match_branch(accept_index, accept_len, next_token, branch_anchor, branch_token)
