"""loramix_kernels.losses: routing-specialisation (SBL / RSL) and Switch balance losses, entropy
sign, batch statistics, expert-preservation penalty, hard-then-soft schedule."""

from __future__ import annotations

import math

import pytest
import torch

import loramix_kernels.ops.routing  # noqa: F401  (registers torch.ops.loramix.route_topk)
from loramix_kernels.losses import (ROUTING_MODES, expert_preservation_penalty,
                                    hard_then_soft_schedule, routing_entropy,
                                    routing_specialization_loss, routing_statistics,
                                    switch_balance_loss)
from loramix_kernels.ops.routing import route_topk

from tests.common import reference_path


@pytest.fixture(autouse=True)
def _reference_router():
    """The router op runs on its CPU kernel here (test_routing.py tests the Triton kernel; the
    interpreter would make the training loops below slow)."""
    with reference_path():
        yield

# A tiny case computed by hand: E = 3, two tokens, k = 2, one unused (-1) slot.
P = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], dtype=torch.float64)
IDS = torch.tensor([[0, 1], [1, -1]])
PBAR = [0.4, 0.4, 0.2]                  # column means
FBAR = [1 / 3, 2 / 3, 0.0]              # valid slots: expert 0 once, expert 1 twice
H = [-(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)),
     -(0.1 * math.log(0.1) + 0.6 * math.log(0.6) + 0.3 * math.log(0.3))]


def test_statistics_by_hand():
    pbar, fbar = routing_statistics(P, IDS)
    torch.testing.assert_close(pbar, torch.tensor(PBAR, dtype=torch.float64))
    torch.testing.assert_close(fbar, torch.tensor(FBAR, dtype=torch.float64))


def test_values_by_hand():
    balance = 3 * sum(p * f for p, f in zip(PBAR, FBAR))  # = 1.2
    assert switch_balance_loss(P, IDS).item() == pytest.approx(balance)
    assert routing_entropy(P).item() == pytest.approx(sum(H) / 2)
    got = routing_specialization_loss(P, IDS, alpha=0.5, entropy_weight=0.2)
    assert got.item() == pytest.approx(0.5 * balance + 0.2 * sum(H) / 2)
    got = routing_specialization_loss(P, IDS, alpha=0.5, entropy_weight=0.2, entropy_sign="maximize")
    assert got.item() == pytest.approx(0.5 * balance - 0.2 * sum(H) / 2)
    # the balance term alone equals alpha times the Switch loss
    got = routing_specialization_loss(P, IDS, alpha=0.3, entropy_weight=0.0)
    assert got.item() == pytest.approx(0.3 * balance)


def test_unused_slots_are_ignored():
    """-1 slots count nowhere: the same as the valid slots alone, and different from a real id."""
    flat_valid = torch.tensor([[0], [1], [1]])
    p3 = P[[0, 0, 1]]  # pbar differs (token weights); compare fbar only
    assert torch.equal(routing_statistics(P, IDS)[1], routing_statistics(p3, flat_valid)[1])
    filled = IDS.clone()
    filled[1, 1] = 2
    assert not torch.equal(routing_statistics(P, IDS)[1], routing_statistics(P, filled)[1])
    none_valid = torch.full((2, 2), -1)
    assert routing_statistics(P, none_valid)[1].abs().sum() == 0
    assert switch_balance_loss(P, none_valid).item() == 0


def test_mask_excludes_tokens():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, 4, generator=g), -1)
    ids = torch.randint(-1, 4, (6, 2), generator=g)
    keep = torch.tensor([True, False, True, True, False, True])
    a = routing_specialization_loss(p, ids, mask=keep)
    b = routing_specialization_loss(p[keep], ids[keep])
    torch.testing.assert_close(a, b)


def test_gradients_reach_router_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 6, generator=g, requires_grad=True)
    gates, ids, probs = route_topk(logits, 2, True)
    loss = routing_specialization_loss(probs, ids, alpha=1.0, entropy_weight=0.1)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() > 1e-4
    # the same gradient as autograd through a plain torch softmax
    x = logits.detach().clone().requires_grad_(True)
    routing_specialization_loss(torch.softmax(x, -1), ids, alpha=1.0, entropy_weight=0.1).backward()
    torch.testing.assert_close(logits.grad, x.grad)


