"""Triton kernel for KV-cache compaction after tree verification (``compact_kv_``).

Kernels only; the launcher lives in ``loramix_kernels/ops/kv.py``.
"""

import triton
import triton.language as tl


@triton.jit
def _compact_kv_kernel(
    k_ptr, v_ptr, bt_ptr, seq_ptr, acc_idx_ptr, acc_len_ptr,
    N, H, D, block_size, max_blocks, num_blocks,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_tb, stride_tm, stride_sb, stride_ab, stride_an, stride_lb,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(B, cdiv(Hkv, BLOCK_H))``: each program moves the accepted path of request b for a
    slice of KV heads, for both caches, in increasing j (``_compact_kv_moves``)."""
    _compact_kv_moves(
        k_ptr, v_ptr, bt_ptr, seq_ptr, acc_idx_ptr, acc_len_ptr,
        tl.program_id(0).to(tl.int64), tl.program_id(1),
        N, H, D, block_size, max_blocks, num_blocks,
        stride_kb, stride_ks, stride_kh, stride_kd,
        stride_vb, stride_vs, stride_vh, stride_vd,
        stride_tb, stride_tm, stride_sb, stride_ab, stride_an, stride_lb,
        BLOCK_H, BLOCK_D)


@triton.jit
def _compact_kv_layers_kernel(
    k_ptr, v_ptr, bt_ptr, seq_ptr, acc_idx_ptr, acc_len_ptr,
    N, H, D, block_size, max_blocks, num_blocks,
    stride_kl, stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vl, stride_vb, stride_vs, stride_vh, stride_vd,
    stride_tb, stride_tm, stride_sb, stride_ab, stride_an, stride_lb,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``compact_kv_layers_``: grid ``(B, cdiv(Hkv, BLOCK_H), L)``; program (b, h, l) does what
    ``_compact_kv_kernel``'s program (b, h) does, on layer l's caches. Layers never share
    elements, so the per-layer race-freedom argument holds unchanged."""
    layer = tl.program_id(2).to(tl.int64)
    _compact_kv_moves(
        k_ptr + layer * stride_kl, v_ptr + layer * stride_vl,
        bt_ptr, seq_ptr, acc_idx_ptr, acc_len_ptr,
        tl.program_id(0).to(tl.int64), tl.program_id(1),
        N, H, D, block_size, max_blocks, num_blocks,
        stride_kb, stride_ks, stride_kh, stride_kd,
        stride_vb, stride_vs, stride_vh, stride_vd,
        stride_tb, stride_tm, stride_sb, stride_ab, stride_an, stride_lb,
        BLOCK_H, BLOCK_D)


@triton.jit
def _compact_kv_moves(
    k_ptr, v_ptr, bt_ptr, seq_ptr, acc_idx_ptr, acc_len_ptr, b, pid_h,
    N, H, D, block_size, max_blocks, num_blocks,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_tb, stride_tm, stride_sb, stride_ab, stride_an, stride_lb,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Move the accepted path of request ``b`` (int64) for KV heads ``pid_h * BLOCK_H + [0,
    BLOCK_H)`` of one layer's caches ``k_ptr`` / ``v_ptr``, for both caches, in increasing j.

    Race freedom, in place: the path is strictly increasing, so the source ``base + a_j`` (with
    ``a_j >= j``) of step j lies at or after every destination ``base + j' (j' < j)`` already
    written: no step reads a row an earlier step overwrote. A row read at step j and overwritten at
    a later step j' is handled by the same threads (same [BLOCK_H, BLOCK_D] layout every step), so
    program order puts the read first. Programs never share elements: the split is across heads
    only, never across j. Invalid entries (a_j outside [j, N), not increasing, base < 0, a
    position past the block table, a block id outside [0, num_blocks)) skip their move: no input
    makes the kernel leave the caches or move another request's rows.
    """
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    hm = (h < H)[:, None] & (d < D)[None, :]
    k_off = h[:, None].to(tl.int64) * stride_kh + d[None, :].to(tl.int64) * stride_kd
    v_off = h[:, None].to(tl.int64) * stride_vh + d[None, :].to(tl.int64) * stride_vd
    # Indices are widened to int64 (never narrowed), so range tests see the input's true value.
    base = tl.load(seq_ptr + b * stride_sb).to(tl.int64) - N
    ln = tl.load(acc_len_ptr + b * stride_lb).to(tl.int64)
    ln = tl.minimum(ln, N - 1)
    ln = tl.where(base >= 0, ln, -1)
    prev = b * 0 - 1
    for j in range(0, ln + 1):
        a = tl.load(acc_idx_ptr + b * stride_ab + j * stride_an).to(tl.int64)
        ok = (a > prev) & (a >= j) & (a < N)
        prev = tl.where(ok, a, prev)
        move = ok & (a != j)
        src = base + tl.minimum(tl.maximum(a, 0), N - 1)
        dst = base + j
        s_lb, d_lb = src // block_size, dst // block_size
        s_blk = tl.load(bt_ptr + b * stride_tb + tl.minimum(s_lb, max_blocks - 1) * stride_tm).to(tl.int64)
        d_blk = tl.load(bt_ptr + b * stride_tb + tl.minimum(d_lb, max_blocks - 1) * stride_tm).to(tl.int64)
        move = (move & (s_lb < max_blocks) & (d_lb < max_blocks) & (s_blk >= 0) & (s_blk < num_blocks)
                & (d_blk >= 0) & (d_blk < num_blocks))
        s_blk = tl.minimum(tl.maximum(s_blk, 0), num_blocks - 1)  # addresses stay in bounds even
        d_blk = tl.minimum(tl.maximum(d_blk, 0), num_blocks - 1)  # where the move is masked off
        s_row = s_blk * stride_kb + (src % block_size) * stride_ks
        d_row = d_blk * stride_kb + (dst % block_size) * stride_ks
        # (an explicit broadcast: the interpreter rejects a block mask & a scalar mask)
        m = hm & ((d[None, :] * 0 + move.to(tl.int32)) != 0)
        kv = tl.load(k_ptr + s_row + k_off, mask=m)
        tl.store(k_ptr + d_row + k_off, kv, mask=m)
        s_row = s_blk * stride_vb + (src % block_size) * stride_vs
        d_row = d_blk * stride_vb + (dst % block_size) * stride_vs
        vv = tl.load(v_ptr + s_row + v_off, mask=m)
        tl.store(v_ptr + d_row + v_off, vv, mask=m)


@triton.jit
def _kv_write_kernel(
    kc_ptr, vc_ptr, k_ptr, v_ptr, slot_ptr,
    H, D, block_size, num_slots,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd, stride_slot,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``kv_write_`` (vLLM's reshape_and_cache): grid ``(T, cdiv(Hkv, BLOCK_H))``; program (t, h)
    copies token t's K and V rows of a slice of heads to physical slot ``slot_mapping[t]`` =
    ``block * block_size + offset``. A slot outside ``[0, num_blocks * block_size)`` (-1: padding
    token) writes nothing, so no input makes the kernel leave the caches."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    slot = tl.load(slot_ptr + t * stride_slot).to(tl.int64)  # widened, never narrowed
    ok = (slot >= 0) & (slot < num_slots)
    slot = tl.where(ok, slot, 0)
    blk = slot // block_size
    off = slot % block_size
    # (an explicit broadcast: the interpreter rejects a block mask & a scalar mask)
    m = (h < H)[:, None] & (d < D)[None, :] & ((d[None, :] * 0 + ok.to(tl.int32)) != 0)
    hh = h[:, None].to(tl.int64)
    dd = d[None, :].to(tl.int64)
    kv = tl.load(k_ptr + t * stride_kt + hh * stride_kh + dd * stride_kd, mask=m)
    tl.store(kc_ptr + blk * stride_kcb + off * stride_kcs + hh * stride_kch + dd * stride_kcd, kv, mask=m)
    vv = tl.load(v_ptr + t * stride_vt + hh * stride_vh + dd * stride_vd, mask=m)
    tl.store(vc_ptr + blk * stride_vcb + off * stride_vcs + hh * stride_vch + dd * stride_vcd, vv, mask=m)
