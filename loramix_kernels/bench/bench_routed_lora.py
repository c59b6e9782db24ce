"""Benchmarks for routed_lora: ours against (a) the per-expert loop (MixLoRA), (b) the dense masked
two-GEMM in torch, (c) the two-launch shrink/expand split (vLLM design, Triton, written here); and
its backward against the per-expert (m-LoRA) and dense-GEMM PyTorch backwards.

Roofline bytes = x + the expected active experts' weights + y (bf16), the floor that a token-major
kernel meets. Run through ``python -m loramix_kernels.bench routed_lora [--full] [--json PATH]``,
or as pytest-benchmark tests: ``pytest loramix_kernels/bench/bench_routed_lora.py``.
"""

import itertools

import pytest
import torch

import loramix_kernels  # noqa: F401
from loramix_kernels import _backend
from loramix_kernels.bench.runner import add_cpu_kernel
from loramix_kernels.ops.routed_lora import (kernel_numerics, slice_kwargs, sort_pairs, sorted_config,
                                             sorted_meta_kwargs)
from loramix_kernels.reference.routed_lora import (
    dense_pack, routed_lora_backward_dense, routed_lora_backward_ref, routed_lora_dense, routed_lora_ref)

def routed_lora_two_launch(x, lora_a, lora_b, expert_ids, gates, scaling):
    """Baseline (c), Triton: the vLLM design, shrink and expand as two launches per slice with an
    fp32 ``[T*k, r]`` intermediate in global memory (same expert-sorted metadata as ours). Inputs
    as for ``routed_lora`` (not validated: a baseline, fed by ``make_inputs``)."""
    from loramix_kernels.kernels.routed_lora import _sorted_expand_kernel, _sorted_shrink_kernel

    T, d_in = x.shape
    E, K = lora_a[0].shape[0], expert_ids.shape[1]
    ws = torch.zeros(T, sum(b.shape[1] for b in lora_b), dtype=torch.float32, device=x.device)
    if T == 0 or K == 0 or d_in == 0:
        return ws.to(x.dtype)
    P = T * K
    block_m, block_n, block_k, nsplit, _, _ = sorted_config(x, P, E, lora_a, lora_b)
    meta = sort_pairs(expert_ids, E, block_m)
    num = kernel_numerics(x.dtype)
    for s in range(len(lora_a)):
        h = torch.empty(P, lora_a[s].shape[1], dtype=torch.float32, device=x.device)
        sizes = dict(gates_ptr=gates, E=E, K=K, stride_gt=gates.stride(0), stride_gk=gates.stride(1),
                     stride_hp=h.stride(0), BLOCK_M=block_m, DOT_FP32=num["DOT_FP32"], IEEE=num["IEEE"],
                     **sorted_meta_kwargs(meta))
        kw = slice_kwargs(lora_a, lora_b, [s], slots=1, b=False, cols=False)
        _sorted_shrink_kernel[(meta[-1],)](
            x_ptr=x, h_ptr=h, D_IN=d_in, stride_xt=x.stride(0), stride_xk=x.stride(1),
            scaling=float(scaling), BLOCK_K=block_k, **sizes, **kw)
        kw = slice_kwargs(lora_a, lora_b, [s], slots=1, a=False)
        _sorted_expand_kernel[(meta[-1] * nsplit,)](
            h_ptr=h, y_ptr=ws, stride_yt=ws.stride(0), stride_yn=ws.stride(1), BLOCK_N=block_n,
            NSPLIT=nsplit, H_FP32=num["H_FP32"], num_warps=8 if block_m >= 64 else 4, **sizes, **kw)
    return ws.to(x.dtype)


SLICES = {"qkv": [4096, 1024, 1024], "single": [4096]}


def cases(quick: bool):
    if quick:
        out = [dict(op="fwd", T=T, d_in=64, slices="qkv_small", E=8, r=16, k=k)
               for T, k in ((1, 2), (16, 2), (64, 8))]
        out.append(dict(op="bwd", T=16, d_in=64, slices="qkv_small", E=32, r=16, k=2))
        # prefill: sparse (the expert-grouped form) and soft routing, and a backward
        return out + [dict(op="fwd", T=512, d_in=512, slices="qkv_small", E=8, r=16, k=2),
                      dict(op="fwd", T=2048, d_in=256, slices="qkv_small", E=8, r=16, k=8),
                      dict(op="bwd", T=512, d_in=256, slices="qkv_small", E=8, r=16, k=2)]
    out = []
    for T, sl, E, r, k in itertools.product([1, 16, 64, 2048, 8192], ["qkv", "single"], [6, 8, 64],
                                           [16, 64], [1, 2, 3, "E"]):
        out.append(dict(op="fwd", T=T, d_in=4096, slices=sl, E=E, r=r, k=E if k == "E" else k))
    # Backward (training): the dense-GEMM regime and the expert-sorted Triton regime.
    for T, (E, r, k) in itertools.product([16, 2048, 8192], [(8, 16, 2), (64, 16, 3), (64, 64, 2)]):
        out.append(dict(op="bwd", T=T, d_in=4096, slices="qkv", E=E, r=r, k=k))
    return out


