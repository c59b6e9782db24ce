"""The CPU ops with and without their native kernels (csrc/): same outputs, same errors.

Where the C++ extension is built, the CPU ops run its kernels (kv_write_, compact_kv_,
compact_kv_layers_, tree_attention's fast path, lm_head_topk, route_topk, verify_*); without it
(``LORAMIX_NATIVE=0``, no compiler) they run the vectorised PyTorch kernels. Both are real paths,
so each is checked against the other here, on the same random valid inputs, and on invalid values
both must raise the same message (the native kernels check values in their walk and let the
Python checks name the offending entry).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loramix_kernels import (_native, compact_kv_, compact_kv_layers_, kv_write_, lm_head_topk,
                             route_topk, tree_attention)
from tests.common import reference_path, strided
from tests.test_tree import make_attention_case

NATIVE_OPS = ("_kv_write_cpu", "_compact_kv_cpu", "_tree_attention_cpu", "_lm_head_topk_cpu",
              "_route_topk_cpu")
pytestmark = pytest.mark.skipif(not all(_native.has_op(n) for n in NATIVE_OPS),
                                reason="C++ extension not built")


@contextlib.contextmanager
def without_native():
    """The plain-PyTorch CPU kernels, as without the extension."""
    mp = pytest.MonkeyPatch()
    direct = _native.set_direct(False)  # the ops' direct C++ CPU kernels hand calls to Python
    mp.setattr(_native, "op", lambda name: None)
    try:
        yield
    finally:
        mp.undo()
        _native.set_direct(direct)


def both(fn):
    """``fn()`` with the native kernels and without them (CPU kernels, not the interpreter)."""
    with reference_path():
        a = fn()
        with without_native():
            b = fn()
    return a, b


def _kv_inputs(g, L=None, nb=12, bs=4, H=2, D=8, dtype=torch.float32):
    shape = (nb, bs, H, D) if L is None else (L, nb, bs, H, D)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("idx", [torch.int32, torch.int64])
def test_kv_write_native_equals_torch(dtype, idx):
    g = torch.Generator().manual_seed(1)
    kc, vc = _kv_inputs(g, dtype=dtype)
    T = 9
    slots = torch.randperm(kc.shape[0] * kc.shape[1], generator=g)[:T].to(idx)
    slots[3] = -1
    k = torch.randn(T, 2, 8, generator=g).to(dtype)
    v = -k

    def run(strided_inputs=False):
        kd, vd = kc.clone(), vc.clone()
        args = (k, v, slots)
        if strided_inputs:
            args = tuple(strided(t) for t in args)
        kv_write_(kd, vd, *args)
        return kd, vd

    for s in (False, True):
        a, b = both(lambda: run(s))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    bad = slots.clone()
    bad[0] = bad[1]
    for ctx in (contextlib.nullcontext, without_native):
        with reference_path(), ctx(), pytest.raises(ValueError, match="kv_write_: slot_mapping must not write"):
            kv_write_(kc.clone(), vc.clone(), k, v, bad)


@pytest.mark.parametrize("layers", [None, 3])
def test_compact_native_equals_torch(layers):
    g = torch.Generator().manual_seed(2)
    B, N, bs, mb = 3, 6, 4, 4
    kc, vc = _kv_inputs(g, L=layers, nb=B * mb + 2, bs=bs)
    table = torch.randperm(B * mb + 2, generator=g)[:B * mb].view(B, mb).to(torch.int32)
    seq = torch.tensor([9, 16, 6], dtype=torch.int32)
    acc = torch.tensor([[0, 2, 3, 5, -1, -1], [0, 1, 4, -1, -1, -1], [0, -1, -1, -1, -1, -1]])
    n = torch.tensor([3, 2, 0])
    op = compact_kv_ if layers is None else compact_kv_layers_

    def run():
        kd, vd = kc.clone(), vc.clone()
        op(kd, vd, table, seq, acc, n)
        return kd, vd

    a, b = both(run)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], kc)
    bad = acc.clone()
    bad[0, 2] = 1  # not increasing
    for ctx in (contextlib.nullcontext, without_native):
        with reference_path(), ctx(), pytest.raises(ValueError, match="accept_index.*increasing"):
            op(kc.clone(), vc.clone(), table, seq, bad, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tree_attention_native_equals_torch(dtype):
    _, args = make_attention_case(3, 7, 8, 2, 16, 8, [21, 0, 9], dtype, "random", seed=9)
    a, b = both(lambda: tree_attention(*args, 0.2))
    torch.testing.assert_close(a, b, atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=1e-3)
    bad = args[4].clone()
    bad[1] = 3  # shorter than the 7 tree nodes
    for ctx in (contextlib.nullcontext, without_native):
        with reference_path(), ctx(), pytest.raises(ValueError, match="tree_attention: seq_lens"):
            tree_attention(*args[:4], bad, args[5])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_tree_attention_native_random_shapes(data):
    """The native kernel (csrc/tree.cpp, through the op's direct CPU kernel) against the fp32
    reference over random shapes: 1 to 150 query rows per KV head (one, two or several row tiles,
    a partial last tile), head dims that are not multiples of 16, prefixes of 0 and of more than one
    key chunk, trees over one to three mask words, random (not only ancestor) masks, some of whose
    words are all zero (chunks no row sees are skipped), int32 / int64 tables, strided inputs."""
    from loramix_kernels.reference.tree import tree_attention_ref

    B = data.draw(st.integers(1, 3), "B")
    N = data.draw(st.integers(1, 70), "N")
    Hkv = data.draw(st.integers(1, 3), "Hkv")
    G = data.draw(st.sampled_from([1, 2, 3, 4]), "G")
    D = data.draw(st.sampled_from([4, 8, 20, 64, 80, 128]), "D")
    bs = data.draw(st.sampled_from([1, 4, 16, 48]), "bs")
    prefix = data.draw(st.lists(st.integers(0, 90), min_size=B, max_size=B), "prefix")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), "dtype")
    kind = data.draw(st.sampled_from(["random", "chain", "star", "mask"]), "kind")
    seed = data.draw(st.integers(0, 2**16), "seed")
    _, args = make_attention_case(B, N, G * Hkv, Hkv, D, bs, prefix, dtype,
                                  "random" if kind == "mask" else kind, seed=seed)
    if kind == "mask":  # any bits, whole words cleared in some rows
        g = torch.Generator().manual_seed(seed)
        mask = torch.randint(-2**31, 2**31, args[5].shape, generator=g, dtype=torch.int64)
        mask[torch.rand(mask.shape, generator=g) < 0.4] = 0
        args[5] = mask.to(torch.int32)
    if data.draw(st.booleans(), "int64 index"):
        args[3], args[4] = args[3].long(), args[4].long()
    if data.draw(st.booleans(), "strided"):
        args = strided(args)
    scale = data.draw(st.sampled_from([None, 0.05, -0.3, 1.7]), "scale")
    with reference_path():
        got = tree_attention(*args, scale)
    want = tree_attention_ref(*args, scale)
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_tree_attention_direct_hands_over_what_it_does_not_answer():
    """Valid CPU calls stay in C++; rejected arguments get the Python validator's message; garbage
    that a row sees goes to the Python kernel's careful path (NaN exactly in the rows that see it)."""
    from loramix_kernels.reference.tree import tree_attention_ref
    from tests.test_tree import _garbage_in_unseen_slots

    _, args = make_attention_case(2, 40, 8, 2, 24, 16, [37, 0], torch.bfloat16, "random", seed=3)
    with reference_path():
        with python_kernel_calls() as calls:
            a = tree_attention(*args, 0.3)
            b = tree_attention(*strided(args))
        assert calls == []
        torch.testing.assert_close(a.float(), tree_attention_ref(*args, 0.3).float(), atol=2e-2,
                                   rtol=2e-2)
        torch.testing.assert_close(b.float(), tree_attention_ref(*args).float(), atol=2e-2, rtol=2e-2)
        q, k, v, table, lens, mask = args
        too_long = lens.clone()
        too_long[0] = table.shape[1] * k.shape[1] + 1
        bad_block = table.clone()
        bad_block[1, 0] = k.shape[0]
        with python_kernel_calls() as calls:
            with pytest.raises(ValueError, match="tree_attention: block_table is too short"):
                tree_attention(q, k, v, table, too_long, mask)
            with pytest.raises(ValueError, match=r"tree_attention: block_table \[1, 0\] = 11 must lie"):
                tree_attention(q, k, v, bad_block, lens, mask)
            with pytest.raises(ValueError, match="tree_attention: sm_scale must be a finite"):
                tree_attention(*args, float("inf"))
            with pytest.raises(ValueError, match="tree_attention: q must have 4 dimensions"):
                tree_attention(q[0], k, v, table, lens, mask)
            with pytest.raises(TypeError, match="tree_attention: k_cache must have q's dtype"):
                tree_attention(q, k.float(), v, table, lens, mask)
        assert calls == ["Tensor"] * 5
        _, gargs, sees = _garbage_in_unseen_slots(torch.float32, "cpu")
        with python_kernel_calls() as calls:
            out = tree_attention(*gargs, 0.3)
        assert calls == ["Tensor"]  # a row sees garbage: the careful path
        assert bool(sees.any()) and torch.equal(out.isnan().any(-1).any(-1), sees)


def test_tree_attention_native_overflowing_scores():
    """A score that overflows (huge q and K, or a huge sm_scale) is not a finite result: the
    native kernel hands the call over, and the op gives what the reference gives (NaN), not the 0
    its softmax would make of it."""
    from loramix_kernels.reference.tree import tree_attention_ref

    table, lens = torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([2], dtype=torch.int32)
    mask = torch.tensor([[[1]]], dtype=torch.int32)
    big = torch.full((2, 1, 1, 1), 1e20)
    cases = [(torch.full((1, 1, 1, 1), 1e20), big, torch.ones(2, 1, 1, 1), 1.0),
             (torch.ones(1, 1, 1, 4), torch.ones(2, 1, 1, 4), torch.ones(2, 1, 1, 4), 1e38)]
    for q, k, v, scale in cases:
        with reference_path():
            got = tree_attention(q, k, v, table, lens, mask, scale)
            _, status = torch.ops.loramix._tree_attention_cpu(q, k, v, table, lens, mask, scale,
                                                             True, True)
        want = tree_attention_ref(q, k, v, table, lens, mask, scale)
        assert status == 1
        assert torch.equal(got.isnan(), want.isnan()) and bool(got.isnan().all())


def test_tree_attention_native_scratch_reuse():
    """The native kernel reuses per-thread scratch for the gathered K / V and the mask: calls of
    shrinking, growing and other-dtype shapes in a row (and from another thread) each equal the
    torch kernel's result, and never return the scratch itself."""
    import threading

    cases = [(5, 7, 4, 2, 16, 8, [40, 3, 17, 0, 25], torch.float32),
             (2, 1, 4, 2, 16, 8, [9, 30], torch.float32),  # smaller: a view of the same scratch
             (3, 4, 4, 1, 8, 4, [12, 5, 60], torch.bfloat16),  # other dtype: new scratch
             (6, 3, 4, 2, 16, 8, [70, 1, 2, 33, 8, 90], torch.float32)]  # larger: grown
    outs, errors = [], []

    def run_all():
        try:
            for i, (B, N, Hq, Hkv, D, bs, pl, dt) in enumerate(cases):
                _, args = make_attention_case(B, N, Hq, Hkv, D, bs, pl, dt, "random", seed=i)
                a, b = both(lambda: tree_attention(*args, 0.3))
                outs.append(a)
                tol = dict(atol=2e-2, rtol=2e-2) if dt == torch.bfloat16 else dict(atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(a, b, **tol)
        except Exception as e:  # re-raised in the main thread
            errors.append(e)

    run_all()
    t = threading.Thread(target=run_all)
    t.start()
    t.join()
    assert not errors, errors
    ptrs = {o.data_ptr() for o in outs}
    assert len(ptrs) == len(outs)  # every output is its own tensor


def test_lm_head_topk_and_route_topk_native_equal_torch():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(5, 16, generator=g)
    w = torch.randn(300, 16, generator=g)
    w[7] = w[3]  # a tie: the lower index first on both paths
    a, b = both(lambda: lm_head_topk(h, w, 9))
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    logits = torch.randn(6, 8, generator=g)
    logits[2, 5] = logits[2, 1]
    for renorm in (False, True):
        a, b = both(lambda: route_topk(logits, 3, renorm))
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
        torch.testing.assert_close(a[0], b[0], atol=0, rtol=2.4e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prob_rows_check_native_equals_torch(dtype):
    """verify_sampling's value check of the probability rows: the native pass
    (csrc/probs.cpp) raises what the PyTorch check raises, for every rule and only for used rows
    (a NaN / negative / unnormalised row the walk cannot read passes), strided too."""
    from loramix_kernels import verify_sampling

    g = torch.Generator().manual_seed(3)
    B, N, V = 3, 5, 1100  # V: a step of 1024 and a tail
    tokens = torch.randint(0, V, (B, N), generator=g)
    parents = torch.tensor([[-1, 0, 0, 1, -1]] * B)  # node 4 is padding: its rows are not read
    p = torch.softmax(torch.randn(B, N, V, generator=g), -1)
    q = torch.softmax(torch.randn(B, N, V, generator=g), -1)

    def run(pp, qq):
        try:
            verify_sampling(tokens, parents, pp.to(dtype), qq.to(dtype), seed=1, offset=0)
            return None
        except ValueError as exc:
            return str(exc)

    cases = {"ok": (p, q)}
    for name, row, value in (("nan", (1, 1, 7), float("nan")), ("inf", (0, 0, 1099), float("inf")),
                             ("neg", (2, 1, 3), -0.25), ("sum", (1, 0, 5), 0.5)):
        for which in ("p", "q"):
            pp, qq = p.clone(), q.clone()
            (pp if which == "p" else qq)[row] = value
            cases[f"{name}-{which}"] = (pp, qq)
    unused_p = p.clone()
    unused_p[0, 4] = float("nan")  # a padding node's row: never read
    cases["unused"] = (unused_p, q)
    both_bad = p.clone()
    both_bad[0, 0, 0], both_bad[2, 1, 0] = -1.0, float("nan")  # the NaN rule comes first
    cases["order"] = (both_bad, q)
    for name, (pp, qq) in cases.items():
        a, b = both(lambda: run(pp, qq))
        assert a == b, (name, a, b)
        a, b = both(lambda: run(strided(pp), strided(qq)))
        assert a == b, (name, a, b)
        assert (a is None) == (name in ("ok", "unused")), (name, a)


def test_native_loops_run_in_parallel():
    """The extension is compiled with OpenMP where torch uses it (csrc/flags.py): at::parallel_for
    in the kernels spreads over torch's intra-op threads instead of running on one."""
    import os

    if "OpenMP" not in torch.__config__.parallel_info() or (os.cpu_count() or 1) < 2:
        pytest.skip("torch without OpenMP, or one core")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.loramix._parallel_threads() == 2
        torch.set_num_threads(1)
        assert torch.ops.loramix._parallel_threads() == 1
    finally:
        torch.set_num_threads(old)


# --- direct kernels (csrc/direct.h): C++ kernels on the public ops' CPU key -------------------

DIRECT_OPS = ("lm_head_topk", "route_topk", "tree_attention")


@contextlib.contextmanager
def python_kernel_calls():
    """Collects the op names whose Python kernel (``ops/_registry.py``'s ``impl``) ran."""
    import sys

    from loramix_kernels.ops import _registry

    calls = []

    def hook(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_name == "impl" and code.co_filename == _registry.__file__:
            calls.append(type(frame.f_locals["args"][0]).__name__)

    old = sys.getprofile()
    sys.setprofile(hook)
    try:
        yield calls
    finally:
        sys.setprofile(old)


@pytest.mark.parametrize("name", DIRECT_OPS)
def test_direct_kernel_is_the_cpu_kernel(name):
    table = torch._C._dispatch_dump_table(f"loramix::{name}")
    cpu = next(line for line in table.splitlines() if line.startswith("CPU:"))
    assert "direct.cpp" in cpu, cpu
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"loramix::_{name}_py", "CPU")


def test_direct_calls_stay_in_cpp_and_hand_over_the_rest():
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(3, 16, generator=g), torch.randn(100, 16, generator=g)
    logits = torch.randn(4, 8, generator=g)
    with reference_path():
        with python_kernel_calls() as calls:
            v, i = lm_head_topk(h, w, 5)
            strided_out = lm_head_topk(strided(h), strided(w), 5)
            route_topk(logits, 2, True)
            route_topk(strided(logits), 2, False)
        assert calls == []  # every call above ran in C++
        assert torch.equal(strided_out[1], i)  # (a strided GEMM may round differently)
        torch.testing.assert_close(strided_out[0], v)
        want = torch.topk(h @ w.T, 5)
        assert torch.equal(i, want.indices)
        torch.testing.assert_close(v, want.values)
        with python_kernel_calls() as calls:
            lm_head_topk(h, w, 65)  # above the native kernel's k: the chunked torch kernel
            route_topk(logits.double(), 2, True)  # fp64 (gradcheck): the reference
            with pytest.raises(ValueError, match=r"lm_head_topk: k must lie in \[1, V=100\], got 0"):
                lm_head_topk(h, w, 0)
            with pytest.raises(TypeError, match="lm_head_topk: weight must have dtype"):
                lm_head_topk(h, w.double(), 2)
            with pytest.raises(ValueError, match="lm_head_topk: weight must have shape"):
                lm_head_topk(h, w[:, :8], 2)
            with pytest.raises(ValueError, match="route_topk: logits must have 2 dimensions"):
                route_topk(logits[0], 2, False)
            with pytest.raises(ValueError, match="route_topk: logits must have at most 1024"):
                route_topk(torch.randn(1, 1025), 2, False)
        assert calls == ["Tensor"] * 7


def test_direct_kernels_follow_the_backend_and_the_switch():
    from tests.common import triton_path

    h, w = torch.randn(2, 16), torch.randn(40, 16)
    with reference_path(), python_kernel_calls() as calls:
        lm_head_topk(h, w, 3)
        old = _native.set_direct(False)
        try:
            lm_head_topk(h, w, 3)  # switched off: the Python kernel
        finally:
            _native.set_direct(old)
        lm_head_topk(h, w, 3)
    assert calls == ["Tensor"]
    from loramix_kernels import _backend

    if _backend.INTERPRET and _backend.HAS_TRITON:
        with triton_path(), python_kernel_calls() as calls:
            lm_head_topk(h, w, 3)  # the test switch: CPU tensors take the Triton kernel
            with reference_path():
                lm_head_topk(h, w, 3)
            lm_head_topk(h, w, 3)
        assert calls == ["Tensor", "Tensor"]


def test_route_topk_direct_under_autograd():
    """Autograd's Python kernel redispatches to the direct kernel: same values and gradients."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 8, generator=g)

    def run():
        x = logits.clone().requires_grad_(True)
        gates, ids, probs = route_topk(x, 3, True)
        (gates * torch.arange(3.0)).sum().add((probs ** 2).sum()).backward()
        return gates.detach(), ids, x.grad

    a, b = both(run)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    with reference_path():
        x = logits.clone()
        out = route_topk(x, 3, False)  # no input requires grad: autograd's kernel is skipped
        assert not any(t.requires_grad for t in out)
        out = route_topk(x.requires_grad_(True), 3, False)
        assert out[0].requires_grad and out[2].requires_grad


def _fresh_process(code, **env):
    import os
    import subprocess
    import sys

    full = dict(os.environ, **env)
    for var in ("TRITON_INTERPRET", "LORAMIX_BACKEND"):
        if var not in env:
            full.pop(var, None)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                          timeout=300)


_FIRST_CALLS = """
import sys, torch, loramix_kernels as lk
calls = []
sys.setprofile(lambda fr, ev, arg: calls.append(1) if ev == 'call' and fr.f_code.co_name == 'impl' else None)
h, w = torch.randn(2, 16), torch.randn(40, 16)
for _ in range(3):
    try:
        lk.lm_head_topk(h, w, 3)
        lk.route_topk(h, 2)
    except Exception as e:
        print(type(e).__name__, e)
sys.setprofile(None)
print('python kernel calls', len(calls))
"""


def test_direct_kernels_read_the_backend_at_the_first_call():
    """LORAMIX_BACKEND is read at the first op call (which runs the Python kernel), as for every
    op: then the direct kernels take over; an invalid or unusable value is reported by every
    call of every op, whatever its dtype or k."""
    r = _fresh_process(_FIRST_CALLS)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "1", r.stdout  # the first call only
    r = _fresh_process(_FIRST_CALLS, LORAMIX_BACKEND="bogus")
    assert r.stdout.count("ValueError LORAMIX_BACKEND must be one of") == 3, r.stdout
    r = _fresh_process(_FIRST_CALLS, LORAMIX_BACKEND="triton")
    assert r.stdout.count("RuntimeError LORAMIX_BACKEND=triton on CPU tensors needs") == 3, r.stdout
    r = _fresh_process("import os, torch, loramix_kernels as lk\n"
                       "os.environ['LORAMIX_BACKEND'] = 'bogus'\n"  # set after import: still read
                       "lk.lm_head_topk(torch.randn(1, 4), torch.randn(5, 4), 2)")
    assert "LORAMIX_BACKEND must be one of" in r.stderr


def test_tree_attention_native_scratch_not_kept_by_autograd():
    """The scratch never ends up in an autograd graph: a thread whose first call ran under
    inference_mode (scratch made of inference tensors) later serves a call with q requiring grad,
    and a later call does not change an earlier output."""
    import threading

    _, args = make_attention_case(2, 3, 4, 2, 8, 4, [5, 9], torch.float32, "random", seed=4)
    _, other = make_attention_case(2, 3, 4, 2, 8, 4, [11, 2], torch.float32, "random", seed=5)
    errors = []

    def run():
        try:
            with reference_path():
                with torch.inference_mode():
                    tree_attention(*other, 0.3)
                q = args[0].clone().requires_grad_(True)
                out = tree_attention(q, *args[1:], 0.3)
                kept = out.detach().clone()
                tree_attention(*other, 0.3)
                assert torch.equal(out.detach(), kept)
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert not errors, errors
