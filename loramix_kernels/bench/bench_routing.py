"""Benchmarks: route_topk, the router's fused softmax + top-k (runner suite "routing").

Shapes (``quick=False``): T in {1, 64, 4096, 32768} (decode to long prefill), E in {6, 8, 64,
256}, k in {1, 2, 3, 8} (k <= E), renormalised gates; bf16 logits on CUDA, fp32 on CPU.
Candidates, ours first:

* ``loramix``: the op (one Triton launch on CUDA; the vectorised CPU kernel on CPU);
* ``torch``: what models write today (MixLoRA, HF MoE routers): ``softmax(logits.float())``,
  ``topk``, renormalisation (``reference/routing.py: route_topk_unfused``; no tie rule);
* ``reference``: the oracle with the stable-sort tie rule (``route_topk_ref``), the price of
  deterministic ties in plain torch.

Roofline traffic (``traffic_bytes``): read the logits once, write probs (fp32 [T, E]), gates (fp32
[T, k]) and expert ids (int32 [T, k]) once. Run: ``python -m loramix_kernels.bench routing``
(add ``--full`` on a GPU).
"""

from __future__ import annotations

import pytest
import torch

import loramix_kernels.ops.routing  # noqa: F401  (registers the op)
from loramix_kernels.bench.runner import add_cpu_kernel
from loramix_kernels.ops.routing import route_topk
from loramix_kernels.reference.routing import route_topk_ref, route_topk_unfused


def cases(quick: bool):
    if quick:
        return [dict(T=T, E=E, k=k) for T, E, k in [(1, 6, 3), (64, 8, 2), (256, 64, 8), (64, 256, 8),
                                                    (4096, 8, 2)]]  # (prefill)
    return [dict(T=T, E=E, k=k) for T in (1, 64, 4096, 32768) for E in (6, 8, 64, 256)
            for k in (1, 2, 3, 8) if k <= E]


def headline_cases():
    return [dict(T=T, E=E, k=k) for T, E, k in [(1, 6, 3), (4096, 8, 2), (32768, 64, 8)]]


def _dtype(device):
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def make_inputs(case, device):
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(case["T"], case["E"], device=device, generator=g).to(_dtype(device))
    return dict(logits=logits)


def candidates(case, inputs):
    x, k = inputs["logits"], case["k"]
    out = {
        "loramix": lambda: route_topk(x, k, True),
        "torch": lambda: route_topk_unfused(x, k, True),
        "reference": lambda: route_topk_ref(x, k, True),
    }
    return add_cpu_kernel(out, "route_topk", x, k, True)


def traffic_bytes(case):
    T, E, k = case["T"], case["E"], case["k"]
    elem = 2 if torch.cuda.is_available() else 4
    return T * (E * elem + E * 4 + k * 4 + k * 4)


@pytest.mark.parametrize("case", cases(quick=True), ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_bench_routing(benchmark, case):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = make_inputs(case, device)
    cands = candidates(case, inputs)
    assert next(iter(cands)) == "loramix"
    results = {name: fn() for name, fn in cands.items()}
    # random continuous logits: no ties, so every candidate picks the same experts
    for name in ("torch", "reference"):
        gates, ids, probs = results[name]
        assert torch.equal(results["loramix"][1].cpu().long(), ids.cpu().long()), name
        torch.testing.assert_close(results["loramix"][0], gates, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(results["loramix"][2], probs, atol=1e-5, rtol=1e-5)
    benchmark(cands["loramix"])
