"""LoRA-Mixer modules (loramix_kernels.nn): LoRAMixerLinear, packed q/k/v groups, inject into real
transformers models (Llama, Mamba), routing modes and the router's gradient, checkpoints, and joint
training on synthetic multi-task data.

The module-level forward/backward test runs the routed_lora kernels under the Triton interpreter
(the conftest default on CPU); the model-level and training tests run the CPU kernels
(``use_backend("auto")``), which the interpreter would make needlessly slow.
"""

import copy
import itertools
import math

import pytest
import torch
from torch import nn

import loramix_kernels
from loramix_kernels import nn as lmx
from loramix_kernels.losses import routing_specialization_loss
from loramix_kernels.ops.routing import route_topk
from tests.common import TOL, assert_close



# Tiny shapes: intra-op threads only add overhead (and contend with other test processes).
pytestmark = pytest.mark.usefixtures("one_thread")

def routing_loss(model, alpha=1.0, entropy_weight=0.1):
    """The paper's balance + entropy-minimisation loss over every mixer's last routing."""
    return routing_specialization_loss(model, alpha=alpha, entropy_weight=entropy_weight,
                                       entropy_sign="minimize")


# ------------------------------------------------------------------------------------------------
# a plain-PyTorch oracle of the module
# ------------------------------------------------------------------------------------------------


