"""Adversarial table for routed_lora / routed_lora_add_ / routed_lora_backward (issue 9).

Every row is a bad or edge input classified as one of
* ``error``: a clear error that starts with ``<op>: <argument>``;
* ``oracle``: the result equals the float64 oracle (tests/test_routed_lora.py) on the inputs as a
  user means them (empty / out-of-range slots contribute nothing);
* ``value``: data-dependent (an out-of-range expert id): an error naming the argument where value
  checks run (the CPU path), the ``oracle`` result with the slot treated as empty where they do
  not (the Triton path runs with value checks forced off, as on CUDA);
* ``isolated``: non-finite values where a token must not see them (other experts' weights, other
  tokens' rows, the gate of an empty slot): outputs / gradients equal the oracle on clean inputs
  wherever the per-expert float64 form is finite, and are non-finite exactly where it is not.

Each row runs on both backends (tests.common.backends()), the Triton one under
``value_checks_off()``.
"""

import contextlib

import pytest
import torch

import loramix_kernels  # noqa: F401
from loramix_kernels.reference.routed_lora import routed_lora_backward_ref, routed_lora_ref
from tests.common import TOL, assert_close, backends, strided, to_device, value_checks_off
from tests.test_routed_lora import make_case, oracle

OPS = {"fwd": "routed_lora", "add": "routed_lora_add_", "bwd": "routed_lora_backward"}


def _case(T=6, d_in=16, ranks=(4,), d_outs=(8,), E=3, k=2, **kw):
    x, A, B, ids, g = make_case(T, d_in, list(ranks), list(d_outs), E, k, **kw)
    return dict(x=x, lora_a=A, lora_b=B, expert_ids=ids, gates=g, scaling=0.5)


def _with(c, **changes):
    c = dict(c)
    c.update(changes)
    return c


