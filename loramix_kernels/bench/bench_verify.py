"""Benchmarks: verify_sampling, verify_greedy (runner suite "verify"; compact_kv_ is suite "kv").

Cases carry an ``op`` key. Shapes (``quick=False``): B in {1, 64, 256}, N in {4, 8, 64}; for
verify_sampling also V in {32k, 128k} with fp32 draft and target probabilities (chains, so the
vLLM-like baseline applies). Candidates, ours first:

* ``loramix``: the op (one launch on CUDA; the C++ walk on CPU);
* ``torch``: the vectorised torch design (``reference.verify.verify_sampling_walk`` /
  ``verify_greedy_ref``), drawing from torch's generator (:class:`TorchStream`) as a plain-torch
  implementation would, rather than from a counter-based RNG computed in torch ops;
* ``separate``: verify_sampling only, the vLLM rejection-sampler design -- a pass computing the
  recovered token of every node from full rows of p and q, then the accept loop
  (:func:`verify_sampling_separate_pass`, this module's launcher of the two Triton kernels in
  ``kernels/verify.py``; GPU or interpreter only).

Roofline traffic (``traffic_bytes``): the bytes any exact sampler must read -- one full row of p
and of q per request (the final node's residual race), plus the index rows and outputs; greedy:
the three index rows and the outputs. Run: ``python -m loramix_kernels.bench verify`` (add
``--full`` on a GPU).
"""

from __future__ import annotations

import pytest
import torch

import loramix_kernels  # noqa: F401
from loramix_kernels import _backend
from loramix_kernels._tiles import pow2_at_least
from loramix_kernels.ops.verify import verify_greedy, verify_sampling
from loramix_kernels.reference.verify import (rng_words, verify_greedy_ref, verify_sampling_ref,
                                               verify_sampling_walk)


class TorchStream:
    """A random source for ``verify_sampling_walk`` backed by torch's generator seeded from
    (seed, offset): the baseline's RNG (not reproducible across paths, unlike Philox)."""

    def __init__(self, seed, offset, device):
        self.g = torch.Generator(device=device)
        # any injective-enough mix of the two ints (1_000_003: a prime, so nearby (seed, offset)
        # pairs do not collide); torch seeds must be non-negative 63-bit
        self.g.manual_seed((seed * 1_000_003 + offset) & ((1 << 63) - 1))

    def accept(self, b, node):
        return torch.rand(b.shape, generator=self.g, device=b.device)

    def race(self, b, V):
        return torch.empty(b.shape[0], V, device=b.device).exponential_(generator=self.g)


def verify_sampling_torch(tokens, parents, target_probs, draft_probs, seed, offset):
    """Baseline ``torch``: the vectorised reference walk with torch's RNG."""
    return verify_sampling_walk(tokens, parents, target_probs, draft_probs,
                                TorchStream(seed, offset, tokens.device))


#: Widest vocabulary tile of the recover pass (4096 fp32 entries of p and q per step).
SEPARATE_BLOCK_V_MAX = 4096


