"""Benchmarks: lm_head_topk (runner suite "lm_head").

Shapes (``quick=False``, GPU): the issue's headline M = 64 rows, V = 128k, H = 4096 with
k in {1, 4, 8} (bf16), plus decode (M = 1) on a Llama-3-sized head and a 256k x 8192 head.
``quick``: small fp32 CPU shapes. Candidates, ours first:

* ``loramix``: the op (Triton streaming top-k on CUDA; chunked matmul + topk on CPU);
* ``torch``: ``torch.topk(hidden @ weight.T, k)`` (``reference/lm_head.py``), the [M, V] logits
  materialised in the inputs' dtype;
* ``chunked``: the chunked fp32 torch kernel (``lm_head_topk_chunked``) on the same device, what
  ``lm_head_topk`` runs on CUDA for k > 64.

Roofline traffic (``traffic_bytes``): one read of the weight and the hidden states plus the
outputs, the minimum for any implementation; ``flops``: 2 M V H.
Run: ``python -m loramix_kernels.bench lm_head`` (add ``--full`` on a GPU).
"""

from __future__ import annotations

import pytest
import torch

import loramix_kernels  # noqa: F401
from loramix_kernels.bench.runner import add_cpu_kernel
from loramix_kernels.ops.lm_head import lm_head_topk
from loramix_kernels.reference.lm_head import lm_head_topk_chunked, lm_head_topk_torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cases(quick: bool):
    if quick:
        return [dict(M=M, V=V, H=H, k=k, dtype="fp32")
                for M, V, H in [(1, 1024, 64), (4, 2048, 64)] for k in (1, 8)] + \
            [dict(M=64, V=32000, H=512, k=8, dtype="fp32")]  # prefill-sized: a 32k vocabulary
    out = [dict(M=64, V=131072, H=4096, k=k, dtype="bf16") for k in (1, 4, 8)]
    out += [dict(M=1, V=128256, H=4096, k=8, dtype="bf16"), dict(M=16, V=128256, H=4096, k=8, dtype="bf16"),
            dict(M=64, V=256000, H=8192, k=8, dtype="bf16"), dict(M=64, V=131072, H=4096, k=8, dtype="fp32")]
    return out


def headline_cases():
    """Issue 12's target shape (M = 64, V = 128k, H = 4096) and a decode row."""
    return [dict(M=64, V=131072, H=4096, k=k, dtype="bf16") for k in (1, 8)] + \
        [dict(M=1, V=128256, H=4096, k=8, dtype="bf16")]


def make_inputs(case, device):
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    dt = _DTYPES[case["dtype"]]
    M, V, H = case["M"], case["V"], case["H"]
    hidden = torch.randn(M, H, device=device, generator=g).to(dt)
    weight = (torch.randn(V, H, device=device, generator=g) * H ** -0.5).to(dt)
    return dict(hidden=hidden, weight=weight)


def candidates(case, inputs):
    h, w, k = inputs["hidden"], inputs["weight"], case["k"]
    out = {
        "loramix": lambda: lm_head_topk(h, w, k),
        "torch": lambda: lm_head_topk_torch(h, w, k),
        "chunked": lambda: lm_head_topk_chunked(h, w, k),
    }
    return add_cpu_kernel(out, "lm_head_topk", h, w, k)


def traffic_bytes(case):
    elem = _DTYPES[case["dtype"]].itemsize
    return (case["V"] + case["M"]) * case["H"] * elem + case["M"] * case["k"] * 12


def flops(case):
    return 2 * case["M"] * case["V"] * case["H"]


@pytest.mark.parametrize("case", cases(quick=True), ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_bench_lm_head(benchmark, case):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = make_inputs(case, device)
    cands = candidates(case, inputs)
    assert next(iter(cands)) == "loramix"
    results = {name: fn() for name, fn in cands.items()}
    # random fp32 logits have no ties: every candidate picks the same tokens
    for name in ("torch", "chunked"):
        assert torch.equal(results[name][1].cpu(), results["loramix"][1].cpu()), name
    benchmark(cands["loramix"])
