"""Benchmarks for tree_attention (draft-tree verification over a paged KV cache).

Ours against (a) ``sdpa_dense``: ``scaled_dot_product_attention`` with a dense boolean tree mask
over the KV gathered out of the paged cache and expanded to every query head BEFOREHAND (the gather,
the mask and the GQA head expansion happen outside the timed call: SDPA's best case, while ours
reads the paged cache), (b) ``sdpa_gather`` (CPU): the same plain-PyTorch formulation doing all its
work per call, as a user would (gather the request's KV, boolean mask from the bitmask, SDPA with
``enable_gqa``), and (c) compiled FlexAttention with a block mask built from the tree (CUDA only).
On CPU the figures to read are the ratios to these baselines in the same run
(``python -m loramix_kernels.bench.bench_tree`` prints them for 1 and 2 threads, interleaved
repetitions, median and interquartile range).

Roofline bytes = every request's cached K and V read once per KV head (prefix + the N tree nodes)
+ q + out, in bf16. Run through ``python -m loramix_kernels.bench tree [--full] [--json PATH]``,
or as pytest-benchmark tests: ``pytest loramix_kernels/bench/bench_tree.py``.
"""

import argparse
import itertools
import math
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import loramix_kernels  # noqa: F401
from loramix_kernels.bench.runner import add_cpu_kernel
from loramix_kernels.reference.tree import (build_tree_ref, dense_tree_mask, flex_tree_block_mask,
                                            gather_kv, tree_attention_flex, tree_attention_sdpa)

DTYPE = torch.bfloat16


def cases(quick: bool):
    if quick:  # CPU: decode shapes of issue 10 (B 1..8, N 8..64, prefix 128..2048), a wide tree
        return [dict(B=2, prefix=64, N=8, Hq=4, Hkv=2, D=32, block=16),
                dict(B=1, prefix=128, N=8, Hq=8, Hkv=2, D=64, block=16),
                dict(B=8, prefix=128, N=8, Hq=32, Hkv=8, D=128, block=16),
                dict(B=4, prefix=512, N=16, Hq=32, Hkv=8, D=128, block=16),
                dict(B=2, prefix=2048, N=64, Hq=16, Hkv=2, D=64, block=16),
                dict(B=1, prefix=512, N=256, Hq=16, Hkv=4, D=64, block=16)]  # prefill-ish
    return [dict(B=B, prefix=P, N=N, Hq=32, Hkv=8, D=128, block=16)
            for B, P, N in itertools.product([1, 8, 32], [1024, 8192, 32768], [16, 64])]


def headline_cases():
    """Issue 4's decode shapes: a 16- and a 64-node tree over an 8k prefix, batch 1 and 32."""
    return [dict(B=B, prefix=8192, N=N, Hq=32, Hkv=8, D=128, block=16) for B, N in ((1, 16), (32, 64))]


def _tree_parents(B: int, N: int, g: torch.Generator) -> torch.Tensor:
    """EAGLE-like trees: node i hangs off a random node among the previous quarter of the tree,
    which gives bushy trees of depth ~log(N) with a few long paths."""
    i = torch.arange(N)
    lo = (i * 3) // 4
    span = (i - lo).clamp(min=1)
    parents = lo + (torch.rand(B, N, generator=g) * span).long()
    parents[:, 0] = -1
    return parents


def make_inputs(case, device):
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    B, P, N, Hq, Hkv, D, bs = (case[k] for k in ("B", "prefix", "N", "Hq", "Hkv", "D", "block"))
    seq_len = P + N
    nblk = math.ceil(seq_len / bs)
    num_blocks = B * nblk
    # Shuffled physical blocks: the kernel must follow the block table, not contiguity.
    table = torch.randperm(num_blocks, generator=g).view(B, nblk).to(device, torch.int32)
    seq_lens = torch.full((B,), seq_len, dtype=torch.int32, device=device)
    gd = torch.Generator(device=device).manual_seed(1)
    k_cache = torch.randn(num_blocks, bs, Hkv, D, generator=gd, device=device, dtype=DTYPE)
    v_cache = torch.randn(num_blocks, bs, Hkv, D, generator=gd, device=device, dtype=DTYPE)
    q = torch.randn(B, N, Hq, D, generator=gd, device=device, dtype=DTYPE)
    tree_mask = build_tree_ref(_tree_parents(B, N, g))[0].to(device)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=table, seq_lens=seq_lens,
                tree_mask=tree_mask, sm_scale=1.0 / math.sqrt(D), max_len=seq_len)


def candidates(case, inp):
    q, kc, vc, bt, sl, tm, scale = (inp[k] for k in ("q", "k_cache", "v_cache", "block_table",
                                                     "seq_lens", "tree_mask", "sm_scale"))
    out = {"loramix": lambda: torch.ops.loramix.tree_attention(q, kc, vc, bt, sl, tm, scale)}
    add_cpu_kernel(out, "tree_attention", q, kc, vc, bt, sl, tm, scale,  # (no checks)
                   native=lambda: torch.ops.loramix._tree_attention_cpu(q, kc, vc, bt, sl, tm, scale,
                                                                        False, False)[0])
    N, L, G = q.shape[1], inp["max_len"], case["Hq"] // case["Hkv"]
    try:  # the baselines' inputs may not fit in memory at the largest shapes
        k, v = gather_kv(kc, vc, bt, sl, L)
        mask = dense_tree_mask(tm, sl, N, L)
        k_exp, v_exp = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        out["sdpa_dense"] = lambda: tree_attention_sdpa(q, k_exp, v_exp, mask, scale)
        if not q.is_cuda:
            out["sdpa_gather"] = lambda: sdpa_gather(q, kc, vc, bt, sl, tm, scale, L)
        if q.is_cuda:  # FlexAttention needs its compiled (Triton) kernels: CUDA only here
            block_mask = flex_tree_block_mask(tm, sl, N, L)
            out["flex"] = lambda: tree_attention_flex(q, k, v, block_mask, scale)
    except torch.OutOfMemoryError as exc:
        print(f"# baselines skipped for {case}: {type(exc).__name__}")
    return out