def test_entropy_gradient_finite_at_zero_probability():
    logits = torch.tensor([[0.0, -float("inf"), 1.0]], requires_grad=True)
    _, ids, probs = route_topk(logits, 1, False)
    routing_specialization_loss(probs, ids, entropy_weight=1.0).backward()
    assert torch.isfinite(logits.grad).all()


def test_balanced_routing_minimises_the_balance_term():
    E, T = 4, 64
    # perfectly balanced: uniform probabilities, every expert the same share of slots -> 1
    uniform = torch.full((T, E), 1.0 / E)
    balanced_ids = torch.arange(T).remainder(E)[:, None]
    assert switch_balance_loss(uniform, balanced_ids).item() == pytest.approx(1.0)
    # collapsed: every token sharply to expert 0 -> close to E
    collapsed = torch.softmax(torch.tensor([8.0, 0, 0, 0]).expand(T, E), -1)
    assert switch_balance_loss(collapsed, torch.zeros(T, 1, dtype=torch.long)).item() > E - 0.01
    # gradient descent on the balance term from a skewed router reaches the balanced minimum
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(T, 8, generator=g)
    w = (torch.randn(8, E, generator=g) * 0.1).requires_grad_(True)
    bias = torch.tensor([3.0, 0.0, 0.0, 0.0], requires_grad=True)
    opt = torch.optim.SGD([w, bias], lr=0.5)
    first = None
    for _ in range(100):
        _, ids, probs = route_topk(feats @ w + bias, 1, False)
        loss = routing_specialization_loss(probs, ids, alpha=1.0, entropy_weight=0.0)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, ids, probs = route_topk(feats @ w + bias, 1, False)
    final = switch_balance_loss(probs, ids).item()
    fbar = routing_statistics(probs, ids)[1]
    assert first > 2.0 and final < 1.1
    assert fbar.max() < 0.4  # no expert holds much more than its 1/4 share


@pytest.mark.parametrize("sign, direction", [("minimize", -1), ("maximize", 1)])
def test_entropy_sign_sets_the_gradient_direction(sign, direction):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(8, 5, generator=g)
    grads = {}
    for s in ("minimize", "maximize"):
        x = x0.clone().requires_grad_(True)
        _, ids, probs = route_topk(x, 2, False)
        routing_specialization_loss(probs, ids, alpha=0.0, entropy_weight=1.0, entropy_sign=s).backward()
        grads[s] = x.grad
    torch.testing.assert_close(grads["minimize"], -grads["maximize"])
    assert grads["minimize"].abs().max() > 1e-3
    # one descent step moves the entropy in the chosen direction
    before = routing_entropy(torch.softmax(x0, -1)).item()
    after = routing_entropy(torch.softmax(x0 - 0.1 * grads[sign], -1)).item()
    assert (after - before) * direction > 0


def test_batch_level_statistics():
    """pbar / fbar are over the whole batch: two sequences, each routed entirely to one expert,
    make a balanced batch (loss 1), though each sequence alone is collapsed (loss 2)."""
    seq0 = torch.tensor([[0.9, 0.1]]).expand(5, 2)
    seq1 = torch.tensor([[0.1, 0.9]]).expand(5, 2)
    probs = torch.stack([seq0, seq1])                         # [B=2, S=5, E=2]
    ids = torch.stack([torch.zeros(5, 1), torch.ones(5, 1)]).long()
    batch = routing_specialization_loss(probs, ids, entropy_weight=0.0)
    assert batch.item() == pytest.approx(1.0)
    alone = routing_specialization_loss(probs[0], ids[0], entropy_weight=0.0)
    assert alone.item() == pytest.approx(2 * 0.9)
    # leading dimensions are flattened: the same as [T, E]
    torch.testing.assert_close(batch, routing_specialization_loss(probs.reshape(10, 2), ids.reshape(10, 1),
                                                                  entropy_weight=0.0))


