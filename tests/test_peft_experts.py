"""Frozen-experts regime: LoRA-Mixer experts from real PEFT adapters (made and saved by the ``peft``
library inside each test), equivalence with ``peft.PeftModel``, unsupported adapters, router-only
training and the Arrow-style training-free router initialisation."""

import json
import math
import shutil

import pytest
import torch
from torch import nn

import loramix_kernels
from loramix_kernels import nn as lmx
from tests.common import TOL
from tests.test_nn import (
    base_linear, make_tasks, randomise_experts, sample_tasks, tiny_llama, tiny_mamba, train)

peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")



# Tiny shapes: intra-op threads only add overhead (and contend with other test processes).
pytestmark = pytest.mark.usefixtures("one_thread")

def _tol():
    atol, rtol = TOL[torch.float32]
    return dict(atol=atol, rtol=rtol)


def save_llama_adapter(path, seed, targets, r, alpha, **kw):
    """A LoRA adapter of the tiny Llama, random A and B (init_lora_weights=False), saved by peft."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **kw)
    pm = peft.get_peft_model(tiny_llama(), cfg)
    pm.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [
        save_llama_adapter(root / "a0", 10, ["q_proj", "v_proj"], r=4, alpha=8),
        save_llama_adapter(root / "a1", 11, ["k_proj", "o_proj"], r=8, alpha=4, use_rslora=True),
        save_llama_adapter(root / "a2", 12, ["q_proj", "k_proj", "v_proj", "o_proj"], r=2, alpha=16),
    ]


def peft_logits(adapter_dir, ids):
    model = peft.PeftModel.from_pretrained(tiny_llama(), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("pack", [False, True])
def test_one_expert_with_gate_one_reproduces_peft(adapters, pack):
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with loramix_kernels.use_backend("auto"):
        model = tiny_llama()
        base = model(ids).logits.detach()
        mods = lmx.from_peft(model, adapters, top_k=1, pack_qkv=pack)
        # every (layer, projection) any adapter targets; ranks padded to each layer's max
        assert len(mods) == 8 and all(m.num_experts == 3 for m in mods.values())
        assert mods["model.layers.0.self_attn.q_proj"].r == 4  # max(4 from a0, 2 from a2)
        assert mods["model.layers.0.self_attn.k_proj"].r == 8  # max(8 from a1, 2 from a2)
        # experts frozen, routers trainable, base frozen
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".router." in n for n in trainable)
        for e, d in enumerate(adapters):
            lmx.set_routing(model, "hard", task_ids=torch.full((2,), e))
            with torch.no_grad():
                got = model(ids).logits
            want = peft_logits(d, ids)
            assert (want - base).abs().max() > 1e-3  # the adapter really changes the output
            torch.testing.assert_close(got, want, **_tol())


def test_expert_weights_fold_each_adapters_scaling(adapters):
    model = tiny_llama()
    mods = lmx.from_peft(model, adapters, top_k=2)
    for e, d in enumerate(adapters):
        pm = peft.PeftModel.from_pretrained(tiny_llama(), str(d))
        for name, m in mods.items():
            want = torch.zeros(m.out_features, m.in_features)
            layer = pm.base_model.model.get_submodule(name)
            if hasattr(layer, "lora_A"):  # a module the adapter does not target: a zero expert
                want = layer.get_delta_weight("default")
            got = m.scaling * m.lora_b[e] @ m.lora_a[e]
            torch.testing.assert_close(got, want, **_tol())
    assert all(m.scaling == 1.0 for m in mods.values())


def test_from_peft_soft_mix_trains_router_only(adapters):
    with loramix_kernels.use_backend("auto"):
        model = tiny_llama()
        lmx.from_peft(model, adapters, top_k=2, routing="soft")
        model.train()
        ids = torch.randint(0, 64, (2, 6))
        model(ids, labels=ids).loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (".router." in n), n
            if p.grad is not None:
                assert p.grad.abs().sum() > 0, n


def test_rank_and_alpha_patterns(tmp_path):
    torch.manual_seed(5)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                          rank_pattern={"v_proj": 6}, alpha_pattern={"layers.1.self_attn.q_proj": 32})
    pm = peft.get_peft_model(tiny_llama(), cfg)
    pm.save_pretrained(str(tmp_path))
    ids = torch.randint(0, 64, (1, 5))
    with loramix_kernels.use_backend("auto"):
        model = tiny_llama()
        lmx.from_peft(model, [tmp_path], top_k=1)
        lmx.set_routing(model, "hard", task_ids=[0])
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, peft_logits(tmp_path, ids), **_tol())


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def _variant(src, dst, **cfg_changes):
    shutil.copytree(src, dst)
    p = dst / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(cfg_changes)
    p.write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("change,match", [
    (dict(use_dora=True), "DoRA"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(peft_type="LOHA"), "peft_type 'LOHA' is not supported"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(r=3), "rank 4 but the config says r=3"),
])
def test_from_peft_unsupported_config(adapters, tmp_path, change, match):
    bad = _variant(adapters[0], tmp_path / "bad", **change)
    model = tiny_llama()
    with pytest.raises(ValueError, match=match):
        lmx.from_peft(model, [adapters[1], bad], top_k=1)
    assert not lmx.mixer_modules(model)  # nothing was changed


def test_from_peft_real_dora_adapter_refused(tmp_path):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    peft.get_peft_model(tiny_llama(), cfg).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"from_peft: adapter .*DoRA"):
        lmx.from_peft(tiny_llama(), [tmp_path], top_k=1)


def test_from_peft_missing_files(adapters, tmp_path):
    no_weights = tmp_path / "no_weights"
    shutil.copytree(adapters[0], no_weights)
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        lmx.from_peft(tiny_llama(), [no_weights], top_k=1)
    no_cfg = tmp_path / "no_cfg"
    shutil.copytree(adapters[0], no_cfg)
    (no_cfg / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        lmx.from_peft(tiny_llama(), [no_cfg], top_k=1)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        lmx.from_peft(tiny_llama(), [tmp_path / "nowhere"], top_k=1)


def test_from_peft_shape_and_module_mismatch(adapters, tmp_path):
    # an adapter of a wider Llama does not fit this one
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    peft.get_peft_model(tiny_llama(hidden_size=48, intermediate_size=64), cfg).save_pretrained(
        str(tmp_path / "wide"))
    with pytest.raises(ValueError, match="shape mismatch"):
        lmx.from_peft(tiny_llama(), [tmp_path / "wide"], top_k=1)
    # a Llama adapter on a Mamba model: the target modules do not exist there
    with pytest.raises(ValueError, match="which the model does not have"):
        lmx.from_peft(tiny_mamba(), [adapters[0]], top_k=1)
    with pytest.raises(ValueError, match="top_k"):
        lmx.from_peft(tiny_llama(), adapters, top_k=4)
    with pytest.raises(TypeError, match="lora_alpha"):
        lmx.from_peft(tiny_llama(), adapters, top_k=1, lora_alpha=4)


# ------------------------------------------------------------------------------------------------
# frozen regime on synthetic tasks: router-only training and Arrow initialisation
# ------------------------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self, tasks):
        super().__init__()
        self.proj = base_linear(tasks)

    def forward(self, x):
        return self.proj(x)


@pytest.fixture(scope="module")
def task_adapters(tmp_path_factory):
    """Four peft-made adapters, adapter t = task t's true low-rank change of the base map, saved
    with different ranks, alphas and rsLoRA (the scalings must be undone by from_peft)."""
    tasks = make_tasks()
    root = tmp_path_factory.mktemp("task_adapters")
    settings = [dict(r=2, lora_alpha=4), dict(r=4, lora_alpha=2), dict(r=2, lora_alpha=16),
                dict(r=3, lora_alpha=3, use_rslora=True)]
    dirs = []
    for t, kw in enumerate(settings):
        us, v = tasks["factors"][t]  # delta = us @ v.T, rank 2
        r = kw["r"]
        scale = kw["lora_alpha"] / (math.sqrt(r) if kw.get("use_rslora") else r)
        q, _ = torch.linalg.qr(torch.cat([v, torch.randn(tasks["d"], r, generator=tasks["g"])], 1))
        a = torch.cat([v.t(), q[:, 2:r].t()])  # [r, d]: the task's input directions first
        b = torch.cat([us, torch.zeros(tasks["d"], r - 2)], 1) / scale  # [d, r]
        pm = peft.get_peft_model(_Net(tasks), peft.LoraConfig(target_modules=["proj"], **kw))
        with torch.no_grad():
            pm.base_model.model.proj.lora_A["default"].weight.copy_(a)
            pm.base_model.model.proj.lora_B["default"].weight.copy_(b)
        pm.save_pretrained(str(root / f"task{t}"))
        dirs.append(root / f"task{t}")
    return tasks, dirs


def test_task_adapters_load_as_true_deltas(task_adapters):
    tasks, dirs = task_adapters
    mods = lmx.from_peft(_Net(tasks), dirs, top_k=1)
    m = mods["proj"]
    assert m.r == 4 and m.num_experts == 4
    for t in range(4):
        torch.testing.assert_close(m.lora_b[t] @ m.lora_a[t], tasks["deltas"][t], **_tol())


def _accuracy(model, x, labels):
    with torch.no_grad():
        model(x)
    return float((model.proj.last_expert_ids[:, 0].long() == labels).float().mean())


def test_frozen_regime_router_only_training_reaches_purity(task_adapters):
    tasks, dirs = task_adapters
    x, y, _ = sample_tasks(tasks, 128, seed=1)
    xt, yt, lt = sample_tasks(tasks, 256, seed=2)
    with loramix_kernels.use_backend("auto"):
        torch.manual_seed(0)
        model = _Net(tasks)
        lmx.from_peft(model, dirs, top_k=1, routing="soft")
        before = _accuracy(model, xt, lt)
        train(model, x, y, steps=150, lr=5e-2)
        lmx.set_routing(model, "topk")
        acc = _accuracy(model, xt, lt)
        with torch.no_grad():
            loss = float(nn.functional.mse_loss(model(xt), yt))
    # expert t is adapter t = task t: purity here is routing accuracy against the labels
    assert acc >= 0.9, (before, acc)
    assert loss < 2 * tasks["noise"] ** 2, loss  # top-1 routed output ~ the true per-task map


def test_frozen_regime_sparse_top1_router_training(task_adapters):
    # Sparse top-1 routing during training (gate = the raw softmax probability, the default
    # renormalize=False): the router's gradient alone takes a random router to the right experts.
    tasks, dirs = task_adapters
    x, y, _ = sample_tasks(tasks, 128, seed=1)
    xt, yt, lt = sample_tasks(tasks, 256, seed=2)
    with loramix_kernels.use_backend("auto"):
        torch.manual_seed(0)
        model = _Net(tasks)
        lmx.from_peft(model, dirs, top_k=1, routing="topk")
        before = _accuracy(model, xt, lt)
        train(model, x, y, steps=40, lr=5e-2)
        acc = _accuracy(model, xt, lt)
    assert before < 0.5 and acc >= 0.9, (before, acc)


def test_arrow_init_alone_routes_far_above_chance(task_adapters):
    tasks, dirs = task_adapters
    xt, yt, lt = sample_tasks(tasks, 256, seed=2)
    with loramix_kernels.use_backend("auto"):
        torch.manual_seed(0)
        model = _Net(tasks)
        lmx.from_peft(model, dirs, top_k=1, routing="topk")
        random_router = _accuracy(model, xt, lt)
        lmx.arrow_init(model)
        acc = _accuracy(model, xt, lt)
        with torch.no_grad():
            loss = float(nn.functional.mse_loss(model(xt), yt))
        base_loss = float(nn.functional.mse_loss(xt @ tasks["W"].t(), yt))
    assert model.proj.router_kind == "arrow"
    assert acc >= 0.8 > 0.25 + 0.5, (random_router, acc)  # chance: 1 / 4
    assert loss < 0.2 * base_loss, (loss, base_loss)


def test_arrow_init_then_soft_router_training(task_adapters):
    # From the Arrow initialisation (sharpened by a low temperature), soft-routed router training
    # starts at the right experts and stays there; from a random router it needs more steps.
    tasks, dirs = task_adapters
    x, y, _ = sample_tasks(tasks, 128, seed=1)
    xt, yt, lt = sample_tasks(tasks, 256, seed=2)
    result = {}
    with loramix_kernels.use_backend("auto"):
        for arrow in (False, True):
            torch.manual_seed(0)
            model = _Net(tasks)
            lmx.from_peft(model, dirs, top_k=1, routing="soft")
            if arrow:
                lmx.arrow_init(model, temperature=0.1)
            losses = []
            for steps in (5, 15):
                train(model, x, y, steps=steps, lr=5e-2)
                with torch.no_grad():
                    losses.append(float(nn.functional.mse_loss(model(xt), yt)))
            result[arrow] = (losses, _accuracy(model, xt, lt))
    (rand_losses, _), (arrow_losses, arrow_acc) = result[False], result[True]
    assert arrow_losses[0] < 0.5 * rand_losses[0], result  # after 5 steps
    assert max(arrow_losses) < 1.2 * tasks["noise"] ** 2 and arrow_acc >= 0.95, result


def test_arrow_prototypes_are_top_singular_vectors():
    torch.manual_seed(0)
    a = [torch.randn(3, 2, 10), torch.randn(3, 4, 10)]
    b = [torch.randn(3, 6, 2), torch.randn(3, 5, 4)]
    b[0][2].zero_()
    b[1][2].zero_()  # expert 2 is zero in every slice
    proto = lmx.expert_prototypes(a, b)
    for e in range(2):
        delta = torch.cat([b[0][e] @ a[0][e], b[1][e] @ a[1][e]])  # stacked slices
        v = torch.linalg.svd(delta).Vh[0]
        assert float(abs(proto[e] @ v)) == pytest.approx(1.0, abs=1e-5)
    assert proto[2].abs().max() == 0
    # arrow scoring: |cos| ignores the singular vector's sign
    m = lmx.LoRAMixerLinear(nn.Linear(10, 11), 3, 2, top_k=1)
    randomise_experts({"": m})
    lmx.arrow_init(m, temperature=0.5)
    x = torch.randn(4, 10)
    s1 = m.router_logits(x)
    with torch.no_grad():
        m.router.weight.neg_()
    torch.testing.assert_close(m.router_logits(x), s1)
    cos = (x @ lmx.expert_prototypes([m.lora_a], [m.lora_b]).t()).abs() / x.norm(dim=1, keepdim=True)
    torch.testing.assert_close(s1, cos / 0.5, **_tol())
