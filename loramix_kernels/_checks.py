"""Argument checks shared by the launchers, CPU kernels and fake kernels.

Every message starts with ``<op>: <argument>`` so a user sees which argument is wrong. Shape and
dtype checks use only metadata (safe in fake kernels and under torch.compile); value checks are
guarded by :func:`loramix_kernels._backend.check_values`.
"""

from __future__ import annotations

from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def fail(op: str, arg: str, msg: str, exc: type[Exception] = ValueError):
    raise exc(f"{op}: {arg} {msg}")


def check(cond: bool, op: str, arg: str, msg: str, exc: type[Exception] = ValueError) -> None:
    if not cond:
        fail(op, arg, msg, exc)


def check_tensor(op: str, arg: str, t, ndim: int | None = None,
                 dtypes: Iterable[torch.dtype] | None = None, device: torch.device | None = None):
    # Messages are built only on failure: these checks run on every call (decode hot path).
    if not isinstance(t, torch.Tensor):
        fail(op, arg, f"must be a Tensor, got {type(t).__name__}", TypeError)
    if ndim is not None and t.dim() != ndim:
        fail(op, arg, f"must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        fail(op, arg, f"must have dtype in {[str(d).replace('torch.', '') for d in dtypes]}, "
             f"got {t.dtype}", TypeError)
    if device is not None and t.device != device:
        fail(op, arg, f"must be on {device} like the other inputs, got {t.device}")


def check_shape(op: str, arg: str, t: torch.Tensor, shape: tuple) -> None:
    """``shape`` may hold None for a free dimension."""
    if t.dim() == len(shape) and all(s is None or n == s for n, s in zip(t.shape, shape)):
        return
    want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    fail(op, arg, f"must have shape {want}, got {list(t.shape)}")


def check_index_range(op: str, arg: str, t: torch.Tensor, lo: int, hi: int) -> None:
    """Value check: every entry in [lo, hi). Call only when ``check_values`` allows."""
    if t.numel() == 0:
        return
    mn, mx = (int(v) for v in t.aminmax())
    check(lo <= mn and mx < hi, op, arg, f"entries must lie in [{lo}, {hi}), found range [{mn}, {mx}]")


def _has_data(t: torch.Tensor) -> bool:
    return not t.is_meta and not isinstance(t, torch._subclasses.fake_tensor.FakeTensor)


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """[first, last] byte addressed by a non-empty ``t``."""
    es = t.element_size()
    start = t.data_ptr()  # the storage's pointer plus the offset
    if t.is_contiguous():
        return start, start + t.numel() * es - 1
    lo = hi = 0
    for size, stride in zip(t.shape, t.stride()):
        span = (size - 1) * stride
        if span < 0:
            lo += span
        else:
            hi += span
    return start + lo * es, start + (hi + 1) * es - 1


def byte_ranges_meet(t: torch.Tensor, others) -> bool:
    """Whether ``t``'s byte range meets any of ``others``' (empty tensors never do): the cheap,
    conservative test of the CPU fast entries, which leave the exact decision (two halves of one
    allocation are fine) to ``check_no_alias``. Metadata only."""
    if t.numel() == 0:
        return False
    t0, t1 = _byte_range(t)
    for o in others:
        if o.numel():
            o0, o1 = _byte_range(o)
            if o0 <= t1 and t0 <= o1:
                return True
    return False


def _ranges_overlap(a: torch.Tensor, b: torch.Tensor, ra=None, rb=None) -> bool:
    """Whether ``a`` and ``b`` address a common byte (``ra`` / ``rb``: their byte ranges when
    already known). Disjoint byte ranges answer at once; otherwise numpy's exact solver decides
    from pointers and strides alone (it never reads the memory, so this works for CUDA tensors
    too): interleaved views that do not meet, e.g. ``kv[:, 0]`` and ``kv[:, 1]`` of a
    ``[num_blocks, 2, ...]`` cache, are not an overlap. Too hard to decide within the solver's
    work bound counts as an overlap."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, a1 = ra or _byte_range(a)
    b0, b1 = rb or _byte_range(b)
    if a1 < b0 or b1 < a0:
        return False
    import numpy as np

    too_hard = getattr(np, "exceptions", np).TooHardError
    try:
        return bool(np.shares_memory(_AddressView(a).array(), _AddressView(b).array(),
                                     max_work=1 << 20))
    except too_hard:
        return True


class _AddressView:
    """A numpy array description (``__array_interface__``) of a tensor's addresses: pointer,
    shape and byte strides, elements as opaque bytes. Only metadata is used."""

    def __init__(self, t: torch.Tensor):
        es = t.element_size()
        self.__array_interface__ = {
            "data": (t.data_ptr(), True), "shape": tuple(t.shape), "version": 3,
            "strides": tuple(s * es for s in t.stride()), "typestr": f"|V{es}"}

    def array(self):
        import numpy as np

        return np.asarray(self)


def check_writable(op: str, arg: str, t: torch.Tensor) -> None:
    """An in-place output must not have internal overlap (an expand()-ed view would make several
    elements one memory location). Metadata only: no sync."""
    if _has_data(t) and torch._debug_has_internal_overlap(t) == 1:
        fail(op, arg, "is written in place and must not have overlapping elements "
             "(an expand()-ed or stride-0 view); pass a .contiguous() copy")


def check_no_alias(op: str, arg: str, t: torch.Tensor, others: dict) -> None:
    """``t`` (written in place) must not share memory with any of ``others`` (name -> tensor or
    list of tensors). Compares address ranges (``t``'s computed once): metadata only, no sync."""
    if t.numel() == 0 or not _has_data(t):
        return
    rt = _byte_range(t)
    for name, o in others.items():
        for i, u in enumerate(o if isinstance(o, (list, tuple)) else (o,)):
            if (isinstance(u, torch.Tensor) and u.numel() and _has_data(u)
                    and _ranges_overlap(t, u, rt)):
                where = name if not isinstance(o, (list, tuple)) else f"{name}[{i}]"
                fail(op, arg, f"is written in place and must not share memory with {where}")


def check_parents(op: str, parents: torch.Tensor) -> None:
    """Value check, the one rule of every op that takes a draft tree (docs/API.md): ``parents[b, 0]
    == -1``, and for ``i >= 1`` ``parents[b, i]`` is -1 (a padding node) or lies in ``[0, i)``.
    A node that hangs from a padding node is allowed: it is unreachable and never accepted.
    Compares in the input's own width (an int64 2^32 + 1 is not parent 1)."""
    if parents.numel() == 0:
        return
    N = parents.shape[1]
    idx = torch.arange(N, device=parents.device, dtype=parents.dtype)
    bad = torch.where(idx == 0, parents != -1, (parents != -1) & ((parents < 0) | (parents >= idx)))
    if bool(bad.any()):
        b, i = (int(t) for t in bad.nonzero()[0])
        want = "-1 (node 0 is the root)" if i == 0 else f"-1 (padding) or lie in [0, {i})"
        fail(op, "parents", f"is not a tree: parents[{b}, {i}] = {int(parents[b, i])}, must be {want} "
             "(a parent comes before its child)")
