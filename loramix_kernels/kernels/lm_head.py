"""Triton kernels for the top-k of the LM head's logits (``lm_head_topk``).

Kernels only; the launcher lives in ``loramix_kernels/ops/lm_head.py``. Two launches: the
partial kernel streams the vocabulary (a split per program) and keeps a running top-k per row;
the merge kernel orders the splits' candidates into the final top-k.
"""

import triton
import triton.language as tl


@triton.jit
def _lm_head_topk_partial_kernel(
    h_ptr, w_ptr, ws_v_ptr, ws_i_ptr,
    M, V, H, K, tiles_per_split,
    stride_hm, stride_hh, stride_wv, stride_wh, stride_wsm,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, KP: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    """Grid ``(cdiv(M, BLOCK_M), splits)``: program (m, s) computes the logits of rows
    ``m * BLOCK_M + [0, BLOCK_M)`` against the vocabulary split ``s`` (``tiles_per_split`` tiles of
    ``BLOCK_V`` rows of ``weight``), one ``[BLOCK_M, BLOCK_V]`` fp32 tile at a time (``tl.dot``
    over ``BLOCK_K`` slices of H), and writes the split's top-K per row, unordered, to
    ``ws[row, s * K + j]``.

    Running top-K: ``K`` slots per row (``KP - K`` padding slots hold +inf and are never
    replaced). Under the total order "larger value, then lower index", each pass takes the tile's
    best remaining candidate per row and, if it beats the row's worst slot (smallest value; the
    larger index among equal values), replaces that slot. Passes run in decreasing candidate order,
    so once one fails for a row, no later candidate of the tile can enter it; a tile needs at most
    min(K, #logits >= the worst before the tile) passes, which is 0 for most tiles once the running
    set has settled. Empty slots start at -inf with indices ``V + s * KP + j`` (unique, above
    every real index), so real logits always displace them, even -inf ones, and the merge orders
    them last.
    """
    pid_m = tl.program_id(0)
    s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols0 = tl.arange(0, BLOCK_V)
    kk = tl.arange(0, BLOCK_K)
    slot = tl.arange(0, KP)
    v_lo = s * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(v_lo + tiles_per_split * BLOCK_V, V)

    zero_mk = tl.zeros([BLOCK_M, KP], dtype=tl.float32)
    run_v = tl.where((slot < K)[None, :], zero_mk + float("-inf"), zero_mk + float("inf"))
    run_i = (tl.zeros([BLOCK_M, KP], dtype=tl.int64) + V + s.to(tl.int64) * KP
             + slot[None, :].to(tl.int64))
    h_rows = h_ptr + rows[:, None].to(tl.int64) * stride_hm

    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + cols0
        cmask = cols < v_hi
        w_cols = w_ptr + cols[None, :].to(tl.int64) * stride_wv
        acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            hk = k0 + kk
            kmask = hk < H
            a = tl.load(h_rows + hk[None, :].to(tl.int64) * stride_hh,
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(w_cols + hk[:, None].to(tl.int64) * stride_wh,
                        mask=kmask[:, None] & cmask[None, :], other=0.0)
            if DOT_FP32:  # the interpreter mis-computes bf16 dots
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            elif IEEE:  # fp32 inputs: full fp32 products (tf32 would reorder close logits)
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        # NaN ranks as -inf (as on the CPU paths): a NaN is never inserted by the compares below,
        # and then the sentinels (index >= V) would be returned as token ids.
        acc = tl.where(acc == acc, acc, float("-inf"))

        # Merge the tile into the running top-K.
        worst = tl.min(run_v, axis=1)
        avail = cmask[None, :] & rmask[:, None]  # (padding rows would only add passes)
        cand = avail & (acc >= worst[:, None])
        npass = tl.minimum(tl.max(tl.sum(cand.to(tl.int32), axis=1), axis=0), K)
        for _p in range(npass):
            x = tl.where(avail, acc, float("-inf"))
            cmax = tl.max(x, axis=1)
            cidx = tl.min(tl.where(avail & (x == cmax[:, None]), cols[None, :], 2147483647), axis=1)
            worst = tl.min(run_v, axis=1)
            wi = tl.max(tl.where(run_v == worst[:, None], run_i, -1), axis=1)
            ins = (cidx < 2147483647) & ((cmax > worst) | ((cmax == worst) & (cidx.to(tl.int64) < wi)))
            hit = ins[:, None] & (run_i == wi[:, None])
            run_v = tl.where(hit, cmax[:, None], run_v)
            run_i = tl.where(hit, cidx[:, None].to(tl.int64), run_i)
            avail = avail & ~(ins[:, None] & (cols[None, :] == cidx[:, None]))

    out = rows[:, None].to(tl.int64) * stride_wsm + s * K + slot[None, :]
    omask = rmask[:, None] & (slot < K)[None, :]
    tl.store(ws_v_ptr + out, run_v, mask=omask)
    tl.store(ws_i_ptr + out, run_i, mask=omask)


@triton.jit
def _lm_head_topk_merge_kernel(
    ws_v_ptr, ws_i_ptr, out_v_ptr, out_i_ptr,
    M, K, NC,
    stride_wsm, stride_ovm, stride_ovk, stride_oim, stride_oik,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid ``(cdiv(M, BLOCK_R),)``: the final top-K of rows ``[r, r + BLOCK_R)`` from their
    ``NC = splits * K`` candidates, in order. Pass p emits the best candidate that comes strictly
    after pass p-1's under the total order "larger value, then lower index" (candidate indices
    are distinct), scanning the candidates in ``BLOCK_C`` chunks: no sort, no scratch writes, and
    ties go to the lower index by construction."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < M
    c = tl.arange(0, BLOCK_C)
    base = rows[:, None].to(tl.int64) * stride_wsm
    prev_v = tl.zeros([BLOCK_R], dtype=tl.float32) + float("inf")
    prev_i = tl.zeros([BLOCK_R], dtype=tl.int64) - 1
    big = tl.zeros([BLOCK_R], dtype=tl.int64) + 0x3FFFFFFFFFFFFFFF
    for p in range(0, K):
        best_v = tl.zeros([BLOCK_R], dtype=tl.float32) + float("-inf")
        best_i = big
        for c0 in range(0, NC, BLOCK_C):
            cc = c0 + c
            m = rmask[:, None] & (cc < NC)[None, :]
            v = tl.load(ws_v_ptr + base + cc[None, :], mask=m, other=float("-inf"))
            i = tl.load(ws_i_ptr + base + cc[None, :], mask=m, other=0)
            after = m & ((v < prev_v[:, None]) | ((v == prev_v[:, None]) & (i > prev_i[:, None])))
            x = tl.where(after, v, float("-inf"))
            cv = tl.max(x, axis=1)
            ci = tl.min(tl.where(after & (x == cv[:, None]), i, big[:, None]), axis=1)
            better = (ci < big) & ((cv > best_v) | ((cv == best_v) & (ci < best_i)))
            best_v = tl.where(better, cv, best_v)
            best_i = tl.where(better, ci, best_i)
        r64 = rows.to(tl.int64)
        tl.store(out_v_ptr + r64 * stride_ovm + p * stride_ovk, best_v, mask=rmask)
        tl.store(out_i_ptr + r64 * stride_oim + p * stride_oik, best_i, mask=rmask)
        prev_v = best_v
        prev_i = best_i
