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
    check(isinstance(t, torch.Tensor), op, arg, f"must be a Tensor, got {type(t).__name__}", TypeError)
    if ndim is not None:
        check(t.dim() == ndim, op, arg, f"must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        check(t.dtype in dtypes, op, arg,
              f"must have dtype in {[str(d).replace('torch.', '') for d in dtypes]}, got {t.dtype}",
              TypeError)
    if device is not None:
        check(t.device == device, op, arg,
              f"must be on {device} like the other inputs, got {t.device}")


def check_shape(op: str, arg: str, t: torch.Tensor, shape: tuple) -> None:
    """``shape`` may hold None for a free dimension."""
    ok = t.dim() == len(shape) and all(s is None or t.shape[i] == s for i, s in enumerate(shape))
    want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    check(ok, op, arg, f"must have shape {want}, got {list(t.shape)}")


def check_index_range(op: str, arg: str, t: torch.Tensor, lo: int, hi: int) -> None:
    """Value check: every entry in [lo, hi). Call only when ``check_values`` allows."""
    if t.numel() == 0:
        return
    mn, mx = int(t.min()), int(t.max())
    check(lo <= mn and mx < hi, op, arg, f"entries must lie in [{lo}, {hi}), found range [{mn}, {mx}]")
