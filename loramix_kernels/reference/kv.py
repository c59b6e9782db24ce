"""Plain-PyTorch KV-cache compaction after tree verification: CPU kernel, test oracle, baseline.

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
    B, N = accept_index.shape
    if B == 0 or N == 0:
        return
    dev = accept_index.device
    bs = k_cache.shape[1]
    j = torch.arange(N, device=dev)[None, :]
    a = accept_index.long()
    base = seq_lens.long()[:, None] - N
    move = (j <= accept_len.long()[:, None]) & (a != j)
    bb, jj = move.nonzero(as_tuple=True)
    if bb.numel() == 0:
        return
    src = (base + a)[bb, jj]
    dst = (base + j)[bb, jj]
    bt = block_table.long()
    sb, so = bt[bb, src // bs], src % bs
    db, do = bt[bb, dst // bs], dst % bs
    for cache in (k_cache, v_cache):
        rows = cache[sb, so].clone()
        cache[db, do] = rows
