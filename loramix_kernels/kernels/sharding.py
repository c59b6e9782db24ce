"""Triton kernels of the sharding ops: ``routed_lora_shrink`` (h = A_e x per routed slot) and
``routed_lora_expand_`` (y += scaling * sum_j g_j B_e h_j), routed_lora's two halves as separate
launches (tensor parallelism all-reduces h between them, ``loramix_kernels.distributed``).

Both run on the expert-sorted (token, slot) pairs of ``ops.routed_lora.sort_pairs`` (device-side
sort, fixed upper-bound grid of ``cdiv(T*k, BLOCK_M) + E`` blocks, no host sync) and reuse the row
helpers of ``kernels/routed_lora.py`` (``_shrink_rows``, ``_expand_rows``, ``_gated_rows``): each
program takes BLOCK_M pairs of ONE expert, so only routed work is done and only routed experts'
weights are read. Up to three slices per launch (slot ``j`` has its own pointers / sizes /
strides from ``ops.routed_lora.slice_kwargs`` plus ``h{j}_ptr``, the view ``h[s]``); the slice is
the fastest-varying program index, so the slice programs of a block share its x / h rows in L2.

``_routed_lora_shrink_kernel``  grid ``blocks * KSPLIT * NUM_SLICES``
    h[s, tok, slot, :r_s] = x[tok] @ A_s[e]^T in fp32 (the buffer is zeroed by the launcher: empty
    slots and columns past r_s stay 0). At decode (few blocks) d_in is cut into KSPLIT chunks whose
    partial sums are added with fp32 atomics, so that no program reads all of A_s[e].
``_routed_lora_expand_kernel``  grid ``blocks * NSPLIT * NUM_SLICES``
    y[tok, col_s + n] += (scaling * g) h[s, tok, slot, :r_s] @ B_s[e]^T over the share's column
    tiles; fp32 atomics into an fp32 target when k > 1 (a token's slots are rows of different
    blocks), a plain read-add-store into ``out`` when k == 1.
"""

import triton
import triton.language as tl

from .routed_lora import _expand_rows, _gated_rows, _shrink_rows


@triton.jit
def _pair_rows(pid_b, blk_expert_ptr, blk_start_ptr, blk_end_ptr, order_ptr, K, E, BLOCK_M: tl.constexpr):
    """(expert, token ids, slot ids, row mask) of one block of expert-sorted pairs."""
    e = tl.load(blk_expert_ptr + pid_b)
    start = tl.load(blk_start_ptr + pid_b)
    end = tl.load(blk_end_ptr + pid_b)
    end = tl.where(e < E, end, start)
    rows = start + tl.arange(0, BLOCK_M)
    rmask = rows < end
    pair = tl.load(order_ptr + rows, mask=rmask, other=0).to(tl.int64)
    e = tl.minimum(tl.maximum(e, 0), E - 1)
    return e, pair // K, pair % K, rmask


