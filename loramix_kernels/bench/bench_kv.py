"""Benchmarks: compact_kv_ and kv_write_ (runner suite "kv").

``op=compact`` (``quick=False``): B in {1, 64, 256}, N in {4, 8, 64} draft-tree nodes behind a
1024-token prefix, in a paged cache of 8 KV heads x 128 (bf16 on CUDA, fp32 on CPU), 16 positions
per block, shuffled physical blocks. Every request accepts every other node of its tree region
(the most moves a path of that length can need). Candidates, ours first:

* ``loramix``: the op (one launch on CUDA; the native walk on CPU);
* ``torch``: the plain-PyTorch gather-then-scatter (``reference.kv.compact_kv_ref_``).

``op=write``: T new tokens (decode: one per request; prefill: thousands) written at distinct
shuffled slots of the same cache. Candidates: ``loramix`` (kv_write_), ``torch``
(``reference.kv.kv_write_ref_``: the vectorised index_put with the -1 / range rule) and
``index_copy`` (``index_copy_`` on the flattened caches: the fastest plain-PyTorch write, which
assumes every slot valid and the caches contiguous).

Roofline traffic (``traffic_bytes``): read + write of K and V for each moved / written row, plus
the index rows. Run: ``python -m loramix_kernels.bench kv`` (add ``--full`` on a GPU).
"""

from __future__ import annotations

import pytest
import torch

import loramix_kernels  # noqa: F401
from loramix_kernels.bench.runner import add_cpu_kernel
from loramix_kernels.ops.kv import compact_kv_, kv_write_
from loramix_kernels.reference.kv import compact_kv_ref_, kv_write_ref_

KV_HEADS, HEAD_DIM, BLOCK_SIZE, PREFIX = 8, 128, 16, 1024


def cases(quick: bool):
    if quick:
        return ([dict(op="compact", B=B, N=N) for B, N in [(2, 4), (3, 8)]]
                + [dict(op="write", T=T) for T in (8, 72, 1024, 4096)])
    return ([dict(op="compact", B=B, N=N) for B in (1, 64, 256) for N in (4, 8, 64)]
            + [dict(op="write", T=T) for T in (1, 64, 256, 4096)])


def headline_cases():
    return [dict(op="compact", B=64, N=8), dict(op="compact", B=256, N=64), dict(op="write", T=256)]


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def make_inputs(case, device):
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    if case["op"] == "write":
        T = case["T"]
        num_blocks = (T + BLOCK_SIZE - 1) // BLOCK_SIZE * 2 + 1
        k = torch.zeros(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device=device).to(_dtype(device))
        slots = torch.randperm(num_blocks * BLOCK_SIZE, device=device, generator=g)[:T]
        new_k = torch.randn(T, KV_HEADS, HEAD_DIM, device=device, generator=g).to(_dtype(device))
        return dict(k=k, v=torch.zeros_like(k), new_k=new_k, new_v=-new_k, slots=slots)
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
    if case["op"] == "write":
        def index_copy():
            H, D = a["k"].shape[2:]
            a["k"].view(-1, H, D).index_copy_(0, a["slots"], a["new_k"])
            a["v"].view(-1, H, D).index_copy_(0, a["slots"], a["new_v"])

        out = {"loramix": lambda: kv_write_(a["k"], a["v"], a["new_k"], a["new_v"], a["slots"]),
               "torch": lambda: kv_write_ref_(a["k"], a["v"], a["new_k"], a["new_v"], a["slots"]),
               "index_copy": index_copy}
        return add_cpu_kernel(out, "kv_write_", a["k"], a["v"], a["new_k"], a["new_v"], a["slots"])
    # The move is idempotent for this path (sources are never rewritten), so repeated timing
    # calls do the same work.
    out = {"loramix": lambda: compact_kv_(a["k"], a["v"], a["bt"], a["seq"], a["acc"], a["n"]),
           "torch": lambda: compact_kv_ref_(a["k"], a["v"], a["bt"], a["seq"], a["acc"], a["n"])}
    return add_cpu_kernel(out, "compact_kv_", a["k"], a["v"], a["bt"], a["seq"], a["acc"], a["n"])


def traffic_bytes(case):
    if case["op"] == "write":
        elem = _dtype(torch.device("cuda" if torch.cuda.is_available() else "cpu")).itemsize
        return case["T"] * (2 * 2 * KV_HEADS * HEAD_DIM * elem + 8)
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
    for name in cands:
        for a, b in zip(outs["loramix"], outs[name]):
            assert torch.equal(a.cpu(), b.cpu()), name
    benchmark(cands["loramix"])