def headline_cases():
    """Issue 3's targets: decode (T 1, 16) and prefill (T 8192) of packed q/k/v, E 8 r 16 top-2,
    64 experts of rank 64 top-3 (expert-sorted), soft routing over 8; one backward."""
    fwd = [dict(op="fwd", T=T, d_in=4096, slices="qkv", E=E, r=r, k=k)
           for T, E, r, k in ((1, 8, 16, 2), (16, 8, 16, 2), (8192, 8, 16, 2), (8192, 64, 64, 3),
                              (2048, 8, 16, 8))]
    return fwd + [dict(op="bwd", T=2048, d_in=4096, slices="qkv", E=64, r=16, k=3)]


def _widths(case):
    return [64, 16, 16] if case["slices"] == "qkv_small" else SLICES[case["slices"]]


def make_inputs(case, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    T, d_in, E, r, k = case["T"], case["d_in"], case["E"], case["r"], case["k"]
    dt = torch.bfloat16
    x = torch.randn(T, d_in, generator=g).to(device, dt)
    lora_a = [(torch.randn(E, r, d_in, generator=g) / d_in ** 0.5).to(device, dt) for _ in _widths(case)]
    lora_b = [(torch.randn(E, w, r, generator=g) / r ** 0.5).to(device, dt) for w in _widths(case)]
    ids = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :k].to(device, torch.int32)
    gates = torch.softmax(torch.randn(T, k, generator=g), -1).to(device)
    dy = torch.randn(T, sum(_widths(case)), generator=g).to(device, dt)
    return dict(x=x, lora_a=lora_a, lora_b=lora_b, ids=ids, gates=gates, dy=dy,
                packed=dense_pack(lora_a, lora_b) if case["op"] == "fwd" else None)


def candidates(case, inp):
    x, A, B, ids, g = inp["x"], inp["lora_a"], inp["lora_b"], inp["ids"], inp["gates"]
    if case["op"] == "bwd":
        dy = inp["dy"]
        out = {
            "loramix": lambda: torch.ops.loramix.routed_lora_backward(dy, x, A, B, ids, g, 1.0),
            "per_expert": lambda: routed_lora_backward_ref(dy, x, A, B, ids, g, 1.0),
            "dense_torch": lambda: routed_lora_backward_dense(dy, x, A, B, ids, g, 1.0),
        }
        return add_cpu_kernel(out, "routed_lora_backward", dy, x, A, B, ids, g, 1.0, None)
    out = {
        "loramix": lambda: torch.ops.loramix.routed_lora(x, A, B, ids, g, 1.0),
        "per_expert": lambda: routed_lora_ref(x, A, B, ids, g, 1.0),
        "dense_torch": lambda: routed_lora_dense(x, inp["packed"], ids, g, 1.0),
    }
    if _backend.use_triton(x):
        out["two_launch"] = lambda: routed_lora_two_launch(x, A, B, ids, g, 1.0)
    return add_cpu_kernel(out, "routed_lora", x, A, B, ids, g, 1.0)


def traffic_bytes(case):
    """Forward: x + active weights + y. Backward: x + dy + dx + active weights + their grads."""
    T, d_in, E, r, k = case["T"], case["d_in"], case["E"], case["r"], case["k"]
    widths = _widths(case)
    active = E * (1 - (1 - k / E) ** T)  # expected distinct experts under uniform routing
    weights = active * sum(r * d_in + w * r for w in widths)
    if case["op"] == "bwd":
        return int(2 * (2 * T * d_in + T * sum(widths) + 2 * weights))
    return int(2 * (T * d_in + weights + T * sum(widths)))


def flops(case):
    """Routed work only (what an ideal kernel computes): 2 GEMMs forward, 6 backward."""
    T, d_in, r, k = case["T"], case["d_in"], case["r"], case["k"]
    fwd = 2 * T * k * sum(r * d_in + w * r for w in _widths(case))
    return int(3 * fwd if case["op"] == "bwd" else fwd)


@pytest.mark.parametrize("case", cases(quick=True), ids=lambda c: f"{c['op']}-T{c['T']}-E{c['E']}-r{c['r']}-k{c['k']}")
@pytest.mark.parametrize("impl", ["loramix", "per_expert", "dense_torch"])
def test_routed_lora(benchmark, case, impl):
    inp = make_inputs(case, torch.device("cpu"))
    benchmark(candidates(case, inp)[impl])
