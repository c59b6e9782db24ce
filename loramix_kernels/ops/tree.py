"""Speculative-decoding trees: ``build_tree`` and ``tree_attention`` (verification attention).

Schemas, launchers (validate, allocate, pick tiles, launch), CPU / CUDA / fake registrations and the
public, documented functions. Kernels are in ``loramix_kernels/kernels/tree.py``; the plain-PyTorch
reference (CPU fallback, test oracle) is ``loramix_kernels/reference/tree.py``.

Launchers read only tensor metadata (no ``.item()``, no host branch on values), so both ops can be
captured in a CUDA graph; data-dependent checks run only where ``_backend.check_values`` allows.
"""

from __future__ import annotations

import math

import torch
import triton

from .. import _backend
from .._checks import FLOAT_DTYPES, INDEX_DTYPES, check, check_shape, check_tensor, fail
from ..reference import tree as ref

torch.library.define(
    "loramix::build_tree",
    "(Tensor parents) -> (Tensor, Tensor, Tensor, Tensor)",
)
torch.library.define(
    "loramix::tree_attention",
    "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
    "Tensor tree_mask, float sm_scale) -> Tensor",
)

# ==================================================================================================
# build_tree
# ==================================================================================================

_BT = "build_tree"


def _check_build_tree(parents: torch.Tensor) -> tuple[int, int, int]:
    check_tensor(_BT, "parents", parents, ndim=2, dtypes=INDEX_DTYPES)
    B, N = parents.shape
    check(N >= 1, _BT, "parents", f"must have at least one node (the root), got shape {[B, N]}")
    return B, N, (N + 31) // 32


def _check_parent_values(parents: torch.Tensor) -> None:
    """Every parents[b, i] must be -1 or lie in [0, i) (so parents[b, 0] == -1)."""
    if parents.numel() == 0:
        return
    idx = torch.arange(parents.shape[1], device=parents.device)
    bad = (parents < -1) | (parents >= idx)
    if bool(bad.any()):
        b, i = (int(x) for x in bad.nonzero()[0])
        fail(_BT, "parents", f"[{b}, {i}] = {int(parents[b, i])} must be -1 or lie in [0, {i}) "
             "(a parent comes before its child; node 0 is the root, parent -1)")


def _empty_tree_outputs(parents, B, N, W):
    dev = parents.device
    return (torch.empty(B, N, W, dtype=torch.int32, device=dev),
            torch.empty(B, N, dtype=torch.int32, device=dev),
            torch.empty(B, N, dtype=torch.int32, device=dev),
            torch.empty(B, N, dtype=torch.int32, device=dev))


