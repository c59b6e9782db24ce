"""Plain-PyTorch multi-token acceptance: CPU fallback, test oracle and benchmark baseline.

Semantics: ``docs/API.md`` (``verify_greedy`` / ``verify_sampling`` / ``match_branch``). No
triton, no kernels: this module is what runs where neither the Triton kernels nor the native
extension do, and what the tests compare them with. Every function here is vectorised over the
batch: the tree walk advances all requests one child test per step (at most N steps, since a
request tests each node at most once), so the statistical tests can draw 200,000 samples as one
batch of 200,000 requests in one call.

The sampling algorithm (shared bit for bit with ``csrc/verify.cpp`` and the Triton kernel)
------------------------------------------------------------------------------------------
At the current node ``u`` with target row ``p = p_u`` (and draft row ``q = q_u``) the residual
distribution after ``k`` rejected children is kept as a scalar state instead of a rewritten row:

* with ``draft_probs`` (SpecInfer / EAGLE recursive rejection for children drawn i.i.d. from q):
  residual ``r_k ∝ w_k = max(p - c_k q, 0)`` with mass ``S_k = sum(w_k)``; ``c_0 = 0, S_0 = 1``.
  Child token ``x`` is accepted iff ``U * q(x) * S_k < w_k(x)`` (i.e. ``U < r_k(x) / q(x)``); on
  rejection ``r_{k+1} = norm(max(r_k - q, 0))``, which is ``∝ max(p - (c_k + S_k) q, 0)``, so
  ``c_{k+1} = c_k + S_k`` and one pass over V gives ``S_{k+1}`` -- only when another sibling
  remains to be tested. Keeping q fixed is the lossless rule for i.i.d. draws: after a rejection
  the next child is a fresh draw from q, and rejection sampling of ``r_k`` against q is exact.
  A token rejected once has ``w = 0`` afterwards (rejection implies ``p(x) < c q(x)``), so its
  duplicates are rejected too.
* without ``draft_probs`` (deterministic proposals): "sample ``y ~ p``, accept the lowest child
  whose token is ``y``, else ``y`` is the correction" is carried out sequentially, in the same
  distribution: child ``k`` (token ``x``) is accepted with probability ``p(x) / S_k`` where
  ``S_k = 1 - sum of p over the distinct tokens already rejected``; a duplicate of a rejected
  token has ``w = 0``. If every child is rejected the correction is drawn from p with the
  children's tokens removed -- exactly the law of ``y`` given that it matched no child. This
  needs scalar reads only, until the one final pass over V.
* the correction (all children rejected) or bonus token (a leaf) is drawn from the unnormalised
  residual ``w`` by an exponential race, ``argmax_v w(v) / E_v`` with ``E_v ~ Exp(1)``: no
  normalisation pass. If ``w`` has no mass left (possible only by rounding), the race falls back
  to ``p`` with the same ``E``.

Randomness: Philox4x32-10 keyed by ``seed`` (mod 2^64), counter ``(c0, c1 = request, c2, c3)``
with ``(c2, c3) = offset`` (mod 2^64: high and low words, so every int64 offset is its own
stream); the acceptance uniform of child node ``i`` uses ``c0 = i``, and the race's element ``v``
uses output ``v % 4`` of ``c0 = 2^31 + v // 4`` (the top bit of c0 tells the two kinds apart:
node indices and ``V / 4`` stay below 2^31). Every (request, node, draw) gets its own counter, so
requests are independent.
Uniforms: acceptance ``U = (r >> 8) * 2^-24`` in [0, 1); race ``U = ((r >> 9) + 0.5) * 2^-23``
in (0, 1), ``E = -log U > 0``. Both are exact in fp32 (a 24-bit significand holds every multiple of
2^-24 in [0, 1)), so every path computes the same floats from the same words.

Sanitising (what the kernels do with values the validation would reject, as on CUDA where value
checks are off by default): a parent outside ``[0, i)`` counts as -1 (padding), a token outside
``[0, V)`` is never accepted and never used as an address. Every comparison runs in int64, the
inputs' own width or wider (an int64 parent 2^32 + 1 is not parent 1).
"""

