"""Tests for compact_kv_: paged in-place compaction of the accepted path, race-free.

The oracle is a sequential per-request copy in increasing j (safe because the path is strictly
increasing, so a source is never an earlier destination) written independently of the reference's
gather-then-scatter; both backends are compared with it on random trees and accepted paths whose
sources and destinations overlap.
"""

import pytest
import torch

from loramix_kernels import _backend
from loramix_kernels.ops.kv import compact_kv_

from tests.common import backends


def _paths(B, N, gen):
    """Random accepted paths: strictly increasing node lists from the root, lengths 0..N-1,
    mostly with gaps (so sources and destinations of different nodes overlap)."""
    acc = torch.full((B, N), -1, dtype=torch.long)
    n = torch.randint(0, N, (B,), generator=gen)
    n[0] = N - 1  # one full-length path (identity moves)
    n[1 % B] = N // 2
    for b in range(B):
        nodes = torch.randperm(N - 1, generator=gen)[: int(n[b])].sort().values + 1
        acc[b, 0] = 0
        acc[b, 1 : 1 + int(n[b])] = nodes
    return acc, n


def _cache(B, N, block_size, H, D, dtype, gen):
    """Paged caches with shuffled physical blocks and varied prefix lengths."""
    prefix = torch.randint(0, 3 * block_size, (B,), generator=gen)
    seq = prefix + N
    mb = int((seq.max() + block_size - 1) // block_size) + 1
    nb = B * mb + 3
    perm = torch.randperm(nb, generator=gen)[: B * mb].view(B, mb)
    k = torch.randn(nb, block_size, H, D, generator=gen).to(dtype)
    v = torch.randn(nb, block_size, H, D, generator=gen).to(dtype)
    return k, v, perm.to(torch.int32), seq.to(torch.int32)


def _oracle(k, v, bt, seq, acc, n):
    k, v = k.clone(), v.clone()
    B, N = acc.shape
    bs = k.shape[1]
    for b in range(B):
        base = int(seq[b]) - N
        for j in range(int(n[b]) + 1):
            s, d = base + int(acc[b, j]), base + j
            for c in (k, v):
                c[int(bt[b, d // bs]), d % bs] = c[int(bt[b, s // bs]), s % bs]
    return k, v


@pytest.mark.parametrize("name, device, ctx", backends())
@pytest.mark.parametrize("B, N, block_size, H, D, dtype", [
    (6, 9, 4, 2, 8, torch.float32),
    (5, 17, 16, 3, 20, torch.float16),  # ragged head / D tiles
    (3, 8, 1, 1, 4, torch.bfloat16),    # one position per block
])
def test_compact_kv_matches_oracle(name, device, ctx, B, N, block_size, H, D, dtype):
    g = torch.Generator().manual_seed(N * 7 + block_size)
    acc, n = _paths(B, N, g)
    assert int(n.max()) >= 2
    k, v, bt, seq = _cache(B, N, block_size, H, D, dtype, g)
    want_k, want_v = _oracle(k, v, bt, seq, acc, n)
    kd, vd = k.clone().to(device), v.clone().to(device)  # .to() on the same device aliases
    with ctx():
        compact_kv_(kd, vd, bt.to(device), seq.to(device), acc.to(device), n.to(device))
    assert torch.equal(kd.cpu(), want_k) and torch.equal(vd.cpu(), want_v)
    assert not torch.equal(want_k, k)  # the case does move rows


@pytest.mark.parametrize("name, device, ctx", backends())
def test_compact_kv_overlap_chain(name, device, ctx):
    """Source of one node = destination of another: path [0, 2, 3, 5] in a contiguous cache."""
    N = 6
    k = torch.arange(10.0).view(1, 10, 1, 1).repeat(1, 1, 2, 3)
    v = -k
    acc = torch.tensor([[0, 2, 3, 5, -1, -1]])
    with ctx():
        kd, vd = k.to(device), v.to(device)
        compact_kv_(kd, vd, torch.tensor([[0]], dtype=torch.int32).to(device),
                    torch.tensor([10]).to(device), acc.to(device), torch.tensor([3]).to(device))
    got = kd[0, :, 0, 0].cpu().tolist()
    assert got == [0, 1, 2, 3, 4, 6, 7, 9, 8, 9]
    assert torch.equal(vd.cpu(), -kd.cpu())


@pytest.mark.parametrize("name, device, ctx", backends())
def test_compact_kv_bad_inputs(name, device, ctx):
    k = torch.zeros(4, 4, 1, 2, device=device)
    v = torch.zeros(4, 4, 1, 2, device=device)
    bt = torch.tensor([[0, 1]], device=device)
    seq = torch.tensor([6], device=device)
    acc = torch.tensor([[0, 1, 3, -1]], device=device)
    n = torch.tensor([2], device=device)
    with ctx():
        with pytest.raises(ValueError, match="v_cache"):
            compact_kv_(k, v[:, :2], bt, seq, acc, n)
        with pytest.raises(TypeError, match="block_table"):
            compact_kv_(k, v, bt.float(), seq, acc, n)
        with pytest.raises(ValueError, match="seq_lens"):
            compact_kv_(k, v, bt, seq[:0], acc, n)
        if _backend.check_values(k):
            with pytest.raises(ValueError, match="accept_len"):
                compact_kv_(k, v, bt, seq, acc, n + 5)
            with pytest.raises(ValueError, match="accept_index.*increasing"):
                compact_kv_(k, v, bt, seq, torch.tensor([[0, 3, 1, -1]], device=device), n)
            with pytest.raises(ValueError, match="seq_lens"):
                compact_kv_(k, v, bt, torch.tensor([3], device=device), acc, n)
            with pytest.raises(ValueError, match="block_table"):
                compact_kv_(k, v, torch.tensor([[0, 9]], device=device), seq, acc, n)


@pytest.mark.parametrize("name, device, ctx", backends())
def test_compact_kv_opcheck(name, device, ctx):
    g = torch.Generator().manual_seed(0)
    acc, n = _paths(3, 7, g)
    k, v, bt, seq = _cache(3, 7, 4, 2, 8, torch.float32, g)
    with ctx():
        torch.library.opcheck(torch.ops.loramix.compact_kv_.default,
                              (k.to(device), v.to(device), bt.to(device), seq.to(device),
                               acc.to(device), n.to(device)))


def sample_inputs(device):
    """(op name, args) for compact_kv_ (tests/test_contract.py runs opcheck, compile and strided
    views on them): fp32 / fp16 / bf16 caches, int32 and int64 indices, one position per block, a
    request that accepts nothing, an empty batch."""
    out = []
    for B, N, block_size, H, D, dtype, idt in [(3, 7, 4, 2, 8, torch.float32, torch.int32),
                                               (2, 5, 16, 3, 4, torch.float16, torch.int64),
                                               (2, 4, 1, 1, 4, torch.bfloat16, torch.int32)]:
        g = torch.Generator().manual_seed(B * N + block_size)
        acc, n = _paths(B, N, g)
        n[-1] = 0  # the last request accepts nothing (no move)
        acc[-1, 1:] = -1
        k, v, bt, seq = _cache(B, N, block_size, H, D, dtype, g)
        args = (k, v, bt.to(idt), seq.to(idt), acc.to(idt), n.to(idt))
        out.append(("compact_kv_", tuple(a.to(device) for a in args)))
    k = torch.zeros(2, 4, 1, 2)
    empty = torch.zeros(0, 3, dtype=torch.int64)
    out.append(("compact_kv_", tuple(a.to(device) for a in (k, k.clone(), empty[:, :1], empty[:, 0],
                                                             empty, empty[:, 0]))))
    return out


@pytest.mark.parametrize("name, device, ctx", backends())
def test_compact_kv_sample_inputs(name, device, ctx):
    """Every sample equals an independent sequential copy, also with strided index views."""
    from tests.common import strided

    for _, args in sample_inputs(device):
        want_k, want_v = _oracle(*(a.cpu() for a in args))
        for view in (lambda t: t, strided):
            k, v = args[0].clone(), args[1].clone()
            with ctx():
                compact_kv_(k, v, *(view(a) for a in args[2:]))
            assert torch.equal(k.cpu(), want_k) and torch.equal(v.cpu(), want_v)
