"""Paged KV-cache ops: compaction after tree verification (``compact_kv_``, and
``compact_kv_layers_`` for every layer's cache in one launch) and writing new tokens' K / V by slot
(``kv_write_``, vLLM's reshape_and_cache).

Per op: ``validate_<op>``, the launcher ``<op>_triton`` (tiles, launch of ``kernels/kv.py``),
the registration (``ops/_registry.py``; CPU kernel: ``reference/kv.py``, no autograd: an in-place
cache update) and the public function.
"""

from __future__ import annotations

import torch

from .. import _backend, _native
from .._checks import (FLOAT_DTYPES, INDEX_DTYPES, check, check_index_range, check_no_alias,
                       check_shape, check_tensor, check_writable, fail)
from .._tiles import cdiv, next_pow2
from ..reference.kv import compact_kv_layers_ref_, compact_kv_ref_, kv_write_ref_
from ._registry import OPS, register_op

_OP = "compact_kv_"


def _compact_cpu(op, ref, k_cache, v_cache, block_table, seq_lens, accept_index, accept_len):
    """CPU kernel of compact_kv_ / compact_kv_layers_ (after validation): the native walk (value
    checks, then the row moves of every layer) when built, else the vectorised gather-then-scatter
    ``ref``."""
    fn = _native.op("_compact_kv_cpu") if accept_index.device.type == "cpu" else None
    if fn is None:
        return ref(k_cache, v_cache, block_table, seq_lens, accept_index, accept_len)
    check = _backend.check_values(accept_index)
    if fn(k_cache, v_cache, block_table, seq_lens, accept_index, accept_len, check, False,
          op == _OP_LAYERS) != 0:
        _check_compact_values(op, block_table, seq_lens, accept_index, accept_len,
                              *k_cache.shape[-4:-2])
        raise _native.disagrees(op)


def _compact_checked(op, validate, *args):
    """``checked_cpu`` of compact_kv_ / compact_kv_layers_: the native kernel checks the metadata
    and the values itself, then moves; the Python validator runs only to name what it rejected
    (or to decide exactly where two address ranges meet)."""
    fn = _native.op("_compact_kv_cpu")
    if fn is None:
        return NotImplemented
    check, layers = _backend.check_values(args[4]), op == _OP_LAYERS
    if fn(*args, check, True, layers) == 0:
        return None
    validate(*args)  # raises naming the argument, unless the caches only share an allocation
    if fn(*args, check, False, layers) != 0:
        raise _native.disagrees(op)
    return None


def validate_compact_kv(k_cache, v_cache, block_table, seq_lens, accept_index, accept_len):
    """Metadata checks, plus (where ``check_values`` allows) the path, lengths and blocks used."""
    _check_compact(_OP, k_cache, v_cache, block_table, seq_lens, accept_index, accept_len, layers=False)