def _build_tree_config(N: int, W: int) -> dict:
    block_n = max(16, triton.next_power_of_2(N))
    # Keep the [BLOCK_N, CHUNK] comparison tile near 4K elements (registers, not local memory).
    chunk = max(16, min(block_n, 4096 // block_n))
    return dict(BLOCK_N=block_n, BLOCK_W=max(2, triton.next_power_of_2(W)), CHUNK=chunk,
                num_warps=4 if block_n <= 256 else 8)


def build_tree_forward(parents: torch.Tensor):
    """Launcher: validate, allocate, launch ``_build_tree_kernel`` with grid ``(B,)``."""
    from ..kernels.tree import _build_tree_kernel

    B, N, W = _check_build_tree(parents)
    if _backend.check_values(parents):
        _check_parent_values(parents)
    mask, depth, first, nsib = _empty_tree_outputs(parents, B, N, W)
    if B == 0:
        return mask, depth, first, nsib
    cfg = _build_tree_config(N, W)
    _build_tree_kernel[(B,)](
        parents, mask, depth, first, nsib,
        N, W,
        parents.stride(0), parents.stride(1),
        mask.stride(0), mask.stride(1), mask.stride(2),
        depth.stride(0), depth.stride(1),
        first.stride(0), first.stride(1),
        nsib.stride(0), nsib.stride(1),
        **cfg,
    )
    return mask, depth, first, nsib


def _build_tree_impl(parents):
    # One kernel for both devices: Triton where it runs (CUDA, or CPU under the interpreter
    # switch), else the reference; value checks wherever check_values allows (always on CPU).
    if _backend.use_triton(parents):
        return build_tree_forward(parents)
    _check_build_tree(parents)
    if _backend.check_values(parents):
        _check_parent_values(parents)
    return ref.build_tree(parents)


torch.library.register_kernel("loramix::build_tree", "cpu", _build_tree_impl)
torch.library.register_kernel("loramix::build_tree", "cuda", _build_tree_impl)


@torch.library.register_fake("loramix::build_tree")
def _build_tree_fake(parents):
    B, N, W = _check_build_tree(parents)
    return _empty_tree_outputs(parents, B, N, W)


def build_tree(parents: torch.Tensor):
    """Ancestor bitmask, depths and child lists of a batch of draft trees.

    Node 0 is the root (the last committed token); ``parents[b, i]`` is node i's parent, which
    comes before it (``0 <= parents[b, i] < i``), or -1 for the root and for unused padding nodes
    (a padding node sees only itself, has depth 0 and is nobody's child).

    Parameters
    ----------
    parents : torch.Tensor
        ``[B, N]`` int32 or int64 parent indices, ``parents[:, 0] == -1``. Any N >= 1 (N > 32
        spreads a row of the mask over several int32 words).

    Returns
    -------
    tree_mask : torch.Tensor
        ``[B, N, ceil(N / 32)]`` int32: bit ``j % 32`` of word ``j // 32`` of row i is set iff
        node j is node i or one of its ancestors (the TensorRT-LLM / FlashInfer packed layout;
        bit 31 is the sign bit). Pass it to :func:`tree_attention`.
    depth : torch.Tensor
        ``[B, N]`` int32, root 0. Node i's position id is ``prefix_len + depth[b, i]``.
    first_child : torch.Tensor
        ``[B, N]`` int32: the lowest-index child of node i, -1 for a leaf.
    next_sibling : torch.Tensor
        ``[B, N]`` int32: the next child (by index) of node i's parent, -1 where none.

    Raises
    ------
    ValueError
        On a parent that is not -1 and not in ``[0, i)`` (checked on CPU; on CUDA only after
        ``loramix_kernels.set_value_validation(True)``; the CUDA kernel treats such a parent as
        -1 and never reads out of bounds).

    Examples
    --------
    >>> import torch, loramix_kernels.ops.tree as T
    >>> mask, depth, first, nxt = T.build_tree(torch.tensor([[-1, 0, 0, 1]]))
    >>> mask[0, :, 0].tolist(), depth.tolist(), first.tolist(), nxt.tolist()
    ([1, 3, 5, 11], [[0, 1, 1, 2]], [[1, 3, -1, -1]], [[-1, 2, -1, -1]])
    """
    return torch.ops.loramix.build_tree(parents)


# ==================================================================================================
# tree_attention
# ==================================================================================================

_TA = "tree_attention"


def _check_tree_attention(q, k_cache, v_cache, block_table, seq_lens, tree_mask, sm_scale):
    """Metadata checks (shapes, dtypes, devices); returns the sizes."""
    check_tensor(_TA, "q", q, ndim=4, dtypes=FLOAT_DTYPES)
    dev = q.device
    if dev.type == "cuda":  # fp32 is a CPU-only dtype of this op (a tf32 dot would lose precision)
        check(q.dtype != torch.float32, _TA, "q",
              "must be float16 or bfloat16 on CUDA, got float32", TypeError)
    B, N, Hq, D = q.shape
    check(N >= 1, _TA, "q", f"must hold at least one tree node (dim 1), got shape {list(q.shape)}")
    check(D >= 1, _TA, "q", f"must have a non-empty head dim, got shape {list(q.shape)}")
    check_tensor(_TA, "k_cache", k_cache, ndim=4, device=dev)
    check(k_cache.dtype == q.dtype, _TA, "k_cache", f"must have q's dtype {q.dtype}, got "
          f"{k_cache.dtype}", TypeError)
    num_blocks, block_size, Hkv, Dk = k_cache.shape
    check(Dk == D, _TA, "k_cache", f"head dim (dim 3) must equal q's {D}, got {Dk}")
    check(num_blocks >= 1 and block_size >= 1 and Hkv >= 1, _TA, "k_cache",
          f"must be non-empty [num_blocks, block_size, Hkv, D], got {list(k_cache.shape)}")
    check(Hq % Hkv == 0, _TA, "q", f"heads ({Hq}) must be a multiple of k_cache's KV heads ({Hkv}) "
          "(GQA)")
    check_tensor(_TA, "v_cache", v_cache, ndim=4, device=dev)
    check(v_cache.dtype == q.dtype, _TA, "v_cache", f"must have q's dtype {q.dtype}, got "
          f"{v_cache.dtype}", TypeError)
    check_shape(_TA, "v_cache", v_cache, tuple(k_cache.shape))
    check_tensor(_TA, "block_table", block_table, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    check_shape(_TA, "block_table", block_table, (B, None))
    check(block_table.shape[1] >= 1, _TA, "block_table", "must have at least one column")
    check_tensor(_TA, "seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, device=dev)
    check_shape(_TA, "seq_lens", seq_lens, (B,))
    W = (N + 31) // 32
    check_tensor(_TA, "tree_mask", tree_mask, ndim=3, dtypes=(torch.int32,), device=dev)
    check_shape(_TA, "tree_mask", tree_mask, (B, N, W))
    check(isinstance(sm_scale, (float, int)) and math.isfinite(sm_scale), _TA, "sm_scale",
          f"must be a finite float, got {sm_scale!r}")
    return B, N, Hq, D, num_blocks, block_size, Hkv


def _check_tree_attention_values(block_table, seq_lens, N, num_blocks, block_size):
    lens = seq_lens.long()
    if bool((lens < N).any()):
        b = int((lens < N).nonzero()[0, 0])
        fail(_TA, "seq_lens", f"[{b}] = {int(lens[b])} is shorter than the {N} tree nodes it must "
             "include (the tree sits at positions seq_lens - N + i)")
    cap = block_table.shape[1] * block_size
    if bool((lens > cap).any()):
        b = int((lens > cap).nonzero()[0, 0])
        fail(_TA, "block_table", f"is too short: row {b} maps {cap} positions "
             f"({block_table.shape[1]} blocks of {block_size}) but seq_lens[{b}] = {int(lens[b])}")
    # Only the blocks a request uses must be valid; the tail of a row may hold padding (e.g. -1).
    used = torch.arange(block_table.shape[1], device=lens.device)[None, :] < \
        ((lens + block_size - 1) // block_size)[:, None]
    bad = used & ((block_table < 0) | (block_table >= num_blocks))
    if bool(bad.any()):
        b, m = (int(x) for x in bad.nonzero()[0])
        fail(_TA, "block_table", f"[{b}, {m}] = {int(block_table[b, m])} must lie in "
             f"[0, {num_blocks}) (num_blocks of k_cache)")


def _attention_config(M: int, D: int) -> dict:
    """Tiles by head dim so the K/V pipeline fits in shared memory and acc in registers.

    BLOCK_M holds query rows (tree nodes x GQA group), BLOCK_KV keys per step. The table was
    checked with ptxas for sm_90 (no register spills; shared memory <= 112 KB): D = 128 with 128
    rows halves BLOCK_KV, and D = 256 caps BLOCK_M at 64 (a 64 x 256 fp32 accumulator is already
    64 KB of registers) with a 32-key tile and two stages.
    """
    block_d = max(16, triton.next_power_of_2(D))
    max_m, block_kv, stages = (128, 64, 3) if block_d <= 128 else (64, 32, 2)
    block_m = min(max(16, triton.next_power_of_2(M)), max_m)
    if block_d == 128 and block_m == 128:
        block_kv = 32
    warps = 4 if block_m * block_d <= 32 * 128 else 8
    return dict(BLOCK_M=block_m, BLOCK_KV=block_kv, BLOCK_D=block_d,
                num_warps=warps, num_stages=stages)


def _num_splits(programs: int, max_kv: int, rows: int, block_kv: int, sms: int) -> int:
    """How many programs share one (request, KV head)'s prefix (flash-decoding).

    Only shapes are used (``max_kv`` = block-table capacity), never lengths, so the launch stays
    graph-capturable. Split when (row tiles x B x Hkv) programs cannot fill the GPU, aiming at
    about one wave, but give every split at least ``max(4 * rows, 256)`` keys: each split writes
    an fp32 partial of ``rows x D`` that the merge reads back, and that traffic must stay small
    next to the ``chunk x D`` K and V it saves (ratio ~ 2 * rows / chunk).
    """
    if programs >= sms:
        return 1
    want = triton.cdiv(sms, programs)
    min_chunk = max(4 * rows, 256, block_kv)
    return max(1, min(want, max_kv // min_chunk, 64))


def tree_attention_forward(q, k_cache, v_cache, block_table, seq_lens, tree_mask, sm_scale,
                           num_splits: int | None = None):
    """Launcher. ``num_splits`` overrides the split heuristic (tests of the merge path)."""
    from ..kernels.tree import _tree_attn_fwd_kernel, _tree_attn_merge_kernel

    B, N, Hq, D, num_blocks, block_size, Hkv = _check_tree_attention(
        q, k_cache, v_cache, block_table, seq_lens, tree_mask, sm_scale)
    if _backend.check_values(seq_lens):
        _check_tree_attention_values(block_table, seq_lens, N, num_blocks, block_size)
    out = torch.empty(B, N, Hq, D, dtype=q.dtype, device=q.device)
    if B == 0 or Hq == 0:
        return out

    G = Hq // Hkv
    M = N * G
    cfg = _attention_config(M, D)
    m_tiles = triton.cdiv(M, cfg["BLOCK_M"])
    max_kv = block_table.shape[1] * block_size
    if num_splits is None:
        num_splits = _num_splits(m_tiles * B * Hkv, max_kv, M, cfg["BLOCK_KV"],
                                 _backend.sm_count(q))
    num_splits = max(1, int(num_splits))
    # Per-split key range: a multiple of BLOCK_KV so only a split's last tile is ragged.
    chunk = triton.cdiv(triton.cdiv(max_kv, num_splits), cfg["BLOCK_KV"]) * cfg["BLOCK_KV"]
    split = num_splits > 1
    m_pad = m_tiles * cfg["BLOCK_M"]
    if split:
        o_part = torch.empty(B * Hkv, num_splits, m_pad, cfg["BLOCK_D"], dtype=torch.float32,
                             device=q.device)
        lse_part = torch.empty(B * Hkv, num_splits, m_pad, dtype=torch.float32, device=q.device)
    else:  # unused (SPLIT is a constexpr); any fp32 tensor fills the pointer slots
        o_part = lse_part = out.new_empty(0, dtype=torch.float32)

    grid = (m_tiles, B * Hkv, num_splits)
    _tree_attn_fwd_kernel[grid](
        q, k_cache, v_cache, block_table, seq_lens, tree_mask,
        out, o_part, lse_part,
        float(sm_scale) * math.log2(math.e),
        N, G, Hkv, D, M, m_pad,
        num_blocks, block_size, block_table.shape[1], chunk, num_splits,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        *block_table.stride(), seq_lens.stride(0), *tree_mask.stride(), *out.stride(),
        SPLIT=split, DOT_FP32=_backend.dot_fp32(q.dtype), **cfg,
    )
    if split:
        merge_m = min(32, cfg["BLOCK_M"])
        _tree_attn_merge_kernel[(triton.cdiv(M, merge_m), B * Hkv)](
            o_part, lse_part, out,
            G, Hkv, D, M, m_pad, num_splits,
            *out.stride(),
            BLOCK_M=merge_m, BLOCK_D=cfg["BLOCK_D"], num_warps=4,
        )
    return out


def _tree_attention_impl(q, k_cache, v_cache, block_table, seq_lens, tree_mask, sm_scale):
    if _backend.use_triton(q):
        return tree_attention_forward(q, k_cache, v_cache, block_table, seq_lens, tree_mask, sm_scale)
    _, N, _, _, num_blocks, block_size, _ = _check_tree_attention(
        q, k_cache, v_cache, block_table, seq_lens, tree_mask, sm_scale)
    if _backend.check_values(seq_lens):
        _check_tree_attention_values(block_table, seq_lens, N, num_blocks, block_size)
    return ref.tree_attention(q, k_cache, v_cache, block_table, seq_lens, tree_mask, sm_scale)


torch.library.register_kernel("loramix::tree_attention", "cpu", _tree_attention_impl)
torch.library.register_kernel("loramix::tree_attention", "cuda", _tree_attention_impl)


@torch.library.register_fake("loramix::tree_attention")
def _tree_attention_fake(q, k_cache, v_cache, block_table, seq_lens, tree_mask, sm_scale):
    _check_tree_attention(q, k_cache, v_cache, block_table, seq_lens, tree_mask, sm_scale)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   block_table: torch.Tensor, seq_lens: torch.Tensor, tree_mask: torch.Tensor,
                   sm_scale: float | None = None) -> torch.Tensor:
    """Attention of a whole draft tree over a paged KV cache, in one pass (tree verification).

    Tree node i of request b sits at cache position ``P_b + i`` with ``P_b = seq_lens[b] - N``
    (its K and V already written there). It attends every prefix position ``t < P_b`` and tree
    node j iff bit j of ``tree_mask[b, i]`` is set (from :func:`build_tree`: itself and its
    ancestors)::

        out[b, i, h] = softmax_t(sm_scale * q[b, i, h] . K[b, t, h // G]) @ V[b, ., h // G]

    over the visible t, with ``G = Hq // Hkv`` query heads per KV head (GQA), fp32 softmax.

    On CUDA one Triton kernel reads each prefix K/V tile once per (request, KV head) for all N
    nodes and all G heads, splits long prefixes over several programs when the batch is small
    (flash-decoding, log-sum-exp merge), and never synchronises with the host (graph-capturable).

    Parameters
    ----------
    q : torch.Tensor
        ``[B, N, Hq, D]`` float16 / bfloat16 (float32 on CPU); any strides.
    k_cache, v_cache : torch.Tensor
        ``[num_blocks, block_size, Hkv, D]``, q's dtype. A contiguous cache is
        ``block_size = max length`` with ``block_table[b] = [b]``.
    block_table : torch.Tensor
        ``[B, max_blocks]`` int32 / int64: physical block of each request's logical block. Entries
        past a request's length are never read (may be -1).
    seq_lens : torch.Tensor
        ``[B]`` int32 / int64: cached length including the N tree nodes; ``N <= seq_lens[b] <=
        max_blocks * block_size``. Requests may have different prefix lengths (0 included).
    tree_mask : torch.Tensor
        ``[B, N, ceil(N / 32)]`` int32 packed ancestor bitmask (see :func:`build_tree`).
    sm_scale : float, optional
        Softmax scale; default ``1 / sqrt(D)``.

    Returns
    -------
    torch.Tensor
        ``[B, N, Hq, D]`` in q's dtype (contiguous). A node whose row sees no key gets zeros.

    Raises
    ------
    ValueError / TypeError
        Wrong rank, shape, dtype or device mix; Hq not a multiple of Hkv. On CPU (on CUDA with
        ``set_value_validation(True)``) also seq_lens < N, a block table too short for seq_lens,
        and block ids outside ``[0, num_blocks)``; the CUDA kernel clamps them instead.

    Examples
    --------
    >>> import torch, loramix_kernels.ops.tree as T
    >>> B, N, Hq, Hkv, D, bs = 2, 4, 8, 2, 64, 16
    >>> mask, depth, _, _ = T.build_tree(torch.tensor([[-1, 0, 0, 1]] * B))
    >>> q = torch.randn(B, N, Hq, D)
    >>> k = torch.randn(8, bs, Hkv, D); v = torch.randn(8, bs, Hkv, D)
    >>> table = torch.arange(8, dtype=torch.int32).view(B, 4)
    >>> lens = torch.tensor([20, 4 + 9], dtype=torch.int32)  # prefixes 16 and 9
    >>> T.tree_attention(q, k, v, table, lens, mask).shape
    torch.Size([2, 4, 8, 64])
    """
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.ops.loramix.tree_attention(q, k_cache, v_cache, block_table, seq_lens, tree_mask,
                                            float(sm_scale))
