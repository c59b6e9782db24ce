"""Speculative-decoding trees: ``build_tree`` and ``tree_attention`` (verification attention).

Per op: ``validate_<op>`` (metadata checks, plus value checks where ``_backend.check_values``
allows), the Triton launcher ``<op>_triton`` (kernels in ``kernels/tree.py``, imported lazily: this
module imports without triton), the CPU kernel (``build_tree_ref`` from ``reference/tree.py``;
``tree_attention_cpu`` below, checked against ``tree_attention_ref``), the fake kernel, the
registration through ``ops/_registry.py`` and the public, documented function.

Launchers read only tensor metadata (no ``.item()``, no host branch on values), so both ops can be
captured in a CUDA graph. Contract: ``docs/API.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _backend, _native
from .._checks import (FLOAT_DTYPES, INDEX_DTYPES, check, check_parents, check_shape, check_tensor,
                       fail)
from .._tiles import cdiv, pow2_at_least
from ..reference.tree import build_tree_ref, default_scale, tree_attention_ref
from ._registry import OPS, register_op

# ==================================================================================================
# build_tree
# ==================================================================================================

_BT = "build_tree"


def validate_build_tree(parents):
    """Metadata checks and (where allowed) the parents rule shared with verify_*; returns
    ``(B, N, W)`` with ``W = ceil(N / 32)`` mask words per row."""
    check_tensor(_BT, "parents", parents, ndim=2, dtypes=INDEX_DTYPES)
    B, N = parents.shape
    check(N >= 1, _BT, "parents", f"must have at least one node (the root), got shape {[B, N]}")
    if _backend.check_values(parents):
        check_parents(_BT, parents)
    return B, N, cdiv(N, 32)


def _build_tree_outputs(parents, B, N, W):
    dev = parents.device
    return (torch.empty(B, N, W, dtype=torch.int32, device=dev),
            torch.empty(B, N, dtype=torch.int32, device=dev),
            torch.empty(B, N, dtype=torch.int32, device=dev),
            torch.empty(B, N, dtype=torch.int32, device=dev))


def _build_tree_config(N: int, W: int) -> dict:
    block_n = pow2_at_least(N, 16)
    # Keep the [BLOCK_N, CHUNK] comparison tile near 4K elements (registers, not local memory).
    chunk = max(16, min(block_n, 4096 // block_n))
    return dict(BLOCK_N=block_n, BLOCK_W=pow2_at_least(W, 2), CHUNK=chunk,
                num_warps=4 if block_n <= 256 else 8)


def build_tree_triton(parents):
    """Launcher: allocate, launch ``_build_tree_kernel`` with grid ``(B,)``."""
    B, N = parents.shape
    W = cdiv(N, 32)
    mask, depth, first, nsib = _build_tree_outputs(parents, B, N, W)
    if B == 0:
        return mask, depth, first, nsib
    from ..kernels.tree import _build_tree_kernel

    _build_tree_kernel[(B,)](
        parents, mask, depth, first, nsib,
        N, W,
        parents.stride(0), parents.stride(1),
        mask.stride(0), mask.stride(1), mask.stride(2),
        depth.stride(0), depth.stride(1),
        first.stride(0), first.stride(1),
        nsib.stride(0), nsib.stride(1),
        **_build_tree_config(N, W),
    )
    return mask, depth, first, nsib


register_op(
    "build_tree",
    "(Tensor parents) -> (Tensor, Tensor, Tensor, Tensor)",
    validate=validate_build_tree,
    triton=build_tree_triton,
    cpu=build_tree_ref,
    fake=lambda info, parents: _build_tree_outputs(parents, *info),
)


def build_tree(parents: torch.Tensor):
    """Ancestor bitmask, depths and child lists of a batch of draft trees.

    Node 0 is the root (the last committed token); ``parents[b, i]`` is node i's parent, which
    comes before it (``0 <= parents[b, i] < i``), or -1 for the root and for unused padding nodes
    (a padding node sees only itself and has depth 0). A node hanging from a padding node
    (directly or further down) is accepted: it is unreachable, and its mask row, depth and child
    lists follow the parents array as given (the one parents rule of every op, ``docs/API.md``).

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
        ``build_tree: parents ...`` on ``parents[b, 0] != -1`` or a parent that is not -1 and not
        in ``[0, i)``, compared in the input's own width (checked on CPU; on CUDA only after
        ``loramix_kernels.set_value_validation(True)`` or with ``LORAMIX_VALIDATE=1``; the CUDA
        kernel treats such a parent as -1 and never reads out of bounds).

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels import build_tree
    >>> mask, depth, first, nxt = build_tree(torch.tensor([[-1, 0, 0, 1]]))
    >>> mask[0, :, 0].tolist(), depth.tolist(), first.tolist(), nxt.tolist()
    ([1, 3, 5, 11], [[0, 1, 1, 2]], [[1, 3, -1, -1]], [[-1, 2, -1, -1]])
    """
    return OPS["build_tree"](parents)


# ==================================================================================================
# tree_attention
# ==================================================================================================

_TA = "tree_attention"


def validate_tree_attention(q, k_cache, v_cache, block_table, seq_lens, tree_mask, sm_scale=None):
    """Shapes, dtypes, devices, sm_scale; where ``check_values`` allows also the lengths (in
    their own width) and the block ids a request uses. Messages are formatted only on failure
    (this runs on every call: per-call overhead at decode shapes)."""
    check_tensor(_TA, "q", q, ndim=4, dtypes=FLOAT_DTYPES)
    dev = q.device
    if dev.type == "cuda":  # fp32 is a CPU-only dtype of this op (a tf32 dot would lose precision)
        if q.dtype == torch.float32:
            fail(_TA, "q", "must be float16 or bfloat16 on CUDA, got float32", TypeError)
    B, N, Hq, D = q.shape
    if N < 1:
        fail(_TA, "q", f"must hold at least one tree node (dim 1), got shape {list(q.shape)}")
    if D < 1:
        fail(_TA, "q", f"must have a non-empty head dim, got shape {list(q.shape)}")
    check_tensor(_TA, "k_cache", k_cache, ndim=4, device=dev)
    if k_cache.dtype != q.dtype:
        fail(_TA, "k_cache", f"must have q's dtype {q.dtype}, got {k_cache.dtype}", TypeError)
    num_blocks, block_size, Hkv, Dk = k_cache.shape
    if Dk != D:
        fail(_TA, "k_cache", f"head dim (dim 3) must equal q's {D}, got {Dk}")
    if not (num_blocks >= 1 and block_size >= 1 and Hkv >= 1):
        fail(_TA, "k_cache",
             f"must be non-empty [num_blocks, block_size, Hkv, D], got {list(k_cache.shape)}")
    if Hq % Hkv != 0:
        fail(_TA, "q", f"heads ({Hq}) must be a multiple of k_cache's KV heads ({Hkv}) (GQA)")
    check_tensor(_TA, "v_cache", v_cache, ndim=4, device=dev)
    if v_cache.dtype != q.dtype:
        fail(_TA, "v_cache", f"must have q's dtype {q.dtype}, got {v_cache.dtype}", TypeError)
    check_shape(_TA, "v_cache", v_cache, tuple(k_cache.shape))
    check_tensor(_TA, "block_table", block_table, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    check_shape(_TA, "block_table", block_table, (B, None))
    check(block_table.shape[1] >= 1, _TA, "block_table", "must have at least one column")
    check_tensor(_TA, "seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, device=dev)
    check_shape(_TA, "seq_lens", seq_lens, (B,))
    check_tensor(_TA, "tree_mask", tree_mask, ndim=3, dtypes=(torch.int32,), device=dev)
    check_shape(_TA, "tree_mask", tree_mask, (B, N, cdiv(N, 32)))
    if not (sm_scale is None or (isinstance(sm_scale, (float, int)) and math.isfinite(sm_scale))):
        fail(_TA, "sm_scale", f"must be a finite float or None, got {sm_scale!r}")
    if B > 0 and _backend.check_values(seq_lens):
        _check_tree_attention_values(block_table, seq_lens, N, num_blocks, block_size)


def _check_tree_attention_values(block_table, seq_lens, N, num_blocks, block_size):
    # Cheap first (one reduction per tensor, compared as Python ints: in the input's own width,
    # an int64 2^32 + 10 is a length past the table, not 10); the precise search runs only to
    # name the offending entry, or when the table holds out-of-range ids (padding) somewhere.
    lo, hi = (int(x) for x in seq_lens.aminmax())
    if lo < N:
        b = int((seq_lens < N).nonzero()[0, 0])
        fail(_TA, "seq_lens", f"[{b}] = {int(seq_lens[b])} is shorter than the {N} tree nodes it "
             "must include (the tree sits at positions seq_lens - N + i)")
    cap = block_table.shape[1] * block_size
    if hi > cap:
        b = int((seq_lens > cap).nonzero()[0, 0])
        fail(_TA, "block_table", f"is too short: row {b} maps {cap} positions "
             f"({block_table.shape[1]} blocks of {block_size}) but seq_lens[{b}] = "
             f"{int(seq_lens[b])}")
    tlo, thi = (int(x) for x in block_table.aminmax())
    if tlo >= 0 and thi < num_blocks:
        return
    # Only the blocks a request uses must be valid; the tail of a row may hold padding (e.g. -1).
    used = torch.arange(block_table.shape[1], device=seq_lens.device)[None, :] < \
        ((seq_lens.long() + block_size - 1) // block_size)[:, None]
    bad = used & ((block_table < 0) | (block_table >= num_blocks))
    if bool(bad.any()):
        b, m = (int(x) for x in bad.nonzero()[0])
        fail(_TA, "block_table", f"[{b}, {m}] = {int(block_table[b, m])} must lie in "
             f"[0, {num_blocks}) (num_blocks of k_cache)")


def _tree_attention_fake(info, q, *args):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _attention_config(M: int, D: int) -> dict:
    """Tiles by head dim so the K/V pipeline fits in shared memory and acc in registers.

    BLOCK_M holds query rows (tree nodes x GQA group), BLOCK_KV prefix keys per step, BLOCK_T
    tree keys per step. The table was
    checked with ptxas for sm_90 (no register spills; shared memory <= 112 KB): D = 128 with 128
    rows halves BLOCK_KV, and D = 256 caps BLOCK_M at 64 (a 64 x 256 fp32 accumulator is already
    64 KB of registers) with a 32-key tile and two stages.
    """
    block_d = pow2_at_least(D, 16)
    max_m, block_kv, stages = (128, 64, 3) if block_d <= 128 else (64, 32, 2)
    block_m = min(pow2_at_least(M, 16), max_m)
    if block_d == 128 and block_m == 128:
        block_kv = 32
    warps = 4 if block_m * block_d <= 32 * 128 else 8
    # Tree keys (N of them, seen by some rows only: V is sanitised there) in 16-key tiles, so
    # that part never sets the register peak.
    return dict(BLOCK_M=block_m, BLOCK_KV=block_kv, BLOCK_D=block_d, BLOCK_T=16,
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
    want = cdiv(sms, programs)
    min_chunk = max(4 * rows, 256, block_kv)
    return max(1, min(want, max_kv // min_chunk, 64))


def tree_attention_triton(q, k_cache, v_cache, block_table, seq_lens, tree_mask, sm_scale=None,
                          num_splits: int | None = None):
    """Launcher: tiles, split-KV heuristic, ``_tree_attention_kernel`` (+ the merge when split).
    ``num_splits`` overrides the heuristic (tests of the merge path)."""
    B, N, Hq, D = q.shape
    num_blocks, block_size, Hkv, _ = k_cache.shape
    sm_scale = default_scale(D) if sm_scale is None else float(sm_scale)
    out = torch.empty(B, N, Hq, D, dtype=q.dtype, device=q.device)
    if B == 0 or Hq == 0:
        return out
    from ..kernels.tree import _tree_attention_kernel, _tree_attention_merge_kernel

    G = Hq // Hkv
    M = N * G
    cfg = _attention_config(M, D)
    m_tiles = cdiv(M, cfg["BLOCK_M"])
    max_kv = block_table.shape[1] * block_size
    if num_splits is None:
        num_splits = _num_splits(m_tiles * B * Hkv, max_kv, M, cfg["BLOCK_KV"],
                                 _backend.sm_count(q))
    num_splits = max(1, int(num_splits))
    # Per-split key range: a multiple of BLOCK_KV so only a split's last tile is ragged.
    chunk = cdiv(cdiv(max_kv, num_splits), cfg["BLOCK_KV"]) * cfg["BLOCK_KV"]
    split = num_splits > 1
    m_pad = m_tiles * cfg["BLOCK_M"]
    if split:
        o_part = torch.empty(B * Hkv, num_splits, m_pad, cfg["BLOCK_D"], dtype=torch.float32,
                             device=q.device)
        lse_part = torch.empty(B * Hkv, num_splits, m_pad, dtype=torch.float32, device=q.device)
    else:  # unused (SPLIT is a constexpr); any fp32 tensor fills the pointer slots
        o_part = lse_part = out.new_empty(0, dtype=torch.float32)

    grid = (m_tiles, B * Hkv, num_splits)
    _tree_attention_kernel[grid](
        q, k_cache, v_cache, block_table, seq_lens, tree_mask,
        out, o_part, lse_part,
        sm_scale * math.log2(math.e),
        N, G, Hkv, D, M, m_pad,
        num_blocks, block_size, block_table.shape[1], chunk, num_splits,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        *block_table.stride(), seq_lens.stride(0), *tree_mask.stride(), *out.stride(),
        SPLIT=split, DOT_FP32=_backend.dot_fp32(q.dtype), **cfg,
    )
    if split:
        merge_m = min(32, cfg["BLOCK_M"])
        _tree_attention_merge_kernel[(cdiv(M, merge_m), B * Hkv)](
            o_part, lse_part, out,
            G, Hkv, D, M, m_pad, num_splits,
            *out.stride(),
            BLOCK_M=merge_m, BLOCK_D=cfg["BLOCK_D"], num_warps=4,
        )
    return out


# --------------------------------------------------------------------------------------------------
# CPU kernel
# --------------------------------------------------------------------------------------------------

#: ``1 << b`` as int32 for b = 0..31 (bit 31 is the sign bit): unpacks the tree mask with one ``&``.
_BITS = torch.tensor([1 << b if b < 31 else -(1 << 31) for b in range(32)], dtype=torch.int32)
_ARANGE = torch.arange(4096)


def _arange(n: int) -> torch.Tensor:
    """``torch.arange(n)`` (int64, CPU) as a slice of a cached tensor: one op less per use."""
    global _ARANGE
    if n > _ARANGE.numel():
        _ARANGE = torch.arange(max(n, 2 * _ARANGE.numel()))
    return _ARANGE[:n]


#: Fold the GQA group into the query rows while N * G stays at most this (measured on CPU: folding
#: wins at decode sizes, the per-row mask costs more than it saves on wide trees).
_FOLD_MAX_ROWS = 256


def tree_attention_cpu(q, k_cache, v_cache, block_table, seq_lens, tree_mask, sm_scale=None):
    """CPU kernel: gather each request's keys once, one fused attention call for all of them.

    Every request's keys are laid out as ``[its prefix 0..Lp) | its N tree nodes]`` (``Lp`` = the
    longest prefix; a shorter prefix is masked and its tail zeroed), gathered from the paged cache
    with one ``index_select`` per cache. K and V are never repeated per query head: small trees
    fold the GQA group into the query rows (``[B, Hkv, N * G, D]``), wide ones use SDPA's GQA.
    PyTorch's fused CPU attention (``scaled_dot_product_attention``: blocked, fp32 accumulation
    and softmax) runs with an additive mask that is non-zero only on the tree columns. Equal to
    ``tree_attention_ref`` (the fp32 oracle) within the dtype's tolerance, with the same rules
    for garbage: non-finite K / V in tree slots a row does not see cannot reach it (zeroed, and
    only the rows that see them get NaN); a row that sees no key gets 0. Bad lengths or block ids
    (value checks off) are clamped as in the Triton kernel.

    With the native extension built, ``csrc/tree.cpp`` computes the attention itself, straight
    out of the paged cache (no gather, no mask tensor, no SDPA call; SIMD over the query rows, an
    online softmax over chunks of 32 keys; fp32 throughout), and the op's direct CPU kernel runs it
    without entering Python; when a non-finite value takes part or a length lies outside the
    table, the code below runs instead (the slow path that sanitises garbage).
    """
    if q.device.type != "cpu":  # LORAMIX_BACKEND=reference on CUDA tensors (a debugging aid)
        return tree_attention_ref(q, k_cache, v_cache, block_table, seq_lens, tree_mask, sm_scale)
    scale = default_scale(q.shape[3]) if sm_scale is None else float(sm_scale)
    out = _tree_attention_native(q, k_cache, v_cache, block_table, seq_lens, tree_mask, scale,
                                 check_meta=False, name=lambda: _check_tree_attention_values(
                                     block_table, seq_lens, q.shape[1], *k_cache.shape[:2]))
    if out is None:
        return _tree_attention_torch(q, k_cache, v_cache, block_table, seq_lens, tree_mask, scale)
    return out


def _tree_attention_native(q, k_cache, v_cache, block_table, seq_lens, tree_mask, scale, *,
                           check_meta, name):
    """The native fast path (csrc/tree.cpp): its output, or None when the PyTorch path must run
    (no native extension, or its fallback status). A rejected argument: ``name()`` raises naming
    it (the Python checks)."""
    fn = _native.op("_tree_attention_cpu")
    if fn is None:
        return None
    out, status = fn(q, k_cache, v_cache, block_table, seq_lens, tree_mask, scale,
                     _backend.check_values(seq_lens) and q.shape[0] > 0, check_meta)
    if status == 0:
        return out
    if status == 2:
        name()
        raise _native.disagrees(_TA)
    return None


def _tree_attention_checked(q, k_cache, v_cache, block_table, seq_lens, tree_mask, sm_scale=None):
    """``checked_cpu``: the native kernel checks the metadata and values itself (the Python
    validator runs only to name a rejected argument), then the fast path; a fallback status runs
    the PyTorch path below (``_tree_attention_torch``)."""
    if _native.op("_tree_attention_cpu") is None:
        return NotImplemented
    args = (q, k_cache, v_cache, block_table, seq_lens, tree_mask)
    if q.dim() != 4 or not (sm_scale is None or (isinstance(sm_scale, (float, int))
                                                 and math.isfinite(sm_scale))):
        validate_tree_attention(*args, sm_scale)  # raises
    scale = default_scale(q.shape[3]) if sm_scale is None else float(sm_scale)
    out = _tree_attention_native(*args, scale, check_meta=True,
                                 name=lambda: validate_tree_attention(*args, sm_scale))
    return _tree_attention_torch(*args, scale) if out is None else out


def _tree_attention_torch(q, k_cache, v_cache, block_table, seq_lens, tree_mask, scale):
    """The PyTorch CPU path of ``tree_attention_cpu`` (gather, mask, fused SDPA, careful garbage
    handling)."""
    B, N, Hq, D = q.shape
    num_blocks, bs, Hkv, _ = k_cache.shape
    out = torch.empty(B, N, Hq, D, dtype=q.dtype)
    if out.numel() == 0:
        return out
    G = Hq // Hkv
    M = N * G
    cap = block_table.shape[1] * bs
    base = seq_lens.long() - N  # position of tree node 0 (int64: no wrap)
    bmin, bmax = (int(x) for x in base.aminmax())
    in_range = bmin >= 0 and bmax + N <= cap  # always true once the values were checked
    if in_range:
        prefix, pmin, Lp = base, bmin, bmax
    else:
        prefix = base.clamp(0, cap)
        pmin, Lp = min(max(bmin, 0), cap), min(max(bmax, 0), cap)
    L = Lp + N
    tpos = base[:, None] + _arange(N)
    pos = torch.cat([_arange(Lp).expand(B, Lp), tpos], 1)  # [B, L] cache positions
    if not in_range:
        tvalid = (tpos >= 0) & (tpos < cap)
        pos.clamp_(0, cap - 1)
    # Clamped always: a shorter prefix's masked tail may map to padding entries (-1) of its row.
    blk = block_table.gather(1, pos // bs).clamp_(0, num_blocks - 1)
    slot = (pos % bs).add_(blk, alpha=bs)  # int64 (an int32 block id times bs could wrap)
    if k_cache.stride(0) == bs * k_cache.stride(1) and v_cache.stride(0) == bs * v_cache.stride(1):
        slot = slot.view(-1)
        k = k_cache.flatten(0, 1).index_select(0, slot).view(B, L, Hkv, D)
        v = v_cache.flatten(0, 1).index_select(0, slot).view(B, L, Hkv, D)
    else:  # block and slot dims not mergeable (an odd view): gather by (block, offset)
        k = k_cache[slot // bs, slot % bs]
        v = v_cache[slot // bs, slot % bs]

    hidden = (tree_mask[..., None] & _BITS).view(B, N, -1)[..., :N].eq(0)  # [B, N, N]: not seen
    if not in_range:
        hidden |= ~tvalid[:, None, :]
    # Small trees fold the GQA group into the query rows (one [N * G, L] problem per KV head:
    # bigger blocks for SDPA, no mask broadcast needed since the mask is materialised per row);
    # wide trees keep [N, L] per query head with SDPA's own GQA and a mask broadcast over heads.
    fold = M <= _FOLD_MAX_ROWS
    rows = G if fold else 1
    ninf = float("-inf")
    # The additive mask [B, N, rows, L] in one write: [prefix columns | tree columns].
    tree_part = torch.zeros(B, N, 1, N, dtype=q.dtype).masked_fill_(hidden[:, :, None, :], ninf)
    tail = None
    if pmin < Lp:  # shorter prefixes: their tail of [0, Lp) is masked
        tail = _arange(Lp)[None, :] >= prefix[:, None]  # [B, Lp], one pass for every request
        prefix_part = torch.zeros(B, 1, 1, Lp, dtype=q.dtype).masked_fill_(tail[:, None, None, :], ninf)
    else:
        prefix_part = torch.zeros(1, 1, 1, Lp, dtype=q.dtype)
    mask = torch.cat([prefix_part.expand(B, N, rows, Lp), tree_part.expand(B, N, rows, N)], -1)
    out5 = out.view(B, N, Hkv, G, D)
    _sdpa_into(out, q, k, v, mask, scale, fold)
    # Masked keys get weight exactly 0, but 0 * NaN = NaN: a NaN / inf in a slot a row does not
    # see (a shorter prefix's tail, a padding node's never-written tree slot) would reach it, and
    # a row that sees nothing gets NaN from SDPA. Neither can hide in a finite output, so one sum
    # over the (small) output decides; only then the slow path zeroes what no row may see, poisons
    # the rows that see garbage and runs again.
    if math.isfinite(float(out.sum())):
        return out
    if tail is not None:
        k[:, :Lp].masked_fill_(tail[:, :, None, None], 0)
        v[:, :Lp].masked_fill_(tail[:, :, None, None], 0)
    kt, vt = k[:, Lp:], v[:, Lp:]
    fin = torch.isfinite(kt) & torch.isfinite(vt)
    kt.masked_fill_(~fin, 0)
    vt.masked_fill_(~fin, 0)
    garbage = ~fin.all(-1)  # [B, N, Hkv]: tree slot j of KV head h holds NaN / inf
    poisoned = (~hidden[:, :, None, :] & garbage.permute(0, 2, 1)[:, None, :, :]).any(-1)
    _sdpa_into(out, q, k, v, mask, scale, fold)
    if pmin == 0:  # a row with no prefix and no visible tree node sees nothing: 0, not NaN
        dead = hidden.all(-1) & (prefix == 0)[:, None]
        if bool(dead.any()):
            out.masked_fill_(dead[:, :, None, None], 0)
    out5.masked_fill_(poisoned[..., None, None], float("nan"))  # sees a garbage slot of this head
    return out


def _sdpa_into(out, q, k, v, mask, scale, fold):
    """``out [B, N, Hq, D]`` = SDPA of ``q`` over the gathered ``k`` / ``v [B, L, Hkv, D]`` with the
    additive ``mask [B, N, rows, L]``, the GQA group folded into the query rows or not."""
    B, N, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    L = k.shape[1]
    if fold:
        qf = q.view(B, N, Hkv, G, D).permute(0, 2, 1, 3, 4).reshape(B, Hkv, N * G, D)
        o = F.scaled_dot_product_attention(qf, k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask.view(B, 1, N * G, L), scale=scale)
        out.view(B, N, Hkv, G, D).copy_(o.view(B, Hkv, N, G, D).permute(0, 2, 1, 3, 4))
    else:
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), attn_mask=mask.view(B, 1, N, L),
                                           scale=scale, enable_gqa=G > 1)
        out.copy_(o.transpose(1, 2))


register_op(
    "tree_attention",
    "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
    "Tensor tree_mask, float? sm_scale=None) -> Tensor",
    validate=validate_tree_attention,
    triton=tree_attention_triton,
    cpu=tree_attention_cpu,
    fake=_tree_attention_fake,
    checked_cpu=_tree_attention_checked,
    direct_cpu=True,
)


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
        Softmax scale; default (None, also in the raw op's schema) ``1 / sqrt(D)``.

    Every tensor argument may have any strides.

    Returns
    -------
    torch.Tensor
        ``[B, N, Hq, D]`` in q's dtype (contiguous). A node whose row sees no key gets zeros.
        Cache slots a node does not see never influence its output, whatever they hold (a
        ``torch.empty`` cache, NaN / inf in a padding node's never-written slot or past a
        request's length); a node that does see a non-finite K or V gets a non-finite output.

    Raises
    ------
    ValueError / TypeError
        Wrong rank, shape, dtype or device mix; Hq not a multiple of Hkv. On CPU (on CUDA with
        ``set_value_validation(True)`` or ``LORAMIX_VALIDATE=1``) also seq_lens < N, a block
        table too short for seq_lens, and block ids outside ``[0, num_blocks)``; the kernels
        clamp them instead (lengths compared in their own width, never wrapped).

    Notes
    -----
    On CPU (native extension built) a C++ kernel computes the attention straight out of the paged
    cache, K and V read once per tile of query rows (tree nodes x the KV head's query heads);
    without the extension the op gathers each request's keys once and runs PyTorch's fused
    attention with the GQA group folded into the query rows (``tree_attention_cpu``).
    ``reference/tree.py`` keeps the plain fp32 form both are tested against.

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels import build_tree, tree_attention
    >>> B, N, Hq, Hkv, D, bs = 2, 4, 8, 2, 64, 16
    >>> mask, depth, _, _ = build_tree(torch.tensor([[-1, 0, 0, 1]] * B))
    >>> q = torch.randn(B, N, Hq, D)
    >>> k = torch.randn(8, bs, Hkv, D); v = torch.randn(8, bs, Hkv, D)
    >>> table = torch.arange(8, dtype=torch.int32).view(B, 4)
    >>> lens = torch.tensor([20, 4 + 9], dtype=torch.int32)  # prefixes 16 and 9
    >>> tree_attention(q, k, v, table, lens, mask).shape
    torch.Size([2, 4, 8, 64])
    """
    return OPS["tree_attention"](q, k_cache, v_cache, block_table, seq_lens, tree_mask,
                                 None if sm_scale is None else float(sm_scale))