def _check_compact(op, k_cache, v_cache, block_table, seq_lens, accept_index, accept_len, *, layers):
    """The checks of ``compact_kv_`` (``layers=False``, caches ``[num_blocks, block_size, Hkv, D]``)
    and ``compact_kv_layers_`` (``layers=True``, caches ``[L, num_blocks, block_size, Hkv, D]``);
    errors name ``op``."""
    ndim = 5 if layers else 4
    kname, vname = ("k_caches", "v_caches") if layers else ("k_cache", "v_cache")
    check_tensor(op, kname, k_cache, ndim=ndim, dtypes=FLOAT_DTYPES)
    dev = k_cache.device
    check_tensor(op, vname, v_cache, ndim=ndim, dtypes=FLOAT_DTYPES, device=dev)
    check_shape(op, vname, v_cache, tuple(k_cache.shape))
    num_blocks, block_size, H, D = k_cache.shape[-4:]
    check_tensor(op, "accept_index", accept_index, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    B, N = accept_index.shape
    check(N >= 1, op, "accept_index", "must have at least one column (the root)")
    check_tensor(op, "accept_len", accept_len, ndim=1, dtypes=INDEX_DTYPES, device=dev)
    check_shape(op, "accept_len", accept_len, (B,))
    check_tensor(op, "block_table", block_table, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    check(block_table.shape[0] == B, op, "block_table",
          f"must have shape [B={B}, max_blocks], got {list(block_table.shape)}")
    check(block_table.shape[1] >= 1, op, "block_table", "must have at least one block per request")
    check_tensor(op, "seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, device=dev)
    check_shape(op, "seq_lens", seq_lens, (B,))
    # In-place outputs: no self-overlap, and the two caches must not share memory with each other
    # or with the index inputs (k_cache and v_cache may be the two halves of one allocation).
    indices = dict(block_table=block_table, seq_lens=seq_lens, accept_index=accept_index,
                   accept_len=accept_len)
    check_writable(op, kname, k_cache)
    check_writable(op, vname, v_cache)
    check_no_alias(op, kname, k_cache, {vname: v_cache, **indices})
    check_no_alias(op, vname, v_cache, indices)
    if B > 0 and _backend.check_values(accept_index):
        _check_compact_values(op, block_table, seq_lens, accept_index, accept_len, num_blocks,
                              block_size)


def _check_compact_values(op, block_table, seq_lens, accept_index, accept_len, num_blocks,
                          block_size):
    """The value checks of ``compact_kv_`` / ``compact_kv_layers_`` (vectorised torch): raise naming
    the first invalid argument. The native kernel makes the same checks in its walk and calls this
    only to name what it rejected."""
    B, N = accept_index.shape
    dev = accept_index.device
    check_index_range(op, "accept_len", accept_len, 0, N)
    cap = block_table.shape[1] * block_size
    check_index_range(op, "seq_lens", seq_lens, N, cap + 1)
    a = accept_index.long()
    j = torch.arange(N, device=dev)[None, :]
    used = j <= accept_len.long()[:, None]
    check(bool(((a >= 0) & (a < N) | ~used).all()), op, "accept_index",
          f"entries on the accepted path (j <= accept_len) must lie in [0, {N})")
    prev = torch.cat([a.new_full((B, 1), -1), a[:, :-1]], 1)
    check(bool(((a > prev) | ~used).all()), op, "accept_index",
          "must be strictly increasing along the accepted path (a child comes after its parent)")
    base = seq_lens.long()[:, None] - N
    pos = torch.cat([(base + a)[used], (base + j).expand(B, N)[used]])
    rows = torch.arange(B, device=dev)[:, None].expand(B, N)[used].repeat(2)
    blk = block_table.long()[rows, pos // block_size]
    if blk.numel() and not bool(((blk >= 0) & (blk < num_blocks)).all()):
        fail(op, "block_table", f"entries used by the move must lie in [0, {num_blocks})")


def compact_kv_triton(k_cache, v_cache, block_table, seq_lens, accept_index, accept_len):
    """Launcher: split heads across programs (never the path), launch ``_compact_kv_kernel``."""
    from ..kernels.kv import _compact_kv_kernel

    B, N = accept_index.shape
    num_blocks, block_size, H, D = k_cache.shape
    if B == 0 or H == 0 or D == 0:
        return
    block_h, block_d = row_copy_tiles(H, D)
    grid = (B, cdiv(H, block_h))
    _compact_kv_kernel[grid](
        k_cache, v_cache, block_table, seq_lens, accept_index, accept_len,
        N, H, D, block_size, block_table.shape[1], num_blocks,
        *k_cache.stride(), *v_cache.stride(),
        block_table.stride(0), block_table.stride(1), seq_lens.stride(0),
        accept_index.stride(0), accept_index.stride(1), accept_len.stride(0),
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )


#: Elements of one program's [BLOCK_H, BLOCK_D] row copy (2048 fp16 = 4 KB).
COPY_ELEMS = 2048


def row_copy_tiles(H: int, D: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_D) of the KV row-copy kernels: ~2-4 KB per program and step, enough bytes
    in flight while (requests or tokens) x head tiles still fill the GPU at small batches."""
    block_d = next_pow2(D)
    return max(1, min(next_pow2(H), COPY_ELEMS // block_d)), block_d

register_op(
    "compact_kv_",
    "(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor block_table, Tensor seq_lens, "
    "Tensor accept_index, Tensor accept_len) -> ()",
    validate=validate_compact_kv,
    triton=compact_kv_triton,
    cpu=lambda *args: _compact_cpu(_OP, compact_kv_ref_, *args),
    checked_cpu=lambda *args: _compact_checked(_OP, validate_compact_kv, *args),
    fake=lambda info, *args: None,
)


def compact_kv_(k_cache, v_cache, block_table, seq_lens, accept_index, accept_len):
    """Move the accepted path's K and V into consecutive cache positions, in place.

    With ``N = accept_index.shape[1]`` and ``base = seq_lens[b] - N`` (the tree's N nodes sit at
    positions ``base + i``), the K and V of node ``accept_index[b, j]`` move from position
    ``base + accept_index[b, j]`` to ``base + j`` for ``j = 0..accept_len[b]``. Race-free in place
    (a source of one node may be the destination of another). The caller then sets
    ``seq_lens[b] = base + accept_len[b] + 1``.

    Parameters
    ----------
    k_cache, v_cache : torch.Tensor
        ``[num_blocks, block_size, Hkv, D]`` paged caches (fp16 / bf16 / fp32), updated in place.
    block_table : torch.Tensor
        ``[B, max_blocks]`` int32 / int64 physical block of each logical block.
    seq_lens : torch.Tensor
        ``[B]`` int32 / int64 cached length including the N tree nodes.
    accept_index, accept_len : torch.Tensor
        ``[B, N]`` and ``[B]`` from :func:`~loramix_kernels.verify_greedy` /
        :func:`~loramix_kernels.verify_sampling` (strictly increasing path starting at node 0).

    Every argument may have any strides. The caches are written in place: they must not overlap
    themselves (no ``expand()``-ed views), each other, or the index inputs; ``k_cache`` and
    ``v_cache`` may be the two halves of one allocation. Contract: ``docs/API.md``.

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels import compact_kv_
    >>> k = torch.arange(8.).view(1, 8, 1, 1); v = k.clone()
    >>> compact_kv_(k, v, torch.tensor([[0]]), torch.tensor([8]), torch.tensor([[0, 2, 3, -1]]),
    ...             torch.tensor([2]))
    >>> k.flatten().tolist()
    [0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 7.0, 7.0]
    """
    OPS["compact_kv_"](k_cache, v_cache, block_table, seq_lens, accept_index, accept_len)


# --- compact_kv_layers_: every layer's cache in one launch ----------------------------------------

_OP_LAYERS = "compact_kv_layers_"


def validate_compact_kv_layers(k_caches, v_caches, block_table, seq_lens, accept_index, accept_len):
    """``compact_kv_``'s checks (one shared helper), with a leading layer dimension on the caches."""
    _check_compact(_OP_LAYERS, k_caches, v_caches, block_table, seq_lens, accept_index, accept_len,
                   layers=True)


def compact_kv_layers_triton(k_caches, v_caches, block_table, seq_lens, accept_index, accept_len):
    """Launcher: ``compact_kv_triton``'s head split, with the layers as a third grid axis."""
    from ..kernels.kv import _compact_kv_layers_kernel

    B, N = accept_index.shape
    L, num_blocks, block_size, H, D = k_caches.shape
    if B == 0 or L == 0 or H == 0 or D == 0:
        return
    block_h, block_d = row_copy_tiles(H, D)
    grid = (B, cdiv(H, block_h), L)
    _compact_kv_layers_kernel[grid](
        k_caches, v_caches, block_table, seq_lens, accept_index, accept_len,
        N, H, D, block_size, block_table.shape[1], num_blocks,
        *k_caches.stride(), *v_caches.stride(),
        block_table.stride(0), block_table.stride(1), seq_lens.stride(0),
        accept_index.stride(0), accept_index.stride(1), accept_len.stride(0),
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )


register_op(
    "compact_kv_layers_",
    "(Tensor(a!) k_caches, Tensor(b!) v_caches, Tensor block_table, Tensor seq_lens, "
    "Tensor accept_index, Tensor accept_len) -> ()",
    validate=validate_compact_kv_layers,
    triton=compact_kv_layers_triton,
    cpu=lambda *args: _compact_cpu(_OP_LAYERS, compact_kv_layers_ref_, *args),
    checked_cpu=lambda *args: _compact_checked(_OP_LAYERS, validate_compact_kv_layers, *args),
    fake=lambda info, *args: None,
)


def compact_kv_layers_(k_caches, v_caches, block_table, seq_lens, accept_index, accept_len):
    """:func:`compact_kv_` on every layer's cache at once, in one launch.

    Engines allocate the caches of all layers as one tensor; this moves the accepted path in each
    of them (the same moves in every layer, the same race-free in-place order), instead of one
    ``compact_kv_`` call per layer. The caller then sets ``seq_lens[b] = seq_lens[b] - N +
    accept_len[b] + 1``.

    Parameters
    ----------
    k_caches, v_caches : torch.Tensor
        ``[L, num_blocks, block_size, Hkv, D]`` paged caches of all L layers (fp16 / bf16 / fp32),
        updated in place.
    block_table, seq_lens, accept_index, accept_len : torch.Tensor
        As for :func:`compact_kv_` (shared by every layer).

    Every argument may have any strides; the caches must not overlap themselves, each other or the
    index inputs (they may be the two halves of one allocation). Contract: ``docs/API.md``.

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels import compact_kv_layers_
    >>> k = torch.arange(8.).view(1, 1, 8, 1, 1).repeat(2, 1, 1, 1, 1); k[1] *= 10; v = -k
    >>> compact_kv_layers_(k, v, torch.tensor([[0]]), torch.tensor([8]),
    ...                    torch.tensor([[0, 2, 3, -1]]), torch.tensor([2]))
    >>> k[:, 0, :, 0, 0].tolist()
    [[0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 7.0, 7.0], [0.0, 10.0, 20.0, 30.0, 40.0, 60.0, 70.0, 70.0]]
    """
    OPS["compact_kv_layers_"](k_caches, v_caches, block_table, seq_lens, accept_index, accept_len)


# --- kv_write_: new K / V into the paged cache by slot (vLLM's reshape_and_cache) -----------------

_OP_WRITE = "kv_write_"


def validate_kv_write(k_cache, v_cache, k, v, slot_mapping):
    """Metadata checks, plus (where ``check_values`` allows) the slots: each in
    ``[-1, num_blocks * block_size)``, and no slot written twice."""
    op = _OP_WRITE
    check_tensor(op, "k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES)
    dev = k_cache.device
    check_tensor(op, "v_cache", v_cache, ndim=4, dtypes=FLOAT_DTYPES, device=dev)
    check_shape(op, "v_cache", v_cache, tuple(k_cache.shape))
    num_blocks, block_size, H, D = k_cache.shape
    check_tensor(op, "slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES, device=dev)
    T = slot_mapping.shape[0]
    check_tensor(op, "k", k, ndim=3, device=dev)
    check_shape(op, "k", k, (T, H, D))
    check(k.dtype == k_cache.dtype, op, "k", f"must have k_cache's dtype {k_cache.dtype}, got {k.dtype}",
          TypeError)
    check_tensor(op, "v", v, ndim=3, device=dev)
    check_shape(op, "v", v, (T, H, D))
    check(v.dtype == v_cache.dtype, op, "v", f"must have v_cache's dtype {v_cache.dtype}, got {v.dtype}",
          TypeError)
    check_writable(op, "k_cache", k_cache)
    check_writable(op, "v_cache", v_cache)
    inputs = dict(k=k, v=v, slot_mapping=slot_mapping)
    check_no_alias(op, "k_cache", k_cache, dict(v_cache=v_cache, **inputs))
    check_no_alias(op, "v_cache", v_cache, inputs)
    if T > 0 and _backend.check_values(slot_mapping):
        _check_kv_write_values(slot_mapping, num_blocks * block_size)


def _check_kv_write_values(slot_mapping, num_slots):
    """The value checks of ``kv_write_`` (vectorised torch), raising with the message."""
    op = _OP_WRITE
    check_index_range(op, "slot_mapping", slot_mapping, -1, num_slots)
    used = slot_mapping[slot_mapping >= 0]
    check(used.unique().numel() == used.numel(), op, "slot_mapping",
          "must not write one slot twice (entries >= 0 must be distinct)")


def kv_write_cpu(k_cache, v_cache, k, v, slot_mapping):
    """CPU kernel (after validation): the native walk (``csrc/kv.cpp``: value checks, then the
    row copies) when built, else ``kv_write_ref_`` (one vectorised index_put per cache)."""
    fn = _native.op("_kv_write_cpu") if slot_mapping.device.type == "cpu" else None
    if fn is None:
        return kv_write_ref_(k_cache, v_cache, k, v, slot_mapping)
    if fn(k_cache, v_cache, k, v, slot_mapping, _backend.check_values(slot_mapping), False) != 0:
        _check_kv_write_values(slot_mapping, k_cache.shape[0] * k_cache.shape[1])
        raise _native.disagrees(_OP_WRITE)


def _kv_write_checked(k_cache, v_cache, k, v, slot_mapping):
    """``checked_cpu`` of kv_write_: the native kernel checks metadata and values itself, then
    writes; ``validate_kv_write`` runs only to name what it rejected (or to decide exactly where
    two address ranges meet, e.g. caches that are two halves of one allocation)."""
    fn = _native.op("_kv_write_cpu")
    if fn is None:
        return NotImplemented
    check = _backend.check_values(slot_mapping)
    if fn(k_cache, v_cache, k, v, slot_mapping, check, True) == 0:
        return None
    validate_kv_write(k_cache, v_cache, k, v, slot_mapping)
    if fn(k_cache, v_cache, k, v, slot_mapping, check, False) != 0:
        raise _native.disagrees(_OP_WRITE)
    return None


def kv_write_triton(k_cache, v_cache, k, v, slot_mapping):
    """Launcher: one program per (token, head tile), ~4 KB row copies like ``compact_kv_``."""
    from ..kernels.kv import _kv_write_kernel

    num_blocks, block_size, H, D = k_cache.shape
    T = slot_mapping.shape[0]
    if T == 0 or H == 0 or D == 0:
        return
    block_h, block_d = row_copy_tiles(H, D)
    _kv_write_kernel[(T, cdiv(H, block_h))](
        k_cache, v_cache, k, v, slot_mapping,
        H, D, block_size, num_blocks * block_size,
        *k_cache.stride(), *v_cache.stride(), *k.stride(), *v.stride(), slot_mapping.stride(0),
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )


register_op(
    "kv_write_",
    "(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slot_mapping) -> ()",
    validate=validate_kv_write,
    triton=kv_write_triton,
    cpu=kv_write_cpu,
    checked_cpu=_kv_write_checked,
    fake=lambda info, *args: None,
)


def kv_write_(k_cache, v_cache, k, v, slot_mapping):
    """Write new tokens' K and V into the paged cache by slot, in place (vLLM's reshape_and_cache).

    ``k_cache[s // block_size, s % block_size] = k[t]`` (and the same for V) with
    ``s = slot_mapping[t]``; a token with slot ``-1`` (padding) is skipped.

    Parameters
    ----------
    k_cache, v_cache : torch.Tensor
        ``[num_blocks, block_size, Hkv, D]`` paged caches (fp16 / bf16 / fp32), written in place.
    k, v : torch.Tensor
        ``[T, Hkv, D]`` the new tokens' keys and values, in the caches' dtypes.
    slot_mapping : torch.Tensor
        ``[T]`` int32 / int64 physical slot ``block * block_size + offset`` of each token, or -1.
        Slots >= 0 must be distinct and lie below ``num_blocks * block_size`` (checked on CPU; on
        CUDA, where value checks are off by default, a slot out of range writes nothing).

    Every argument may have any strides. The caches must not overlap themselves, each other, or
    the inputs; they may be the two halves of one allocation. Contract: ``docs/API.md``.

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels import kv_write_
    >>> kc = torch.zeros(2, 4, 1, 2); vc = torch.zeros(2, 4, 1, 2)
    >>> k = torch.tensor([[[1., 1.]], [[2., 2.]], [[3., 3.]]]); v = -k
    >>> kv_write_(kc, vc, k, v, torch.tensor([5, -1, 0]))
    >>> kc[:, :, 0, 0].tolist()
    [[3.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    """
    OPS["kv_write_"](k_cache, v_cache, k, v, slot_mapping)
