"""Tests for the engine's paged-cache ops: kv_write_ (vLLM's reshape_and_cache) and
compact_kv_layers_ (compact_kv_ on every layer's cache in one launch).

Oracles are Python loops written independently of the kernels: a per-token copy for kv_write_, and
a sequential per-request, per-layer copy in increasing j for compact_kv_layers_ (safe because the
accepted path is strictly increasing). compact_kv_layers_ is also compared with compact_kv_ called
per layer on the same backend.
"""

import pytest
import torch

from loramix_kernels import _backend, _native
from loramix_kernels.ops.kv import compact_kv_, compact_kv_layers_, kv_write_

from tests.common import backends, strided, value_checks_off

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# --- inputs and oracles ---------------------------------------------------------------------------

def _paths(B, N, gen):
    """Strictly increasing accepted paths from the root with gaps (sources overlap destinations);
    request 0 accepts every node, request 1 about half."""
    acc = torch.full((B, N), -1, dtype=torch.long)
    n = torch.randint(0, N, (B,), generator=gen)
    n[0] = N - 1
    n[1 % B] = N // 2
    for b in range(B):
        nodes = torch.randperm(N - 1, generator=gen)[: int(n[b])].sort().values + 1
        acc[b, 0] = 0
        acc[b, 1: 1 + int(n[b])] = nodes
    return acc, n


