"""Benchmarks: compact_kv_ (runner suite "kv").

Shapes (``quick=False``): B in {1, 64, 256}, N in {4, 8, 64} draft-tree nodes behind a 1024-token
prefix, in a paged cache of 8 KV heads x 128 (bf16 on CUDA, fp32 on CPU), 16 positions per block,
shuffled physical blocks. Every request accepts every other node of its tree region (the most
moves a path of that length can need). Candidates, ours first:

* ``loramix``: the op (one launch on CUDA; vectorised torch on CPU);
* ``torch``: the plain-PyTorch gather-then-scatter (``reference.kv.compact_kv_ref_``).

Roofline traffic (``traffic_bytes``): read + write of K and V for each moved node, plus the index
rows. Run: ``python -m loramix_kernels.bench kv`` (add ``--full`` on a GPU).
"""

from __future__ import annotations

import pytest
import torch

import loramix_kernels  # noqa: F401
from loramix_kernels.ops.kv import compact_kv_
from loramix_kernels.reference.kv import compact_kv_ref_

KV_HEADS, HEAD_DIM, BLOCK_SIZE, PREFIX = 8, 128, 16, 1024


def cases(quick: bool):
    if quick:
        return [dict(B=B, N=N) for B, N in [(2, 4), (3, 8)]]
    return [dict(B=B, N=N) for B in (1, 64, 256) for N in (4, 8, 64)]


def headline_cases():
    return [dict(B=64, N=8), dict(B=256, N=64)]


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def make_inputs(case, device):
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    B, N = case["B"], case["N"]
    seq = torch.full((B,), PREFIX + N, dtype=torch.int32, device=device)
    mb = (PREFIX + N + BLOCK_SIZE - 1) // BLOCK_SIZE
    bt = torch.randperm(B * mb, device=device, generator=g).view(B, mb).to(torch.int32)
    k = torch.randn(B * mb, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device=device, generator=g).to(_dtype(device))
    v = torch.randn_like(k)
    L = (N - 1) // 2
    acc = torch.full((B, N), -1, dtype=torch.int32, device=device)
    acc[:, : L + 1] = torch.arange(0, 2 * L + 1, 2, device=device, dtype=torch.int32)
    n = torch.full((B,), L, dtype=torch.int32, device=device)
    return dict(k=k, v=v, bt=bt, seq=seq, acc=acc, n=n)


def candidates(case, inputs):
    a = inputs
    # The move is idempotent for this path (sources are never rewritten), so repeated timing
    # calls do the same work.
    return {"loramix": lambda: compact_kv_(a["k"], a["v"], a["bt"], a["seq"], a["acc"], a["n"]),
            "torch": lambda: compact_kv_ref_(a["k"], a["v"], a["bt"], a["seq"], a["acc"], a["n"])}


def traffic_bytes(case):
    B, N = case["B"], case["N"]
    L = (N - 1) // 2
    elem = _dtype(torch.device("cuda" if torch.cuda.is_available() else "cpu")).itemsize
    return B * (L * 2 * 2 * KV_HEADS * HEAD_DIM * elem + N * 4 + 8)


@pytest.mark.parametrize("case", cases(quick=True), ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_bench_kv(benchmark, case):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = make_inputs(case, device)
    cands = candidates(case, inputs)
    assert next(iter(cands)) == "loramix"
    # both candidates give the same caches (from copies of the same inputs)
    outs = {}
    for name in cands:
        fresh = {key: t.clone() for key, t in inputs.items()}
        candidates(case, fresh)[name]()
        outs[name] = (fresh["k"], fresh["v"])
    assert not torch.equal(outs["loramix"][0], inputs["k"])  # rows did move
    for a, b in zip(outs["loramix"], outs["torch"]):
        assert torch.equal(a.cpu(), b.cpu())
    benchmark(cands["loramix"])