def oracle_forward(m, x, task_ids=None):
    """base(x) + scaling * sum_j g_j B_e A_e x with the routing written out in torch (float64)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, m.in_features).double()
    logits = x2 @ m.router.weight.double().t() + m.router.bias.double()
    probs = torch.softmax(logits, -1)
    T, E = probs.shape
    if m.routing == "soft":
        ids, gates = torch.arange(E).expand(T, E), probs
    elif m.routing == "topk":
        gates, ids = probs.topk(m.top_k, -1)
        if m.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
    else:
        ids = task_ids.reshape(-1, 1).expand(lead).reshape(-1, 1)
        gates = torch.ones(T, 1, dtype=torch.float64)
    a, b = m.lora_a.double()[ids], m.lora_b.double()[ids]  # [T, k, r, in], [T, k, out, r]
    h = torch.einsum("tkri,ti->tkr", a, x2)
    d = torch.einsum("tkor,tkr->tko", b, h)
    y = x2 @ m.base.weight.double().t() + m.base.bias.double() + m.scaling * (gates.unsqueeze(-1) * d).sum(1)
    return y.reshape(*lead, m.out_features)


def randomise_experts(model_or_mods, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    mods = (model_or_mods if isinstance(model_or_mods, dict) else lmx.mixer_modules(model_or_mods)).values()
    with torch.no_grad():
        for m in mods:
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * scale)


# ------------------------------------------------------------------------------------------------
# LoRAMixerLinear
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,top_k,renorm", [("soft", 2, False), ("topk", 2, False), ("topk", 2, True),
                                               ("topk", 1, True), ("hard", 1, False)])
def test_module_forward_backward_interpreter(mode, top_k, renorm):
    # Runs routed_lora through the Triton kernels (interpreter on CPU under the test conftest).
    torch.manual_seed(0)
    m = lmx.LoRAMixerLinear(nn.Linear(24, 20), num_experts=4, r=4, top_k=top_k, lora_alpha=8,
                            routing=mode, renormalize=renorm)
    randomise_experts({"": m})
    x = torch.randn(2, 3, 24, requires_grad=True)
    task_ids = torch.tensor([2, 0])
    if mode == "hard":
        lmx.set_routing(m, "hard", task_ids=task_ids)
    y = m(x)
    assert y.shape == (2, 3, 20)
    assert_close(y, oracle_forward(m, x, task_ids), torch.float32)
    assert m.last_router_probs.shape == (6, 4)
    assert m.last_expert_ids.shape == (6, 1 if mode == "hard" else top_k)
    # gradients against autograd through the oracle (the straight-through gates of top-1 /
    # hard routing differ from the oracle's constant 1 in the gradient through the router: the
    # router's own and its contribution to dx)
    w = torch.randn(2, 3, 20)
    (y * w).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    ref = copy.deepcopy(m)
    ref.zero_grad()
    (oracle_forward(ref, x2, task_ids) * w.double()).sum().backward()
    for got, want in [(m.lora_a.grad, ref.lora_a.grad), (m.lora_b.grad, ref.lora_b.grad)]:
        assert_close(got, want, torch.float32)
    if not (mode == "hard" or (top_k == 1 and renorm)):  # straight-through gates: see below
        assert_close(x.grad, x2.grad, torch.float32)
        assert_close(m.router.weight.grad, ref.router.weight.grad, torch.float32)


def test_zero_b_equals_base_exactly():
    torch.manual_seed(1)
    base = nn.Linear(16, 12)
    m = lmx.LoRAMixerLinear(base, num_experts=3, r=2, top_k=2)
    x = torch.randn(4, 5, 16)
    for mode in ("soft", "topk", "hard"):
        lmx.set_routing(m, mode, task_ids=torch.tensor([0, 1, 2, -1]) if mode == "hard" else None)
        assert torch.equal(m(x), base(x))
    assert not any(p.requires_grad for p in base.parameters())
    assert m.lora_a.abs().sum() > 0 and m.lora_b.abs().sum() == 0
    # PEFT's A init: kaiming-uniform with a = sqrt(5) per expert -> |A| <= 1 / sqrt(in_features)
    assert float(m.lora_a.detach().abs().max()) <= 1 / math.sqrt(16) + 1e-6


def test_base_only_context_is_per_thread():
    """nn.base_only(): in this thread, LoRA-Mixer layers (alone and packed q/k/v) compute their base
    layer only; other threads and the code after the context see the experts again."""
    import threading

    torch.manual_seed(2)
    base = nn.Linear(16, 12)
    m = lmx.LoRAMixerLinear(base, num_experts=3, r=2, top_k=2)
    with torch.no_grad():
        m.lora_b.normal_()
    x = torch.randn(4, 16)
    full = m(x)
    assert not torch.equal(full, base(x))
    seen = {}

    def other():
        seen["other"] = m(x)

    with lmx.base_only():
        assert torch.equal(m(x), base(x))
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert torch.equal(seen["other"], full)  # the other thread kept the experts
    assert torch.equal(m(x), full)


@pytest.mark.parametrize("expert_dtype", [None, torch.float32])
def test_bf16_base_and_empty_input(expert_dtype):
    torch.manual_seed(5)
    with loramix_kernels.use_backend("auto"):
        base = nn.Linear(16, 8).to(torch.bfloat16)
        m = lmx.LoRAMixerLinear(base, num_experts=4, r=2, top_k=2, dtype=expert_dtype)
        assert m.lora_a.dtype == (expert_dtype or torch.bfloat16) == m.router.weight.dtype
        randomise_experts({"": m})
        x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
        y = m(x)
        assert y.dtype == torch.bfloat16
        want = oracle_forward(m, x.float())
        assert_close(y, want, torch.bfloat16)
        y.float().sum().backward()
        assert x.grad.dtype == torch.bfloat16 and m.lora_b.grad.abs().sum() > 0
        empty = m(torch.zeros(0, 5, 16, dtype=torch.bfloat16))
        assert empty.shape == (0, 5, 8) and m.last_router_probs.shape == (0, 4)


def _router_grad_ratio(m, x):
    m.zero_grad()
    (m(x) ** 2).sum().backward()
    return float(m.router.weight.grad.norm() / m.lora_b.grad.norm())


@pytest.mark.parametrize("mode,top_k,renorm,kind", [
    ("soft", 1, False, "linear"), ("topk", 1, False, "linear"), ("topk", 1, True, "linear"),
    ("topk", 2, True, "linear"), ("topk", 3, False, "linear"), ("hard", 1, False, "linear"),
    ("topk", 1, True, "arrow"), ("soft", 2, False, "arrow")])
def test_router_gradient_useful_in_every_mode(mode, top_k, renorm, kind):
    torch.manual_seed(2)
    with loramix_kernels.use_backend("auto"):
        m = lmx.LoRAMixerLinear(nn.Linear(16, 16), num_experts=4, r=2, top_k=top_k,
                                routing=mode, renormalize=renorm)
        randomise_experts({"": m})
        if kind == "arrow":
            lmx.arrow_init(m)
        x = torch.randn(8, 16)
        if mode == "hard":
            lmx.set_routing(m, "hard", task_ids=torch.arange(8) % 4)
        ratio = _router_grad_ratio(m, x)
    assert ratio > 1e-2, ratio


def test_naive_renormalised_top1_gate_has_no_router_gradient():
    # What the straight-through gate fixes: route_topk(k=1, renormalize=True) is the constant 1.
    torch.manual_seed(3)
    logits = torch.randn(8, 4, requires_grad=True)
    gates, _, _ = route_topk(logits, 1, True)
    (gates * torch.randn(8, 1)).sum().backward()
    assert float(logits.grad.abs().max()) < 1e-6
    # ... while the module's top-1 renormalised gate is exactly 1 and still passes a gradient
    m = lmx.LoRAMixerLinear(nn.Linear(16, 16), num_experts=4, r=2, top_k=1, renormalize=True)
    x = torch.randn(8, 16)
    with loramix_kernels.use_backend("auto"):
        gates, ids, probs, _ = m.route(x, x.shape[:-1])
        assert torch.equal(gates, torch.ones_like(gates))
        (gates * torch.randn(8, 1)).sum().backward()
    assert float(m.router.weight.grad.norm()) > 1e-3


def test_module_errors():
    lin = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="LoRAMixerLinear: top_k"):
        lmx.LoRAMixerLinear(lin, 4, 2, 5)
    with pytest.raises(ValueError, match="routing mode"):
        lmx.LoRAMixerLinear(lin, 4, 2, 1, routing="dense")
    with pytest.raises(TypeError, match="base"):
        lmx.LoRAMixerLinear(nn.Conv1d(8, 8, 1), 4, 2, 1)
    m = lmx.LoRAMixerLinear(lin, 4, 2, 1)
    with pytest.raises(ValueError, match="task_ids"):
        lmx.set_routing(m, "hard")
    with pytest.raises(ValueError, match=r"task_ids must be in \[-1, 4\)"):
        lmx.set_routing(m, "hard", task_ids=[0, 4])
    lmx.set_routing(m, "hard", task_ids=[0, 1, 2])
    with pytest.raises(ValueError, match="leading dimensions"):
        m(torch.randn(2, 5, 8))


# ------------------------------------------------------------------------------------------------
# packed q/k/v
# ------------------------------------------------------------------------------------------------


class _Attn(nn.Module):
    """q/k/v of unequal widths (GQA) reading one input, o_proj on another."""

    def __init__(self, d=16):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d // 2), nn.Linear(d, d // 2)
        self.o_proj = nn.Linear(d, d)


def _packed_and_unpacked(top_k=2, routing="topk", **kw):
    torch.manual_seed(4)
    base = nn.ModuleDict({"attn": _Attn()})
    packed, unpacked = copy.deepcopy(base), copy.deepcopy(base)
    pm = lmx.inject(packed, ["q_proj", "k_proj", "v_proj", "o_proj"], 4, 3, top_k, pack_qkv=True,
                    routing=routing, **kw)
    um = lmx.inject(unpacked, ["q_proj", "k_proj", "v_proj", "o_proj"], 4, 3, top_k, routing=routing, **kw)
    randomise_experts(pm)
    with torch.no_grad():
        for n in pm:
            um[n].lora_a.copy_(pm[n].lora_a)
            um[n].lora_b.copy_(pm[n].lora_b)
            um[n].router.load_state_dict(pm[n].router.state_dict())
    return packed, unpacked, pm, um


@pytest.fixture
def count_routed_lora(monkeypatch):
    calls = []
    real = lmx.routed_lora

    def counting(x, lora_a, lora_b, *args):
        calls.append(len(lora_a))
        return real(x, lora_a, lora_b, *args)

    monkeypatch.setattr(lmx, "routed_lora", counting)
    return calls


def test_packed_group_structure():
    packed, _, pm, _ = _packed_and_unpacked()
    a = packed["attn"]
    g = a.q_proj.group
    assert g is a.k_proj.group is a.v_proj.group and a.o_proj.group is None
    assert a.q_proj.router is a.k_proj.router is a.v_proj.router is not a.o_proj.router
    assert [m for m in g.members] == [a.q_proj, a.k_proj, a.v_proj]
    rep = lmx.parameter_report(packed)
    assert rep["routers"] == 2 * (16 * 4 + 4)  # one shared q/k/v router + o_proj's
    assert rep["mixers"] == 4


@pytest.mark.parametrize("order", list(itertools.permutations(["q_proj", "k_proj", "v_proj"])))
def test_packed_any_call_order_one_call_same_gradients(order, count_routed_lora):
    with loramix_kernels.use_backend("auto"):
        packed, unpacked, pm, um = _packed_and_unpacked()
        x = torch.randn(2, 5, 16)
        xp, xu = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        w = {n: torch.randn(2, 5, 16 if n == "q_proj" else 8) for n in order}
        count_routed_lora.clear()
        outs_p = {n: getattr(packed["attn"], n)(xp) for n in order}
        assert count_routed_lora == [3]  # one routed_lora call over the three slices
        outs_u = {n: getattr(unpacked["attn"], n)(xu) for n in order}
        for n in order:
            torch.testing.assert_close(outs_p[n], outs_u[n], **_tol())
        sum((outs_p[n] * w[n]).sum() for n in order).backward()
        sum((outs_u[n] * w[n]).sum() for n in order).backward()
    torch.testing.assert_close(xp.grad, xu.grad, **_tol())
    for n in order:
        torch.testing.assert_close(pm[f"attn.{n}"].lora_a.grad, um[f"attn.{n}"].lora_a.grad, **_tol())
        torch.testing.assert_close(pm[f"attn.{n}"].lora_b.grad, um[f"attn.{n}"].lora_b.grad, **_tol())
    # the shared router's gradient is the sum of the three unpacked routers' gradients
    want = sum(um[f"attn.{n}"].router.weight.grad for n in order)
    torch.testing.assert_close(pm["attn.q_proj"].router.weight.grad, want, **_tol())
    assert packed["attn"].q_proj.group._cache is None  # every member took its slice


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_packed_soft_and_hard_routing_match_unpacked(mode, count_routed_lora):
    with loramix_kernels.use_backend("auto"):
        packed, unpacked, pm, um = _packed_and_unpacked()
        task_ids = torch.tensor([3, -1]) if mode == "hard" else None
        lmx.set_routing(packed, mode, task_ids=task_ids)
        lmx.set_routing(unpacked, mode, task_ids=task_ids)
        x = torch.randn(2, 4, 16)
        count_routed_lora.clear()
        for n in ("v_proj", "q_proj", "k_proj"):
            torch.testing.assert_close(getattr(packed["attn"], n)(x), getattr(unpacked["attn"], n)(x), **_tol())
        assert count_routed_lora.count(3) == 1
        q = packed["attn"].q_proj
        assert q.last_router_probs is packed["attn"].k_proj.last_router_probs  # the loss counts it once
        assert q.last_expert_ids.shape == ((8, 1) if mode == "hard" else (8, 2))


def _tol():
    atol, rtol = TOL[torch.float32]
    return dict(atol=atol, rtol=rtol)


def test_packed_different_inputs_and_stale_cache(count_routed_lora):
    with loramix_kernels.use_backend("auto"):
        packed, unpacked, pm, um = _packed_and_unpacked()
        a, b = torch.randn(3, 16), torch.randn(3, 16)
        # q on a, k on b (no sharing), v on a (shares q's call), q again on a (recomputes)
        got = [packed["attn"].q_proj(a), packed["attn"].k_proj(b), packed["attn"].v_proj(a),
               packed["attn"].q_proj(a)]
        want = [unpacked["attn"].q_proj(a), unpacked["attn"].k_proj(b), unpacked["attn"].v_proj(a),
                unpacked["attn"].q_proj(a)]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **_tol())
        # an in-place change of the input, or of the experts, invalidates the cached slices
        x = torch.randn(3, 16)
        packed["attn"].q_proj(x)
        x.mul_(2)
        torch.testing.assert_close(packed["attn"].k_proj(x), unpacked["attn"].k_proj(x), **_tol())
        packed["attn"].q_proj(x)
        with torch.no_grad():
            pm["attn.v_proj"].lora_b.add_(1.0)
            um["attn.v_proj"].lora_b.add_(1.0)
        torch.testing.assert_close(packed["attn"].v_proj(x), unpacked["attn"].v_proj(x), **_tol())
        # a routing change between calls invalidates it too
        packed["attn"].q_proj(x)
        lmx.set_routing(packed, "soft")
        lmx.set_routing(unpacked, "soft")
        torch.testing.assert_close(packed["attn"].k_proj(x), unpacked["attn"].k_proj(x), **_tol())
    assert count_routed_lora.count(3) >= 6


# ------------------------------------------------------------------------------------------------
# real transformers models
# ------------------------------------------------------------------------------------------------


def tiny_llama(seed=0, **over):
    transformers = pytest.importorskip("transformers")
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    cfg.update(over)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


def tiny_mamba(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.MambaConfig(vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=2,
                                   expand=2, conv_kernel=4, use_mambapy=False)
    return transformers.MambaForCausalLM(cfg).eval()


@pytest.mark.parametrize("pack", [False, True])
def test_llama_inject_forward_backward(pack):
    with loramix_kernels.use_backend("auto"):
        model = tiny_llama()
        ids = torch.randint(0, 64, (2, 7))
        model.requires_grad_(False)  # as inject leaves it (see the Mamba test)
        want = model(ids).logits
        mods = lmx.inject(model, ["q_proj", "k_proj", "v_proj", "o_proj"], num_experts=4, r=2, top_k=2,
                          pack_qkv=pack)
        assert len(mods) == 8 and all(n.startswith("model.layers.") for n in mods)
        assert torch.equal(model(ids).logits, want)  # zero-initialised B: exactly the base model
        rep = lmx.parameter_report(model)
        assert rep["trainable"] == rep["experts"] + rep["routers"] > 0
        randomise_experts(model)
        model.train()
        out = model(ids, labels=ids)
        out.loss.backward()
        for n, m in mods.items():
            assert m.lora_a.grad is not None and m.lora_b.grad.abs().sum() > 0, n
            assert m.router.weight.grad.abs().sum() > 0, n
            assert m.last_router_probs.shape == (14, 4) and m.last_expert_ids.shape == (14, 2)
        base = [p for n, p in model.named_parameters() if "lora_" not in n and "router" not in n]
        assert base and all(p.grad is None for p in base)


def test_llama_packed_equals_unpacked():
    with loramix_kernels.use_backend("auto"):
        packed, unpacked = tiny_llama(), tiny_llama()
        pm = lmx.inject(packed, ["q_proj", "k_proj", "v_proj"], 4, 2, 2, pack_qkv=True)
        um = lmx.inject(unpacked, ["q_proj", "k_proj", "v_proj"], 4, 2, 2)
        randomise_experts(pm)
        with torch.no_grad():
            for n in pm:
                for attr in ("lora_a", "lora_b"):
                    getattr(um[n], attr).copy_(getattr(pm[n], attr))
                um[n].router.load_state_dict(pm[n].router.state_dict())
        ids = torch.randint(0, 64, (2, 6))
        torch.testing.assert_close(packed(ids).logits, unpacked(ids).logits, **_tol())
        # generation with the KV cache (decode steps of one token) runs through the packed path
        gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(packed.generate(ids, **gen), unpacked.generate(ids, **gen))


def test_mamba_inject_forward_backward():
    with loramix_kernels.use_backend("auto"):
        model = tiny_mamba()
        ids = torch.randint(0, 64, (2, 6))
        # inject freezes the base; freeze it for the reference too: at::matmul folds a transposed
        # 3-D input differently when an operand requires grad (Mamba's x_proj), a 1-ulp change.
        model.requires_grad_(False)
        want = model(ids).logits
        mods = lmx.inject(model, ["in_proj", "out_proj"], num_experts=3, r=2, top_k=1)
        assert sorted(mods) == sorted(f"backbone.layers.{i}.mixer.{p}" for i in range(2)
                                      for p in ("in_proj", "out_proj"))
        assert torch.equal(model(ids).logits, want)
        randomise_experts(model, scale=0.1)
        model.train()
        model(ids, labels=ids).loss.backward()
        for n, m in mods.items():
            assert m.lora_b.grad.abs().sum() > 0 and m.router.weight.grad.abs().sum() > 0, n


def test_inject_errors_and_helpers():
    model = tiny_llama()
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        lmx.inject(model, ["nope_proj"], 4, 2, 1)
    with pytest.raises(ValueError, match="target_modules"):
        lmx.inject(model, [], 4, 2, 1)
    first = lmx.inject(model, ["v_proj"], 4, 2, 1)
    mods = lmx.inject(model, ["o_proj"], 4, 2, 1)
    assert all(m.lora_a.requires_grad and m.router.weight.requires_grad for m in first.values())
    with pytest.raises(ValueError, match="already holds a LoRA-Mixer"):
        lmx.inject(model, ["o_proj"], 4, 2, 1)
    mods.update(first)
    n = lmx.mark_only_mixer_trainable(model, train_experts=False)
    assert n == sum(m.router.weight.numel() + m.router.bias.numel() for m in mods.values())
    assert all(not m.lora_a.requires_grad for m in mods.values())
    n = lmx.mark_only_mixer_trainable(model, train_router=False)
    assert n == sum(m.lora_a.numel() + m.lora_b.numel() for m in mods.values())
    rep = lmx.parameter_report(model)
    assert rep["total"] == sum(p.numel() for p in model.parameters())
    assert rep["base"] + rep["experts"] + rep["routers"] == rep["total"]
    assert rep["router_percent"] == pytest.approx(100 * rep["routers"] / rep["total"]) and rep["routers"] > 0
    assert lmx.set_routing(model, "soft") == 4


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------


def test_save_load_round_trip_into_fresh_model(tmp_path):
    with loramix_kernels.use_backend("auto"):
        model = tiny_llama()
        mods = lmx.inject(model, ["q_proj", "k_proj", "v_proj", "o_proj"], 4, 2, 2, pack_qkv=True,
                          lora_alpha=4, use_rslora=True)
        randomise_experts(model)
        lmx.arrow_init(model.model.layers[1].self_attn.o_proj, temperature=0.5)
        path = tmp_path / "mixer.safetensors"
        lmx.save_mixer(model, path)
        ids = torch.randint(0, 64, (2, 5))
        want = model(ids).logits
        # 1) a fresh base model: the mixers are rebuilt from the checkpoint's configuration
        fresh = tiny_llama()
        loaded = lmx.load_mixer(fresh, path)
        assert list(loaded) == list(mods)
        torch.testing.assert_close(fresh(ids).logits, want, atol=0, rtol=0)
        sd, fsd = model.state_dict(), fresh.state_dict()
        assert sd.keys() == fsd.keys() and all(torch.equal(sd[k], fsd[k]) for k in sd)
        fm = fresh.model.layers[0].self_attn
        assert fm.q_proj.group is fm.k_proj.group is not None and fm.q_proj.router is fm.v_proj.router
        assert fresh.model.layers[1].self_attn.o_proj.router_kind == "arrow"
        assert lmx.parameter_report(fresh) == lmx.parameter_report(model)
        # 2) a model with mixers already injected (other random experts): overwritten
        other = tiny_llama()
        lmx.inject(other, ["q_proj", "k_proj", "v_proj", "o_proj"], 4, 2, 2, pack_qkv=True,
                   lora_alpha=4, use_rslora=True)
        randomise_experts(other, seed=9)
        lmx.load_mixer(other, path)
        torch.testing.assert_close(other(ids).logits, want, atol=0, rtol=0)
        # 3) a mismatching model is refused with a clear error
        wrong = tiny_llama()
        lmx.inject(wrong, ["o_proj"], 4, 2, 2)
        with pytest.raises(ValueError, match="does not match"):
            lmx.load_mixer(wrong, path)
        wrong = tiny_llama()
        lmx.inject(wrong, ["q_proj", "k_proj", "v_proj", "o_proj"], 4, 3, 2)
        with pytest.raises(ValueError, match="has shape"):
            lmx.load_mixer(wrong, path)
        with pytest.raises(FileNotFoundError):
            lmx.load_mixer(wrong, tmp_path / "none.safetensors")
        # routers only (frozen-experts regime): a small file, experts untouched on load
        lmx.save_mixer(model, tmp_path / "routers.safetensors", experts=False)
        assert (tmp_path / "routers.safetensors").stat().st_size < path.stat().st_size / 2
        other = tiny_llama()
        om = lmx.inject(other, ["q_proj", "k_proj", "v_proj", "o_proj"], 4, 2, 2, pack_qkv=True)
        randomise_experts(other, seed=9)
        experts = {n: m.lora_b.detach().clone() for n, m in om.items()}
        lmx.load_mixer(other, tmp_path / "routers.safetensors")
        for n, m in om.items():
            assert torch.equal(m.lora_b, experts[n]) and torch.equal(m.router.weight, mods[n].router.weight)
        with pytest.raises(ValueError, match="routers only"):
            lmx.load_mixer(tiny_llama(), tmp_path / "routers.safetensors")


# ------------------------------------------------------------------------------------------------
# synthetic multi-task data: joint training
# ------------------------------------------------------------------------------------------------


def make_tasks(d=16, n_tasks=4, rank=2, noise=0.3, sep=6.0, seed=0):
    """Base map W and, per task t, a rank-``rank`` change U_t S V_t^T of it whose top input
    direction is the task's own input direction m_t (inputs of task t: sep * m_t + N(0, I))."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g) / math.sqrt(d)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    dirs = Q[:, :n_tasks].t().contiguous()  # m_t
    deltas, factors = [], []
    for t in range(n_tasks):
        U, _ = torch.linalg.qr(torch.randn(d, rank, generator=g))
        V = torch.stack([dirs[t]] + [Q[:, n_tasks + (t * (rank - 1) + j) % (d - n_tasks)]
                                     for j in range(rank - 1)], 1)
        S = torch.linspace(1.5, 0.8, rank)
        deltas.append(U @ torch.diag(S) @ V.t())
        factors.append((U * S, V))
    return dict(W=W, dirs=dirs, deltas=deltas, factors=factors, noise=noise, sep=sep, d=d, g=g)


