"""Triton kernels for multi-token acceptance: ``verify_greedy``, ``verify_sampling``,
``match_branch``, and the separate-pass (vLLM-like) benchmark baseline's two kernels.

Kernels only; the launchers live in ``loramix_kernels/ops/verify.py`` (the baseline's in
``loramix_kernels/bench/bench_verify.py``). The algorithm and the random
stream (Philox4x32-10 counters, uniform conversions) are specified in
``loramix_kernels/reference/verify.py``; the reference and ``csrc/verify.cpp`` reproduce them bit
for bit, so the three paths agree on the same (seed, offset) up to rare fp32 rounding ties.

Safety without host checks (CUDA): a parent outside [0, i) counts as -1 (padding); a token outside
[0, V) is never accepted and is never used as an address; every walk terminates because the tested
child index strictly increases; every load is masked or its index clamped.
"""

import triton
import triton.language as tl

_BIG = tl.constexpr(2147483647)  # "no such node / index" in masked mins

# Uniforms from 32-bit Philox words (the same constants in reference/verify.py and csrc/verify.cpp).
# Acceptance: the top 24 bits, U = (r >> 8) * 2^-24. An fp32 holds every multiple of 2^-24 in
# [0, 1) exactly (24-bit significand), so the conversion has no rounding and U < 1 always.
_ACCEPT_ULP = tl.constexpr(5.9604644775390625e-08)  # 2^-24
# Race: the top 23 bits plus half a step, U = ((r >> 9) + 0.5) * 2^-23, exact in fp32 and strictly
# inside (0, 1), so E = -log(U) is finite and > 0 and w / E never divides by zero.
_RACE_ULP = tl.constexpr(1.1920928955078125e-07)  # 2^-23


@triton.jit
def _u32(word):
    """A 32-bit RNG word passed as a signed int32 (the launcher's encoding: one kernel
    specialisation for every seed and offset) reinterpreted as uint32."""
    return word.to(tl.uint32, bitcast=True)


@triton.jit
def _philox_seed(key0, key1):
    """The 64-bit Philox key ``key1 << 32 | key0`` from its two int32-encoded words."""
    return (_u32(key1).to(tl.uint64) << 32) | _u32(key0).to(tl.uint64)


@triton.jit
def _load_tree(tokens_ptr, parents_ptr, b, N, V, stride_tb, stride_tn, stride_pb, stride_pn,
               BLOCK_N: tl.constexpr, CLAMP_V: tl.constexpr):
    """Row b's node ids, sanitised parents and tokens ([BLOCK_N] int32; -1 = none / invalid)."""
    idx = tl.arange(0, BLOCK_N)
    valid = idx < N
    par = tl.load(parents_ptr + b * stride_pb + idx * stride_pn, mask=valid, other=-1)
    par = tl.where((par >= 0) & (par < idx), par, -1).to(tl.int32)
    tok = tl.load(tokens_ptr + b * stride_tb + idx * stride_tn, mask=valid, other=-1)
    if CLAMP_V:
        tok = tl.where((tok >= 0) & (tok < V), tok, -1)
    return idx, par, tok


# --------------------------------------------------------------------------------------------------
# verify_greedy
# --------------------------------------------------------------------------------------------------


@triton.jit
def _verify_greedy_kernel(
    tokens_ptr, parents_ptr, target_ptr, acc_idx_ptr, acc_len_ptr, next_ptr,
    N,
    stride_tb, stride_tn, stride_pb, stride_pn, stride_gb, stride_gn, stride_ab, stride_an,
    stride_lb, stride_xb,
    BLOCK_N: tl.constexpr,
):
    """One program per request; grid ``(B,)``.

    The node row lives in registers ([BLOCK_N] lanes); each step of the walk is one scalar load of
    ``target_ids[b, u]`` and one masked min over the lanes (the lowest-index matching child), so a
    request costs depth + 1 steps and reads its three rows once.
    """
    b = tl.program_id(0).to(tl.int64)
    idx, par, tok = _load_tree(tokens_ptr, parents_ptr, b, N, 0, stride_tb, stride_tn,
                               stride_pb, stride_pn, BLOCK_N, False)
    zero = tl.program_id(0) * 0
    u = zero
    n = zero
    acc = tl.where(idx == 0, 0, -1)
    want = tl.load(target_ptr + b * stride_gb)
    go = zero == 0
    while go:
        child = tl.min(tl.where((par == u) & (tok == want), idx, _BIG), axis=0)
        go = child < _BIG
        n = tl.where(go, n + 1, n)
        acc = tl.where(go & (idx == n), child, acc)
        u = tl.where(go, child, u)
        want = tl.load(target_ptr + b * stride_gb + u.to(tl.int64) * stride_gn)
    tl.store(acc_idx_ptr + b * stride_ab + idx * stride_an, acc, mask=idx < N)
    tl.store(acc_len_ptr + b * stride_lb, n)
    tl.store(next_ptr + b * stride_xb, want.to(tl.int64))