@triton.jit
def _shrink_store(x_ptr, h_ptr, tok, slot, rmask, a_ptr, e, k_lo, k_hi, D_IN, stride_xt, stride_xk,
                  stride_ae, stride_ar, stride_ak, stride_ht, stride_hk, stride_hr,
                  R, RP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                  ATOMIC: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    h = _shrink_rows(x_ptr, tok, rmask, a_ptr, e, k_lo, k_hi, D_IN, stride_xt, stride_xk, stride_ae,
                     stride_ar, stride_ak, R, RP, BLOCK_M, BLOCK_K, DOT_FP32, IEEE)
    i = tl.arange(0, RP)
    hp = h_ptr + tok[:, None] * stride_ht + slot[:, None] * stride_hk + i[None, :].to(tl.int64) * stride_hr
    hmask = rmask[:, None] & (i < R)[None, :]
    if ATOMIC:  # a d_in chunk's partial sum (decode split-K) into the zeroed fp32 h
        tl.atomic_add(hp, h, mask=hmask)
    else:
        tl.store(hp, h, mask=hmask)


@triton.jit
def _routed_lora_shrink_kernel(
    x_ptr, h0_ptr, h1_ptr, h2_ptr,
    order_ptr, blk_expert_ptr, blk_start_ptr, blk_end_ptr,
    a0_ptr, a1_ptr, a2_ptr,
    D_IN, K_CHUNK, E, K, r0, r1, r2,
    stride_xt, stride_xk, stride_ht, stride_hk, stride_hr,
    stride_a0e, stride_a0r, stride_a0k, stride_a1e, stride_a1r, stride_a1k,
    stride_a2e, stride_a2r, stride_a2k,
    NUM_SLICES: tl.constexpr, RP0: tl.constexpr, RP1: tl.constexpr, RP2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, KSPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    s = pid % NUM_SLICES
    pid_k = (pid // NUM_SLICES) % KSPLIT
    pid_b = pid // (NUM_SLICES * KSPLIT)
    k_lo = pid_k * K_CHUNK
    k_hi = tl.minimum(D_IN, k_lo + K_CHUNK)
    # Fixed upper-bound grid: blocks past the real count hold no rows and leave at once.
    if tl.load(blk_expert_ptr + pid_b) >= E:
        return
    e, tok, slot, rmask = _pair_rows(pid_b, blk_expert_ptr, blk_start_ptr, blk_end_ptr, order_ptr,
                                     K, E, BLOCK_M)
    if s == 0:
        _shrink_store(x_ptr, h0_ptr, tok, slot, rmask, a0_ptr, e, k_lo, k_hi, D_IN, stride_xt, stride_xk,
                      stride_a0e, stride_a0r, stride_a0k, stride_ht, stride_hk, stride_hr, r0, RP0,
                      BLOCK_M, BLOCK_K, KSPLIT > 1, DOT_FP32, IEEE)
    if NUM_SLICES > 1:
        if s == 1:
            _shrink_store(x_ptr, h1_ptr, tok, slot, rmask, a1_ptr, e, k_lo, k_hi, D_IN, stride_xt, stride_xk,
                          stride_a1e, stride_a1r, stride_a1k, stride_ht, stride_hk, stride_hr, r1,
                          RP1, BLOCK_M, BLOCK_K, KSPLIT > 1, DOT_FP32, IEEE)
    if NUM_SLICES > 2:
        if s == 2:
            _shrink_store(x_ptr, h2_ptr, tok, slot, rmask, a2_ptr, e, k_lo, k_hi, D_IN, stride_xt, stride_xk,
                          stride_a2e, stride_a2r, stride_a2k, stride_ht, stride_hk, stride_hr, r2,
                          RP2, BLOCK_M, BLOCK_K, KSPLIT > 1, DOT_FP32, IEEE)


@triton.jit
def _expand_slice(h_ptr, b_ptr, y_ptr, tok, slot, w, rmask, e, N, col, pid_n,
                  stride_ht, stride_hk, stride_hr, stride_be, stride_bn, stride_br, stride_yt, stride_yn,
                  R, RP: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr,
                  ATOMIC: tl.constexpr, ACCUMULATE: tl.constexpr, H_FP32: tl.constexpr,
                  DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    i = tl.arange(0, RP)
    hp = h_ptr + tok[:, None] * stride_ht + slot[:, None] * stride_hk + i[None, :].to(tl.int64) * stride_hr
    h = tl.load(hp, mask=rmask[:, None] & (i < R)[None, :], other=0.0).to(tl.float32)
    _expand_rows(_gated_rows(h, w, b_ptr, H_FP32), b_ptr, e, y_ptr, tok, rmask, N, col, 0, pid_n,
                 stride_be, stride_bn, stride_br, stride_yt, stride_yn, R, RP, BLOCK_N, NSPLIT,
                 ATOMIC, ACCUMULATE, H_FP32, DOT_FP32, IEEE)


@triton.jit
def _routed_lora_expand_kernel(
    y_ptr, h0_ptr, h1_ptr, h2_ptr, gates_ptr,
    order_ptr, blk_expert_ptr, blk_start_ptr, blk_end_ptr,
    b0_ptr, b1_ptr, b2_ptr,
    E, K, r0, r1, r2, n0, n1, n2, col0, col1, col2,
    stride_yt, stride_yn, stride_ht, stride_hk, stride_hr, stride_gt, stride_gk,
    stride_b0e, stride_b0n, stride_b0r, stride_b1e, stride_b1n, stride_b1r,
    stride_b2e, stride_b2n, stride_b2r,
    scaling,
    NUM_SLICES: tl.constexpr, RP0: tl.constexpr, RP1: tl.constexpr, RP2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr,
    ATOMIC: tl.constexpr, ACCUMULATE: tl.constexpr, H_FP32: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    s = pid % NUM_SLICES
    pid_n = (pid // NUM_SLICES) % NSPLIT
    pid_b = pid // (NUM_SLICES * NSPLIT)
    if tl.load(blk_expert_ptr + pid_b) >= E:
        return
    e, tok, slot, rmask = _pair_rows(pid_b, blk_expert_ptr, blk_start_ptr, blk_end_ptr, order_ptr,
                                     K, E, BLOCK_M)
    w = tl.load(gates_ptr + tok * stride_gt + slot * stride_gk, mask=rmask, other=0.0).to(tl.float32)
    w = w * scaling
    if s == 0:
        _expand_slice(h0_ptr, b0_ptr, y_ptr, tok, slot, w, rmask, e, n0, col0, pid_n, stride_ht,
                      stride_hk, stride_hr, stride_b0e, stride_b0n, stride_b0r, stride_yt, stride_yn,
                      r0, RP0, BLOCK_N, NSPLIT, ATOMIC, ACCUMULATE, H_FP32, DOT_FP32, IEEE)
    if NUM_SLICES > 1:
        if s == 1:
            _expand_slice(h1_ptr, b1_ptr, y_ptr, tok, slot, w, rmask, e, n1, col1, pid_n, stride_ht,
                          stride_hk, stride_hr, stride_b1e, stride_b1n, stride_b1r, stride_yt,
                          stride_yn, r1, RP1, BLOCK_N, NSPLIT, ATOMIC, ACCUMULATE, H_FP32, DOT_FP32,
                          IEEE)
    if NUM_SLICES > 2:
        if s == 2:
            _expand_slice(h2_ptr, b2_ptr, y_ptr, tok, slot, w, rmask, e, n2, col2, pid_n, stride_ht,
                          stride_hk, stride_hr, stride_b2e, stride_b2n, stride_b2r, stride_yt,
                          stride_yn, r2, RP2, BLOCK_N, NSPLIT, ATOMIC, ACCUMULATE, H_FP32, DOT_FP32,
                          IEEE)
