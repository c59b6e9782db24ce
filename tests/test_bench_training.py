"""The training and model-level benchmark suites: their baselines compute what routed_lora computes
(forward and every gradient), and each suite's quick cases build and run."""

import pytest
import torch

import loramix_kernels
from loramix_kernels.bench import bench_training as bt
from loramix_kernels.ops.routed_lora import routed_lora
from loramix_kernels.reference.routed_lora import routed_lora_dense
from tests.common import assert_close


@pytest.fixture(autouse=True)
def _one_thread_auto():
    """Tiny shapes: one intra-op thread; the CPU path a user gets (not the Triton interpreter)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with loramix_kernels.use_backend("auto"):
        yield
    torch.set_num_threads(n)


def _problem(T, d_in, widths, E, r, k, dtype, seed=0, empty_slots=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g, dtype=dtype)
    A = [torch.randn(E, r, d_in, generator=g, dtype=dtype) / d_in ** 0.5 for _ in widths]
    B = [torch.randn(E, w, r, generator=g, dtype=dtype) / r ** 0.5 for w in widths]
    if k == E:
        ids = torch.arange(E, dtype=torch.int32).expand(T, E)
    else:
        ids = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :k].to(torch.int32)
    if empty_slots:
        ids = ids.clone()
        ids[::3, -1] = -1  # empty routing slots contribute nothing (and get a zero gate gradient)
    gates = torch.rand(T, k, generator=g, dtype=dtype)
    dy = torch.randn(T, sum(widths), generator=g, dtype=dtype)
    return x, A, B, ids, gates, dy


PROBLEMS = [
    # T, d_in, widths, E, r, k, empty_slots
    (37, 48, [40, 16, 16], 6, 8, 3, False),   # packed q/k/v, top-3 of 6
    (29, 32, [24], 8, 4, 8, False),           # soft (k = E)
    (33, 40, [32, 8], 64, 4, 2, True),        # many experts, most unused; -1 slots
    (1, 16, [8, 8, 8], 5, 2, 2, False),       # one token
]


def _close(got, want, dtype):
    if dtype == torch.float64:  # both sides in float64: only summation order differs
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    else:
        assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("prob", PROBLEMS, ids=lambda p: f"T{p[0]}-E{p[3]}-k{p[5]}-s{len(p[2])}")
@pytest.mark.parametrize("joint", [True, False], ids=["joint", "frozen"])
def test_baselines_match_routed_lora(prob, joint, dtype):
    T, d_in, widths, E, r, k, empty = prob
    x, A, B, ids, gates, dy = _problem(T, d_in, widths, E, r, k, dtype, empty_slots=empty)
    s = 0.75

    def leaves_of(x, A, B, g):
        return [x, g] + (list(A) + list(B) if joint else [])

    def fresh():
        return (x.clone().requires_grad_(True), [a.clone().requires_grad_(joint) for a in A],
                [b.clone().requires_grad_(joint) for b in B], gates.clone().requires_grad_(True))

    # ours
    x0, A0, B0, g0 = fresh()
    y0 = routed_lora(x0, A0, B0, ids, g0, s)
    want = torch.autograd.grad(y0, leaves_of(x0, A0, B0, g0), dy)

    # per-expert loop (MixLoRA)
    x1, A1, B1, g1 = fresh()
    y1 = bt.mixlora_loop(x1, A1, B1, ids, g1, s)
    got = torch.autograd.grad(y1, leaves_of(x1, A1, B1, g1), dy)
    _close(y1, y0, dtype)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        _close(a, b, dtype)

    # dense form, experts as leaves in its own layout
    x2, _, _, g2 = fresh()
    packed = bt.dense_leaves(A, B, joint)
    y2 = routed_lora_dense(x2, packed, ids, g2, s)
    wrt = [x2, g2] + ([a for a, _, _ in packed] + [b for _, b, _ in packed] if joint else [])
    got = torch.autograd.grad(y2, wrt, dy)
    _close(y2, y0, dtype)
    _close(got[0], want[0], dtype)
    _close(got[1], want[1], dtype)
    if joint:
        ga, gb = bt.dense_grads_as_experts(packed, got[2:])
        for a, b in zip(ga + gb, want[2:]):
            _close(a, b, dtype)


def test_dense_leaves_layout():
    """B_cat[:, e r + i] is expert e's column i; A_cat row e r + i is expert e's row i."""
    _, A, B, _, _, _ = _problem(4, 12, [10, 6], 3, 2, 2, torch.float64)
    packed = bt.dense_leaves(A, B, False)
    for (a_cat, b_cat, r), a, b in zip(packed, A, B):
        assert r == 2
        for e in range(3):
            assert torch.equal(a_cat[e * r:(e + 1) * r], a[e])
            assert torch.equal(b_cat[:, e * r:(e + 1) * r], b[e])


def test_training_quick_cases_run():
    """Every quick case: each candidate differentiates its leaves; the step's results agree."""
    cases = bt.cases(quick=True)
    assert {c["routing"] for c in cases} == {"soft", "topk"}
    assert {c["regime"] for c in cases} == {"joint", "frozen"}
    for case in cases:
        inputs = bt.make_inputs(case, "cpu")
        cands = bt.candidates(case, inputs)
        assert list(cands)[0] == "loramix" and set(cands) == {"loramix", "per_expert", "dense_torch"}
        n_leaves = 2 + (2 * len(inputs["lora_a"]) if case["regime"] == "joint" else 0)
        res = {impl: fn() for impl, fn in cands.items()}
        for impl, grads in res.items():
            assert len(grads) == n_leaves, impl
        for impl in ("per_expert", "dense_torch"):  # x and gates grads are layout-independent
            for a, b in zip(res[impl][:2], res["loramix"][:2]):
                torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
        assert bt.traffic_bytes(case) > 0 and bt.flops(case) > 0