# --------------------------------------------------------------------------------------------------
# verify_sampling
# --------------------------------------------------------------------------------------------------


@triton.jit
def _race_bits(seed, v0, b32, c2, c3, QV: tl.constexpr):
    """Philox words for vocabulary entries v0 + 4 i + k as a [QV, 4] tile (output k of counter
    v0 / 4 + i): one Philox call yields four entries' randomness. ``b32``, ``c2``, ``c3`` are
    uint32 scalars, ``seed`` the uint64 key."""
    # The race's counters have the top bit set (reference.verify.RACE_COUNTER_BIT): acceptance
    # counters are node indices, below 2^31, and so is v0 / 4.
    ctr = (v0 // 4 + tl.arange(0, QV)).to(tl.uint32) | (tl.full([QV], 1, tl.uint32) << 31)
    z = ctr * 0
    r0, r1, r2, r3 = tl.philox(seed, ctr, z + b32, z + c2, z + c3)
    k4 = tl.arange(0, 4)[None, :]
    return tl.where(k4 == 0, r0[:, None], tl.where(k4 == 1, r1[:, None],
                    tl.where(k4 == 2, r2[:, None], r3[:, None])))


@triton.jit
def _race_tile_best(w, m, offs, seed, v0, b32, c2, c3, QV: tl.constexpr):
    """Exponential race over one [QV, 4] vocabulary tile: (max of w / E, lowest index at the max)."""
    bits = _race_bits(seed, v0, b32, c2, c3, QV)
    e = -tl.log(((bits >> 9).to(tl.float32) + 0.5) * _RACE_ULP)
    # Flattened to 1-D so each tile costs two reductions (max, then lowest index at the max).
    key = tl.reshape(tl.where(m, w / e, -1.0), [4 * QV])
    t_best = tl.max(key, axis=0)
    t_i = tl.min(tl.where(key == t_best, tl.reshape(offs, [4 * QV]), _BIG), axis=0)
    return t_best, t_i


@triton.jit
def _residual_mass(p_row, q_row, c, V, stride_pv, stride_qv, QV: tl.constexpr):
    """S = sum_v max(p_v - c q_v, 0) over the row, in [QV, 4] tiles (fp32)."""
    offs0 = tl.arange(0, QV)[:, None] * 4 + tl.arange(0, 4)[None, :]
    acc = tl.zeros([QV, 4], dtype=tl.float32)
    for v0 in range(0, V, 4 * QV):
        offs = v0 + offs0
        m = offs < V
        p = tl.load(p_row + offs.to(tl.int64) * stride_pv, mask=m, other=0.0).to(tl.float32)
        q = tl.load(q_row + offs.to(tl.int64) * stride_qv, mask=m, other=0.0).to(tl.float32)
        acc += tl.maximum(p - c * q, 0.0)
    return tl.sum(tl.reshape(acc, [4 * QV]), axis=0)


@triton.jit(do_not_specialize=["key0", "key1", "c2", "c3"])
def _verify_sampling_kernel(
    tokens_ptr, parents_ptr, p_ptr, q_ptr, acc_idx_ptr, acc_len_ptr, next_ptr,
    N, V, key0, key1, c2, c3,
    stride_tb, stride_tn, stride_rb, stride_rn,
    stride_pb, stride_pn, stride_pv, stride_qb, stride_qn, stride_qv,
    stride_ab, stride_an, stride_lb, stride_xb,
    HAS_DRAFT: tl.constexpr, BLOCK_N: tl.constexpr, QV: tl.constexpr,
):
    """One program per request; grid ``(B,)``. The algorithm of ``reference/verify.py``.

    Walk: the request's node row (parents, tokens) sits in [BLOCK_N] registers; each step finds
    the next child of ``u`` with a masked min, reads ``p_u(x)`` (and ``q_u(x)``) as scalars and
    takes its acceptance uniform from Philox counter (child, b, kind 0, offset) --
    all nodes' uniforms come from one vector Philox call before the walk. The residual is
    the scalar state (c, S), so a chain never touches a full row during the walk; with draft
    probabilities one pass over row u (p and q) updates S after a rejection that still has a
    sibling to test.

    Final race: one pass over row u in [QV, 4] tiles (16-byte vector loads; one Philox call per
    four entries), tracking the running max of ``w / E`` and the lowest index reaching it.
    The q row is only loaded when the residual subtracts it (c > 0): a leaf's bonus token reads p
    alone. Without draft probabilities the children's tokens are removed from the race: a
    per-tile test (a [BLOCK_N] reduction) finds the rare tiles holding one, which then loop over
    the nodes.

    Random words: ``key0, key1, c2, c3`` are the uint32 words of
    ``reference.verify.rng_words(seed, offset)`` passed as signed int32 (never specialised), so
    every int64 seed and offset runs the same compiled kernel.
    """
    seed = _philox_seed(key0, key1)
    c2 = _u32(c2)
    c3 = _u32(c3)
    pid = tl.program_id(0)
    b = pid.to(tl.int64)
    idx, par, tok = _load_tree(tokens_ptr, parents_ptr, b, N, V, stride_tb, stride_tn,
                               stride_rb, stride_rn, BLOCK_N, True)
    tok = tok.to(tl.int32)
    b32 = pid.to(tl.uint32)
    zero = pid * 0
    u = zero
    j = zero
    n = zero
    c = zero.to(tl.float32)
    S = c + 1.0
    acc = tl.where(idx == 0, 0, -1)
    p_base = p_ptr + b * stride_pb
    q_base = q_ptr + b * stride_qb
    # Acceptance uniforms of every node at once (counter c0 = node): one Philox call, not one per
    # tested child.
    zn = idx.to(tl.uint32) * 0
    r_acc = tl.philox(seed, idx.to(tl.uint32), zn + b32, zn + c2, zn + c3)[0]
    u_all = (r_acc >> 8).to(tl.float32) * _ACCEPT_ULP  # U in [0, 1)
    go = zero == 0
    while go:
        is_child = par == u
        nxt = tl.min(tl.where(is_child & (idx > j), idx, _BIG), axis=0)
        has = nxt < _BIG
        nxt_c = tl.minimum(nxt, N - 1).to(tl.int64)
        x = tl.load(tokens_ptr + b * stride_tb + nxt_c * stride_tn, mask=has, other=-1)
        x = tl.where((x >= 0) & (x < V), x, -1).to(tl.int32)
        xv = has & (x >= 0)
        xs = tl.maximum(x, 0).to(tl.int64)
        p_row = p_base + u.to(tl.int64) * stride_pn
        q_row = q_base + u.to(tl.int64) * stride_qn
        px = tl.load(p_row + xs * stride_pv, mask=xv, other=0.0).to(tl.float32)
        U = tl.sum(tl.where(idx == nxt, u_all, 0.0), axis=0)
        if HAS_DRAFT:
            qx = tl.load(q_row + xs * stride_qv, mask=xv, other=0.0).to(tl.float32)
            w = tl.maximum(px - c * qx, 0.0)
            ok = xv & (U * qx * S < w)
        else:
            dup = tl.sum((is_child & (idx < nxt) & (tok == x)).to(tl.int32), axis=0) > 0
            w = tl.where(dup, 0.0, px)
            ok = xv & (U * S < w)
        rej = has & (ok == 0)
        n = tl.where(ok, n + 1, n)
        acc = tl.where(ok & (idx == n), nxt, acc)
        j = tl.where(has, nxt, j)
        if HAS_DRAFT:
            c_new = c + S
            more = tl.min(tl.where(is_child & (idx > nxt), idx, _BIG), axis=0) < _BIG
            S_new = S
            if rej & more:
                S_new = _residual_mass(p_row, q_row, c_new, V, stride_pv, stride_qv, QV)
            c = tl.where(ok, 0.0, tl.where(rej, c_new, c))
            S = tl.where(ok, 1.0, tl.where(rej, S_new, S))
        else:
            S = tl.where(ok, 1.0, tl.where(rej, tl.maximum(S - w, 0.0), S))
        u = tl.where(ok, nxt, u)
        go = has

    # ---- final race at u: correction from the residual, or the bonus token at a leaf ----
    p_row = p_base + u.to(tl.int64) * stride_pn
    q_row = q_base + u.to(tl.int64) * stride_qn
    kid_tok = tl.where(par == u, tok, -1)
    offs0 = tl.arange(0, QV)[:, None] * 4 + tl.arange(0, 4)[None, :]
    best = zero.to(tl.float32) - 1.0
    best_i = zero
    for v0 in range(0, V, 4 * QV):
        offs = v0 + offs0
        m = offs < V
        p = tl.load(p_row + offs.to(tl.int64) * stride_pv, mask=m, other=0.0).to(tl.float32)
        if HAS_DRAFT:
            q = tl.load(q_row + offs.to(tl.int64) * stride_qv,
                        mask=m & (c + tl.zeros([QV, 4], tl.float32) > 0.0), other=0.0)
            w = tl.maximum(p - c * q.to(tl.float32), 0.0)
        else:
            w = p
            in_tile = (kid_tok >= v0) & (kid_tok < v0 + 4 * QV)
            if tl.sum(in_tile.to(tl.int32), axis=0) > 0:
                for jj in range(1, N):
                    tj = tl.max(tl.where(idx == jj, kid_tok, -1), axis=0)
                    w = tl.where(offs == tj, 0.0, w)
        t_best, t_i = _race_tile_best(w, m, offs, seed, v0, b32, c2, c3, QV)
        upd = t_best > best
        best = tl.where(upd, t_best, best)
        best_i = tl.where(upd, t_i, best_i)
    out = best_i
    if best <= 0.0:
        # No residual mass left (reachable only through rounding): race over p itself, with the
        # same exponentials. A second pass, but on a path of measure zero.
        best_p = zero.to(tl.float32) - 1.0
        for v0 in range(0, V, 4 * QV):
            offs = v0 + offs0
            m = offs < V
            p = tl.load(p_row + offs.to(tl.int64) * stride_pv, mask=m, other=0.0).to(tl.float32)
            t_best, t_i = _race_tile_best(p, m, offs, seed, v0, b32, c2, c3, QV)
            upd = t_best > best_p
            best_p = tl.where(upd, t_best, best_p)
            out = tl.where(upd, t_i, out)
    out = tl.minimum(tl.maximum(out, 0), V - 1)
    tl.store(acc_idx_ptr + b * stride_ab + idx * stride_an, acc, mask=idx < N)
    tl.store(acc_len_ptr + b * stride_lb, n)
    tl.store(next_ptr + b * stride_xb, out.to(tl.int64))


# --------------------------------------------------------------------------------------------------
# match_branch
# --------------------------------------------------------------------------------------------------


@triton.jit
def _match_branch_kernel(
    acc_idx_ptr, acc_len_ptr, next_ptr, anchor_ptr, btok_ptr, out_ptr,
    B, N, M,
    stride_ab, stride_an, stride_lb, stride_xb, stride_hb, stride_hm, stride_kb, stride_km,
    stride_ob,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """A [BLOCK_B, BLOCK_M] tile of requests x branch slots per program; grid ``(cdiv(B, BLOCK_B),)``.
    The first matching slot is a masked min over the slot axis. ``accept_len`` is clamped to
    [0, N) in its own width (as the reference does); every compare runs in the wider of the two
    operands' widths, never narrowed."""
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    bm = rb < B
    rb64 = rb.to(tl.int64)
    ln = tl.load(acc_len_ptr + rb64 * stride_lb, mask=bm, other=0)
    ln = tl.minimum(tl.maximum(ln, 0), N - 1).to(tl.int64)
    last = tl.load(acc_idx_ptr + rb64 * stride_ab + ln * stride_an, mask=bm, other=-1)
    tokn = tl.load(next_ptr + rb64 * stride_xb, mask=bm, other=0)
    res = tl.full([BLOCK_B], _BIG, tl.int32)
    for m0 in range(0, M, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        mm = bm[:, None] & (ms[None, :] < M)
        anc = tl.load(anchor_ptr + rb64[:, None] * stride_hb + ms[None, :] * stride_hm, mask=mm, other=-1)
        bt = tl.load(btok_ptr + rb64[:, None] * stride_kb + ms[None, :] * stride_km, mask=mm, other=0)
        hit = mm & (anc >= 0) & (anc == last[:, None]) & (bt == tokn[:, None])
        res = tl.minimum(res, tl.min(tl.where(hit, ms[None, :], _BIG), axis=1))
    tl.store(out_ptr + rb64 * stride_ob, tl.where(res < _BIG, res, -1), mask=bm)


# --------------------------------------------------------------------------------------------------
# benchmark baseline: separate passes (vLLM's rejection sampler design, chains)
# --------------------------------------------------------------------------------------------------


@triton.jit
def _separate_recover_kernel(
    tokens_ptr, q_ptr, p_ptr, rec_ptr, N, V, seed, c2, c3,
    stride_tb, stride_tn, stride_pb, stride_pn, stride_pv, stride_qb, stride_qn, stride_qv,
    stride_rb, stride_rn,
    HAS_DRAFT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Grid ``(B, N)``: the token a rejection at node u would emit (chain: child u + 1), read from
    the full rows of p and q -- the pass over all B * N rows that our fused kernel avoids."""
    b = tl.program_id(0).to(tl.int64)
    u = tl.program_id(1)
    leaf = u == N - 1
    child_tok = tl.load(tokens_ptr + b * stride_tb + tl.minimum(u + 1, N - 1) * stride_tn)
    p_row = p_ptr + b * stride_pb + u.to(tl.int64) * stride_pn
    q_row = q_ptr + b * stride_qb + u.to(tl.int64) * stride_qn
    best = -1.0
    best_i = 0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        m = offs < V
        p = tl.load(p_row + offs.to(tl.int64) * stride_pv, mask=m, other=0.0).to(tl.float32)
        if HAS_DRAFT:
            q = tl.load(q_row + offs.to(tl.int64) * stride_qv, mask=m & (leaf == 0), other=0.0)
            w = tl.maximum(p - q.to(tl.float32), 0.0)
        else:
            w = tl.where((offs == child_tok) & (leaf == 0), 0.0, p)
        r = tl.randint(seed, (b * N + u) * V + offs)
        e = -tl.log(((r >> 9).to(tl.float32) + 0.5) * _RACE_ULP)
        key = tl.where(m, w / e, -1.0)
        t_best = tl.max(key, axis=0)
        t_i = tl.argmax(key, axis=0)
        upd = t_best > best
        best = tl.where(upd, t_best, best)
        best_i = tl.where(upd, v0 + t_i, best_i)
    tl.store(rec_ptr + b * stride_rb + u * stride_rn, best_i)


@triton.jit
def _separate_accept_kernel(
    tokens_ptr, p_ptr, q_ptr, rec_ptr, acc_idx_ptr, acc_len_ptr, next_ptr,
    N, V, seed, c2, c3,
    stride_tb, stride_tn, stride_pb, stride_pn, stride_pv, stride_qb, stride_qn, stride_qv,
    stride_rb, stride_rn, stride_ab, stride_an,
    HAS_DRAFT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(B,)``: the chain's accept loop, then the precomputed recovered / bonus token."""
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK_N)
    n = tl.program_id(0) * 0
    go = n == 0
    i = n + 1
    while go & (i < N):
        x = tl.load(tokens_ptr + b * stride_tb + i * stride_tn)
        xs = tl.minimum(tl.maximum(x, 0), V - 1).to(tl.int64)
        px = tl.load(p_ptr + b * stride_pb + (i - 1).to(tl.int64) * stride_pn + xs * stride_pv).to(tl.float32)
        r = tl.randint(seed, (b * N + i).to(tl.uint32))
        U = (r >> 8).to(tl.float32) * _ACCEPT_ULP
        if HAS_DRAFT:
            qx = tl.load(q_ptr + b * stride_qb + (i - 1).to(tl.int64) * stride_qn + xs * stride_qv).to(tl.float32)
            ok = U * qx < px
        else:
            ok = U < px
        go = ok
        n = tl.where(ok, n + 1, n)
        i = tl.where(ok, i + 1, i)
    acc = tl.where(idx <= n, idx, -1)
    tl.store(acc_idx_ptr + b * stride_ab + idx * stride_an, acc, mask=idx < N)
    tl.store(acc_len_ptr + b, n)
    tok = tl.load(rec_ptr + b * stride_rb + n * stride_rn)
    tl.store(next_ptr + b, tok.to(tl.int64))