def _rows():
    """(id, op, builder -> (inputs dict, extra), kind, detail)."""
    base = _case()
    x, A, B, ids, g = (base[k] for k in ("x", "lora_a", "lora_b", "expert_ids", "gates"))
    rows = []

    def err(name, op, inputs, arg, exc=ValueError, **extra):
        rows.append((name, op, inputs, extra, "error", (exc, arg)))

    def ok(name, op, inputs, kind="oracle", **extra):
        rows.append((name, op, inputs, extra, kind, None))

    # ---- metadata errors, every op (each names its own op) ----
    for op in ("fwd", "add", "bwd"):
        err(f"{op}-x-1d", op, _with(base, x=x[0]), "x")
        err(f"{op}-x-int", op, _with(base, x=x.long()), "x", TypeError)
        err(f"{op}-lora_a-empty", op, _with(base, lora_a=[], lora_b=[]), "lora_a")
        err(f"{op}-lora_b-count", op, _with(base, lora_b=B + B), "lora_b")
        err(f"{op}-lora_a-d_in", op, _with(base, lora_a=[A[0][:, :, :5]]), r"lora_a\[0\]")
        err(f"{op}-lora_a-dtype", op, _with(base, lora_a=[A[0].half()]), r"lora_a\[0\]", TypeError)
        err(f"{op}-lora_b-experts", op, _with(base, lora_b=[B[0][:2]]), r"lora_b\[0\]")
        err(f"{op}-lora_b-rank", op, _with(base, lora_b=[B[0][:, :, :3]]), r"lora_b\[0\]")
        err(f"{op}-ids-float", op, _with(base, expert_ids=ids.float()), "expert_ids", TypeError)
        err(f"{op}-ids-rows", op, _with(base, expert_ids=ids[:3]), "expert_ids")
        err(f"{op}-gates-shape", op, _with(base, gates=g[:, :1]), "gates")
        err(f"{op}-gates-int", op, _with(base, gates=g.long()), "gates", TypeError)
        err(f"{op}-scaling-nan", op, _with(base, scaling=float("nan")), "scaling")
        err(f"{op}-scaling-inf", op, _with(base, scaling=float("-inf")), "scaling")
        err(f"{op}-x-f64-weights-f32", op, _with(base, x=x.double()), r"lora_a\[0\]", TypeError)
        # ---- value-dependent: out-of-range expert ids ----
        for name, bad in [("id-eq-E", 3), ("id-minus-2", -2), ("id-2pow32", (1 << 32) + 1),
                          ("id-neg-huge", -(1 << 40))]:
            bad_ids = ids.clone()
            bad_ids[2, 1] = bad
            rows.append((f"{op}-{name}", op, _with(base, expert_ids=bad_ids), {}, "value", "expert_ids"))

    # ---- routed_lora_add_: the in-place output ----
    buf = torch.randn(6, 24)
    err("add-out-shape", "add", base, "out", out=torch.zeros(6, 9))
    err("add-out-int", "add", base, "out", TypeError, out=torch.zeros(6, 8, dtype=torch.int32))
    err("add-out-expanded", "add", base, "out", out=torch.zeros(1, 8).expand(6, 8))
    err("add-out-is-x", "add", _with(base, x=buf[:, :8].contiguous(), lora_a=[A[0][:, :, :8]]), "out",
        out="x")
    err("add-out-overlaps-x", "add", _with(base, x=buf[:, :16]), "out", out=buf[:, 12:20], alias=True)
    err("add-out-is-gates-storage", "add", _with(base, gates=buf[:, 20:22]), "out", out=buf[:, 16:24], alias=True)
    err("add-out-in-lora_b", "add", _with(base, lora_b=[buf[:, :24].reshape(3, 12, 4)[:, :8]]), "out",
        out=buf.view(-1)[:48].view(6, 8), alias=True)
    ok("add-out-strided", "add", base, out=torch.randn(8, 6).t())
    ok("add-out-bf16", "add", base, out=torch.randn(6, 8).bfloat16())
    ok("add-out-f64", "add", base, out=torch.randn(6, 8).double())

    # ---- routed_lora_backward ----
    err("bwd-grad_y-shape", "bwd", base, "grad_y", grad_y=torch.randn(6, 9))
    err("bwd-grad_y-int", "bwd", base, "grad_y", TypeError, grad_y=torch.ones(6, 8, dtype=torch.int64))
    err("bwd-needs-length", "bwd", base, "needs", needs=[True, False, True])
    ok("bwd-needs-none", "bwd", base, needs=[False, False, False, False])
    ok("bwd-needs-gates-only", "bwd", base, needs=[False, False, False, True])
    ok("bwd-grad_y-transposed", "bwd", base, grad_y=torch.randn(8, 6).t())
    ok("bwd-grad_y-expanded", "bwd", base, grad_y=torch.randn(1, 8).expand(6, 8))

    # ---- edge results, every op ----
    for op in ("fwd", "add", "bwd"):
        ok(f"{op}-T0", op, _case(T=0))
        ok(f"{op}-k0", op, _with(base, expert_ids=ids[:, :0], gates=g[:, :0]))
        ok(f"{op}-d_in0", op, _case(d_in=0))
        ok(f"{op}-d_in0-sorted", op, _case(d_in=0, ranks=(16,), E=64))
        ok(f"{op}-all-empty", op, _with(base, expert_ids=torch.full_like(ids, -1)))
        ok(f"{op}-E1-r1", op, _case(E=1, k=1, ranks=(1,)))
        ok(f"{op}-4-slices", op, _case(ranks=(2, 3, 4, 5), d_outs=(3, 4, 5, 6), E=4))
        ok(f"{op}-sorted-k3", op, _case(T=5, ranks=(16, 8), d_outs=(8, 4), E=64, k=3))
        ok(f"{op}-dense-gemm", op, _case(T=5, ranks=(16,), E=40, k=40))
        ok(f"{op}-dup-experts", op, _with(base, expert_ids=torch.stack([ids[:, 0], ids[:, 0]], 1)))
        ok(f"{op}-negative-zero-gates", op, _with(base, gates=torch.tensor([[-1.0, 0.0]] * 6)))
        ok(f"{op}-int32-ids", op, _with(base, expert_ids=ids.int()))
        ok(f"{op}-strided-all", op, {k: strided(v) for k, v in base.items()})
        ok(f"{op}-strided-all-sorted", op,
           {k: strided(v) for k, v in _case(T=4, ranks=(16,), E=64).items()})
        ok(f"{op}-expanded-x-ids-gates", op, _with(base, x=x[:1].expand(6, 16), expert_ids=ids[:1].expand(6, 2),
                                                   gates=g[:1].expand(6, 2)))
        ok(f"{op}-transposed-weights", op, _case(noncontig=True))
        ok(f"{op}-float64", op, _case(dtype=torch.float64))
        ok(f"{op}-f64-gates-bf16", op, _with(_case(dtype=torch.bfloat16), gates=g.double()))
        ok(f"{op}-big-scaling", op, _with(base, scaling=1e4))
        # ---- isolation (non-finite values a token must not see) ----
        for strat, c in [("token-major", _case(T=8, E=4, k=2, empty_frac=0.0)),
                         ("sorted", _case(T=8, ranks=(16,), E=64, k=2, empty_frac=0.0)),
                         ("dense-gemm", _case(T=8, ranks=(16,), E=40, k=40, empty_frac=0.0))]:
            E = c["lora_a"][0].shape[0]
            # an expert used only by token 3 (or by nobody)
            ids_c = c["expert_ids"].clone()
            spare = E - 1
            ids_c = torch.where(ids_c == spare, (spare - 1), ids_c)
            if ids_c.shape[1] < E:
                ids_c[3, 0] = spare
            c = _with(c, expert_ids=ids_c)
            for what, val in [("inf", float("inf")), ("nan", float("nan"))]:
                for w in ("lora_a", "lora_b"):
                    bad = [t.clone() for t in c[w]]
                    bad[0][spare, 0, 0] = val
                    rows.append((f"{op}-{strat}-{what}-in-{w}", op, _with(c, **{w: bad}), {}, "isolated", None))
            x_bad = c["x"].clone()
            x_bad[5, 2] = float("inf")
            rows.append((f"{op}-{strat}-inf-in-x-row", op, _with(c, x=x_bad), {}, "isolated", None))
        g_bad = g.clone()
        ids_e = ids.clone()
        ids_e[1, 1] = -1
        g_bad[1, 1] = float("nan")
        rows.append((f"{op}-nan-gate-in-empty-slot", op, _with(base, expert_ids=ids_e, gates=g_bad), {},
                     "isolated", None))
        tok_unused = _with(base, expert_ids=torch.where(ids == 2, 1, ids))
        rows.append((f"{op}-nan-weights-unused-expert", op,
                     _with(tok_unused, lora_a=[torch.where(torch.arange(3)[:, None, None] == 2, float("nan"), A[0])],
                           lora_b=[torch.where(torch.arange(3)[:, None, None] == 2, float("nan"), B[0])]), {},
                     "isolated", None))
    return rows


