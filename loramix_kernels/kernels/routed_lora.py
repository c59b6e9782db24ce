"""Triton kernels for routed multi-LoRA (LoRA-Mixer): y[t, s] = scaling * sum_j g[t,j] B_s[e] A_s[e] x[t].

Up to three slices (packed q/k/v, unequal widths) are handled by one launch; slot ``j`` has its
own pointer / size / stride arguments (``a{j}_ptr``, ``n{j}``, ``col{j}``, ``stride_a{j}e`` ...,
all passed by keyword from ``ops.routed_lora.slice_kwargs``) and its rank ``R{j}`` / padded row
count ``ER{j}`` (or ``RP{j}``) as constexprs (a slot beyond ``NUM_SLICES`` is never touched). All
accumulation is fp32. ``H_FP32`` (fp16 inputs): the gated rank-sized intermediate stays fp32 into
the expand (fp32 operands, tf32 tensor cores) instead of being rounded to fp16, which overflows
beyond 65504. Isolation: a token's output depends only on the experts it routes to (see
``_expand_dense`` for the dense tile).

Kernels
-------
``_routed_lora_token_major_kernel``  (strategy "token_major", small E*r)
    Grid: ``cdiv(T, BLOCK_T) * NUM_SLICES * NSPLIT * KSPLIT`` programs; program (token tile, slice,
    column share, d_in chunk). It builds the tile's gate matrix
    ``G[t, e*r+i] = sum_j g[t,j] [ids[t,j] == e]``, computes the shrink for all experts at once
    ``H = x_tile @ A_cat^T`` (A rows of experts that no token of the tile uses are masked off, so
    they are never read: at decode only the active experts' weights move), then
    ``y_tile = (H * G * scaling) @ B_cat^T`` over the column tiles of its share: every routed
    contribution is summed before one write of y (or one read-modify-write for ``out +=``).
    Slices run in parallel programs (adjacent ids, so a token tile's x comes from HBM once and from
    L2 for the other slices), which keeps the register tile at BLOCK_T x E*r of ONE slice and lets
    BLOCK_T grow to 128 at prefill: the weights are re-read from L2 once per token tile, so a tall
    tile is what keeps that traffic below the HBM traffic.
    Decode split-K: y is linear in the shrink, y = sum_c (G * (x_c A_c^T)) B^T over d_in chunks c,
    so when a few token tiles cannot fill the GPU each program takes one d_in chunk (KSPLIT) and
    one column share (NSPLIT) and adds its partial y with fp32 atomics: every program reads only
    1/KSPLIT of A and 1/NSPLIT of B instead of all of A.
``_routed_lora_sorted_kernel``  (strategy "expert_sorted", large E*r; ScatterMoE style)
    The T*k (token, slot) pairs are sorted by expert; each program takes BLOCK_M pairs of ONE
    expert (block metadata from the launcher), gathers their x rows on load, computes
    ``h = x_rows @ A_s[e]^T`` and ``h*g @ B_s[e]^T`` for its column split, and scatters rows to y on
    store: directly when k == 1 (each token appears once), else by fp32 atomic add into a workspace.
    The same d_in split (KSPLIT) as above applies at decode.
``_sorted_shrink_kernel`` / ``_sorted_expand_kernel``
    The same computation split into two launches (one slice, slot 0) with an fp32 [pairs, r]
    intermediate in global memory: the vLLM shrink/expand design, a benchmark baseline launched by
    ``loramix_kernels/bench/bench_routed_lora.py`` (``routed_lora_two_launch``).
``_routed_lora_bwd_shrink_kernel`` / ``_routed_lora_bwd_expand_kernel``  (backward, expert_sorted)
    Same sorted blocks. The first recomputes h = A_s[e] x and u = B_s[e]^T dy per sorted row into
    an fp32 [pairs, sum r] workspace (split-K with atomics at decode); the second gives d_gates
    (one writer per pair), dx and dA over d_in tiles and dB over d_out tiles, dealt round robin to
    NSPLIT programs per block, with fp32 atomics (see the section at the end of this file). Each
    gradient's code is compiled out when it is not needed (NEED_DX / NEED_DA / NEED_DB / NEED_DG).
"""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    # DOT_FP32: the interpreter mis-computes bf16 dots; IEEE: fp32 inputs get full fp32 products
    # (not tf32), so fp32 results match the reference to ~1e-5.
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _slot_ids(ids_ptr, offs_t, tmask, E, j, stride_it, stride_ik):
    """Expert ids of slot j for a token tile; out-of-range ids (never validated on CUDA) become -1
    and so match no expert: they cannot address memory. The range test runs in the ids' own width
    (an int64 id of 2**32 + 3 must not wrap to expert 3)."""
    ids_j = tl.load(ids_ptr + offs_t * stride_it + j * stride_ik, mask=tmask, other=-1)
    return tl.where((ids_j >= 0) & (ids_j < E), ids_j, -1).to(tl.int32)


@triton.jit
def _active_rows(ids_ptr, offs_t, tmask, E, K, stride_it, stride_ik, R: tl.constexpr, ER: tl.constexpr):
    """[ER] flags: row e*R + i belongs to an expert that some token of the tile routes to."""
    e_row = tl.arange(0, ER) // R
    act = tl.zeros((ER,), dtype=tl.int32)
    for j in range(0, K):
        ids_j = _slot_ids(ids_ptr, offs_t, tmask, E, j, stride_it, stride_ik)
        act = tl.maximum(act, tl.max((ids_j[:, None] == e_row[None, :]).to(tl.int32), axis=0))
    return act