from __future__ import annotations

import torch

# Philox4x32-10 constants (Salmon et al. 2011; identical to triton.language.philox).
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_M32 = 0xFFFFFFFF
#: Set in the race's counter word c0 (acceptance counters are node indices, below 2^31).
RACE_COUNTER_BIT = 1 << 31
#: Acceptance uniforms: the top 24 bits of a Philox word times 2^-24.
ACCEPT_ULP = 2.0 ** -24
#: Race uniforms: the top 23 bits plus half a step, times 2^-23 (never 0, never 1).
RACE_ULP = 2.0 ** -23


def rng_words(seed: int, offset: int):
    """(key0, key1, c2, c3) as Python ints in [0, 2^32), for any int ``seed`` and ``offset``
    (taken mod 2^64: an int64 -1 is 2^64 - 1): the key is the seed, (c2, c3) the offset."""
    s, o = seed & ((1 << 64) - 1), offset & ((1 << 64) - 1)
    return s & _M32, s >> 32, o >> 32, o & _M32


def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of ``a * b`` for b in [0, 2^32), in int64 without overflow."""
    lo = b * (a & 0xFFFF)  # < 2^48
    mid = b * (a >> 16) + (lo >> 16)  # < 2^49: the product is mid * 2^16 + (lo & 0xFFFF)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (lo & 0xFFFF)


def philox4x32(key0: int, key1: int, c0, c1, c2, c3, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values (broadcast together); 4 words out."""
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c) for c in (c0, c1, c2, c3)))
    k0, k1 = key0, key1
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def accept_uniform(words, b: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
    """U in [0, 1) (fp32) of the acceptance test of child ``node`` in request ``b``."""
    k0, k1, c2, c3 = words
    r = philox4x32(k0, k1, node.long(), b.long(), c2, c3)[0]
    return (r >> 8).to(torch.float32) * ACCEPT_ULP


def race_exponentials(words, b: torch.Tensor, V: int) -> torch.Tensor:
    """E ~ Exp(1) (fp32) ``[len(b), V]`` for the final race of requests ``b``."""
    k0, k1, c2, c3 = words
    V4 = (V + 3) // 4
    ctr = RACE_COUNTER_BIT + torch.arange(V4, device=b.device, dtype=torch.int64)[None, :]
    r = torch.stack(philox4x32(k0, k1, ctr, b.long()[:, None], c2, c3), dim=-1)  # [R, V4, 4]
    r = r.reshape(b.shape[0], 4 * V4)[:, :V]
    u = ((r >> 9).to(torch.float32) + 0.5) * RACE_ULP
    return -torch.log(u)


def sanitize_parents(parents: torch.Tensor) -> torch.Tensor:
    """int64 parents with every entry outside [0, i) replaced by -1 (the kernels' rule)."""
    N = parents.shape[-1]
    idx = torch.arange(N, device=parents.device)
    p = parents.long()
    return torch.where((p >= 0) & (p < idx), p, -1)


# --------------------------------------------------------------------------------------------------
# verify_greedy
# --------------------------------------------------------------------------------------------------


def verify_greedy_ref(tokens, parents, target_ids):
    """Vectorised greedy walk; returns (accept_index int32 [B, N], accept_len int32, next int64)."""
    B, N = tokens.shape
    dev = tokens.device
    par = sanitize_parents(parents)
    tok, tgt = tokens.long(), target_ids.long()
    idx = torch.arange(N, device=dev)
    acc = torch.full((B, N), -1, dtype=torch.int64, device=dev)
    acc[:, 0] = 0
    u = torch.zeros(B, dtype=torch.int64, device=dev)
    n = torch.zeros(B, dtype=torch.int64, device=dev)
    rows = torch.arange(B, device=dev)
    for _ in range(N - 1):  # the path gains one node per step and has at most N nodes
        want = tgt.gather(1, u[:, None])
        match = (par == u[:, None]) & (tok == want)
        has = match.any(1)
        child = torch.where(match, idx, N).min(1).values
        n = n + has.long()
        acc[rows[has], n[has]] = child[has]
        u = torch.where(has, child, u)
    nxt = tgt.gather(1, u[:, None])[:, 0]
    return acc.to(torch.int32), n.to(torch.int32), nxt


# --------------------------------------------------------------------------------------------------
# verify_sampling
# --------------------------------------------------------------------------------------------------


class PhiloxStream:
    """The random source of every path: Philox words for (seed, offset), see the module docstring.

    ``accept(b, node)``: the acceptance uniforms of child ``node`` of requests ``b``;
    ``race(b, V)``: the race exponentials ``[len(b), V]`` of requests ``b``.
    """

    def __init__(self, seed, offset):
        self.words = rng_words(seed, offset)

    def accept(self, b, node):
        return accept_uniform(self.words, b, node)

    def race(self, b, V):
        return race_exponentials(self.words, b, V)


def verify_sampling_ref(tokens, parents, target_probs, draft_probs, seed, offset):
    """Vectorised lossless tree verification (the algorithm in the module docstring); the random
    stream of the C++ and Triton kernels, so all paths agree on the same (seed, offset)."""
    return verify_sampling_walk(tokens, parents, target_probs, draft_probs, PhiloxStream(seed, offset))


def verify_sampling_walk(tokens, parents, target_probs, draft_probs, rng):
    """The vectorised walk of :func:`verify_sampling_ref` drawing from any random source ``rng``
    with :class:`PhiloxStream`'s two methods (the benchmark's plain-torch baseline passes one
    backed by torch's generator)."""
    B, N = tokens.shape
    V = target_probs.shape[-1]
    dev = tokens.device
    R = rng
    has_q = draft_probs is not None
    par = sanitize_parents(parents)
    tok = tokens.long()
    tok = torch.where((tok >= 0) & (tok < V), tok, -1)
    idx = torch.arange(N, device=dev)
    rows = torch.arange(B, device=dev)
    acc = torch.full((B, N), -1, dtype=torch.int64, device=dev)
    acc[:, 0] = 0
    u = torch.zeros(B, dtype=torch.int64, device=dev)
    j = torch.zeros(B, dtype=torch.int64, device=dev)  # last tested child (children of u are > j)
    n = torch.zeros(B, dtype=torch.int64, device=dev)
    c = torch.zeros(B, dtype=torch.float32, device=dev)
    S = torch.ones(B, dtype=torch.float32, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    for _ in range(N):  # each step tests one child per active request; <= N - 1 tests in all
        is_child = par == u[:, None]
        nxt = torch.where(is_child & (idx > j[:, None]), idx, N).min(1).values
        active = active & (nxt < N)
        if not bool(active.any()):
            break
        a = rows[active]
        ua, xa = u[a], tok[a, nxt[a]]
        xs = xa.clamp_min(0)
        px = torch.where(xa >= 0, target_probs[a, ua, xs].float(), 0.0)
        U = R.accept(a, nxt[a])
        if has_q:
            qx = torch.where(xa >= 0, draft_probs[a, ua, xs].float(), 0.0)
            w = (px - c[a] * qx).clamp_min(0)
            ok = (xa >= 0) & (U * qx * S[a] < w)
        else:
            earlier = is_child[a] & (idx < nxt[a, None]) & (tok[a] == xa[:, None])
            w = torch.where(earlier.any(1), 0.0, px)
            ok = (xa >= 0) & (U * S[a] < w)
        rej = a[~ok]
        acc_rows = a[ok]
        n[acc_rows] += 1
        acc[acc_rows, n[acc_rows]] = nxt[acc_rows]
        u[acc_rows] = nxt[acc_rows]
        c[acc_rows] = 0.0
        S[acc_rows] = 1.0
        j[a] = nxt[a]
        if rej.numel():
            if has_q:
                c_new = c[rej] + S[rej]
                more = (is_child[rej] & (idx > nxt[rej, None])).any(1)
                need = rej[more]
                if need.numel():
                    pr = target_probs[need, u[need]].float()
                    qr = draft_probs[need, u[need]].float()
                    S[need] = (pr - c_new[more, None] * qr).clamp_min(0).sum(1)
                c[rej] = c_new
            else:
                S[rej] = (S[rej] - w[~ok]).clamp_min(0)
    # Final race at u: the correction from the residual, or the bonus token at a leaf.
    p = target_probs[rows, u].float()
    if has_q:
        wf = (p - c[:, None] * draft_probs[rows, u].float()).clamp_min(0)
    else:
        wf = torch.cat([p, p.new_zeros(B, 1)], 1)
        # remove the (rejected) children's tokens of u; leaves have none
        kids = torch.where((par == u[:, None]) & (tok >= 0), tok, V)
        wf.scatter_(1, kids, 0.0)
        wf = wf[:, :V]
    E = R.race(rows, V)
    key = wf / E
    best = key.max(1)
    fallback = (p / E).argmax(1)
    nxt_tok = torch.where(best.values > 0, best.indices, fallback)
    return acc.to(torch.int32), n.to(torch.int32), nxt_tok.long()


def verify_sampling_literal(tokens, parents, target_probs, seed):
    """The no-draft rule exactly as worded in API.md: at each node sample ``y ~ p_u`` (torch
    multinomial), accept the lowest-index child whose token is ``y``, else emit ``y``.

    A second, independently written oracle for ``draft_probs=None``: the tests check that the
    op's output law matches it, which ties the sequential-acceptance formulation to the wording.
    """
    B, N = tokens.shape
    dev = tokens.device
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    par = sanitize_parents(parents)
    tok = tokens.long()
    idx = torch.arange(N, device=dev)
    rows = torch.arange(B, device=dev)
    acc = torch.full((B, N), -1, dtype=torch.int64, device=dev)
    acc[:, 0] = 0
    u = torch.zeros(B, dtype=torch.int64, device=dev)
    n = torch.zeros(B, dtype=torch.int64, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    y = torch.zeros(B, dtype=torch.int64, device=dev)
    for _ in range(N):
        y_new = torch.multinomial(target_probs[rows, u].float(), 1, generator=g)[:, 0]
        y = torch.where(done, y, y_new)
        match = (par == u[:, None]) & (tok == y[:, None])
        child = torch.where(match, idx, N).min(1).values
        step = ~done & (child < N)
        done = done | ~step
        n = n + step.long()
        acc[rows[step], n[step]] = child[step]
        u = torch.where(step, child, u)
    return acc.to(torch.int32), n.to(torch.int32), y


# --------------------------------------------------------------------------------------------------
# match_branch
# --------------------------------------------------------------------------------------------------


def match_branch_ref(accept_index, accept_len, next_token, branch_anchor, branch_token):
    """reuse[b] = lowest m with anchor == last accepted node and token == next_token, else -1."""
    B, N = accept_index.shape
    M = branch_anchor.shape[1]
    dev = accept_index.device
    ln = accept_len.long().clamp(0, max(N - 1, 0))
    last = accept_index.long().gather(1, ln[:, None]) if N > 0 else torch.full((B, 1), -1, device=dev)
    hit = (branch_anchor.long() == last) & (branch_anchor.long() >= 0) & \
          (branch_token.long() == next_token.long()[:, None])
    m = torch.where(hit, torch.arange(M, device=dev), M).min(1).values if M > 0 else \
        torch.full((B,), M, device=dev, dtype=torch.int64)
    return torch.where(m < M, m, -1).to(torch.int32)
