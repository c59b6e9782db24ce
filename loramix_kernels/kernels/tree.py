"""Triton kernels for speculative-decoding trees: ``build_tree`` and ``tree_attention``.

Kernels only; the launchers (validation, allocation, tile choice, split heuristic) live in
``loramix_kernels/ops/tree.py``. Every load is masked and every index taken from tensor data
(parents, block-table entries, sequence lengths) is clamped or sanitised here, so no input can make
a kernel read or write out of bounds, even when the launcher's value checks are off (CUDA).
"""

import triton
import triton.language as tl

# --------------------------------------------------------------------------------------------------
# build_tree
# --------------------------------------------------------------------------------------------------


@triton.jit
def _build_tree_kernel(
    parents_ptr, mask_ptr, depth_ptr, first_child_ptr, next_sibling_ptr,
    N, W,
    stride_pb, stride_pn,
    stride_mb, stride_mn, stride_mw,
    stride_db, stride_dn,
    stride_fb, stride_fn,
    stride_sb, stride_sn,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, CHUNK: tl.constexpr,
):
    """One program per request ``b``; grid ``(B,)``.

    Lane ``i`` of a ``[BLOCK_N]`` vector owns node ``i``. A parent ``p`` of node ``c`` is used
    only when ``0 <= p < c``; anything else counts as -1 (no parent). The launcher rejects such
    input on CPU; on CUDA the rule makes every walk terminate (indices strictly decrease) and keeps
    every load inside row ``b`` of ``parents``.

    * ancestor mask + depth: every lane walks up its own ancestor chain at once, setting bit ``cur``
      of its row at each step (``mask[i] = OR of 1 << a`` over ``a`` in ancestors-or-self(i)).
      The walk gathers ``parents[b, cur]`` from global memory (L1-resident: one row of N ints),
      so it needs no cross-lane communication and runs max-depth + 1 steps, not N.
    * first_child / next_sibling: minima over a ``[BLOCK_N, CHUNK]`` comparison tile, looping
      over candidate children in chunks so the tile stays small in registers at N = 256+.
    """
    b = tl.program_id(0).to(tl.int64)
    par_row = parents_ptr + b * stride_pb
    i = tl.arange(0, BLOCK_N)
    valid = i < N
    # Range tests in the input's own width (an int64 2^32 + 1 must not wrap to parent 1); only
    # the sanitised index, in [-1, N), is narrowed to int32.
    p = tl.load(par_row + i * stride_pn, mask=valid, other=-1)
    p = tl.where((p >= 0) & (p < i), p, -1).to(tl.int32)

    w = tl.arange(0, BLOCK_W)
    words = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.int32)
    steps = tl.zeros([BLOCK_N], dtype=tl.int32)
    cur = tl.where(valid, i, -1)
    while tl.max(cur, axis=0) >= 0:
        active = cur >= 0
        c = tl.maximum(cur, 0)
        # bit 31 wraps to the sign bit of the int32 word, as the packed layout wants.
        bit = tl.full([BLOCK_N], 1, tl.int32) << (c % 32)
        hit = (w[None, :] == (c // 32)[:, None]) & active[:, None]
        words = words | tl.where(hit, bit[:, None], 0)
        steps += active.to(tl.int32)
        nxt = tl.load(par_row + c.to(tl.int64) * stride_pn, mask=active, other=-1)
        cur = tl.where(active & (nxt >= 0) & (nxt < c), nxt, -1).to(tl.int32)

    row_m = mask_ptr + b * stride_mb
    tl.store(row_m + i[:, None] * stride_mn + w[None, :] * stride_mw, words,
             mask=valid[:, None] & (w[None, :] < W))
    # `steps` counted node i itself, so depth = steps - 1 (the root and padding nodes: 0).
    tl.store(depth_ptr + b * stride_db + i * stride_dn, steps - 1, mask=valid)

    BIG: tl.constexpr = 2147483647
    first = tl.full([BLOCK_N], BIG, tl.int32)
    nsib = tl.full([BLOCK_N], BIG, tl.int32)
    for j0 in range(0, N, CHUNK):
        j = j0 + tl.arange(0, CHUNK)
        pj = tl.load(par_row + j * stride_pn, mask=j < N, other=-1)
        pj = tl.where((pj >= 0) & (pj < j), pj, -1).to(tl.int32)
        # first_child[u]: the lowest j whose parent is u (pj = -1 never equals a node index).
        is_child = pj[None, :] == i[:, None]
        first = tl.minimum(first, tl.min(tl.where(is_child, j[None, :], BIG), axis=1))
        # next_sibling[i]: the lowest j > i that shares i's (real) parent.
        is_sib = (pj[None, :] == p[:, None]) & (p[:, None] >= 0) & (j[None, :] > i[:, None])
        nsib = tl.minimum(nsib, tl.min(tl.where(is_sib, j[None, :], BIG), axis=1))
    tl.store(first_child_ptr + b * stride_fb + i * stride_fn, tl.where(first == BIG, -1, first),
             mask=valid)
    tl.store(next_sibling_ptr + b * stride_sb + i * stride_sn, tl.where(nsib == BIG, -1, nsib),
             mask=valid)


# --------------------------------------------------------------------------------------------------
# tree_attention
# --------------------------------------------------------------------------------------------------


@triton.jit
def _tree_attention_step(
    acc, m_i, l_i, q,
    k_head_ptr, v_head_ptr, bt_row_ptr,
    pos, kvalid, allowed,
    num_blocks, block_size, max_blocks, qk_scale, D,
    stride_btm, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
    BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, SANITIZE_V: tl.constexpr,
):
    """One online-softmax step over the keys at logical positions ``pos`` ``[BLOCK_KV]``.

    ``allowed`` ``[BLOCK_M, BLOCK_KV]`` says which (query row, key) pairs count. Scores are kept in
    the log2 domain (``qk_scale`` = sm_scale * log2(e)) so the kernel uses exp2. A row that has
    seen no allowed key keeps ``m_i = -inf``; its running max is then replaced by 0 before the
    exponentials, which keeps ``-inf - -inf`` (NaN) out of the arithmetic.

    A disallowed key gets probability exactly 0, but ``0 * inf`` and ``0 * NaN`` are NaN inside
    ``p @ v``. Where not every row of the tile sees every key (the tree part, ``SANITIZE_V``), the
    non-finite entries of V are replaced by 0 before the dot and exactly the rows that do see such
    a key get a NaN accumulator: bytes a node does not see never reach its output. (A NaN in K
    needs nothing: its score is replaced by -inf.)
    """
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    # Paged addressing per key: a tile may straddle several cache blocks (block_size 16 with a
    # 64-key tile) or sit inside one; both are handled by gathering the block id of every key.
    lblk = tl.minimum(pos // block_size, max_blocks - 1)
    lblk = tl.maximum(lblk, 0)
    blk = tl.load(bt_row_ptr + lblk.to(tl.int64) * stride_btm, mask=kvalid, other=0)
    blk = tl.minimum(tl.maximum(blk.to(tl.int64), 0), num_blocks - 1)
    off = (tl.maximum(pos, 0) % block_size).to(tl.int64)

    kt = tl.load(k_head_ptr + blk[None, :] * stride_kb + off[None, :] * stride_ks
                 + d[:, None] * stride_kd, mask=dmask[:, None] & kvalid[None, :], other=0.0)
    if DOT_FP32:
        qk = tl.dot(q.to(tl.float32), kt.to(tl.float32))
    else:
        qk = tl.dot(q, kt)
    qk = tl.where(allowed, qk * qk_scale, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)

    v = tl.load(v_head_ptr + blk[:, None] * stride_vb + off[:, None] * stride_vs
                + d[None, :] * stride_vd, mask=kvalid[:, None] & dmask[None, :], other=0.0)
    if SANITIZE_V:
        bad = (v - v) != 0  # NaN or +-inf, in V's own dtype (cheap on registers)
        v = tl.where(bad, 0.0, v).to(v.dtype)
        # rows that see a poisoned key: acc becomes NaN and stays NaN (this is the last loop)
        v_bad = tl.max(bad.to(tl.int32), axis=1)
        row_bad = tl.max(tl.where(allowed, v_bad[None, :], 0), axis=1)
    if DOT_FP32:
        pv = tl.dot(p, v.to(tl.float32))
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    if SANITIZE_V:
        acc = tl.where(row_bad[:, None] != 0, float("nan"), acc)
    return acc, m_new, l_i


@triton.jit
def _tree_attention_kernel(
    q_ptr, k_ptr, v_ptr, block_table_ptr, seq_lens_ptr, tree_mask_ptr,
    out_ptr, o_part_ptr, lse_part_ptr,
    qk_scale,
    N, G, HKV, D, M, M_PAD,
    num_blocks, block_size, max_blocks, chunk_len, num_splits,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_btb, stride_btm,
    stride_sl,
    stride_tmb, stride_tmn, stride_tmw,
    stride_ob, stride_on, stride_oh, stride_od,
    BLOCK_M: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Tree attention for one (query-row tile, request ``b``, KV head ``h``, KV split ``s``).

    Grid ``(ceil(M / BLOCK_M), B * HKV, num_splits)`` with ``M = N * G`` query rows per
    (request, KV head): row ``r`` is tree node ``r // G`` under query head ``h * G + r % G``. So
    every K/V tile loaded here is used by all N tree nodes and all G query heads of the GQA group:
    the prefix KV of each (request, KV head) is read from HBM once. (When M exceeds one tile, the
    row tiles of one (b, h, s) are adjacent program ids, run together and share the KV through L2.)

    Keys: split ``s`` covers prefix positions ``[s * chunk_len, (s + 1) * chunk_len)`` clipped to
    the request's prefix length ``P = seq_lens[b] - N``; the last split also covers the N tree
    nodes at positions ``P + j``, where node i may see node j iff bit j of ``tree_mask[b, i]``.
    With ``SPLIT`` the program writes its normalised partial output and log2-sum-exp to
    ``o_part`` / ``lse_part`` for ``_tree_attention_merge_kernel``; without, it writes ``out``.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    b = pid_bh // HKV
    h = pid_bh % HKV

    # Lengths come from device memory (no host sync). They are compared in int64 (an int64
    # 2^32 + 10 is a length past the table, not 10) and clamped to [0, cap] before anything is
    # narrowed, so a bad seq_lens value can at worst produce garbage, never an out-of-bounds access.
    cap = max_blocks * block_size
    seq_len = tl.load(seq_lens_ptr + b * stride_sl).to(tl.int64)
    prefix = seq_len - N
    prefix_end = tl.minimum(tl.maximum(prefix, 0), cap).to(tl.int32)
    lo = pid_s * chunk_len
    hi = tl.minimum(lo + chunk_len, prefix_end)

    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = r < M
    node = r // G
    head = h * G + r % G
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q_ptr + b * stride_qb + node[:, None].to(tl.int64) * stride_qn
                + head[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=row_valid[:, None] & dmask[None, :], other=0.0)

    k_head_ptr = k_ptr + h * stride_kh
    v_head_ptr = v_ptr + h * stride_vh
    bt_row_ptr = block_table_ptr + b * stride_btb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Prefix: every tree node sees every cached position before the tree (so every valid row of
    # the tile sees every valid key: V needs no sanitising).
    for start in range(lo, hi, BLOCK_KV):
        pos = start + tl.arange(0, BLOCK_KV)
        kvalid = pos < hi
        acc, m_i, l_i = _tree_attention_step(
            acc, m_i, l_i, q, k_head_ptr, v_head_ptr, bt_row_ptr, pos, kvalid,
            kvalid[None, :] & row_valid[:, None],
            num_blocks, block_size, max_blocks, qk_scale, D,
            stride_btm, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
            BLOCK_D, DOT_FP32, False)

    # Tree part (last split only): node j sits at position prefix + j; the bitmask decides. Its
    # own (small) key tile BLOCK_T keeps the V sanitising off the register peak of the prefix loop.
    tree_hi = tl.where(pid_s == num_splits - 1, N, 0)
    tm_rows = tree_mask_ptr + b * stride_tmb + node[:, None].to(tl.int64) * stride_tmn
    for t0 in range(0, tree_hi, BLOCK_T):
        j = t0 + tl.arange(0, BLOCK_T)
        pos = tl.minimum(tl.maximum(prefix + j, -1), cap).to(tl.int32)
        kvalid = (j < N) & (pos >= 0) & (pos < cap)
        word = tl.load(tm_rows + (j // 32)[None, :] * stride_tmw,
                       mask=row_valid[:, None] & (j < N)[None, :], other=0)
        bit = (word >> (j % 32)[None, :]) & 1
        allowed = (bit != 0) & kvalid[None, :] & row_valid[:, None]
        acc, m_i, l_i = _tree_attention_step(
            acc, m_i, l_i, q, k_head_ptr, v_head_ptr, bt_row_ptr, pos, kvalid, allowed,
            num_blocks, block_size, max_blocks, qk_scale, D,
            stride_btm, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
            BLOCK_D, DOT_FP32, True)

    # A row with no visible key at all (only possible with a mask lacking its diagonal) gets 0.
    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if SPLIT:
        part = (pid_bh * num_splits + pid_s) * M_PAD + r
        tl.store(o_part_ptr + part[:, None] * BLOCK_D + d[None, :], o)
        lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(lse_part_ptr + part, lse)
    else:
        tl.store(out_ptr + b * stride_ob + node[:, None].to(tl.int64) * stride_on
                 + head[:, None] * stride_oh + d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dmask[None, :])


@triton.jit
def _tree_attention_merge_kernel(
    o_part_ptr, lse_part_ptr, out_ptr,
    G, HKV, D, M, M_PAD, num_splits,
    stride_ob, stride_on, stride_oh, stride_od,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Log-sum-exp merge of the split-KV partials; grid ``(ceil(M / BLOCK_M), B * HKV)``.

    ``out = sum_s 2^(lse_s - lse) * o_s`` with ``lse = log2 sum_s 2^lse_s``, done as a running
    (online) merge so the number of splits need not be a compile-time constant. Splits that saw
    no key (empty range of a short request) carry ``lse = -inf`` and weigh 0.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HKV
    h = pid_bh % HKV
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = r < M
    d = tl.arange(0, BLOCK_D)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        part = (pid_bh * num_splits + s) * M_PAD + r
        lse = tl.load(lse_part_ptr + part, mask=row_valid, other=float("-inf"))
        o = tl.load(o_part_ptr + part[:, None] * BLOCK_D + d[None, :], mask=row_valid[:, None],
                    other=0.0)
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_safe)
        wgt = tl.math.exp2(lse - m_safe)
        acc = acc * alpha[:, None] + wgt[:, None] * o
        l_sum = l_sum * alpha + wgt
        m = m_new

    o = acc / tl.where(l_sum > 0.0, l_sum, 1.0)[:, None]
    node = r // G
    head = h * G + r % G
    tl.store(out_ptr + b * stride_ob + node[:, None].to(tl.int64) * stride_on
             + head[:, None] * stride_oh + d[None, :] * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & (d < D)[None, :])
