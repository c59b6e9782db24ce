"""Triton kernel for the router's softmax + top-k (``route_topk``).

Kernels only; the launcher lives in ``loramix_kernels/ops/routing.py``.
"""

import triton
import triton.language as tl


@triton.jit
def _route_topk_kernel(
    logits_ptr, gates_ptr, ids_ptr, probs_ptr,
    T, E, K,
    stride_lt, stride_le,
    RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid ``(cdiv(T, BLOCK_T),)``: each program owns BLOCK_T whole rows of ``[T, E]`` logits.

    Per row, in registers: ``p = exp(x - max x) / sum`` in the probabilities' dtype (fp32, fp64 for
    fp64 logits), stored once; then K passes of an argmax over a selection key, each taking the
    largest key and, among equal keys, the lowest expert index (``min`` of the matching column
    indices), then retiring that column (key -1). The k chosen (gate, id) pairs gather in a
    ``[BLOCK_T, BLOCK_K]`` register tile, renormalised by their sum when asked, and are stored once:
    logits read once, every output written once, no host synchronisation.

    Key: p itself (p >= 0), -0.5 for a NaN p (so a NaN row still yields distinct ids in index
    order, as the reference does), -1 for a retired column, -2 for the padding columns
    ``E <= col < BLOCK_E`` (never chosen while K <= E).
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    m = row_ok[:, None] & col_ok[None, :]
    x = tl.load(logits_ptr + rows[:, None] * stride_lt + cols[None, :].to(tl.int64) * stride_le,
                mask=m, other=0.0)
    x = x.to(probs_ptr.dtype.element_ty)
    # Padding columns are -inf (exp -> 0); rows past T read zeros, so no NaN is ever computed
    # for them.
    x = tl.where(col_ok[None, :], x, float("-inf"))
    mx = tl.max(x, axis=1)
    e = tl.exp(x - mx[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    out_off = rows[:, None] * E + cols[None, :]
    tl.store(probs_ptr + out_off, p, mask=m)

    key = tl.where(p != p, -0.5, p)
    key = tl.where(col_ok[None, :], key, -2.0)
    kcols = tl.arange(0, BLOCK_K)
    gates = tl.zeros((BLOCK_T, BLOCK_K), dtype=p.dtype)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in range(0, K):
        best = tl.max(key, axis=1)
        # lowest column holding the maximum: ties go to the lower expert index
        idx = tl.min(tl.where(key == best[:, None], cols[None, :], BLOCK_E), axis=1)
        hit = cols[None, :] == idx[:, None]
        g = tl.sum(tl.where(hit, p, 0.0), axis=1)
        key = tl.where(hit, -1.0, key)
        slot = kcols[None, :] == j
        gates = tl.where(slot, g[:, None], gates)
        ids = tl.where(slot, idx[:, None].to(tl.int32), ids)
    if RENORMALIZE:
        gates = gates / tl.sum(gates, axis=1)[:, None]
    km = row_ok[:, None] & (kcols[None, :] < K)
    k_off = rows[:, None] * K + kcols[None, :]
    tl.store(gates_ptr + k_off, gates, mask=km)
    tl.store(ids_ptr + k_off, ids, mask=km)