def _layer_caches(L, B, N, block_size, H, D, dtype, gen):
    """[L, num_blocks, block_size, H, D] caches with shuffled physical blocks, varied prefixes;
    the first and last physical blocks belong to no request (clamped bad ids land there)."""
    prefix = torch.randint(0, 3 * block_size, (B,), generator=gen)
    seq = prefix + N
    mb = int((seq.max() + block_size - 1) // block_size) + 1
    nb = B * mb + 3
    bt = torch.randperm(nb - 2, generator=gen)[: B * mb].view(B, mb) + 1
    k = torch.randn(L, nb, block_size, H, D, generator=gen).to(dtype)
    v = torch.randn(L, nb, block_size, H, D, generator=gen).to(dtype)
    return k, v, bt.to(torch.int32), seq.to(torch.int32)


def _compact_oracle(k, v, bt, seq, acc, n):
    k, v = k.clone(), v.clone()
    B, N = acc.shape
    bs = k.shape[2]
    for layer in range(k.shape[0]):
        for b in range(B):
            base = int(seq[b]) - N
            for j in range(int(n[b]) + 1):
                s, d = base + int(acc[b, j]), base + j
                for c in (k, v):
                    c[layer, int(bt[b, d // bs]), d % bs] = c[layer, int(bt[b, s // bs]), s % bs]
    return k, v


def _write_oracle(kc, vc, k, v, slots):
    kc, vc = kc.clone(), vc.clone()
    bs, cap = kc.shape[1], kc.shape[0] * kc.shape[1]
    for t in range(slots.shape[0]):
        s = int(slots[t])
        if 0 <= s < cap:
            kc[s // bs, s % bs] = k[t]
            vc[s // bs, s % bs] = v[t]
    return kc, vc


def _write_inputs(T, num_blocks, block_size, H, D, dtype, gen, slot_dtype=torch.int64, pad=True):
    """Caches, new K / V and distinct slots, every third token a padding token (-1) if ``pad``."""
    kc = torch.randn(num_blocks, block_size, H, D, generator=gen).to(dtype)
    vc = torch.randn(num_blocks, block_size, H, D, generator=gen).to(dtype)
    k = torch.randn(T, H, D, generator=gen).to(dtype)
    v = torch.randn(T, H, D, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:T]
    if pad:
        slots[::3] = -1
    return kc, vc, k, v, slots.to(slot_dtype)


# --- kv_write_ ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, device, ctx", backends())
@pytest.mark.parametrize("T, num_blocks, block_size, H, D, dtype, slot_dtype", [
    (7, 3, 4, 2, 8, torch.float32, torch.int64),
    (11, 4, 16, 3, 20, torch.float16, torch.int32),  # ragged head / D tiles
    (5, 6, 1, 1, 4, torch.bfloat16, torch.int64),    # one slot per block
    (1, 1, 1, 1, 1, torch.float32, torch.int32),
])
def test_kv_write_matches_loop(name, device, ctx, T, num_blocks, block_size, H, D, dtype, slot_dtype):
    g = torch.Generator().manual_seed(T * 31 + D)
    kc, vc, k, v, slots = _write_inputs(T, num_blocks, block_size, H, D, dtype, g, slot_dtype,
                                        pad=T > 1)
    want_k, want_v = _write_oracle(kc, vc, k, v, slots)
    kd, vd = kc.clone().to(device), vc.clone().to(device)
    with ctx():
        kv_write_(kd, vd, k.to(device), v.to(device), slots.to(device))
    assert torch.equal(kd.cpu(), want_k) and torch.equal(vd.cpu(), want_v)
    assert not torch.equal(want_k, kc)  # the case does write


@pytest.mark.parametrize("name, device, ctx", backends())
def test_kv_write_strided(name, device, ctx):
    """Caches as the two halves of one allocation with a transposed head/D layout, strided K / V
    and a strided slot vector."""
    g = torch.Generator().manual_seed(3)
    kc, vc, k, v, slots = _write_inputs(9, 3, 4, 3, 5, torch.float32, g)
    want_k, want_v = _write_oracle(kc, vc, k, v, slots)
    kv = torch.stack([kc, vc]).transpose(-1, -2).contiguous().transpose(-1, -2).to(device)
    with ctx():
        v_t = v.to(device).transpose(0, 1).contiguous().transpose(0, 1)  # [T, H, D], heads outermost
        kv_write_(kv[0], kv[1], strided(k.to(device)), v_t, strided(slots.to(device)))
    assert torch.equal(kv[0].cpu(), want_k) and torch.equal(kv[1].cpu(), want_v)


@pytest.mark.parametrize("name, device, ctx", backends())
def test_kv_write_empty(name, device, ctx):
    kc = torch.randn(2, 4, 1, 3, device=device)
    vc = kc.clone()
    before = kc.clone()
    with ctx():
        kv_write_(kc, vc, torch.empty(0, 1, 3, device=device), torch.empty(0, 1, 3, device=device),
                  torch.empty(0, dtype=torch.int32, device=device))
        kv_write_(kc, vc, torch.ones(2, 1, 3, device=device), torch.ones(2, 1, 3, device=device),
                  torch.tensor([-1, -1], device=device))  # only padding tokens
    assert torch.equal(kc, before) and torch.equal(vc, before)


@pytest.mark.parametrize("name, device, ctx", backends())
def test_kv_write_out_of_range_slots_unchecked(name, device, ctx):
    """With value checks off (as on CUDA), slots outside [0, num_blocks * block_size) write
    nothing, whatever their sign or width, and the valid ones still land."""
    g = torch.Generator().manual_seed(5)
    kc, vc, k, v, _ = _write_inputs(6, 2, 4, 2, 3, torch.float32, g)
    slots = torch.tensor([3, -1, 8, -7, 2 ** 40 + 1, 7])  # cap = 8; 2^40 + 1 is not slot 1
    want_k, want_v = _write_oracle(kc, vc, k, v, slots)
    kd, vd = kc.clone().to(device), vc.clone().to(device)
    with ctx(), value_checks_off():
        kv_write_(kd, vd, k.to(device), v.to(device), slots.to(device))
    assert torch.equal(kd.cpu(), want_k) and torch.equal(vd.cpu(), want_v)
    changed = (kd.cpu() != kc).any(-1).any(-1).flatten().nonzero().flatten().tolist()
    assert changed == [3, 7]


@pytest.mark.parametrize("name, device, ctx", backends())
def test_kv_write_bad_inputs(name, device, ctx):
    kc = torch.zeros(2, 4, 2, 3, device=device)
    vc = torch.zeros(2, 4, 2, 3, device=device)
    k = torch.ones(3, 2, 3, device=device)
    v = torch.ones(3, 2, 3, device=device)
    slots = torch.tensor([0, 5, -1], device=device)
    with ctx():
        with pytest.raises(ValueError, match="kv_write_: v_cache"):
            kv_write_(kc, vc[:, :2], k, v, slots)
        with pytest.raises(ValueError, match="kv_write_: k must have shape"):
            kv_write_(kc, vc, k[:, :1], v, slots)
        with pytest.raises(ValueError, match="kv_write_: v must have shape"):
            kv_write_(kc, vc, k, v[:2], slots)
        with pytest.raises(TypeError, match="kv_write_: k must have k_cache's dtype"):
            kv_write_(kc, vc, k.half(), v, slots)
        with pytest.raises(TypeError, match="kv_write_: slot_mapping"):
            kv_write_(kc, vc, k, v, slots.float())
        with pytest.raises(ValueError, match="kv_write_: k_cache .*overlapping"):
            kv_write_(kc[:1].expand(2, 4, 2, 3), vc, k, v, slots)
        with pytest.raises(ValueError, match="kv_write_: k_cache .*share memory with v_cache"):
            kv_write_(kc, kc, k, v, slots)
        with pytest.raises(ValueError, match="kv_write_: v_cache .*share memory with v"):
            kv_write_(kc, vc, k, vc.view(-1)[:18].view(3, 2, 3), slots)
        if _backend.check_values(kc):
            with pytest.raises(ValueError, match=r"kv_write_: slot_mapping entries must lie in \[-1, 8\)"):
                kv_write_(kc, vc, k, v, torch.tensor([0, 8, -1], device=device))
            with pytest.raises(ValueError, match=r"kv_write_: slot_mapping entries must lie"):
                kv_write_(kc, vc, k, v, torch.tensor([0, -2, 1], device=device))
            with pytest.raises(ValueError, match="kv_write_: slot_mapping must not write one slot twice"):
                kv_write_(kc, vc, k, v, torch.tensor([4, 4, -1], device=device))
    assert not kc.any() and not vc.any()  # nothing was written by a rejected call


# --- compact_kv_layers_ ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, device, ctx", backends())
@pytest.mark.parametrize("L, B, N, block_size, H, D, dtype", [
    (3, 4, 9, 4, 2, 8, torch.float32),
    (2, 3, 12, 16, 3, 20, torch.float16),  # ragged head / D tiles
    (2, 2, 6, 1, 1, 4, torch.bfloat16),    # one position per block
])
def test_compact_kv_layers_matches_oracle(name, device, ctx, L, B, N, block_size, H, D, dtype):
    g = torch.Generator().manual_seed(L * 100 + N)
    acc, n = _paths(B, N, g)
    k, v, bt, seq = _layer_caches(L, B, N, block_size, H, D, dtype, g)
    want_k, want_v = _compact_oracle(k, v, bt, seq, acc, n)
    idx = [t.to(device) for t in (bt, seq, acc, n)]
    kd, vd = k.clone().to(device), v.clone().to(device)
    kp, vp = k.clone().to(device), v.clone().to(device)
    with ctx():
        compact_kv_layers_(kd, vd, *idx)
        for layer in range(L):  # the same op, one layer at a time
            compact_kv_(kp[layer], vp[layer], *idx)
    assert torch.equal(kd.cpu(), want_k) and torch.equal(vd.cpu(), want_v)
    assert torch.equal(kd, kp) and torch.equal(vd, vp)
    assert not torch.equal(want_k[-1], k[-1])  # the last layer is moved too


@pytest.mark.parametrize("name, device, ctx", backends())
def test_compact_kv_layers_strided(name, device, ctx):
    """Caches as the K / V halves of one [2, L, num_blocks + 1, ...] allocation (a layer stride
    that is not the layer's size), strided index tensors."""
    g = torch.Generator().manual_seed(9)
    acc, n = _paths(3, 7, g)
    k, v, bt, seq = _layer_caches(2, 3, 7, 4, 2, 8, torch.float32, g)
    want_k, want_v = _compact_oracle(k, v, bt, seq, acc, n)
    nb = k.shape[1]
    kv = torch.zeros(2, k.shape[0], nb + 1, *k.shape[2:], device=device)
    kv[0, :, :nb], kv[1, :, :nb] = k.to(device), v.to(device)
    with ctx():
        compact_kv_layers_(kv[0, :, :nb], kv[1, :, :nb],
                           *strided([t.to(device) for t in (bt, seq, acc, n)]))
    assert torch.equal(kv[0, :, :nb].cpu(), want_k) and torch.equal(kv[1, :, :nb].cpu(), want_v)
    assert not kv[:, :, nb].any()  # the padding block is untouched


@pytest.mark.parametrize("name, device, ctx", backends())
def test_compact_kv_layers_bad_inputs(name, device, ctx):
    k = torch.zeros(2, 4, 4, 1, 2, device=device)
    v = torch.zeros(2, 4, 4, 1, 2, device=device)
    bt = torch.tensor([[0, 1]], device=device)
    seq = torch.tensor([6], device=device)
    acc = torch.tensor([[0, 1, 3, -1]], device=device)
    n = torch.tensor([2], device=device)
    with ctx():
        with pytest.raises(ValueError, match="compact_kv_layers_: k_caches must have 5 dimensions"):
            compact_kv_layers_(k[0], v[0], bt, seq, acc, n)
        with pytest.raises(ValueError, match="compact_kv_layers_: v_caches must have shape"):
            compact_kv_layers_(k, v[:1], bt, seq, acc, n)
        with pytest.raises(TypeError, match="compact_kv_layers_: block_table"):
            compact_kv_layers_(k, v, bt.float(), seq, acc, n)
        with pytest.raises(ValueError, match="compact_kv_layers_: k_caches .*share memory with v_caches"):
            compact_kv_layers_(k, k, bt, seq, acc, n)
        with pytest.raises(ValueError, match="compact_kv_layers_: v_caches .*overlapping"):
            compact_kv_layers_(k, v[:1].expand(2, 4, 4, 1, 2), bt, seq, acc, n)
        if _backend.check_values(k):
            with pytest.raises(ValueError, match="compact_kv_layers_: accept_len"):
                compact_kv_layers_(k, v, bt, seq, acc, n + 5)
            with pytest.raises(ValueError, match="compact_kv_layers_: accept_index.*increasing"):
                compact_kv_layers_(k, v, bt, seq, torch.tensor([[0, 3, 1, -1]], device=device), n)
            with pytest.raises(ValueError, match="compact_kv_layers_: block_table"):
                compact_kv_layers_(k, v, torch.tensor([[0, 9]], device=device), seq, acc, n)
    # compact_kv_'s own messages still name compact_kv_ (the validation helper is shared)
    with ctx(), pytest.raises(ValueError, match="compact_kv_: k_cache must have 4 dimensions"):
        compact_kv_(k, v, bt, seq, acc, n)


@pytest.mark.parametrize("name, device, ctx", backends())
def test_compact_kv_layers_bad_values_unchecked(name, device, ctx):
    """Value checks off: a non-increasing path and out-of-range block ids never make the Triton
    kernel nor the native CPU kernel leave the caches (entries are skipped or clamped); valid
    requests still move."""
    if name == "reference" and not _native.has_op("_compact_kv_cpu"):
        pytest.skip("the vectorised fallback indexes with torch (bounds-checked); kernels must clamp")
    g = torch.Generator().manual_seed(2)
    acc, n = _paths(3, 6, g)
    k, v, bt, seq = _layer_caches(2, 3, 6, 4, 1, 4, torch.float32, g)
    want_k, _ = _compact_oracle(k, v, bt[:1], seq[:1], acc[:1], n[:1])
    bad_bt = bt.clone()
    bad_bt[1] = 10 ** 6
    bad_acc = acc.clone()
    bad_acc[2, 1:] = torch.tensor([4, 2, 9, -3, 1])
    n = n.clone()
    n[2] = 5
    kd, vd = k.clone().to(device), v.clone().to(device)
    with ctx(), value_checks_off():
        compact_kv_layers_(kd, vd, bad_bt.to(device), seq.to(device), bad_acc.to(device), n.to(device))
    # request 0 is valid: its rows match the oracle restricted to it
    bs = k.shape[2]
    for j in range(int(seq[0])):
        blk = int(bt[0, j // bs])
        assert torch.equal(kd[:, blk, j % bs].cpu(), want_k[:, blk, j % bs])


# --- the contract tests' inputs -------------------------------------------------------------------

def sample_inputs(device):
    """(op name, args) for tests/test_contract.py: kv_write_ and compact_kv_layers_."""
    g = torch.Generator().manual_seed(0)
    out = []
    for dtype, slot_dtype, pad in ((torch.float32, torch.int64, True),
                                   (torch.bfloat16, torch.int32, False)):
        args = _write_inputs(5, 3, 4, 2, 8, dtype, g, slot_dtype, pad)
        out.append(("kv_write_", tuple(t.to(device) for t in args)))
    for dtype in (torch.float32, torch.float16):
        acc, n = _paths(3, 7, g)
        k, v, bt, seq = _layer_caches(2, 3, 7, 4, 2, 8, dtype, g)
        out.append(("compact_kv_layers_", tuple(t.to(device) for t in (k, v, bt, seq, acc, n))))
    return out
