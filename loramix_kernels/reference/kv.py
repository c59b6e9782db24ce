"""Plain-PyTorch paged KV-cache ops (compaction after tree verification, for one layer's cache or
all layers' at once; writes by slot): CPU kernels, test oracles, baselines.

Semantics (../shared/API.md, ``compact_kv_``): with ``N = accept_index.shape[1]`` and
``base = seq_lens[b] - N``, the K and V of node ``accept_index[b, j]`` move from position
``base + accept_index[b, j]`` to ``base + j`` for ``j = 0..accept_len[b]``, in the paged cache
``[num_blocks, block_size, Hkv, D]`` addressed through ``block_table``.
"""

from __future__ import annotations

import torch


def compact_kv_ref_(k_cache, v_cache, block_table, seq_lens, accept_index, accept_len):
    """Gather every source row first, then scatter: in place without a read-after-write hazard
    (a source position of one node can be the destination of another)."""
    moves = _compact_moves(block_table, seq_lens, accept_index, accept_len, k_cache.shape[1])
    if moves is None:
        return
    sb, so, db, do = moves
    for cache in (k_cache, v_cache):
        rows = cache[sb, so].clone()
        cache[db, do] = rows


def _compact_moves(block_table, seq_lens, accept_index, accept_len, block_size):
    """(source block, source offset, destination block, destination offset) of every row move of
    ``compact_kv_`` (moves of a node onto itself left out), or None when nothing moves."""
    B, N = accept_index.shape
    if B == 0 or N == 0:
        return None
    dev = accept_index.device
    j = torch.arange(N, device=dev)[None, :]
    a = accept_index.long()
    base = seq_lens.long()[:, None] - N
    move = (j <= accept_len.long()[:, None]) & (a != j)
    bb, jj = move.nonzero(as_tuple=True)
    if bb.numel() == 0:
        return None
    src = (base + a)[bb, jj]
    dst = (base + j)[bb, jj]
    bt = block_table.long()
    return bt[bb, src // block_size], src % block_size, bt[bb, dst // block_size], dst % block_size


def compact_kv_layers_ref_(k_caches, v_caches, block_table, seq_lens, accept_index, accept_len):
    """``compact_kv_`` on every layer of ``[L, num_blocks, block_size, Hkv, D]`` caches at once:
    the same gather-then-scatter, with the layer dimension carried along."""
    moves = _compact_moves(block_table, seq_lens, accept_index, accept_len, k_caches.shape[2])
    if moves is None:
        return
    sb, so, db, do = moves
    for cache in (k_caches, v_caches):
        rows = cache[:, sb, so].clone()
        cache[:, db, do] = rows


def kv_write_ref_(k_cache, v_cache, k, v, slot_mapping):
    """vLLM's reshape_and_cache: token t's ``k[t]`` / ``v[t]`` ``[Hkv, D]`` go to physical slot
    ``slot_mapping[t] = block * block_size + offset``; tokens whose slot lies outside
    ``[0, num_blocks * block_size)`` (-1: padding) are skipped. One vectorised index_put."""
    num_blocks, block_size = k_cache.shape[:2]
    slot = slot_mapping.long()
    keep = (slot >= 0) & (slot < num_blocks * block_size)
    if not bool(keep.all()):
        slot, k, v = slot[keep], k[keep], v[keep]
    blk, off = slot // block_size, slot % block_size
    k_cache[blk, off] = k
    v_cache[blk, off] = v