def verify_sampling_separate_pass(tokens, parents, target_probs, draft_probs, seed, offset):
    """Baseline ``separate``: the vLLM rejection-sampler design for chains, two Triton launches.

    Pass 1 computes, for *every* node, the token that a rejection there would emit (an
    exponential race over ``max(p - q, 0)``, or over p at the last node for the bonus token),
    reading all ``B * N`` rows of p and q. Pass 2 runs the accept loop and picks. Lossless for
    chains only (one child per node), like vLLM. Its random stream is its own (``tl.randint``).
    """
    from loramix_kernels.kernels.verify import _separate_accept_kernel, _separate_recover_kernel

    B, N = tokens.shape
    V = target_probs.shape[-1]
    dev = tokens.device
    k0, k1, c2, c3 = rng_words(seed, offset)
    seed64 = (k1 << 32) | k0
    seed64 = seed64 - (1 << 64) if seed64 >= (1 << 63) else seed64
    has_q = draft_probs is not None
    q = draft_probs if has_q else target_probs
    recovered = torch.empty(B, N, dtype=torch.int32, device=dev)
    block_v = min(SEPARATE_BLOCK_V_MAX, pow2_at_least(V, 64))
    _separate_recover_kernel[(B, N)](
        tokens, q, target_probs, recovered, N, V, seed64, c2, c3,
        tokens.stride(0), tokens.stride(1), *target_probs.stride(), *q.stride(),
        recovered.stride(0), recovered.stride(1),
        HAS_DRAFT=has_q, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)
    acc = torch.empty(B, N, dtype=torch.int32, device=dev)
    acc_len = torch.empty(B, dtype=torch.int32, device=dev)
    nxt = torch.empty(B, dtype=torch.int64, device=dev)
    _separate_accept_kernel[(B,)](
        tokens, target_probs, q, recovered, acc, acc_len, nxt, N, V, seed64, c2, c3,
        tokens.stride(0), tokens.stride(1), *target_probs.stride(), *q.stride(),
        recovered.stride(0), recovered.stride(1), acc.stride(0), acc.stride(1),
        HAS_DRAFT=has_q, BLOCK_N=pow2_at_least(N))
    return acc, acc_len, nxt


def cases(quick: bool):
    if quick:
        out = [dict(op="verify_sampling", B=B, N=N, V=V, draft=True)
               for B, N, V in [(2, 4, 64), (3, 8, 200), (32, 8, 4096)]]
        out.append(dict(op="verify_sampling", B=2, N=8, V=64, draft=False))
        out += [dict(op="verify_greedy", B=B, N=N) for B, N in [(2, 4), (4, 64)]]
        return out
    out = []
    for B in (1, 64, 256):
        for N in (4, 8, 64):
            for V in (32768, 131072):
                out.append(dict(op="verify_sampling", B=B, N=N, V=V, draft=True))
            out.append(dict(op="verify_sampling", B=B, N=N, V=131072, draft=False))
            out.append(dict(op="verify_greedy", B=B, N=N))
    return out


def headline_cases():
    """Issue 5's targets: sampling over a 128k vocabulary at decode and serving batches, greedy."""
    return [dict(op="verify_sampling", B=B, N=8, V=131072, draft=True) for B in (1, 64)] + \
        [dict(op="verify_sampling", B=64, N=8, V=131072, draft=False),
         dict(op="verify_greedy", B=256, N=64)]


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
    raise ValueError(f"unknown op {case['op']!r}")


def _triton_ok(device):
    return device.type == "cuda" or (_backend.INTERPRET and _backend.backend() == "triton")


def candidates(case, inputs):
    op = case["op"]
    if op == "verify_sampling":
        t, par, p, q = inputs["tokens"], inputs["parents"], inputs["p"], inputs["q"]
        out = {
            "loramix": lambda: verify_sampling(t, par, p, q, seed=1, offset=0),
            "torch": lambda: verify_sampling_torch(t, par, p, q, 1, 0),
        }
        if _triton_ok(p.device):
            out["separate"] = lambda: verify_sampling_separate_pass(t, par, p, q, 1, 0)
        return out
    if op == "verify_greedy":
        t, par, tgt = inputs["tokens"], inputs["parents"], inputs["target"]
        return {"loramix": lambda: verify_greedy(t, par, tgt),
                "torch": lambda: verify_greedy_ref(t, par, tgt)}
    raise ValueError(f"unknown op {op!r}")


def traffic_bytes(case):
    B, N = case["B"], case["N"]
    if case["op"] == "verify_sampling":
        rows = 2 if case["draft"] else 1
        return B * (rows * case["V"] * 4 + 2 * N * 8 + N * 4 + 12)
    return B * (3 * N * 8 + N * 4 + 12)  # verify_greedy


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
    else:  # same Philox stream as the reference (the torch baseline draws its own)
        i = inputs
        want = verify_sampling_ref(i["tokens"], i["parents"], i["p"], i["q"], 1, 0)
        for a, b in zip(results["loramix"], want):
            assert torch.equal(a.cpu(), b.cpu())
    benchmark(cands["loramix"])