def sample_tasks(tasks, n_per_task, seed):
    g = torch.Generator().manual_seed(seed)
    xs, ys, labels = [], [], []
    for t, delta in enumerate(tasks["deltas"]):
        x = tasks["sep"] * tasks["dirs"][t] + torch.randn(n_per_task, tasks["d"], generator=g)
        y = x @ (tasks["W"] + delta).t() + tasks["noise"] * torch.randn(n_per_task, tasks["d"], generator=g)
        xs.append(x)
        ys.append(y)
        labels.append(torch.full((n_per_task,), t))
    return torch.cat(xs), torch.cat(ys), torch.cat(labels)


def base_linear(tasks):
    lin = nn.Linear(tasks["d"], tasks["d"], bias=False)
    with torch.no_grad():
        lin.weight.copy_(tasks["W"])
    return lin


def reduced_rank_fit(x, resid, rank):
    """``[d_out, d_in]`` rank-``rank`` matrix D minimising ``|resid - x D^T|`` (reduced-rank regression)."""
    b_ols = torch.linalg.lstsq(x.double(), resid.double()).solution  # [d_in, d_out]
    _, _, vh = torch.linalg.svd(x.double() @ b_ols, full_matrices=False)
    v = vh[:rank].t()
    return (b_ols @ v @ v.t()).t().float()


