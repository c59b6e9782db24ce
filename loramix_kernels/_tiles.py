"""Integer helpers for launchers (no triton import: the package works without triton on CPU)."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-int(a) // int(b))


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def pow2_at_least(n: int, lo: int = 16) -> int:
    """``next_pow2(n)``, at least ``lo``: tile sizes (``tl.dot`` wants >= 16 per dimension, and
    ``tl.arange`` a power of two)."""
    return max(lo, next_pow2(n))