def test_half_precision_probs_accumulate_in_fp32():
    p = P.to(torch.bfloat16)
    out = routing_specialization_loss(p, IDS)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(routing_specialization_loss(p.double(), IDS).item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# model trees


class _Layer(torch.nn.Module):
    def __init__(self, probs=None, ids=None):
        super().__init__()
        self.last_router_probs = probs
        self.last_expert_ids = ids


def test_model_tree_mean_and_sum_over_layers():
    g = torch.Generator().manual_seed(4)
    p1 = torch.softmax(torch.randn(6, 3, generator=g), -1)
    p2 = torch.softmax(torch.randn(2, 3, 3, generator=g), -1)  # leading dims [B, S]
    i1 = torch.randint(-1, 3, (6, 2), generator=g)
    i2 = torch.randint(0, 3, (2, 3, 1), generator=g)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 3),
        torch.nn.ModuleDict({"a": _Layer(p1, i1), "unused": _Layer()}),
        torch.nn.Sequential(_Layer(p2, i2)),
    )
    l1 = routing_specialization_loss(p1, i1)
    l2 = routing_specialization_loss(p2, i2)
    torch.testing.assert_close(routing_specialization_loss(model), (l1 + l2) / 2)
    torch.testing.assert_close(routing_specialization_loss(model, layer_reduction="sum"), l1 + l2)
    # a token mask applies to every layer (6 tokens each)
    keep = torch.tensor([True, True, False, True, True, False])
    want = (routing_specialization_loss(p1, i1, mask=keep)
            + routing_specialization_loss(p2, i2, mask=keep.view(2, 3))) / 2
    torch.testing.assert_close(routing_specialization_loss(model, mask=keep), want)


def test_model_tree_shared_router_counts_once():
    p = torch.softmax(torch.randn(4, 3), -1)
    ids = torch.randint(0, 3, (4, 1))
    packed = torch.nn.ModuleList([_Layer(p, ids), _Layer(p, ids), _Layer(p, ids)])  # q, k, v
    other = _Layer(torch.full((4, 3), 1 / 3), torch.arange(4).remainder(3)[:, None])
    model = torch.nn.ModuleList([packed, other])
    want = (routing_specialization_loss(p, ids) + routing_specialization_loss(other.last_router_probs,
                                                                              other.last_expert_ids)) / 2
    torch.testing.assert_close(routing_specialization_loss(model), want)


def test_model_tree_gradient_reaches_router():
    router = torch.nn.Linear(4, 3)
    layer = _Layer()
    x = torch.randn(5, 4)
    _, layer.last_expert_ids, layer.last_router_probs = route_topk(router(x), 2, False)
    routing_specialization_loss(torch.nn.Sequential(router, layer)).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().max() > 0