ROWS = _rows()


def _grad_y(inputs, extra):
    T = inputs["x"].shape[0] if inputs["x"].dim() else 0
    d_out = sum(b.shape[1] for b in inputs["lora_b"]) if inputs["lora_b"] else 8
    gy = extra.get("grad_y")
    if gy is None:
        gy = torch.randn(T, d_out, generator=torch.Generator().manual_seed(1))
        if inputs["x"].is_floating_point():
            gy = gy.to(inputs["x"].dtype)
    return gy


def _call(op, inputs, extra, device):
    """Runs the op on ``device``; returns (outputs as a flat list, the out tensor's start value)."""
    inp = {k: to_device(v, device) for k, v in inputs.items()}
    args = (inp["x"], inp["lora_a"], inp["lora_b"], inp["expert_ids"], inp["gates"], inp["scaling"])
    if op == "fwd":
        return [torch.ops.loramix.routed_lora(*args)], None
    if op == "add":
        out = extra.get("out")
        if out is None:
            out = _grad_y(inputs, {}).float().zero_()
        if isinstance(out, str):  # the output is that input itself
            out = inp[out]
        elif not extra.get("alias") and not torch._debug_has_internal_overlap(out):  # same strides
            out = out.new_empty_strided(out.shape, out.stride()).copy_(out)
        out = to_device(out, device) if out.device.type != device else out
        start = out.detach().cpu().clone()
        torch.ops.loramix.routed_lora_add_(out, *args)
        return [out], start
    gy = to_device(_grad_y(inputs, extra), device)
    needs = extra.get("needs")
    gx, ga, gb, gg = torch.ops.loramix.routed_lora_backward(gy, *args, needs)
    return [gx, *ga, *gb, gg], None