def test_full_cases_cover_the_issue():
    cases = bt.cases(quick=False)
    assert {c["T"] for c in cases} == {2048, 8192}
    assert {c["E"] for c in cases} == {6, 8, 64}
    assert {c["slices"] for c in cases} == {"qkv", "single"}
    for c in cases:
        assert c["d_in"] == 4096 and c["r"] == 16
        assert c["k"] == (c["E"] if c["routing"] == "soft" else (3 if c["E"] == 6 else 2))
    assert len(cases) == 2 * 2 * 3 * 2 * 2


def test_peak_memory_cpu():
    """The CPU measurement sees a step's transient allocations (or honestly says None)."""
    n = 1 << 20

    def alloc_then_free():
        a = torch.ones(n)  # 4 MiB, freed before the return
        return float(a.sum())

    peak = bt.peak_memory(alloc_then_free, "cpu")
    if peak is None:
        pytest.skip("this torch's profiler gives no allocation timeline")
    assert 4 * n <= peak < 8 * n


def test_model_quick_case_runs():
    """The model-level suite's quick case: all four models build offline and run one forward."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from loramix_kernels.bench import bench_model as bm

    case = bm.cases(quick=True)[0]
    inputs = bm.make_inputs(case, "cpu")
    assert inputs["errors"] == {}, inputs["errors"]
    cands = bm.candidates(case, inputs)
    assert list(cands) == ["loramix", "base", "peft_lora", "xlora"]
    outs = {impl: fn() for impl, fn in cands.items()}
    for impl, out in outs.items():
        assert out.shape == (1, case["T"], case["vocab"]) and torch.isfinite(out).all(), impl
    for impl in ("loramix", "peft_lora", "xlora"):
        assert not torch.allclose(outs[impl], outs["base"], atol=1e-4), impl
    from loramix_kernels.nn import mixer_modules

    mods = mixer_modules(inputs["models"]["loramix"])
    assert len(mods) == 4 * case["layers"]
    assert all(m.top_k == 3 and m.num_experts == 6 and m.routing == "topk" for m in mods.values())
    assert sum(m.group is not None for m in mods.values()) == 3 * case["layers"]  # packed q/k/v
    r = bm.ratios({"base": 2.0, "loramix": 2.5})
    assert r == {"base": 1.0, "loramix": 1.25}
