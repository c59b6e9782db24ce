"""Plain-PyTorch tree ops: ``build_tree_ref`` (also the CPU kernel of ``build_tree``),
``tree_attention_ref`` (the straightforward fp32 form of ``tree_attention``: the oracle the fast CPU
kernel ``ops/tree.py::tree_attention_cpu`` and the Triton kernels are compared with), and the
benchmark baselines (dense-mask SDPA and FlexAttention over the gathered KV).

All attention arithmetic is done in fp32 (softmax included) and cast back to q's dtype. No triton
import: this module is the package's CPU path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# build_tree
# --------------------------------------------------------------------------------------------------


def _sanitize_parents(parents: torch.Tensor) -> torch.Tensor:
    """int64 parents where anything outside ``[0, i)`` becomes -1 (the kernels' rule); compared
    in the input's own width before widening (an int32 or int64 input never wraps)."""
    idx = torch.arange(parents.shape[1], device=parents.device, dtype=parents.dtype)
    ok = (parents >= 0) & (parents < idx)
    return torch.where(ok, parents, torch.full_like(parents, -1)).long()


def ancestor_matrix(parents: torch.Tensor) -> torch.Tensor:
    """``anc[b, i, j]`` (bool ``[B, N, N]``): node j is node i or one of its ancestors."""
    p = _sanitize_parents(parents)
    B, N = p.shape
    anc = torch.zeros(B, N, N, dtype=torch.bool, device=p.device)
    rows = torch.arange(B, device=p.device)
    # Parents come before children, so row i = row parents[i] | {i}, filled in index order.
    for i in range(N):
        par = p[:, i]
        has = par >= 0
        anc[:, i] = anc[rows, par.clamp(min=0)] & has[:, None]
        anc[:, i, i] = True
    return anc


def pack_mask(dense: torch.Tensor) -> torch.Tensor:
    """Pack bool ``[..., N]`` into int32 ``[..., ceil(N/32)]`` words, bit j % 32 of word j // 32."""
    n = dense.shape[-1]
    words = (n + 31) // 32
    padded = F.pad(dense.long(), (0, words * 32 - n))
    bits = padded.reshape(*dense.shape[:-1], words, 32)
    shifts = torch.arange(32, device=dense.device, dtype=torch.long)
    val = (bits << shifts).sum(-1)  # in [0, 2^32)
    return torch.where(val >= 2**31, val - 2**32, val).to(torch.int32)


def unpack_mask(tree_mask: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: int32 ``[..., W]`` to bool ``[..., n]``."""
    shifts = torch.arange(32, device=tree_mask.device, dtype=torch.long)
    bits = (tree_mask.long()[..., None] >> shifts) & 1
    return bits.reshape(*tree_mask.shape[:-1], -1)[..., :n].bool()


def _first_true(x: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim, -1 where none (int32)."""
    idx = x.int().argmax(-1)  # first maximal value
    return torch.where(x.any(-1), idx, torch.full_like(idx, -1)).to(torch.int32)


def build_tree_ref(parents: torch.Tensor):
    """Reference ``build_tree`` (and its CPU kernel): see ``loramix_kernels.build_tree``.

    Parents outside ``[0, i)`` count as -1, as in the Triton kernel (they are rejected before
    when value checks run). A node hanging from a padding node keeps the ancestors the parents
    array gives it."""
    p = _sanitize_parents(parents)
    N = p.shape[1]
    anc = ancestor_matrix(p)
    depth = (anc.sum(-1) - 1).to(torch.int32)
    idx = torch.arange(N, device=p.device)
    # child[b, u, i]: parents[b, i] == u
    child = p[:, None, :] == idx[None, :, None]
    first_child = _first_true(child)
    # sib[b, i, j]: j > i shares i's real parent
    sib = (p[:, None, :] == p[:, :, None]) & (p[:, :, None] >= 0) & (idx[None, :] > idx[:, None])
    next_sibling = _first_true(sib)
    return pack_mask(anc), depth, first_child, next_sibling


# --------------------------------------------------------------------------------------------------
# tree_attention
# --------------------------------------------------------------------------------------------------


def gather_kv(k_cache, v_cache, block_table, seq_lens, max_len: int | None = None):
    """Gather the paged cache into dense ``[B, Hkv, L, D]`` K and V (zeros past each length).

    ``max_len`` defaults to ``max(seq_lens)`` (reads the lengths: a host sync on CUDA).
    """
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    if max_len is None:
        max_len = int(seq_lens.max()) if seq_lens.numel() else 0
    pos = torch.arange(max_len, device=k_cache.device)
    lblk = (pos // block_size).clamp(max=block_table.shape[1] - 1)
    blk = block_table.long()[:, lblk].clamp(0, num_blocks - 1)  # [B, L]
    off = (pos % block_size)[None, :].expand_as(blk)
    live = (pos[None, :] < seq_lens.long()[:, None])[..., None, None]
    k = torch.where(live, k_cache[blk, off], 0).transpose(1, 2)
    v = torch.where(live, v_cache[blk, off], 0).transpose(1, 2)
    return k, v


def dense_tree_mask(tree_mask, seq_lens, n: int, max_len: int) -> torch.Tensor:
    """Bool ``[B, N, L]``: node i may see key position t (prefix, or a tree node in its mask)."""
    pos = torch.arange(max_len, device=tree_mask.device)
    prefix = (seq_lens.long() - n)[:, None]  # [B, 1]
    node_mask = unpack_mask(tree_mask, n)  # [B, N, N]
    j = pos[None, :] - prefix  # [B, L]: tree node index at each position
    in_tree = (j >= 0) & (j < n)
    tree_ok = torch.gather(node_mask, 2, j.clamp(0, max(n - 1, 0))[:, None, :].expand(-1, n, -1))
    return (pos[None, None, :] < prefix[:, :, None]) | (tree_ok & in_tree[:, None, :])


def _masked_attention_fp32(q, k, v, mask, sm_scale):
    """q ``[B, Hq, N, D]``, k/v ``[B, Hkv, L, D]``, mask bool ``[B, N, L]``; fp32 softmax.

    A row with no visible key returns 0 (the kernels do the same). Keys a row does not see never
    reach it: masked scores are replaced (not added to), and non-finite V entries are zeroed before
    ``p @ v`` (where ``0 * inf`` would be NaN) while the rows that DO see a non-finite V are set
    to NaN for that head.
    """
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qf = q.float().reshape(B, Hkv, G, N, D)
    s = torch.einsum("bhgnd,bhld->bhgnl", qf, k.float()) * sm_scale
    m = mask[:, None, None]
    s = s.masked_fill(~m, float("-inf"))
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    p = torch.exp(s - mx)
    denom = p.sum(-1, keepdim=True)
    vf = v.float()
    fin = torch.isfinite(vf)
    o = torch.einsum("bhgnl,bhld->bhgnd", p, torch.where(fin, vf, 0.0))
    o = o / torch.where(denom > 0, denom, 1.0)
    seen_bad = (m & ~fin.all(-1)[:, :, None, None, :]).any(-1)  # [B, Hkv, G, N]
    o = torch.where(seen_bad[..., None], float("nan"), o)
    return o.reshape(B, Hq, N, D)


def tree_attention_ref(q, k_cache, v_cache, block_table, seq_lens, tree_mask, sm_scale=None):
    """Reference ``tree_attention``: fp32 masked softmax over the gathered KV.

    See ``loramix_kernels.tree_attention`` for the contract. Lengths outside ``[N, capacity]``
    (rejected before when value checks run) behave as in the Triton kernel: the prefix is
    clamped to the block table's capacity and tree positions outside it are invisible.
    """
    B, N, Hq, D = q.shape
    if sm_scale is None:
        sm_scale = default_scale(D)
    if B == 0 or Hq == 0:
        return torch.empty(B, N, Hq, D, dtype=q.dtype, device=q.device)
    cap = block_table.shape[1] * k_cache.shape[1]
    # Match the kernels on lengths past the block table: positions beyond it do not exist.
    lens = seq_lens.long().clamp(0, cap)
    max_len = int(lens.max())
    k, v = gather_kv(k_cache, v_cache, block_table, lens, max_len)
    mask = dense_tree_mask(tree_mask, seq_lens, N, max_len)
    mask = mask & (torch.arange(max_len, device=q.device)[None, None, :] < lens[:, None, None])
    o = _masked_attention_fp32(q.transpose(1, 2), k, v, mask, sm_scale)
    return o.transpose(1, 2).to(q.dtype).contiguous()


# --------------------------------------------------------------------------------------------------
# Benchmark baselines: what a user of stock PyTorch would run over a (pre-gathered) KV cache.
# --------------------------------------------------------------------------------------------------


def tree_attention_sdpa(q, k, v, dense_mask, sm_scale):
    """``scaled_dot_product_attention`` with a dense boolean mask (leaves the flash path).

    q ``[B, N, Hq, D]``, k/v ``[B, Hkv, L, D]`` (from :func:`gather_kv`), dense_mask bool
    ``[B, N, L]`` (from :func:`dense_tree_mask`). Returns ``[B, N, Hq, D]``.
    """
    Hq, Hkv = q.shape[2], k.shape[1]
    if Hq != Hkv:  # portable GQA (enable_gqa is not on every backend / version)
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=dense_mask[:, None],
                                       scale=sm_scale)
    return o.transpose(1, 2)


def flex_tree_block_mask(tree_mask, seq_lens, n: int, max_len: int):
    """FlexAttention ``BlockMask`` for the tree: prefix visible, tree part from the node mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    prefix = (seq_lens.long() - n).contiguous()
    node_mask = unpack_mask(tree_mask, n).contiguous()  # [B, N, N]

    def mask_mod(b, h, q_idx, kv_idx):
        j = kv_idx - prefix[b]
        in_tree = (j >= 0) & (j < n)
        return (kv_idx < prefix[b]) | (in_tree & node_mask[b, q_idx, j.clamp(0, n - 1)])

    return create_block_mask(mask_mod, tree_mask.shape[0], None, n, max_len,
                             device=tree_mask.device)


_flex_compiled = None


def tree_attention_flex(q, k, v, block_mask, sm_scale):
    """Compiled FlexAttention over the gathered KV.

    q ``[B, N, Hq, D]``, k/v ``[B, Hkv, L, D]``, block_mask from :func:`flex_tree_block_mask`.
    """
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if _flex_compiled is None:
        # One static compile per shape (a benchmark sweeps ~20): lift dynamo's recompile limit,
        # past which it would silently fall back to the (very slow) eager flex_attention.
        import torch._dynamo.config as dcfg

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(getattr(dcfg, name), 64))
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    gqa = q.shape[2] != k.shape[1]
    o = _flex_compiled(q.transpose(1, 2), k, v, block_mask=block_mask, scale=sm_scale,
                       enable_gqa=gqa)
    return o.transpose(1, 2)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
