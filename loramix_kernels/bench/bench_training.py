"""Benchmarks: one training step (forward + backward) of a routed LoRA layer (runner suite "training").

What is timed is the routed mixture of one layer, ``y = scaling * sum_j g_j B_{e_j} A_{e_j} x``,
forward and backward to every leaf that needs a gradient (``torch.autograd.grad`` against a fixed
``dy``). The frozen base projection ``W x`` and the router are left out: they are the same GEMM /
the same small ``[d, E]`` product for every candidate (``route_topk`` has its own suite), and the
gates enter as a leaf that needs a gradient (what the router receives).

Shapes (``quick=False``): prefill T in {2048, 8192}; the routed_lora suite's widths (packed q/k/v
of a 4096-wide Llama, d_in 4096 with slices 4096 / 1024 / 1024, and a single 4096 -> 4096 slice),
r 16; E in {6, 8, 64}; soft routing (k = E, gates = the full softmax) and top-k (k = 3 at E = 6,
the paper's top-3 of 6; k = 2 otherwise); two regimes:

* ``joint``: experts, input and gates all need gradients (the paper's joint training);
* ``frozen``: experts are frozen (``requires_grad=False``, e.g. PEFT adapters); only the input
  and the gates need gradients (router-only training).

bf16 on CUDA, fp32 on CPU. Quick CPU shapes: T 64..256, d_in 256 (slices 256 / 64 / 64).

Candidates, ours first:

* ``loramix``: ``routed_lora`` through autograd (its registered backward);
* ``per_expert``: torch autograd through the per-expert loop as MixLoRA writes it
  (:func:`mixlora_loop`: for every expert, ``where`` / ``index_select`` / two matmuls per slice /
  gate / ``index_add_``, in the model dtype);
* ``dense_torch``: torch autograd through the dense two-GEMM form around a ``[T, E]`` gate matrix
  (``reference.routed_lora.routed_lora_dense``), its experts kept as leaves in the concatenated
  layout that form wants (``A_cat [E r, d_in]``, ``B_cat [d_out, E r]``), so it pays no repacking.

Peak memory: :func:`peak_memory` gives the bytes a step allocates above what was resident before
it (``torch.cuda.max_memory_allocated`` on CUDA; on CPU the profiler's allocation timeline, None
when the profiler cannot give it). The runner picks it up through the optional suite hook
``peak_memory(fn, device)``.

Roofline traffic (``traffic_bytes``): forward reads x, the active experts' weights and writes y;
backward reads dy, x and the weights, writes dx and the gates' gradient, and in the joint regime
the active experts' gradients. Run: ``python -m loramix_kernels.bench training`` (``--full`` on a
GPU), or ``pytest loramix_kernels/bench/bench_training.py``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import loramix_kernels  # noqa: F401  (registers the ops)
from loramix_kernels.ops.routed_lora import routed_lora
from loramix_kernels.reference.routed_lora import routed_lora_dense

SLICES = {"qkv": [4096, 1024, 1024], "single": [4096]}
QUICK_SLICES = {"qkv": [256, 64, 64], "single": [256]}
ROUTINGS = ("soft", "topk")
REGIMES = ("joint", "frozen")


def _k(routing, E):
    return E if routing == "soft" else (3 if E == 6 else 2)


def cases(quick: bool):
    if quick:
        rows = [(128, "qkv", 6, "soft", "joint"), (256, "qkv", 6, "topk", "frozen"),
                (64, "single", 64, "topk", "joint"), (256, "single", 8, "soft", "frozen"),
                (1024, "qkv", 6, "topk", "joint"), (512, "single", 8, "topk", "joint")]  # prefill
        return [dict(T=T, d_in=256, slices=sl, E=E, r=16, k=_k(rt, E), routing=rt, regime=rg)
                for T, sl, E, rt, rg in rows]
    return [dict(T=T, d_in=4096, slices=sl, E=E, r=16, k=_k(rt, E), routing=rt, regime=rg)
            for T, sl, E, rt, rg in itertools.product((2048, 8192), ("qkv", "single"), (6, 8, 64),
                                                      ROUTINGS, REGIMES)]


def headline_cases():
    """Issue 11's training targets: packed q/k/v at T 2048, 6 experts top-3 and 64 experts top-2,
    joint and frozen."""
    return [dict(T=2048, d_in=4096, slices="qkv", E=E, r=16, k=_k("topk", E), routing="topk", regime=rg)
            for E in (6, 64) for rg in REGIMES]


def _widths(case):
    return (SLICES if case["d_in"] == 4096 else QUICK_SLICES)[case["slices"]]


def _dtype(device):
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# ------------------------------------------------------------------------------------------------
# baselines
# ------------------------------------------------------------------------------------------------


def mixlora_loop(x, lora_a, lora_b, expert_ids, gates, scaling):
    """The per-expert loop of MixLoRA (TUDB-Labs/MixLoRA, plain autograd), over packed slices.

    For each of the E experts: the (token, slot) pairs routed to it (``torch.where``), its tokens
    (``index_select``), ``B_s (A_s x)`` per slice in the model dtype, times the slot's gate and
    ``scaling``, added into the output rows (``index_add_``). Every expert is visited (empty ones
    too), as MixLoRA does. Differentiable in every tensor argument; ``-1`` slots contribute nothing.
    """
    E = lora_a[0].shape[0]
    y = x.new_zeros(x.shape[0], sum(b.shape[1] for b in lora_b))
    ids = expert_ids.long()
    for e in range(E):
        rows, slots = torch.where(ids == e)
        xe = x.index_select(0, rows)
        w = (gates[rows, slots] * scaling).to(x.dtype).unsqueeze(1)
        ye = torch.cat([(xe @ a[e].t()) @ b[e].t() for a, b in zip(lora_a, lora_b)], dim=1)
        y.index_add_(0, rows, ye * w)
    return y


def dense_leaves(lora_a, lora_b, requires_grad):
    """The experts in the dense form's layout, as their own leaves: ``[(A_cat, B_cat, r)]`` with
    ``A_cat [E r, d_in]`` and ``B_cat [d_out, E r]`` (``B_cat[:, e r + i] = B[e][:, i]``)."""
    out = []
    for a, b in zip(lora_a, lora_b):
        E, r, d_in = a.shape
        a_cat = a.detach().reshape(E * r, d_in).clone().requires_grad_(requires_grad)
        b_cat = b.detach().permute(1, 0, 2).reshape(b.shape[1], E * r).clone().requires_grad_(requires_grad)
        out.append((a_cat, b_cat, r))
    return out


def dense_grads_as_experts(packed, grads):
    """Map the dense leaves' gradients ``[dA_cat..., dB_cat...]`` back to ``[E, r, d_in]`` /
    ``[E, d_out, r]`` (for comparison with routed_lora's)."""
    n = len(packed)
    ga, gb = [], []
    for (a_cat, b_cat, r), da, db in zip(packed, grads[:n], grads[n:]):
        E = a_cat.shape[0] // r
        ga.append(da.view(E, r, -1))
        gb.append(db.view(db.shape[0], E, r).permute(1, 0, 2))
    return ga, gb


# ------------------------------------------------------------------------------------------------
# suite interface
# ------------------------------------------------------------------------------------------------


def make_inputs(case, device):
    device = torch.device(device)
    dt = _dtype(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    T, d_in, E, r, k = case["T"], case["d_in"], case["E"], case["r"], case["k"]
    joint = case["regime"] == "joint"
    widths = _widths(case)
    x = torch.randn(T, d_in, generator=g).to(device, dt).requires_grad_(True)
    lora_a = [(torch.randn(E, r, d_in, generator=g) / d_in ** 0.5).to(device, dt).requires_grad_(joint)
              for _ in widths]
    lora_b = [(torch.randn(E, w, r, generator=g) / r ** 0.5).to(device, dt).requires_grad_(joint)
              for w in widths]
    logits = torch.randn(T, E, generator=g)
    if case["routing"] == "soft":
        ids = torch.arange(E, dtype=torch.int32).expand(T, E)  # as LoRAMixerLinear passes them
        gates = torch.softmax(logits, -1)
    else:
        top, ids = torch.topk(logits, k, dim=-1)
        ids, gates = ids.to(torch.int32), torch.softmax(top, -1)
    ids = ids.to(device)
    gates = gates.to(device).requires_grad_(True)  # fp32, as route_topk gives them
    dy = torch.randn(T, sum(widths), generator=g).to(device, dt)
    return dict(x=x, lora_a=lora_a, lora_b=lora_b, ids=ids, gates=gates, dy=dy, scaling=2.0,
                packed=dense_leaves(lora_a, lora_b, joint), joint=joint)


def leaves(inputs, impl):
    """The tensors a step differentiates: x, gates and, in the joint regime, the experts (in the
    layout of ``impl``)."""
    out = [inputs["x"], inputs["gates"]]
    if inputs["joint"]:
        if impl == "dense_torch":
            out += [a for a, _, _ in inputs["packed"]] + [b for _, b, _ in inputs["packed"]]
        else:
            out += list(inputs["lora_a"]) + list(inputs["lora_b"])
    return out


def forwards(inputs):
    """impl -> zero-argument forward (ours first)."""
    x, A, B, ids, g, s = (inputs[n] for n in ("x", "lora_a", "lora_b", "ids", "gates", "scaling"))
    return {
        "loramix": lambda: routed_lora(x, A, B, ids, g, s),
        "per_expert": lambda: mixlora_loop(x, A, B, ids, g, s),
        "dense_torch": lambda: routed_lora_dense(x, inputs["packed"], ids, g, s),
    }


def _step(forward, wrt, dy):
    def run():
        return torch.autograd.grad(forward(), wrt, dy)
    return run


def candidates(case, inputs):
    return {impl: _step(fwd, leaves(inputs, impl), inputs["dy"]) for impl, fwd in forwards(inputs).items()}


def traffic_bytes(case):
    T, d_in, E, r, k = case["T"], case["d_in"], case["E"], case["r"], case["k"]
    widths = _widths(case)
    elem = 2 if torch.cuda.is_available() else 4
    active = E * (1 - (1 - k / E) ** T)  # expected distinct experts
    weights = active * sum(r * d_in + w * r for w in widths)
    d_out = sum(widths)
    fwd = T * d_in + weights + T * d_out
    bwd = T * d_out + T * d_in + weights + T * d_in + (weights if case["regime"] == "joint" else 0)
    return int(elem * (fwd + bwd) + 2 * 4 * T * k)


def flops(case):
    """Routed work only: forward 2 GEMMs; backward 2 more (dx path), 2 more when experts train."""
    T, d_in, r, k = case["T"], case["d_in"], case["r"], case["k"]
    fwd = 2 * T * k * sum(r * d_in + w * r for w in _widths(case))
    return int((3 if case["regime"] == "joint" else 2) * fwd)


def peak_memory(fn, device):
    """Bytes allocated at the peak of ``fn()`` above what was allocated before it (its result
    included). CUDA: the caching allocator's statistics. CPU: the profiler's allocation timeline
    (every allocation and free of the CPU allocator); None where that is unavailable."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return int(peak)
    if device.type != "cpu":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
        del out
        events = prof.profiler.kineto_results.events()
        mem = sorted((e.start_ns(), e.nbytes()) for e in events
                     if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    except Exception:  # private profiler API changed: say "not measured", never guess
        return None
    if not mem:
        return None
    cur = peak = 0
    for _, n in mem:
        cur += n
        peak = max(peak, cur)
    return int(peak)


def _case_id(c):
    return f"{c['slices']}-T{c['T']}-E{c['E']}-k{c['k']}-{c['routing']}-{c['regime']}"


@pytest.mark.parametrize("case", cases(quick=True), ids=_case_id)
@pytest.mark.parametrize("impl", ["loramix", "per_expert", "dense_torch"])
def test_bench_training(benchmark, case, impl):
    with loramix_kernels.use_backend("auto"):  # the CPU path a user gets, not the interpreter
        inputs = make_inputs(case, torch.device("cpu"))
        fn = candidates(case, inputs)[impl]
        grads = fn()
        assert len(grads) == len(leaves(inputs, impl)) and all(torch.isfinite(t).all() for t in grads)
        benchmark(fn)
