"""The shared argument checks: in-place outputs against overlap and aliasing."""

import pytest
import torch

import loramix_kernels
from loramix_kernels._checks import check_no_alias, check_writable


def test_interleaved_kv_halves_are_not_aliases():
    """FlashInfer's [num_blocks, 2, ...] cache: kv[:, 0] and kv[:, 1] interleave but never meet."""
    kv = torch.zeros(5, 2, 4, 3, 8)
    check_no_alias("op", "k_cache", kv[:, 0], {"v_cache": kv[:, 1]})
    kv2 = torch.zeros(2, 5, 4, 3, 8)  # vLLM's [2, num_blocks, ...]
    check_no_alias("op", "k_cache", kv2[0], {"v_cache": kv2[1]})


def test_overlapping_views_are_aliases():
    kv = torch.zeros(5, 2, 4, 3, 8)
    with pytest.raises(ValueError, match="op: k_cache .* share memory with v_cache"):
        check_no_alias("op", "k_cache", kv[:, :, :2], {"v_cache": kv[:, :, 1:]})
    x = torch.zeros(12)
    with pytest.raises(ValueError, match=r"out .* lora_a\[1\]"):
        check_no_alias("op", "out", x[::2], {"lora_a": [torch.zeros(3), x[2::3]]})
    check_no_alias("op", "out", x[::2], {"x": x[1::2]})  # even and odd elements never meet


def test_expanded_output_rejected():
    with pytest.raises(ValueError, match="op: out .* overlapping"):
        check_writable("op", "out", torch.zeros(3, 1).expand(3, 4))
    check_writable("op", "out", torch.zeros(3, 4)[:, ::2])


def test_compact_kv_accepts_interleaved_cache_halves():
    kv = torch.randn(2, 2, 8, 1, 3)  # [num_blocks, 2 (K, V), block_size, H, D]
    k, v = kv[:, 0], kv[:, 1]
    k_want, v_want = k.clone(), v.clone()
    args = (torch.tensor([[0, 1]]), torch.tensor([12]), torch.tensor([[0, 2, 3, -1]]),
            torch.tensor([2]))
    with loramix_kernels.use_backend("auto"):
        loramix_kernels.compact_kv_(k_want, v_want, *args)
        loramix_kernels.compact_kv_(k, v, *args)
        assert torch.equal(kv[:, 0], k_want) and torch.equal(kv[:, 1], v_want)
        with pytest.raises(ValueError, match="compact_kv_: k_cache"):
            loramix_kernels.compact_kv_(k, k, *args)