def test_model_tree_errors():
    with pytest.raises(ValueError, match="routing_specialization_loss: model_or_probs has no LoRA-Mixer"):
        routing_specialization_loss(torch.nn.Sequential(torch.nn.Linear(2, 2), _Layer()))
    with pytest.raises(ValueError, match="routing_specialization_loss: expert_ids must be None"):
        routing_specialization_loss(torch.nn.Sequential(_Layer(P, IDS)), IDS)
    with pytest.raises(TypeError, match="routing_specialization_loss: model_or_probs must be"):
        routing_specialization_loss([P])
    with pytest.raises(ValueError, match=r"routing_specialization_loss \(layer '0'\): mask"):
        routing_specialization_loss(torch.nn.Sequential(_Layer(P, IDS)), mask=torch.ones(3, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize("call, exc, match", [
    (lambda: routing_specialization_loss(P), ValueError,
     "routing_specialization_loss: expert_ids is required"),
    (lambda: routing_specialization_loss(P, IDS, entropy_sign="up"), ValueError,
     "routing_specialization_loss: entropy_sign must be one of"),
    (lambda: routing_specialization_loss(P, IDS, layer_reduction="max"), ValueError, "layer_reduction"),
    (lambda: routing_specialization_loss(P, IDS.float()), TypeError,
     "routing_specialization_loss: expert_ids must be an integer tensor"),
    (lambda: routing_specialization_loss(P, IDS[:1]), ValueError,
     r"routing_specialization_loss: expert_ids must have shape \[2, k\]"),
    (lambda: switch_balance_loss(P, torch.tensor([[0], [3]])), ValueError,
     r"switch_balance_loss: expert_ids entries must lie in \[-1, 3\)"),
    (lambda: switch_balance_loss(P, torch.tensor([[0], [-2]])), ValueError,
     "switch_balance_loss: expert_ids"),
    (lambda: switch_balance_loss(IDS, IDS), TypeError, "switch_balance_loss: probs must be floating point"),
    (lambda: switch_balance_loss(P, IDS, mask=torch.ones(3, dtype=torch.bool)), ValueError,
     "switch_balance_loss: mask must have probs' leading shape"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_compiles_fullgraph():
    """No data-dependent shapes or host reads under torch.compile (value checks skip there)."""
    def f(x):
        _, ids, probs = route_topk(x, 2, True)
        return routing_specialization_loss(probs, ids, mask=x[:, 0] > -5)

    torch._dynamo.reset()
    x = torch.randn(7, 5)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    f(a).backward()
    torch.compile(f, fullgraph=True, backend="aot_eager")(b).backward()
    torch.testing.assert_close(a.grad, b.grad)


# ------------------------------------------------------------------------------------------------
# expert-preservation penalty


def test_preservation_penalty_values_and_gradient():
    g = torch.Generator().manual_seed(5)
    a0, b0 = torch.randn(4, 2, 3, generator=g), torch.randn(4, 5, 2, generator=g)
    a = (a0 + torch.randn(4, 2, 3, generator=g)).requires_grad_(True)
    b = (b0 + torch.randn(4, 5, 2, generator=g)).requires_grad_(True)
    chosen = [1, 3]
    da, db = a.detach() - a0, b.detach() - b0
    want = 0.25 * sum(float((da[i] ** 2).sum() + (db[i] ** 2).sum()) for i in chosen)
    got = expert_preservation_penalty([a, b], [a0, b0], 0.25, experts=chosen)
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    mask = torch.zeros(4, 1, 1)
    mask[chosen] = 1
    torch.testing.assert_close(a.grad, 2 * 0.25 * (a - a0).detach() * mask)
    torch.testing.assert_close(b.grad, 2 * 0.25 * (b - b0).detach() * mask)
    # dict form, tensor index, every expert by default
    d = expert_preservation_penalty({"a": a, "b": b}, {"a": a0, "b": b0}, 0.25, experts=torch.tensor(chosen))
    assert d.item() == pytest.approx(want, rel=1e-5)
    every = expert_preservation_penalty(a, a0, 1.0)
    assert every.item() == pytest.approx(float(((a.detach() - a0) ** 2).sum()), rel=1e-5)
    assert expert_preservation_penalty(a0, a0.clone(), 3.0).item() == 0


@pytest.mark.parametrize("call, exc, match", [
    (lambda t: expert_preservation_penalty(t, torch.zeros(3, 2), 1.0), ValueError,
     r"expert_preservation_penalty: initial_params must have params's shape"),
    (lambda t: expert_preservation_penalty([t], [t, t], 1.0), ValueError,
     "expert_preservation_penalty: initial_params must have the same structure"),
    (lambda t: expert_preservation_penalty(t, t, 1.0, experts=[4]), ValueError,
     r"expert_preservation_penalty: experts entries must lie in \[0, 4\)"),
    (lambda t: expert_preservation_penalty(3.0, t, 1.0), TypeError,
     "expert_preservation_penalty: params must be"),
])
def test_preservation_penalty_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.zeros(4, 2))


# ------------------------------------------------------------------------------------------------
# schedule


def test_hard_then_soft_schedule():
    assert [hard_then_soft_schedule(s, 3) for s in range(5)] == ["hard"] * 3 + ["soft"] * 2
    assert hard_then_soft_schedule(0, 0) == "soft"
    assert hard_then_soft_schedule(1, 5, training=False) == "topk"
    assert hard_then_soft_schedule(1, 5, training=False, inference_mode="soft") == "soft"
    assert set(ROUTING_MODES) == {"soft", "topk", "hard"}
    with pytest.raises(ValueError, match="hard_then_soft_schedule: step must be >= 0"):
        hard_then_soft_schedule(-1, 2)
    with pytest.raises(TypeError, match="hard_then_soft_schedule: hard_steps must be an int"):
        hard_then_soft_schedule(1, 2.5)
    with pytest.raises(ValueError, match="hard_then_soft_schedule: inference_mode"):
        hard_then_soft_schedule(1, 2, training=False, inference_mode="dense")