def _expected(op, inputs, extra, per_expert=False):
    """float64: the oracle (``per_expert``: the per-expert reference, whose non-finite pattern is
    the contract's) on CPU, as a flat list like ``_call``'s."""
    x, A, B, ids, g, s = (inputs[k] for k in ("x", "lora_a", "lora_b", "expert_ids", "gates", "scaling"))
    E = A[0].shape[0]
    ids = torch.where((ids >= 0) & (ids < E), ids, -1)
    if op in ("fwd", "add"):
        if per_expert:
            y = routed_lora_ref(x.double(), [a.double() for a in A], [b.double() for b in B], ids,
                                g.double(), s, acc_dtype=torch.float64)
        else:
            y = oracle(x, A, B, ids, g, s)
        if op == "add":
            out = extra.get("out")
            start = (x if isinstance(out, str) else out if out is not None else torch.zeros_like(y))
            y = y + start.double()
        return [y]
    gy = _grad_y(inputs, extra)
    needs = extra.get("needs") or [True] * 4
    if per_expert:
        gx, ga, gb, gg = routed_lora_backward_ref(gy.double(), x.double(), [a.double() for a in A],
                                                  [b.double() for b in B], ids, g.double(), s,
                                                  acc_dtype=torch.float64)
    else:
        n = len(A)
        leaves = [t.double().requires_grad_(True) for t in (x, *A, *B, g)]
        yo = oracle(leaves[0], leaves[1:1 + n], leaves[1 + n:1 + 2 * n], ids, leaves[-1], s)
        got = torch.autograd.grad(yo, leaves, gy.double(), allow_unused=True)
        got = [torch.zeros_like(t) if d is None else d for d, t in zip(got, leaves)]
        gx, ga, gb, gg = got[0], got[1:1 + n], got[1 + n:1 + 2 * n], got[-1]
    flat = [(gx, needs[0])] + [(t, needs[1]) for t in ga] + [(t, needs[2]) for t in gb] + [(gg, needs[3])]
    return [t if need else t.new_empty(0) for t, need in flat]


def _dtype(inputs):
    return inputs["x"].dtype if inputs["x"].dtype in TOL else torch.float32


@pytest.mark.parametrize("name, device, ctx", backends())
@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_adversarial(name, device, ctx, row):
    rid, op, inputs, extra, kind, detail = row
    checks_off = value_checks_off() if name == "triton" else contextlib.nullcontext()
    if kind == "error" or (kind == "value" and name != "triton"):
        exc, arg = detail if kind == "error" else (ValueError, detail)
        with ctx(), checks_off, pytest.raises(exc, match=f"^{OPS[op]}: {arg}"):
            _call(op, inputs, extra, device)
        return
    with ctx(), checks_off:
        got, _ = _call(op, inputs, extra, device)
    dtype = _dtype(inputs)
    out = extra.get("out")
    if op == "add" and isinstance(out, torch.Tensor) and out.dtype in (torch.float16, torch.bfloat16):
        dtype = out.dtype  # y is rounded to out's dtype
    if kind in ("oracle", "value"):
        want = _expected(op, inputs, extra)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.shape == b.shape, rid
            assert_close(a, b, dtype)
        return
    # isolated: exact where the per-expert form is finite, non-finite exactly where it is not
    want = _expected(op, inputs, extra, per_expert=True)
    clean = _expected(op, {k: (torch.nan_to_num(v, 0.0, 0.0, 0.0) if isinstance(v, torch.Tensor) and v.is_floating_point()
                               else [torch.nan_to_num(t, 0.0, 0.0, 0.0) for t in v] if isinstance(v, list) else v)
                           for k, v in inputs.items()}, extra)
    for i, (a, w, c) in enumerate(zip(got, want, clean)):
        a = a.detach().cpu().double()
        bad = ~torch.isfinite(w)
        assert torch.equal(~torch.isfinite(a), bad), f"{rid}: output {i}: non-finite pattern differs"
        assert_close(torch.where(bad, 0.0, a), torch.where(bad, 0.0, c), dtype)