def routing_purity(ids, labels, n_tasks):
    """Mean over tasks of the share of the task's tokens on its most used (top-1) expert, and that
    expert per task."""
    shares, winners = [], []
    for t in range(n_tasks):
        e = ids[labels == t, 0].long()
        counts = torch.bincount(e, minlength=int(ids.max()) + 1)
        shares.append(float(counts.max()) / len(e))
        winners.append(int(counts.argmax()))
    return sum(shares) / n_tasks, winners


def train(module, x, y, steps, lr, extra_loss=None, seed=0):
    torch.manual_seed(seed)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(module(x), y)
        if extra_loss is not None:
            loss = loss + extra_loss(module)
        loss.backward()
        opt.step()
        sched.step()
    return module


def test_joint_soft_training_specialises_and_matches_oracles():
    tasks = make_tasks()
    n_tasks = 4
    x, y, labels = sample_tasks(tasks, 128, seed=1)
    xt, yt, lt = sample_tasks(tasks, 256, seed=2)
    with loramix_kernels.use_backend("auto"):
        torch.manual_seed(0)
        mixer = lmx.LoRAMixerLinear(base_linear(tasks), num_experts=n_tasks, r=2, top_k=1, routing="soft")
        train(mixer, x, y, steps=600, lr=3e-2, extra_loss=lambda m: 0.05 * routing_loss(m))
        with torch.no_grad():
            pred = mixer(xt)
            purity, winners = routing_purity(mixer.last_expert_ids, lt, n_tasks)
            mix_loss = [float(nn.functional.mse_loss(pred[lt == t], yt[lt == t])) for t in range(n_tasks)]
            lmx.set_routing(mixer, "topk")  # sparse top-1 inference with the trained router
            top1 = mixer(xt)
            top1_loss = [float(nn.functional.mse_loss(top1[lt == t], yt[lt == t])) for t in range(n_tasks)]
        # per-task oracle: the best rank-2 change of the base map fitted to that task's training
        # data alone (reduced-rank least squares, exact), scored on the same held-out data
        oracle = []
        for t in range(n_tasks):
            delta = reduced_rank_fit(x[labels == t], y[labels == t] - x[labels == t] @ tasks["W"].t(), 2)
            pred_t = xt[lt == t] @ (tasks["W"] + delta).t()
            oracle.append(float(nn.functional.mse_loss(pred_t, yt[lt == t])))
        base_loss = float(nn.functional.mse_loss(xt @ tasks["W"].t(), yt))
    assert purity >= 0.9, (purity, winners)
    assert sorted(winners) == list(range(n_tasks)), winners  # one expert per task
    for t in range(n_tasks):
        assert mix_loss[t] <= 1.1 * oracle[t], (t, mix_loss, oracle)
        assert top1_loss[t] <= 1.1 * oracle[t], (t, top1_loss, oracle)
    assert max(oracle) < 0.1 * base_loss  # the tasks are not trivial: the base map is far off