@triton.jit
def _shrink_dense(h, xk, a_ptr, kk, kmask, act, E, stride_ae, stride_ar, stride_ak,
                  R: tl.constexpr, ER: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """h[BLOCK_T, ER] += xk[BLOCK_T, BK] @ A_cat[ER, BK]^T; rows of inactive experts are not loaded."""
    er = tl.arange(0, ER)
    e = er // R
    i = er % R
    rmask = (e < E) & (act > 0)
    a = tl.load(a_ptr + e[None, :].to(tl.int64) * stride_ae + i[None, :] * stride_ar + kk[:, None].to(tl.int64) * stride_ak,
                mask=rmask[None, :] & kmask[:, None], other=0.0)
    return _dot(xk, a, h, DOT_FP32, IEEE)


@triton.jit
def _write_tile(yp, acc, ymask, ATOMIC: tl.constexpr, ACCUMULATE: tl.constexpr):
    """Partial sums (split-K, or several slots of one token) add atomically into an fp32 target;
    a complete tile is stored once, or added to what ``out`` holds (``out +=``)."""
    if ATOMIC:
        tl.atomic_add(yp, acc, mask=ymask)
    else:
        if ACCUMULATE:
            acc += tl.load(yp, mask=ymask, other=0.0).to(tl.float32)
        tl.store(yp, acc.to(yp.dtype.element_ty), mask=ymask)


@triton.jit
def _expand_dense(hg, act, b_ptr, y_ptr, ids_ptr, offs_t, tmask, E, K, N, col, pid_n,
                  stride_it, stride_ik, stride_be, stride_bn, stride_br, stride_yt, stride_yn,
                  R: tl.constexpr, ER: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr,
                  ATOMIC: tl.constexpr, ACCUMULATE: tl.constexpr, H_FP32: tl.constexpr,
                  DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """y[tile, col + n] (+)= hg @ B_cat[n, :]^T over this split's share (round robin) of the
    slice's column tiles.

    Isolation: hg is exactly 0 where a token does not route to an expert, but 0 * inf is NaN, so a
    non-finite B entry of an expert that only SOME tokens of the tile use would leak into the
    others through the dense dot. When a tile's result is not finite everywhere (rare: garbage
    weights, or a legitimately non-finite routed contribution), it is recomputed expert by expert,
    each expert's product added only to the outputs of the tokens routed to it (in y's dtype, one
    rounding per routed expert): a token's output then depends only on its own experts, as in
    the per-expert form. The check reads the small result tile; the weight tile goes to the dot
    untouched.
    """
    er = tl.arange(0, ER)
    e = er // R
    i = er % R
    rmask = (e < E) & (act > 0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    for t in range(pid_n, n_tiles, NSPLIT):
        nn = t * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = nn < N
        b_ptrs = b_ptr + e[:, None].to(tl.int64) * stride_be + nn[None, :].to(tl.int64) * stride_bn \
            + i[:, None] * stride_br
        b = tl.load(b_ptrs, mask=rmask[:, None] & nmask[None, :], other=0.0)
        if H_FP32:
            b = b.to(tl.float32)
        acc = _dot(hg, b, tl.zeros((hg.shape[0], BLOCK_N), dtype=tl.float32), DOT_FP32, IEEE)
        yp = y_ptr + offs_t[:, None].to(tl.int64) * stride_yt + (col + nn)[None, :].to(tl.int64) * stride_yn
        ymask = tmask[:, None] & nmask[None, :]
        # x - x is 0 for finite x and NaN for inf / NaN.
        if tl.max(tl.max(((acc - acc) != 0).to(tl.int32), axis=1), axis=0) == 0:
            _write_tile(yp, acc, ymask, ATOMIC, ACCUMULATE)
        else:
            # Expert by expert, each product written (added) for its own tokens only; acc is dead
            # here, so this path needs no more registers than the dot above.
            if not ATOMIC:
                if not ACCUMULATE:
                    tl.store(yp, tl.zeros((hg.shape[0], BLOCK_N), dtype=yp.dtype.element_ty), mask=ymask)
            for ex in range(0, E):
                routed = tl.zeros((hg.shape[0],), dtype=tl.int32)
                for j in range(0, K):
                    ids_j = _slot_ids(ids_ptr, offs_t, tmask, E, j, stride_it, stride_ik)
                    routed = tl.maximum(routed, (ids_j == ex).to(tl.int32))
                if tl.max(routed, axis=0) > 0:
                    # Only expert ex's R rows (the others are zero).
                    b_e = tl.load(b_ptrs, mask=((e == ex) & rmask)[:, None] & nmask[None, :], other=0.0)
                    if H_FP32:
                        b_e = b_e.to(tl.float32)
                    part = _dot(hg, b_e, tl.zeros((hg.shape[0], BLOCK_N), dtype=tl.float32),
                                DOT_FP32, IEEE)
                    _write_tile(yp, part, ymask & (routed[:, None] > 0), ATOMIC, True)


@triton.jit
def _token_major_slice(
    x_ptr, ids_ptr, gates_ptr, y_ptr, a_ptr, b_ptr,
    offs_t, tmask, k_lo, k_hi, pid_n, E, K, N, col,
    stride_xt, stride_xk, stride_it, stride_ik, stride_gt, stride_gk, stride_yt, stride_yn,
    stride_ae, stride_ar, stride_ak, stride_be, stride_bn, stride_br, scaling,
    R: tl.constexpr, ER: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    NSPLIT: tl.constexpr, ATOMIC: tl.constexpr, ACCUMULATE: tl.constexpr, H_FP32: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    """One slice of one token tile: active experts, shrink over [k_lo, k_hi), gates, expand."""
    # Active-expert rows of this token tile, then the shrink; the [BLOCK_T, ER] gate matrix is
    # built only afterwards so that it is not live (in registers) across the shrink loop.
    act = _active_rows(ids_ptr, offs_t, tmask, E, K, stride_it, stride_ik, R, ER)
    h = tl.zeros((offs_t.shape[0], ER), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < k_hi
        xk = tl.load(x_ptr + offs_t[:, None] * stride_xt + kk[None, :].to(tl.int64) * stride_xk,
                     mask=tmask[:, None] & kmask[None, :], other=0.0)
        h = _shrink_dense(h, xk, a_ptr, kk, kmask, act, E, stride_ae, stride_ar, stride_ak, R, ER,
                          DOT_FP32, IEEE)

    # Gate and scale in fp32 (slot by slot, straight into h). tl.where, not a multiplication by a
    # 0 / 1 mask: h of an expert a token does not use may be inf / NaN (garbage weights) and must
    # not reach that token. The expand then reads hg in the weights' dtype (tensor cores), or in
    # fp32 where that dtype could overflow (H_FP32: fp16); the accumulator is fp32.
    hg = tl.zeros((offs_t.shape[0], ER), dtype=tl.float32)
    e_row = tl.arange(0, ER) // R
    for j in range(0, K):
        ids_j = _slot_ids(ids_ptr, offs_t, tmask, E, j, stride_it, stride_ik)
        g_j = tl.load(gates_ptr + offs_t * stride_gt + j * stride_gk, mask=tmask, other=0.0).to(tl.float32)
        hg += tl.where(ids_j[:, None] == e_row[None, :], h * g_j[:, None], 0.0)
    hg = hg * scaling
    if not H_FP32:
        hg = hg.to(b_ptr.dtype.element_ty)
    _expand_dense(hg, act, b_ptr, y_ptr, ids_ptr, offs_t, tmask, E, K, N, col, pid_n,
                  stride_it, stride_ik, stride_be, stride_bn, stride_br, stride_yt, stride_yn,
                  R, ER, BLOCK_N, NSPLIT, ATOMIC, ACCUMULATE, H_FP32, DOT_FP32, IEEE)


@triton.jit
def _routed_lora_token_major_kernel(
    x_ptr, ids_ptr, gates_ptr, y_ptr,
    a0_ptr, b0_ptr, a1_ptr, b1_ptr, a2_ptr, b2_ptr,
    T, D_IN, K_CHUNK, E, K,
    n0, n1, n2, col0, col1, col2,
    stride_xt, stride_xk, stride_it, stride_ik, stride_gt, stride_gk, stride_yt, stride_yn,
    stride_a0e, stride_a0r, stride_a0k, stride_b0e, stride_b0n, stride_b0r,
    stride_a1e, stride_a1r, stride_a1k, stride_b1e, stride_b1n, stride_b1r,
    stride_a2e, stride_a2r, stride_a2k, stride_b2e, stride_b2n, stride_b2r,
    scaling,
    NUM_SLICES: tl.constexpr,
    R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr,
    ER0: tl.constexpr, ER1: tl.constexpr, ER2: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr,
    KSPLIT: tl.constexpr, ATOMIC: tl.constexpr, ACCUMULATE: tl.constexpr, H_FP32: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    # Program order (token tile, slice, column share, d_in chunk), the last fastest: the programs
    # of one token tile are adjacent, run together, and read its x tile from HBM once (L2 serves
    # the other slices' reads).
    per_slice = NSPLIT * KSPLIT
    pid_t = pid // (NUM_SLICES * per_slice)
    pid_s = (pid // per_slice) % NUM_SLICES
    pid_n = (pid // KSPLIT) % NSPLIT
    pid_k = pid % KSPLIT
    offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = offs_t < T
    # K_CHUNK is a multiple of BLOCK_K, so d_in chunks never overlap.
    k_lo = pid_k * K_CHUNK
    k_hi = tl.minimum(D_IN, k_lo + K_CHUNK)
    if pid_s == 0:
        _token_major_slice(
            x_ptr, ids_ptr, gates_ptr, y_ptr, a0_ptr, b0_ptr, offs_t, tmask, k_lo, k_hi, pid_n, E, K,
            n0, col0, stride_xt, stride_xk, stride_it, stride_ik, stride_gt, stride_gk, stride_yt,
            stride_yn, stride_a0e, stride_a0r, stride_a0k, stride_b0e, stride_b0n, stride_b0r, scaling,
            R0, ER0, BLOCK_K, BLOCK_N, NSPLIT, ATOMIC, ACCUMULATE, H_FP32, DOT_FP32, IEEE)
    if NUM_SLICES > 1:
        if pid_s == 1:
            _token_major_slice(
                x_ptr, ids_ptr, gates_ptr, y_ptr, a1_ptr, b1_ptr, offs_t, tmask, k_lo, k_hi, pid_n, E,
                K, n1, col1, stride_xt, stride_xk, stride_it, stride_ik, stride_gt, stride_gk,
                stride_yt, stride_yn, stride_a1e, stride_a1r, stride_a1k, stride_b1e, stride_b1n,
                stride_b1r, scaling, R1, ER1, BLOCK_K, BLOCK_N, NSPLIT, ATOMIC, ACCUMULATE, H_FP32,
                DOT_FP32, IEEE)
    if NUM_SLICES > 2:
        if pid_s == 2:
            _token_major_slice(
                x_ptr, ids_ptr, gates_ptr, y_ptr, a2_ptr, b2_ptr, offs_t, tmask, k_lo, k_hi, pid_n, E,
                K, n2, col2, stride_xt, stride_xk, stride_it, stride_ik, stride_gt, stride_gk,
                stride_yt, stride_yn, stride_a2e, stride_a2r, stride_a2k, stride_b2e, stride_b2n,
                stride_b2r, scaling, R2, ER2, BLOCK_K, BLOCK_N, NSPLIT, ATOMIC, ACCUMULATE, H_FP32,
                DOT_FP32, IEEE)


# --------------------------------------------------------------------------------------------
# Expert-sorted grouped GEMM (gather x rows on load, scatter y rows on store)
# --------------------------------------------------------------------------------------------


@triton.jit
def _shrink_rows(x_ptr, tok, rmask, a_ptr, e, k_lo, k_hi, D_IN, stride_xt, stride_xk, stride_ae, stride_ar, stride_ak,
                 R, RP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """h[BLOCK_M, RP] = x[tok, k_lo:k_hi] @ A[e, :, k_lo:k_hi]^T (x rows gathered by token id)."""
    i = tl.arange(0, RP)
    imask = i < R
    h = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    a_base = a_ptr + e.to(tl.int64) * stride_ae
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < D_IN
        xk = tl.load(x_ptr + tok[:, None] * stride_xt + kk[None, :].to(tl.int64) * stride_xk,
                     mask=rmask[:, None] & kmask[None, :], other=0.0)
        a = tl.load(a_base + i[None, :] * stride_ar + kk[:, None].to(tl.int64) * stride_ak,
                    mask=imask[None, :] & kmask[:, None], other=0.0)
        h = _dot(xk, a, h, DOT_FP32, IEEE)
    return h


@triton.jit
def _expand_rows(hg, b_ptr, e, y_ptr, tok, rmask, N, col, tile_base, pid_n,
                 stride_be, stride_bn, stride_br, stride_yt, stride_yn,
                 R, RP: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr,
                 ATOMIC: tl.constexpr, ACCUMULATE: tl.constexpr, H_FP32: tl.constexpr,
                 DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """Scatter hg @ B[e]^T to rows ``tok`` of y over this split's column tiles (every row of the
    block routes to expert e, so no other expert's weights are read). hg is fp32 when H_FP32."""
    i = tl.arange(0, RP)
    imask = i < R
    b_base = b_ptr + e.to(tl.int64) * stride_be
    n_tiles = tl.cdiv(N, BLOCK_N)
    first = (pid_n - tile_base % NSPLIT + NSPLIT) % NSPLIT
    for t in range(first, n_tiles, NSPLIT):
        nn = t * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = nn < N
        b = tl.load(b_base + nn[None, :].to(tl.int64) * stride_bn + i[:, None] * stride_br,
                    mask=imask[:, None] & nmask[None, :], other=0.0)
        if H_FP32:
            b = b.to(tl.float32)
        acc = _dot(hg, b, tl.zeros((hg.shape[0], BLOCK_N), dtype=tl.float32), DOT_FP32, IEEE)
        yp = y_ptr + tok[:, None] * stride_yt + (col + nn)[None, :].to(tl.int64) * stride_yn
        ymask = rmask[:, None] & nmask[None, :]
        _write_tile(yp, acc, ymask, ATOMIC, ACCUMULATE)
    return n_tiles


@triton.jit
def _gated_rows(h, g, b_ptr, H_FP32: tl.constexpr):
    """h * g per row, fed to the expand in B's dtype (tensor cores), or kept fp32 (H_FP32)."""
    hg = h * g[:, None]
    if not H_FP32:
        hg = hg.to(b_ptr.dtype.element_ty)
    return hg


@triton.jit
def _sorted_block(pid_b, blk_expert_ptr, blk_start_ptr, blk_end_ptr, order_ptr, gates_ptr,
                  K, E, stride_gt, stride_gk, BLOCK_M: tl.constexpr):
    """Rows of one block of expert-sorted (token, slot) pairs: (expert, token ids, gates, row mask)."""
    e = tl.load(blk_expert_ptr + pid_b)
    start = tl.load(blk_start_ptr + pid_b)
    end = tl.load(blk_end_ptr + pid_b)
    end = tl.where(e < E, end, start)  # idle block: no rows
    rows = start + tl.arange(0, BLOCK_M)
    rmask = rows < end
    pair = tl.load(order_ptr + rows, mask=rmask, other=0).to(tl.int64)
    tok = pair // K
    g = tl.load(gates_ptr + tok * stride_gt + (pair % K) * stride_gk, mask=rmask, other=0.0).to(tl.float32)
    e = tl.minimum(tl.maximum(e, 0), E - 1)  # blocks past the last expert are fully masked
    return e, tok, g, rows, rmask


@triton.jit
def _routed_lora_sorted_kernel(
    x_ptr, gates_ptr, y_ptr,
    order_ptr, blk_expert_ptr, blk_start_ptr, blk_end_ptr,
    a0_ptr, b0_ptr, a1_ptr, b1_ptr, a2_ptr, b2_ptr,
    D_IN, K_CHUNK, E, K,
    r0, r1, r2, n0, n1, n2, col0, col1, col2,
    stride_xt, stride_xk, stride_gt, stride_gk, stride_yt, stride_yn,
    stride_a0e, stride_a0r, stride_a0k, stride_b0e, stride_b0n, stride_b0r,
    stride_a1e, stride_a1r, stride_a1k, stride_b1e, stride_b1n, stride_b1r,
    stride_a2e, stride_a2r, stride_a2k, stride_b2e, stride_b2n, stride_b2r,
    scaling,
    NUM_SLICES: tl.constexpr, RP0: tl.constexpr, RP1: tl.constexpr, RP2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr,
    KSPLIT: tl.constexpr, ATOMIC: tl.constexpr, ACCUMULATE: tl.constexpr, H_FP32: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_b = pid // (NSPLIT * KSPLIT)
    pid_n = (pid // KSPLIT) % NSPLIT
    pid_k = pid % KSPLIT
    k_lo = pid_k * K_CHUNK
    k_hi = tl.minimum(D_IN, k_lo + K_CHUNK)
    # The grid is a fixed upper bound (cdiv(T*k, BLOCK_M) + E blocks) so the launch needs no
    # host sync; blocks beyond the real count have no rows and leave at once.
    if tl.load(blk_expert_ptr + pid_b) >= E:
        return
    e, tok, g, rows, rmask = _sorted_block(pid_b, blk_expert_ptr, blk_start_ptr, blk_end_ptr,
                                           order_ptr, gates_ptr, K, E, stride_gt, stride_gk, BLOCK_M)
    g = g * scaling
    h = _shrink_rows(x_ptr, tok, rmask, a0_ptr, e, k_lo, k_hi, D_IN, stride_xt, stride_xk,
                     stride_a0e, stride_a0r, stride_a0k, r0, RP0, BLOCK_M, BLOCK_K, DOT_FP32, IEEE)
    tiles = _expand_rows(_gated_rows(h, g, b0_ptr, H_FP32), b0_ptr, e, y_ptr, tok, rmask, n0, col0, 0,
                         pid_n, stride_b0e, stride_b0n, stride_b0r, stride_yt, stride_yn, r0, RP0,
                         BLOCK_N, NSPLIT, ATOMIC, ACCUMULATE, H_FP32, DOT_FP32, IEEE)
    if NUM_SLICES > 1:
        h = _shrink_rows(x_ptr, tok, rmask, a1_ptr, e, k_lo, k_hi, D_IN, stride_xt, stride_xk,
                         stride_a1e, stride_a1r, stride_a1k, r1, RP1, BLOCK_M, BLOCK_K, DOT_FP32, IEEE)
        tiles += _expand_rows(_gated_rows(h, g, b1_ptr, H_FP32), b1_ptr, e, y_ptr, tok, rmask, n1, col1,
                              tiles, pid_n, stride_b1e, stride_b1n, stride_b1r, stride_yt, stride_yn,
                              r1, RP1, BLOCK_N, NSPLIT, ATOMIC, ACCUMULATE, H_FP32, DOT_FP32, IEEE)
    if NUM_SLICES > 2:
        h = _shrink_rows(x_ptr, tok, rmask, a2_ptr, e, k_lo, k_hi, D_IN, stride_xt, stride_xk,
                         stride_a2e, stride_a2r, stride_a2k, r2, RP2, BLOCK_M, BLOCK_K, DOT_FP32, IEEE)
        _expand_rows(_gated_rows(h, g, b2_ptr, H_FP32), b2_ptr, e, y_ptr, tok, rmask, n2, col2, tiles,
                     pid_n, stride_b2e, stride_b2n, stride_b2r, stride_yt, stride_yn, r2, RP2,
                     BLOCK_N, NSPLIT, ATOMIC, ACCUMULATE, H_FP32, DOT_FP32, IEEE)


@triton.jit
def _sorted_shrink_kernel(
    x_ptr, gates_ptr, h_ptr,
    order_ptr, blk_expert_ptr, blk_start_ptr, blk_end_ptr,
    a0_ptr, D_IN, E, K, r0,
    stride_xt, stride_xk, stride_gt, stride_gk, stride_a0e, stride_a0r, stride_a0k, stride_hp,
    scaling,
    RP0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    """Baseline (vLLM-style) launch 1 (one slice, slot 0): h[sorted row] = g * scaling *
    x[tok] @ A[e]^T into an fp32 [pairs, r] buffer."""
    pid_b = tl.program_id(0)
    if tl.load(blk_expert_ptr + pid_b) >= E:
        return
    e, tok, g, rows, rmask = _sorted_block(pid_b, blk_expert_ptr, blk_start_ptr, blk_end_ptr,
                                           order_ptr, gates_ptr, K, E, stride_gt, stride_gk, BLOCK_M)
    h = _shrink_rows(x_ptr, tok, rmask, a0_ptr, e, 0, D_IN, D_IN, stride_xt, stride_xk,
                     stride_a0e, stride_a0r, stride_a0k, r0, RP0, BLOCK_M, BLOCK_K, DOT_FP32, IEEE)
    i = tl.arange(0, RP0)
    tl.store(h_ptr + rows[:, None].to(tl.int64) * stride_hp + i[None, :], h * (g * scaling)[:, None],
             mask=rmask[:, None] & (i < r0)[None, :])


@triton.jit
def _sorted_expand_kernel(
    h_ptr, y_ptr, gates_ptr,
    order_ptr, blk_expert_ptr, blk_start_ptr, blk_end_ptr,
    b0_ptr, n0, col0, E, K, r0,
    stride_gt, stride_gk, stride_b0e, stride_b0n, stride_b0r, stride_yt, stride_yn, stride_hp,
    RP0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr,
    H_FP32: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    """Baseline (vLLM-style) launch 2 (one slice, slot 0): y[tok] += h[sorted row] @ B[e]^T (fp32
    atomics)."""
    pid = tl.program_id(0)
    pid_b = pid // NSPLIT
    pid_n = pid % NSPLIT
    if tl.load(blk_expert_ptr + pid_b) >= E:
        return
    e, tok, g, rows, rmask = _sorted_block(pid_b, blk_expert_ptr, blk_start_ptr, blk_end_ptr,
                                           order_ptr, gates_ptr, K, E, stride_gt, stride_gk, BLOCK_M)
    i = tl.arange(0, RP0)
    h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_hp + i[None, :],
                mask=rmask[:, None] & (i < r0)[None, :], other=0.0)
    if not H_FP32:
        h = h.to(b0_ptr.dtype.element_ty)
    _expand_rows(h, b0_ptr, e, y_ptr, tok, rmask, n0, col0, 0, pid_n, stride_b0e, stride_b0n,
                 stride_b0r, stride_yt, stride_yn, r0, RP0, BLOCK_N, NSPLIT, True, False, H_FP32,
                 DOT_FP32, IEEE)


# --------------------------------------------------------------------------------------------
# Backward of the expert-sorted regime (no host sync, fixed grids over the same sorted blocks)
# --------------------------------------------------------------------------------------------
#
# With h_s = A_s[e] x_t, u_s = B_s[e]^T dy_t,s and w = scaling * g for a pair (t, j) of expert e:
#   d_gates[t, j] = scaling * sum_s <u_s, h_s>,   dx[t] += w A_s[e]^T u_s,
#   dA_s[e] += w u_s x_t^T,                        dB_s[e] += w dy_t,s h_s^T.
# Two launches per group of <= 3 slices:
# ``_routed_lora_bwd_shrink_kernel`` computes h and u of every sorted row (both are full
#   reductions, over d_in and over d_out) into an fp32 [pairs, sum r] workspace; at decode its
#   (tile) loops are split KSPLIT ways with fp32 atomics, like the forward's split-K.
# ``_routed_lora_bwd_expand_kernel`` reads them back and produces d_gates (share 0 of each block:
#   one writer per pair), dx and dA over d_in tiles and dB over d_out tiles; a block's tiles are
#   dealt round robin to NSPLIT programs. dA / dB are shared by every block of an expert and dx by
#   the k slots of a token, so all three are added with fp32 atomics into zeroed workspaces.


@triton.jit
def _a_tile(a_base, kk, kmask, stride_ar, stride_ak, R, RP: tl.constexpr):
    """A[e, :, kk] as a [RP, BLOCK_K] tile (rows >= R are zero)."""
    i = tl.arange(0, RP)
    return tl.load(a_base + i[:, None] * stride_ar + kk[None, :].to(tl.int64) * stride_ak,
                   mask=(i < R)[:, None] & kmask[None, :], other=0.0)


@triton.jit
def _store_rows(p_ptr, rows, rmask, ro, stride_hw, v, R, RP: tl.constexpr, ATOMIC: tl.constexpr):
    """Rows ``rows`` of an fp32 workspace, columns [ro, ro + R)."""
    i = tl.arange(0, RP)
    p = p_ptr + rows[:, None].to(tl.int64) * stride_hw + (ro + i)[None, :]
    m = rmask[:, None] & (i < R)[None, :]
    if ATOMIC:
        tl.atomic_add(p, v, mask=m)
    else:
        tl.store(p, v, mask=m)


@triton.jit
def _load_rows(p_ptr, rows, rmask, ro, stride_hw, R, RP: tl.constexpr):
    i = tl.arange(0, RP)
    return tl.load(p_ptr + rows[:, None].to(tl.int64) * stride_hw + (ro + i)[None, :],
                   mask=rmask[:, None] & (i < R)[None, :], other=0.0)


@triton.jit
def _shrink_dy_rows(dy_ptr, tok, rmask, b_ptr, e, N, col, tile_base, pid_k, stride_dyt, stride_dyn,
                    stride_be, stride_bn, stride_br, R, RP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    KSPLIT: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """u[BLOCK_M, RP] = dy[tok, col + n] @ B[e, n, :] over this split's share of the column tiles."""
    i = tl.arange(0, RP)
    imask = i < R
    b_base = b_ptr + e.to(tl.int64) * stride_be
    u = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    n_tiles = tl.cdiv(N, BLOCK_N)
    first = (pid_k - tile_base % KSPLIT + KSPLIT) % KSPLIT
    for t in range(first, n_tiles, KSPLIT):
        nn = t * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = nn < N
        b = tl.load(b_base + nn[:, None].to(tl.int64) * stride_bn + i[None, :] * stride_br,
                    mask=nmask[:, None] & imask[None, :], other=0.0)
        dyt = tl.load(dy_ptr + tok[:, None] * stride_dyt + (col + nn)[None, :].to(tl.int64) * stride_dyn,
                      mask=rmask[:, None] & nmask[None, :], other=0.0)
        u = _dot(dyt.to(b.dtype), b, u, DOT_FP32, IEEE)
    return u, n_tiles


@triton.jit
def _routed_lora_bwd_shrink_kernel(
    x_ptr, dy_ptr, gates_ptr, h_ptr, u_ptr,
    order_ptr, blk_expert_ptr, blk_start_ptr, blk_end_ptr,
    a0_ptr, b0_ptr, a1_ptr, b1_ptr, a2_ptr, b2_ptr,
    D_IN, E, K,
    r0, r1, r2, n0, n1, n2, col0, col1, col2, ro0, ro1, ro2,
    stride_xt, stride_xk, stride_dyt, stride_dyn, stride_gt, stride_gk, stride_hw,
    stride_a0e, stride_a0r, stride_a0k, stride_b0e, stride_b0n, stride_b0r,
    stride_a1e, stride_a1r, stride_a1k, stride_b1e, stride_b1n, stride_b1r,
    stride_a2e, stride_a2r, stride_a2k, stride_b2e, stride_b2n, stride_b2r,
    NUM_SLICES: tl.constexpr, RP0: tl.constexpr, RP1: tl.constexpr, RP2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, KSPLIT: tl.constexpr,
    ATOMIC: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    """h[row] = A_s[e] x[tok] and u[row] = B_s[e]^T dy[tok, slice s] for the sorted rows of a block."""
    pid = tl.program_id(0)
    pid_b = pid // KSPLIT
    pid_k = pid % KSPLIT
    if tl.load(blk_expert_ptr + pid_b) >= E:
        return
    e, tok, g, rows, rmask = _sorted_block(pid_b, blk_expert_ptr, blk_start_ptr, blk_end_ptr,
                                           order_ptr, gates_ptr, K, E, stride_gt, stride_gk, BLOCK_M)
    e64 = e.to(tl.int64)
    # One pass over d_in for every slice: each x tile is loaded once.
    h0 = tl.zeros((BLOCK_M, RP0), dtype=tl.float32)
    h1 = tl.zeros((BLOCK_M, RP1), dtype=tl.float32)
    h2 = tl.zeros((BLOCK_M, RP2), dtype=tl.float32)
    for t in range(pid_k, tl.cdiv(D_IN, BLOCK_K), KSPLIT):
        kk = t * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = kk < D_IN
        xk = tl.load(x_ptr + tok[:, None] * stride_xt + kk[None, :].to(tl.int64) * stride_xk,
                     mask=rmask[:, None] & kmask[None, :], other=0.0)
        h0 = _dot(xk, tl.trans(_a_tile(a0_ptr + e64 * stride_a0e, kk, kmask, stride_a0r, stride_a0k, r0, RP0)), h0,
                  DOT_FP32, IEEE)
        if NUM_SLICES > 1:
            h1 = _dot(xk, tl.trans(_a_tile(a1_ptr + e64 * stride_a1e, kk, kmask, stride_a1r, stride_a1k, r1, RP1)), h1,
                      DOT_FP32, IEEE)
        if NUM_SLICES > 2:
            h2 = _dot(xk, tl.trans(_a_tile(a2_ptr + e64 * stride_a2e, kk, kmask, stride_a2r, stride_a2k, r2, RP2)), h2,
                      DOT_FP32, IEEE)
    _store_rows(h_ptr, rows, rmask, ro0, stride_hw, h0, r0, RP0, ATOMIC)
    u, tiles = _shrink_dy_rows(dy_ptr, tok, rmask, b0_ptr, e, n0, col0, 0, pid_k, stride_dyt, stride_dyn,
                               stride_b0e, stride_b0n, stride_b0r, r0, RP0, BLOCK_M, BLOCK_N, KSPLIT, DOT_FP32, IEEE)
    _store_rows(u_ptr, rows, rmask, ro0, stride_hw, u, r0, RP0, ATOMIC)
    if NUM_SLICES > 1:
        _store_rows(h_ptr, rows, rmask, ro1, stride_hw, h1, r1, RP1, ATOMIC)
        u, nt = _shrink_dy_rows(dy_ptr, tok, rmask, b1_ptr, e, n1, col1, tiles, pid_k, stride_dyt, stride_dyn,
                                stride_b1e, stride_b1n, stride_b1r, r1, RP1, BLOCK_M, BLOCK_N, KSPLIT, DOT_FP32, IEEE)
        tiles += nt
        _store_rows(u_ptr, rows, rmask, ro1, stride_hw, u, r1, RP1, ATOMIC)
    if NUM_SLICES > 2:
        _store_rows(h_ptr, rows, rmask, ro2, stride_hw, h2, r2, RP2, ATOMIC)
        u, nt = _shrink_dy_rows(dy_ptr, tok, rmask, b2_ptr, e, n2, col2, tiles, pid_k, stride_dyt, stride_dyn,
                                stride_b2e, stride_b2n, stride_b2r, r2, RP2, BLOCK_M, BLOCK_N, KSPLIT, DOT_FP32, IEEE)
        _store_rows(u_ptr, rows, rmask, ro2, stride_hw, u, r2, RP2, ATOMIC)


@triton.jit
def _dx_da_slice(dxa, dh, xk, a_ptr, da_ptr, e, kk, kmask, D_IN, stride_ae, stride_ar, stride_ak,
                 R, RP: tl.constexpr, NEED_DX: tl.constexpr, NEED_DA: tl.constexpr,
                 DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """dx tile += dh @ A[e, :, kk] (NEED_DX);  dA[e, :, kk] += dh^T @ x[tok, kk] (NEED_DA, fp32
    atomics). dh is in the weights' dtype (tensor-core operands), or fp32 (H_FP32); accumulation
    is fp32."""
    if NEED_DX:
        a = _a_tile(a_ptr + e.to(tl.int64) * stride_ae, kk, kmask, stride_ar, stride_ak, R, RP)
        dxa = _dot(dh, a, dxa, DOT_FP32, IEEE)
    if NEED_DA:
        da = _dot(tl.trans(dh), xk, tl.zeros((RP, xk.shape[1]), dtype=tl.float32), DOT_FP32, IEEE)
        i = tl.arange(0, RP)
        # dA workspace: contiguous fp32 [E, R, D_IN].
        p = da_ptr + (e.to(tl.int64) * R + i[:, None]) * D_IN + kk[None, :]
        tl.atomic_add(p, da, mask=(i < R)[:, None] & kmask[None, :])
    return dxa


@triton.jit
def _db_slice(dy_ptr, tok, rmask, w, hw, db_ptr, e, N, col, tile_base, pid_n, stride_dyt, stride_dyn,
              R, RP: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr,
              DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """dB[e, n, :] += (w * dy[tok, col + n])^T @ hw over this split's share of the column tiles
    (hw: h in the weights' dtype, or fp32)."""
    i = tl.arange(0, RP)
    n_tiles = tl.cdiv(N, BLOCK_N)
    first = (pid_n - tile_base % NSPLIT + NSPLIT) % NSPLIT
    for t in range(first, n_tiles, NSPLIT):
        nn = t * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = nn < N
        dyt = tl.load(dy_ptr + tok[:, None] * stride_dyt + (col + nn)[None, :].to(tl.int64) * stride_dyn,
                      mask=rmask[:, None] & nmask[None, :], other=0.0).to(tl.float32)
        dyw = (dyt * w[:, None]).to(hw.dtype)
        db = _dot(tl.trans(dyw), hw, tl.zeros((BLOCK_N, RP), dtype=tl.float32), DOT_FP32, IEEE)
        # dB workspace: contiguous fp32 [E, N, R].
        p = db_ptr + (e.to(tl.int64) * N + nn[:, None]) * R + i[None, :]
        tl.atomic_add(p, db, mask=nmask[:, None] & (i < R)[None, :])


@triton.jit
def _dgate_db_slice(h_ptr, u_ptr, db_ptr, a_ptr, dy_ptr, tok, rows, rmask, w, e, ro, stride_hw, N, col,
                    tile_base, pid_n, stride_dyt, stride_dyn, R, RP: tl.constexpr,
                    BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr, NEED_DB: tl.constexpr,
                    NEED_DG: tl.constexpr, H_FP32: tl.constexpr, DOT_FP32: tl.constexpr,
                    IEEE: tl.constexpr):
    """One slice of a block: (dh = w u, <u, h> per row (0 unless NEED_DG), tiles so far); adds
    this share's dB tiles (NEED_DB). dh and h feed the dots in the weights' dtype, or in fp32
    where that dtype could overflow (H_FP32: fp16)."""
    u = _load_rows(u_ptr, rows, rmask, ro, stride_hw, R, RP)
    dgs = tl.zeros((rows.shape[0],), dtype=tl.float32)
    if NEED_DB or NEED_DG:
        h = _load_rows(h_ptr, rows, rmask, ro, stride_hw, R, RP)
        if NEED_DG:
            dgs = tl.sum(u * h, axis=1)
        if NEED_DB:
            if not H_FP32:
                h = h.to(a_ptr.dtype.element_ty)
            _db_slice(dy_ptr, tok, rmask, w, h, db_ptr, e, N, col, tile_base, pid_n, stride_dyt,
                      stride_dyn, R, RP, BLOCK_N, NSPLIT, DOT_FP32, IEEE)
    dh = u * w[:, None]
    if not H_FP32:
        dh = dh.to(a_ptr.dtype.element_ty)
    return dh, dgs, tile_base + tl.cdiv(N, BLOCK_N)


@triton.jit
def _routed_lora_bwd_expand_kernel(
    x_ptr, dy_ptr, gates_ptr, h_ptr, u_ptr, dx_ptr, dg_ptr,
    order_ptr, blk_expert_ptr, blk_start_ptr, blk_end_ptr,
    a0_ptr, a1_ptr, a2_ptr, da0_ptr, db0_ptr, da1_ptr, db1_ptr, da2_ptr, db2_ptr,
    D_IN, E, K,
    r0, r1, r2, n0, n1, n2, col0, col1, col2, ro0, ro1, ro2,
    stride_xt, stride_xk, stride_dyt, stride_dyn, stride_gt, stride_gk, stride_dxt, stride_hw,
    stride_a0e, stride_a0r, stride_a0k, stride_a1e, stride_a1r, stride_a1k,
    stride_a2e, stride_a2r, stride_a2k,
    scaling,
    NUM_SLICES: tl.constexpr, RP0: tl.constexpr, RP1: tl.constexpr, RP2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr,
    GATE_ATOMIC: tl.constexpr, NEED_DX: tl.constexpr, NEED_DA: tl.constexpr,
    NEED_DB: tl.constexpr, NEED_DG: tl.constexpr, H_FP32: tl.constexpr, DOT_FP32: tl.constexpr,
    IEEE: tl.constexpr,
):
    """d_gates, dx, dA, dB (each only where NEED_*) of the sorted rows of a block, from the shrink
    kernel's h and u. The pointers of a gradient that is not needed are never touched."""
    pid = tl.program_id(0)
    pid_b = pid // NSPLIT
    pid_n = pid % NSPLIT
    if tl.load(blk_expert_ptr + pid_b) >= E:
        return
    e, tok, g, rows, rmask = _sorted_block(pid_b, blk_expert_ptr, blk_start_ptr, blk_end_ptr,
                                           order_ptr, gates_ptr, K, E, stride_gt, stride_gk, BLOCK_M)
    w = g * scaling  # 0 on masked rows
    n_kt = tl.cdiv(D_IN, BLOCK_K)
    # Per slice: its d_gates term, then dB (d_out tiles continue the round robin after the d_in
    # tiles), so that only dh = w u stays live through the d_in loop below.
    dh0, dgs, tiles = _dgate_db_slice(
        h_ptr, u_ptr, db0_ptr, a0_ptr, dy_ptr, tok, rows, rmask, w, e, ro0, stride_hw, n0, col0,
        n_kt, pid_n, stride_dyt, stride_dyn, r0, RP0, BLOCK_N, NSPLIT, NEED_DB, NEED_DG, H_FP32,
        DOT_FP32, IEEE)
    dh1 = tl.zeros((BLOCK_M, RP1), dtype=dh0.dtype)
    dh2 = tl.zeros((BLOCK_M, RP2), dtype=dh0.dtype)
    if NUM_SLICES > 1:
        dh1, d, tiles = _dgate_db_slice(
            h_ptr, u_ptr, db1_ptr, a0_ptr, dy_ptr, tok, rows, rmask, w, e, ro1, stride_hw, n1, col1,
            tiles, pid_n, stride_dyt, stride_dyn, r1, RP1, BLOCK_N, NSPLIT, NEED_DB, NEED_DG, H_FP32,
            DOT_FP32, IEEE)
        dgs += d
    if NUM_SLICES > 2:
        dh2, d, tiles = _dgate_db_slice(
            h_ptr, u_ptr, db2_ptr, a0_ptr, dy_ptr, tok, rows, rmask, w, e, ro2, stride_hw, n2, col2,
            tiles, pid_n, stride_dyt, stride_dyn, r2, RP2, BLOCK_N, NSPLIT, NEED_DB, NEED_DG, H_FP32,
            DOT_FP32, IEEE)
        dgs += d
    if NEED_DG:
        if pid_n == 0:
            # One program per sorted row: a plain store, unless slice groups in other launches add.
            pair = tl.load(order_ptr + rows, mask=rmask, other=0).to(tl.int64)
            if GATE_ATOMIC:
                tl.atomic_add(dg_ptr + pair, dgs * scaling, mask=rmask)
            else:
                tl.store(dg_ptr + pair, dgs * scaling, mask=rmask)

    # d_in tiles: dx (summed over the slices in registers first) and dA.
    if NEED_DX or NEED_DA:
        for t in range(pid_n, n_kt, NSPLIT):
            kk = t * BLOCK_K + tl.arange(0, BLOCK_K)
            kmask = kk < D_IN
            xk = tl.load(x_ptr + tok[:, None] * stride_xt + kk[None, :].to(tl.int64) * stride_xk,
                         mask=rmask[:, None] & kmask[None, :], other=0.0)
            dxa = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            dxa = _dx_da_slice(dxa, dh0, xk, a0_ptr, da0_ptr, e, kk, kmask, D_IN, stride_a0e,
                               stride_a0r, stride_a0k, r0, RP0, NEED_DX, NEED_DA, DOT_FP32, IEEE)
            if NUM_SLICES > 1:
                dxa = _dx_da_slice(dxa, dh1, xk, a1_ptr, da1_ptr, e, kk, kmask, D_IN, stride_a1e,
                                   stride_a1r, stride_a1k, r1, RP1, NEED_DX, NEED_DA, DOT_FP32, IEEE)
            if NUM_SLICES > 2:
                dxa = _dx_da_slice(dxa, dh2, xk, a2_ptr, da2_ptr, e, kk, kmask, D_IN, stride_a2e,
                                   stride_a2r, stride_a2k, r2, RP2, NEED_DX, NEED_DA, DOT_FP32, IEEE)
            if NEED_DX:
                tl.atomic_add(dx_ptr + tok[:, None] * stride_dxt + kk[None, :], dxa,
                              mask=rmask[:, None] & kmask[None, :])