def sdpa_gather(q, k_cache, v_cache, block_table, seq_lens, tree_mask, sm_scale, max_len):
    """The plain-PyTorch formulation doing all its work per call: gather the KV once, a boolean
    mask from the bitmask, SDPA with GQA (no repeated heads)."""
    k, v = gather_kv(k_cache, v_cache, block_table, seq_lens, max_len)
    mask = dense_tree_mask(tree_mask, seq_lens, q.shape[1], max_len)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask[:, None],
                                       scale=sm_scale, enable_gqa=q.shape[2] != k.shape[1])
    return o.transpose(1, 2)


def traffic_bytes(case):
    B, P, N, Hq, Hkv, D = (case[k] for k in ("B", "prefix", "N", "Hq", "Hkv", "D"))
    elem = torch.finfo(DTYPE).bits // 8
    kv = B * (P + N) * Hkv * D * 2 * elem  # K and V, once per (request, KV head)
    q_out = 2 * B * N * Hq * D * elem
    return int(kv + q_out)


def flops(case):
    B, P, N, Hq, D = (case[k] for k in ("B", "prefix", "N", "Hq", "D"))
    return int(4 * B * Hq * N * (P + N) * D)  # QK^T and PV over every cached position


def _case_id(c):
    return f"B{c['B']}-P{c['prefix']}-N{c['N']}-Hq{c['Hq']}-Hkv{c['Hkv']}-D{c['D']}"


@pytest.mark.parametrize("case", cases(quick=True), ids=_case_id)
@pytest.mark.parametrize("impl", ["loramix", "sdpa_dense", "sdpa_gather"])
def test_tree_attention(benchmark, case, impl):
    inp = make_inputs(case, torch.device("cpu"))
    benchmark(candidates(case, inp)[impl])


@pytest.mark.parametrize("case", cases(quick=True), ids=_case_id)
def test_candidates_agree(case):
    """Every candidate computes the same attention (the timings compare like with like)."""
    inp = make_inputs(case, torch.device("cpu"))
    cands = candidates(case, inp)
    ours = cands.pop("loramix")().float()
    assert cands, "no baseline ran"
    for name, fn in cands.items():
        torch.testing.assert_close(fn().float(), ours, atol=3e-2, rtol=3e-2, msg=name)


# --------------------------------------------------------------------------------------------------
# CPU ratios: ours against the baselines, interleaved, 1 and 2 threads
# --------------------------------------------------------------------------------------------------


def cpu_ratios(threads=(1, 2), dtypes=(torch.bfloat16, torch.float32), reps=None, shapes=None):
    """Time ours and every baseline in interleaved repetitions (so that drift and neighbours hit
    them alike) and print, per case, the median time of each and the median and interquartile
    range of the per-repetition ratios baseline / ours (> 1: ours is faster)."""
    global DTYPE
    old_threads, old_dtype = torch.get_num_threads(), DTYPE
    print("# threads dtype case | median us per impl | ratio baseline/ours: median [q1, q3]")
    try:
        for th in threads:
            torch.set_num_threads(th)
            for case in shapes or cases(quick=True):
                for dtype in dtypes:
                    DTYPE = dtype
                    inp = make_inputs(case, "cpu")
                    fns = candidates(case, inp)
                    work = (case["B"] * (case["prefix"] + case["N"]) * case["N"] * case["Hq"]
                            * case["D"])
                    n = reps or max(7, min(300, int(2e9 / work)))
                    for fn in fns.values():  # warm-up
                        fn(), fn()
                    ts = {k: [] for k in fns}
                    for _ in range(n):
                        for k, fn in fns.items():
                            t0 = time.perf_counter()
                            fn()
                            ts[k].append(time.perf_counter() - t0)
                    med = {k: statistics.median(v) * 1e6 for k, v in ts.items()}
                    cols = []
                    for k in fns:
                        if k == "loramix":
                            continue
                        r = sorted(b / a for a, b in zip(ts["loramix"], ts[k]))
                        cols.append(f"{k} {statistics.median(r):.2f} [{r[len(r) // 4]:.2f}, "
                                    f"{r[(3 * len(r)) // 4]:.2f}]")
                    times = " ".join(f"{k}={v:.0f}" for k, v in med.items())
                    print(f"{th} {str(dtype)[6:]} {_case_id(case)} reps={n} | {times} | "
                          + "; ".join(cols), flush=True)
    finally:
        torch.set_num_threads(old_threads)
        DTYPE = old_dtype


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=cpu_ratios.__doc__)
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default: by case size)")
    a = p.parse_args()
    cpu_ratios(tuple(int(t) for t in a.threads.split(",")), reps=a.reps)
