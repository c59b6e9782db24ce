"""Benchmarks: verify_sampling, verify_greedy, compact_kv_ (runner suite "verify").

Cases carry an ``op`` key. Shapes (``quick=False``): B in {1, 64, 256}, N in {4, 8, 64}; for
verify_sampling also V in {32k, 128k} with fp32 draft and target probabilities (chains, so the
vLLM-like baseline applies). Candidates, ours first:

* ``loramix``: the op (one launch on CUDA; the C++ walk on CPU);
* ``torch``: the vectorised torch implementation (``reference/verify.py``, torch's RNG);
* ``separate``: verify_sampling only, the vLLM rejection-sampler design -- a pass computing the
  recovered token of every node from full rows of p and q, then the accept loop (Triton; GPU or
  interpreter only).

Roofline traffic (``traffic_bytes``): the bytes any exact sampler must read -- one full row of p
and of q per request (the final node's residual race), plus the index rows and outputs; greedy:
the three index rows and the outputs; compact_kv_: read + write of K and V for each moved node.
Run: ``python -m loramix_kernels.bench verify`` (add ``--full`` on a GPU).
"""

from __future__ import annotations

import pytest
import torch

import loramix_kernels  # noqa: F401
from loramix_kernels import _backend
from loramix_kernels.ops.kv import compact_kv_
from loramix_kernels.ops.verify import verify_greedy, verify_sampling
from loramix_kernels.reference.kv import compact_kv_ref_
from loramix_kernels.reference.verify import (
    verify_greedy_ref,
    verify_sampling_ref,
    verify_sampling_separate_pass,
)

KV_HEADS, HEAD_DIM, BLOCK_SIZE, PREFIX = 8, 128, 16, 1024


def cases(quick: bool):
    if quick:
        out = [dict(op="verify_sampling", B=B, N=N, V=V, draft=True) for B, N, V in [(2, 4, 64), (3, 8, 200)]]
        out.append(dict(op="verify_sampling", B=2, N=8, V=64, draft=False))
        out += [dict(op="verify_greedy", B=B, N=N) for B, N in [(2, 4), (4, 64)]]
        out += [dict(op="compact_kv_", B=B, N=N) for B, N in [(2, 4), (3, 8)]]
        return out
    out = []
    for B in (1, 64, 256):
        for N in (4, 8, 64):
            for V in (32768, 131072):
                out.append(dict(op="verify_sampling", B=B, N=N, V=V, draft=True))
            out.append(dict(op="verify_sampling", B=B, N=N, V=131072, draft=False))
            out.append(dict(op="verify_greedy", B=B, N=N))
            out.append(dict(op="compact_kv_", B=B, N=N))
    return out


def _tree(B, N, device):
    """A bushy tree (node i hangs from (i - 1) // 3): what EAGLE-style drafts look like."""
    i = torch.arange(N, device=device)
    return torch.where(i == 0, -1, (i - 1) // 3).expand(B, N).contiguous()


def make_inputs(case, device):
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    B, N = case["B"], case["N"]
    if case["op"] == "verify_sampling":
        V = case["V"]
        parents = torch.arange(-1, N - 1, device=device).expand(B, N).contiguous()  # chain
        logits = torch.randn(B, N, V, device=device, generator=g) * 3
        p = torch.softmax(logits, -1)
        # a draft close to the target: long accepted runs, the realistic (expensive) case
        q = torch.softmax(logits + torch.randn(B, N, V, device=device, generator=g) * 0.3, -1)
        tok = torch.zeros(B, N, dtype=torch.long, device=device)
        tok[:, 1:] = q[:, :-1].argmax(-1)
        return dict(tokens=tok, parents=parents, p=p, q=q if case["draft"] else None)
    if case["op"] == "verify_greedy":
        parents = _tree(B, N, device)
        tok = torch.randint(0, 4, (B, N), device=device, generator=g)
        tgt = torch.randint(0, 4, (B, N), device=device, generator=g)
        return dict(tokens=tok, parents=parents, target=tgt)
    # compact_kv_: every request accepts every other node of its tree region (maximal moves)
    seq = torch.full((B,), PREFIX + N, dtype=torch.int32, device=device)
    mb = (PREFIX + N + BLOCK_SIZE - 1) // BLOCK_SIZE
    bt = torch.randperm(B * mb, device=device, generator=g).view(B, mb).to(torch.int32)
    k = torch.randn(B * mb, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device=device, generator=g).to(torch.bfloat16
                                                                                          if device.type == "cuda" else torch.float32)
    v = torch.randn_like(k)
    L = (N - 1) // 2
    acc = torch.full((B, N), -1, dtype=torch.int32, device=device)
    acc[:, : L + 1] = torch.arange(0, 2 * L + 1, 2, device=device, dtype=torch.int32)
    n = torch.full((B,), L, dtype=torch.int32, device=device)
    return dict(k=k, v=v, bt=bt, seq=seq, acc=acc, n=n)


def _triton_ok(device):
    return device.type == "cuda" or (_backend.INTERPRET and _backend.backend() == "triton")


def candidates(case, inputs):
    op = case["op"]
    if op == "verify_sampling":
        t, par, p, q = inputs["tokens"], inputs["parents"], inputs["p"], inputs["q"]
        out = {
            "loramix": lambda: verify_sampling(t, par, p, q, seed=1, offset=0),
            "torch": lambda: verify_sampling_ref(t, par, p, q, 1, 0, rng="torch"),
        }
        if _triton_ok(p.device):
            out["separate"] = lambda: verify_sampling_separate_pass(t, par, p, q, 1, 0)
        return out
    if op == "verify_greedy":
        t, par, tgt = inputs["tokens"], inputs["parents"], inputs["target"]
        return {"loramix": lambda: verify_greedy(t, par, tgt),
                "torch": lambda: verify_greedy_ref(t, par, tgt)}
    a = inputs
    # The move is idempotent for this path (sources are never rewritten), so repeated timing
    # calls do the same work.
    return {"loramix": lambda: compact_kv_(a["k"], a["v"], a["bt"], a["seq"], a["acc"], a["n"]),
            "torch": lambda: compact_kv_ref_(a["k"], a["v"], a["bt"], a["seq"], a["acc"], a["n"])}


def traffic_bytes(case):
    B, N = case["B"], case["N"]
    if case["op"] == "verify_sampling":
        rows = 2 if case["draft"] else 1
        return B * (rows * case["V"] * 4 + 2 * N * 8 + N * 4 + 12)
    if case["op"] == "verify_greedy":
        return B * (3 * N * 8 + N * 4 + 12)
    L = (case["N"] - 1) // 2
    elem = 2 if torch.cuda.is_available() else 4
    return B * (L * 2 * 2 * KV_HEADS * HEAD_DIM * elem + N * 4 + 8)


@pytest.mark.parametrize("case", cases(quick=True), ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_bench_verify(benchmark, case):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = make_inputs(case, device)
    cands = candidates(case, inputs)
    assert next(iter(cands)) == "loramix"
    results = {name: fn() for name, fn in cands.items()}
    if case["op"] == "verify_greedy":  # exact op: the baseline must agree
        for a, b in zip(results["loramix"], results["torch"]):
            assert torch.equal(a.cpu(), b.cpu())
    benchmark(cands["loramix"])
