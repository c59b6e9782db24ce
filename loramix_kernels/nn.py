"""LoRA-Mixer modules: routed mixtures of LoRA experts in place of a model's linear projections.

Both regimes of the LoRA-Mixer paper, on top of the ``routed_lora`` and ``route_topk`` ops:

* joint training: :func:`inject` replaces matching ``nn.Linear`` modules of any ``nn.Module`` (Llama-,
  Qwen-, Mistral-style ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``; Mamba-style ``in_proj`` /
  ``out_proj``) by :class:`LoRAMixerLinear` (frozen base + E experts of rank r + a router);
* frozen experts: :func:`from_peft` builds one frozen expert per PEFT LoRA adapter directory and
  trains only the routers; :func:`arrow_init` initialises those routers without training.

Routing modes (:func:`set_routing`; gates are what multiplies each expert's ``B A x``):

``"soft"``
    Dense softmax over all E experts (``k = E``); gates = router probabilities. Fully differentiable.
``"topk"``
    Sparse: the ``top_k`` most probable experts (``route_topk``). By default the gates are the raw
    softmax probabilities (Switch-Transformer style), so the router's gradient reaches it through the
    gate values; this is the sparse mode to train in (top-1 included: a random router learns the
    right experts from the task loss alone, tests/test_peft_experts.py). With ``renormalize=True``
    the k gates are rescaled to sum 1 (Mixtral style); for ``top_k == 1`` that gate is the constant
    1 and would carry no gradient (the ~4e-10 of a naive implementation), so there the gate is the
    straight-through estimate ``1 + p - stop_grad(p)``: exactly 1 in the forward pass (as PEFT's
    Arrow and a single adapter), the gradient of the chosen expert's probability ``p`` backward.
    That gradient is non-zero but one-sided: it pushes the router away from a chosen expert that
    hurts, yet is zero-mean once the chosen expert is right, so it gives no pull towards the right
    expert. Train with ``"soft"`` or ``renormalize=False`` and switch to renormalised top-1 for
    inference if that is the wanted forward.
``"hard"``
    Every token of sample b goes to expert ``task_ids[b]`` (domain-labelled data; ``-1`` = base only).
    The gate is again ``1 + p - stop_grad(p)`` with ``p`` the router's probability of the labelled
    expert: the forward pass is exactly gate 1 and the router still receives the (one-sided)
    straight-through gradient of the task loss, plus whatever routing loss is put on the exposed
    probabilities. Hard routing is for training the experts on labelled data (the paper's first
    phase); the labels do not supervise the router by themselves: for that, add a cross-entropy
    between ``last_router_probs`` and the token labels, or train the router afterwards in
    ``"soft"`` mode.

After each forward pass a module exposes ``last_router_probs`` (``[tokens, E]`` fp32 softmax, the
``pbar`` input of the routing loss) and ``last_expert_ids`` (``[tokens, k]`` int32, the routed slots
for ``fbar``). In ``"soft"`` mode every expert carries weight, so ``last_expert_ids`` holds the
``top_k`` most probable experts (the slots sparse inference would route to), which keeps the
balance term informative; in ``"hard"`` mode it holds the labels (``[tokens, 1]``).

Packed q/k/v (``pack_qkv=True``): projections that read the same input share one router
(:class:`LoRAMixerGroup`), route once and run ``routed_lora`` once over all their slices. The first
member called with a given input tensor computes every member's output and caches the others' slices,
keyed on the identity and version counter of that input tensor, the experts' and router's version
counters, the grad mode and the routing settings; a later member called with the same tensor (in any
order) takes its slice, one called with a different tensor recomputes (no sharing then). Outputs are
slices of one autograd graph, so gradients equal those of the unpacked computation. The cache holds
at most one input per group and is dropped once every member took its slice. The identity check is
Python-side state: compile models with ``pack_qkv=False``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .losses import ROUTING_MODES
from .ops.routed_lora import routed_lora

__all__ = [
    "ROUTING_MODES", "LoRAMixerLinear", "LoRAMixerGroup", "inject", "from_peft", "arrow_init",
    "expert_prototypes", "set_routing", "mixer_modules", "mark_only_mixer_trainable",
    "parameter_report", "save_mixer", "load_mixer", "base_only",
]

ROUTER_KINDS = ("linear", "arrow")
_QKV = ("q_proj", "k_proj", "v_proj")
_FORMAT = "loramix_mixer/1"


def _fail(where, what, msg, exc=ValueError):
    raise exc(f"{where}: {what} {msg}")


def _route_topk(logits, k, renormalize):
    # Imported at call time so that this module imports on trees where the routing family is absent.
    from .ops.routing import route_topk

    return route_topk(logits, k, renormalize)


class _BaseOnly(threading.local):
    on = False


_BASE_ONLY = _BaseOnly()


@contextlib.contextmanager
def base_only():
    """In this context (in this thread only), every :class:`LoRAMixerLinear` computes its frozen
    base layer alone: no router, no experts. A cheap draft from a LoRA-Mixer model's own layers
    (the engine's ``draft_experts=False``: speculative decoding stays lossless, since the target
    verifies every token with its experts)."""
    old = _BASE_ONLY.on
    _BASE_ONLY.on = True
    try:
        yield
    finally:
        _BASE_ONLY.on = old


def _straight_through_one(p):
    """Exactly 1.0 in the forward pass, gradient of ``p`` in the backward pass."""
    return 1.0 + (p - p.detach())


# ------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------


class LoRAMixerLinear(nn.Module):
    r"""``base(x)`` plus a routed mixture of LoRA experts; the base layer stays frozen.

    .. math:: y = W x + b + \text{scaling} \sum_{j} g_j(x)\, B_{e_j} A_{e_j} x

    Parameters
    ----------
    base : nn.Linear
        The wrapped projection (frozen: ``requires_grad`` is switched off).
    num_experts : int
        E, the number of experts.
    r : int
        Expert rank.
    top_k : int
        Experts per token in ``"topk"`` mode (also the slots reported in ``"soft"`` mode).
    lora_alpha : float, optional
        Scaling numerator: ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        Default ``r`` (scaling 1).
    use_rslora : bool
        rsLoRA scaling, default False.
    routing : str
        ``"soft"``, ``"topk"`` (default) or ``"hard"`` (see the module docstring).
    renormalize : bool
        Rescale the top-k gates to sum 1 (default False; top-1 uses a straight-through gate).
    router_kind : str
        ``"linear"`` (logits = router(x), default) or ``"arrow"`` (logits = ``|W x| / (|x| T) + b``,
        the absolute cosine to the expert prototypes in ``router.weight``; see :func:`arrow_init`).
    arrow_temperature : float
        T of the ``"arrow"`` scoring, default 1.
    dtype : torch.dtype, optional
        dtype of experts and router, default the base weight's.
    init_experts : bool
        Kaiming-uniform A (as PEFT) and zero B, default True (False leaves them zero).

    Attributes
    ----------
    base, router (``nn.Linear(in_features, num_experts)``), lora_a ``[E, r, in]``, lora_b
    ``[E, out, r]``, scaling, last_router_probs ``[tokens, E]``, last_expert_ids ``[tokens, k]``.

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels.nn import LoRAMixerLinear
    >>> layer = LoRAMixerLinear(torch.nn.Linear(32, 48), num_experts=4, r=8, top_k=2)
    >>> x = torch.randn(2, 5, 32)
    >>> torch.equal(layer(x), layer.base(x))  # B starts at zero
    True
    >>> layer.last_router_probs.shape, layer.last_expert_ids.shape
    (torch.Size([10, 4]), torch.Size([10, 2]))
    """

    def __init__(self, base: nn.Linear, num_experts: int, r: int, top_k: int, lora_alpha=None,
                 use_rslora: bool = False, routing: str = "topk", renormalize: bool = False,
                 router_kind: str = "linear", arrow_temperature: float = 1.0, dtype=None,
                 init_experts: bool = True):
        super().__init__()
        where = "LoRAMixerLinear"
        if not isinstance(base, nn.Linear):
            _fail(where, "base", f"must be an nn.Linear, got {type(base).__name__}", TypeError)
        if not (isinstance(num_experts, int) and num_experts >= 1):
            _fail(where, "num_experts", f"must be an int >= 1, got {num_experts!r}")
        if not (isinstance(r, int) and r >= 1):
            _fail(where, "r", f"must be an int >= 1, got {r!r}")
        _check_top_k(where, top_k, num_experts)
        _check_mode(where, routing)
        if router_kind not in ROUTER_KINDS:
            _fail(where, "router_kind", f"must be one of {ROUTER_KINDS}, got {router_kind!r}")
        lora_alpha = r if lora_alpha is None else lora_alpha
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_experts, self.r, self.top_k = num_experts, r, top_k
        self.lora_alpha, self.use_rslora = lora_alpha, use_rslora
        self.scaling = float(lora_alpha / (math.sqrt(r) if use_rslora else r))
        self.routing, self.renormalize = routing, bool(renormalize)
        self.router_kind, self.arrow_temperature = router_kind, float(arrow_temperature)
        self.task_ids = None
        dtype = dtype or base.weight.dtype
        dev = base.weight.device
        self.router = nn.Linear(self.in_features, num_experts, device=dev, dtype=dtype)
        self.lora_a = nn.Parameter(torch.zeros(num_experts, r, self.in_features, device=dev, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(num_experts, self.out_features, r, device=dev, dtype=dtype))
        if init_experts:
            with torch.no_grad():
                for e in range(num_experts):  # per expert: fan_in = in_features, as PEFT's lora_A
                    nn.init.kaiming_uniform_(self.lora_a[e], a=math.sqrt(5))
        self.last_router_probs = None
        self.last_expert_ids = None
        # Packed q/k/v: the shared group (plain attribute, not a submodule: the router is registered
        # in every member instead, as tied weights).
        object.__setattr__(self, "_group", None)

    # Compatibility with code that reads the projection's parameters (e.g. transformers' Mamba
    # passes out_proj.weight / .bias to its fused kernel, which then bypasses the experts).
    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    @property
    def group(self):
        """The :class:`LoRAMixerGroup` this module is packed in, or None."""
        return self._group

    def __getstate__(self):
        # The last routing holds autograd graphs (for the loss): not part of a copy or a pickle.
        state = self.__dict__.copy()
        state["last_router_probs"] = state["last_expert_ids"] = None
        return state

    def extra_repr(self):
        return (f"num_experts={self.num_experts}, r={self.r}, top_k={self.top_k}, "
                f"scaling={self.scaling:g}, routing={self.routing!r}, router_kind={self.router_kind!r}"
                + (f", packed={len(self._group.members)}" if self._group is not None else ""))

    # -- routing ---------------------------------------------------------------------------------

    def router_logits(self, x2):
        """``[T, E]`` router scores of the flattened input ``x2`` ``[T, in]``."""
        xr = x2.to(self.router.weight.dtype)
        if self.router_kind == "linear":
            return self.router(xr)
        s = F.linear(xr, self.router.weight).abs()
        norm = xr.norm(dim=-1, keepdim=True).clamp_min(1e-12) * self.arrow_temperature
        return s / norm + self.router.bias

    def route(self, x2, lead_shape):
        """(gates ``[T, k']``, expert_ids ``[T, k']`` int32, probs ``[T, E]`` fp32, reported ids):
        the slots routed_lora computes, and what the loss sees."""
        T, E = x2.shape[0], self.num_experts
        logits = self.router_logits(x2)
        if self.routing == "soft":
            _, top_ids, probs = _route_topk(logits, self.top_k, False)
            ids = torch.arange(E, device=x2.device, dtype=torch.int32).expand(T, E)
            return probs, ids, probs, top_ids
        if self.routing == "topk":
            if self.top_k == 1 and self.renormalize:
                _, ids, probs = _route_topk(logits, 1, False)
                gates = _straight_through_one(probs.gather(1, ids.long()))
            else:
                gates, ids, probs = _route_topk(logits, self.top_k, self.renormalize)
            return gates, ids, probs, ids
        # hard
        _, _, probs = _route_topk(logits, 1, False)
        labels = _expand_labels(self.task_ids, lead_shape, x2.device)
        ids = labels.to(torch.int32).unsqueeze(1)
        valid = (labels >= 0).unsqueeze(1)
        p = probs.gather(1, labels.clamp_min(0).unsqueeze(1))
        gates = torch.where(valid, _straight_through_one(p), torch.zeros_like(p))
        return gates, ids, probs, ids

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, x):
        if _BASE_ONLY.on:
            return self.base(x)
        y = self.base(x)
        if self._group is not None:
            delta = self._group.output_for(self, x)
        else:
            lead = x.shape[:-1]
            x2 = x.reshape(-1, self.in_features)
            gates, ids, probs, shown = self.route(x2, lead)
            xl = x2.to(self.lora_a.dtype)
            delta = routed_lora(xl, [self.lora_a], [self.lora_b], ids, gates, self.scaling)
            self.last_router_probs, self.last_expert_ids = probs, shown
            delta = delta.reshape(*lead, self.out_features)
        # In place: keeps base(x)'s memory layout (e.g. Mamba's out_proj of a transposed input), so
        # layers downstream reduce in the same order and a zero delta gives the base output bit
        # for bit. base(x) is a fresh tensor that its own backward does not need.
        return y.add_(delta.to(y.dtype))

    def routing_state(self):
        return (self.routing, self.top_k, self.renormalize, self.router_kind, self.arrow_temperature,
                id(self.task_ids), None if self.task_ids is None else self.task_ids._version)


def _check_top_k(where, top_k, num_experts):
    if not (isinstance(top_k, int) and 1 <= top_k <= num_experts):
        _fail(where, "top_k", f"must be an int in [1, num_experts={num_experts}], got {top_k!r}")


def _check_mode(where, mode):
    if mode not in ROUTING_MODES:
        _fail(where, "routing mode", f"must be one of {ROUTING_MODES}, got {mode!r}")


def _expand_labels(task_ids, lead_shape, device):
    """Per-token labels ``[T]`` from task_ids whose shape is a prefix of the input's leading dims."""
    if task_ids is None:
        _fail("LoRAMixerLinear", "task_ids", "are needed in 'hard' routing mode: "
              "set_routing(model, 'hard', task_ids=...)")
    t = torch.as_tensor(task_ids, device=device)
    lead = tuple(lead_shape)
    if t.dim() > len(lead) or tuple(t.shape) != lead[: t.dim()]:
        _fail("LoRAMixerLinear", "task_ids", f"of shape {list(t.shape)} must match the leading "
              f"dimensions of the input {list(lead)} (e.g. [batch])")
    t = t.reshape(tuple(t.shape) + (1,) * (len(lead) - t.dim())).expand(lead)
    return t.reshape(-1).long()


class LoRAMixerGroup:
    """Projections that read the same input (packed q/k/v): one router, one ``routed_lora`` call.

    Members keep their own experts (``lora_a`` / ``lora_b``, ranks and widths may differ) and share
    one ``router`` module (registered in each member as tied weights). See the module docstring for
    the cache that makes any call order correct. Use :func:`inject` / :func:`from_peft` with
    ``pack_qkv=True`` rather than building groups by hand.
    """

    def __init__(self, members):
        members = list(members)
        where = "LoRAMixerGroup"
        if len(members) < 2:
            _fail(where, "members", f"must be at least 2 LoRAMixerLinear modules, got {len(members)}")
        m0 = members[0]
        for m in members:
            if not isinstance(m, LoRAMixerLinear):
                _fail(where, "members", f"must be LoRAMixerLinear, got {type(m).__name__}", TypeError)
            if m._group is not None:
                _fail(where, "members", "already belong to a group")
            for attr in ("in_features", "num_experts", "scaling"):
                if getattr(m, attr) != getattr(m0, attr):
                    _fail(where, "members", f"must share {attr}: {getattr(m, attr)} != {getattr(m0, attr)}")
            if m.lora_a.dtype != m0.lora_a.dtype:
                _fail(where, "members", "must share the experts' dtype")
        self.members = members
        self.router = m0.router
        for m in members:
            m.router = self.router  # tied: one module registered under every member
            object.__setattr__(m, "_group", self)
        self.clear_cache()

    def clear_cache(self):
        self._cache = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    def _key(self, member, x):
        try:
            xv = x._version
        except RuntimeError:  # inference tensors keep no version counter (and cannot change here)
            xv = None
        pv = tuple(p._version for m in self.members for p in (m.lora_a, m.lora_b))
        rv = tuple(p._version for p in self.router.parameters())
        return (xv, torch.is_grad_enabled(), pv, rv, member.routing_state())

    def output_for(self, member, x):
        """This member's routed delta ``[..., out]`` for input ``x``."""
        key = self._key(member, x)
        c = self._cache
        if c is not None and c["x"] is x and c["key"] == key and member in c["outs"]:
            out = c["outs"].pop(member)
            if not c["outs"]:
                self._cache = None
            member.last_router_probs, member.last_expert_ids = c["probs"], c["ids"]
            return out
        lead = x.shape[:-1]
        x2 = x.reshape(-1, member.in_features)
        gates, ids, probs, shown = member.route(x2, lead)
        xl = x2.to(member.lora_a.dtype)
        y = routed_lora(xl, [m.lora_a for m in self.members], [m.lora_b for m in self.members],
                        ids, gates, member.scaling)
        outs = {m: part.reshape(*lead, m.out_features)
                for m, part in zip(self.members, y.split([m.out_features for m in self.members], 1))}
        mine = outs.pop(member)
        self._cache = dict(x=x, key=key, outs=outs, probs=probs, ids=shown) if outs else None
        member.last_router_probs, member.last_expert_ids = probs, shown
        return mine


# ------------------------------------------------------------------------------------------------
# model surgery
# ------------------------------------------------------------------------------------------------


def mixer_modules(model: nn.Module) -> "OrderedDict[str, LoRAMixerLinear]":
    """Every :class:`LoRAMixerLinear` of ``model`` by qualified name (``model`` itself as ``""``)."""
    return OrderedDict((n, m) for n, m in model.named_modules() if isinstance(m, LoRAMixerLinear))


def _as_names(target_modules, where):
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    names = list(target_modules or [])
    if not names or not all(isinstance(t, str) and t for t in names):
        _fail(where, "target_modules",
              f"must be a non-empty list of module-name suffixes, got {target_modules!r}")
    return names


def _matches(name, targets):
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_submodule(model, name, module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _pack_names(pack_qkv):
    if pack_qkv is True:
        return _QKV
    if not pack_qkv:
        return ()
    return tuple(pack_qkv)


def _make_groups(created, pack_qkv):
    """Group the new modules whose last name component is in ``pack_qkv`` per parent module."""
    names = _pack_names(pack_qkv)
    if not names:
        return []
    by_parent = OrderedDict()
    for n, m in created.items():
        parent, _, leaf = n.rpartition(".")
        if leaf in names:
            by_parent.setdefault(parent, []).append((names.index(leaf), m))
    groups = []
    for members in by_parent.values():
        if len(members) >= 2:
            groups.append(LoRAMixerGroup(m for _, m in sorted(members, key=lambda t: t[0])))
    return groups


def inject(model: nn.Module, target_modules, num_experts: int, r: int, top_k: int, *,
           pack_qkv=False, **kw) -> "OrderedDict[str, LoRAMixerLinear]":
    """Replace, in place, every ``nn.Linear`` whose qualified name ends with one of
    ``target_modules`` by a :class:`LoRAMixerLinear` wrapping it.

    Parameters
    ----------
    model : nn.Module
        Any module tree (e.g. a transformers ``LlamaForCausalLM`` or ``MambaForCausalLM``).
    target_modules : str or list[str]
        Name suffixes, e.g. ``["q_proj", "k_proj", "v_proj", "o_proj"]`` or ``["in_proj", "out_proj"]``.
    num_experts, r, top_k : int
        Experts per layer, their rank, experts per token.
    pack_qkv : bool or tuple[str]
        Group ``q_proj`` / ``k_proj`` / ``v_proj`` (or the given leaf names) of one parent module:
        one shared router, one ``routed_lora`` call (see :class:`LoRAMixerGroup`).
    **kw
        Passed to :class:`LoRAMixerLinear` (``lora_alpha``, ``use_rslora``, ``routing``,
        ``renormalize``, ``router_kind``, ``dtype`` ...).

    Returns
    -------
    OrderedDict[str, LoRAMixerLinear]
        The new modules by qualified name. The base model's parameters are frozen.

    Notes
    -----
    transformers' Mamba, when its fused CUDA kernels (``mamba_ssm``) are available, trains
    through ``mamba_inner_fn`` with ``out_proj.weight`` directly, bypassing an ``out_proj``
    mixer; its pure-PyTorch path (CPU, or without those kernels) and inference call the module.

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels.nn import inject
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> list(inject(net, ["0", "2"], num_experts=4, r=2, top_k=2))
    ['0', '2']
    """
    where = "inject"
    targets = _as_names(target_modules, where)
    for n, m in model.named_modules():
        if isinstance(m, LoRAMixerLinear) and _matches(n, targets):
            _fail(where, "model", f"already holds a LoRA-Mixer at {n!r}")
    found = [(n, m) for n, m in model.named_modules()
             if type(m) is nn.Linear and _matches(n, targets) and not _inside_mixer(model, n)]
    if not found:
        _fail(where, "target_modules", f"{targets} matched no nn.Linear in {type(model).__name__}")
    _freeze_base(model)
    created = OrderedDict()
    for n, lin in found:
        mod = LoRAMixerLinear(lin, num_experts, r, top_k, **kw)
        _set_submodule(model, n, mod)
        created[n] = mod
    _make_groups(created, pack_qkv)
    return created


def _freeze_base(model):
    """requires_grad off for every parameter that is not a LoRA-Mixer expert or router (mixers
    injected earlier keep their settings)."""
    own = {id(p) for m in mixer_modules(model).values()
           for p in (m.lora_a, m.lora_b, *m.router.parameters())}
    for p in model.parameters():
        if id(p) not in own:
            p.requires_grad_(False)


def _inside_mixer(model, name):
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), LoRAMixerLinear):
            return True
    return False


def set_routing(model: nn.Module, mode: str, task_ids=None, top_k: int | None = None):
    """Set every LoRA-Mixer layer of ``model`` to routing ``mode``.

    ``mode``: ``"soft"``, ``"topk"`` or ``"hard"`` (then ``task_ids`` ``[batch]`` int, or any prefix of
    the layers' leading input dims, ``-1`` = no expert). ``top_k`` optionally changes the modules'
    top_k. Returns the number of modules set.
    """
    _check_mode("set_routing", mode)
    if mode == "hard" and task_ids is None:
        _fail("set_routing", "task_ids", "are required for mode 'hard'")
    mods = mixer_modules(model) if not isinstance(model, LoRAMixerLinear) else {"": model}
    if task_ids is not None:
        task_ids = torch.as_tensor(task_ids)
        if task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool:
            _fail("set_routing", "task_ids", f"must be integers, got {task_ids.dtype}", TypeError)
    for m in mods.values():
        if top_k is not None:
            _check_top_k("set_routing", top_k, m.num_experts)
            m.top_k = top_k
        if task_ids is not None and task_ids.numel():
            if int(task_ids.max()) >= m.num_experts or int(task_ids.min()) < -1:
                _fail("set_routing", "task_ids", f"must be in [-1, {m.num_experts}), got "
                      f"[{int(task_ids.min())}, {int(task_ids.max())}]")
        m.routing = mode
        m.task_ids = task_ids
        if m.group is not None:
            m.group.clear_cache()
    return len(mods)


def mark_only_mixer_trainable(model: nn.Module, train_experts: bool = True, train_router: bool = True):
    """Freeze everything except the LoRA-Mixer experts (if ``train_experts``) and routers (if
    ``train_router``). Returns the number of trainable parameters (elements)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in mixer_modules(model).values():
        m.lora_a.requires_grad_(train_experts)
        m.lora_b.requires_grad_(train_experts)
        for p in m.router.parameters():
            p.requires_grad_(train_router)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_report(model: nn.Module) -> dict:
    """Parameter counts (shared tensors once): ``total``, ``trainable``, ``experts``, ``routers``,
    ``base`` (everything else), ``mixers`` (number of LoRA-Mixer layers), ``trainable_percent``,
    ``router_percent`` (routers / total)."""
    mods = mixer_modules(model)
    expert_ids = {id(p) for m in mods.values() for p in (m.lora_a, m.lora_b)}
    router_ids = {id(p) for m in mods.values() for p in m.router.parameters()}
    rep = dict(total=0, trainable=0, experts=0, routers=0, base=0)
    for p in model.parameters():  # deduplicated by nn.Module
        n = p.numel()
        rep["total"] += n
        rep["trainable"] += n if p.requires_grad else 0
        key = "experts" if id(p) in expert_ids else "routers" if id(p) in router_ids else "base"
        rep[key] += n
    rep["mixers"] = len(mods)
    tot = max(rep["total"], 1)
    rep["trainable_percent"] = 100.0 * rep["trainable"] / tot
    rep["router_percent"] = 100.0 * rep["routers"] / tot
    return rep


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("LoRA-Mixer checkpoints need `safetensors` "
                          "(pip install 'loramix_kernels[hf]')") from e
    return st


def _module_config(m, leader):
    return dict(num_experts=m.num_experts, r=m.r, in_features=m.in_features,
                out_features=m.out_features, lora_alpha=m.lora_alpha, use_rslora=m.use_rslora,
                scaling=m.scaling, top_k=m.top_k, routing=m.routing if m.routing != "hard" else "topk",
                renormalize=m.renormalize, router_kind=m.router_kind,
                arrow_temperature=m.arrow_temperature, router_of=leader,
                dtype=str(m.lora_a.dtype).replace("torch.", ""))


def save_mixer(model: nn.Module, path, experts: bool = True) -> None:
    """Save the LoRA-Mixer experts (unless ``experts=False``) and routers of ``model`` to one
    safetensors file; the module configuration goes into its metadata, so :func:`load_mixer` can
    rebuild the mixers in a fresh copy of the base model. Shared (packed) routers are stored once."""
    st = _safetensors()
    mods = mixer_modules(model)
    if not mods:
        _fail("save_mixer", "model", "holds no LoRA-Mixer layers")
    tensors, config, seen = {}, {}, {}
    for n, m in mods.items():
        leader = seen.setdefault(id(m.router), n)
        config[n] = _module_config(m, leader)
        if experts:
            tensors[f"{n}.lora_a"] = m.lora_a.detach().contiguous().cpu()
            tensors[f"{n}.lora_b"] = m.lora_b.detach().contiguous().cpu()
        if leader == n:
            for pn, p in m.router.named_parameters():
                tensors[f"{n}.router.{pn}"] = p.detach().contiguous().cpu()
    meta = {"format": _FORMAT, "modules": json.dumps(config), "experts": str(bool(experts))}
    st.save_file(tensors, os.fspath(path), metadata=meta)


def load_mixer(model: nn.Module, path, strict: bool = True) -> "OrderedDict[str, LoRAMixerLinear]":
    """Load a :func:`save_mixer` checkpoint into ``model``.

    If ``model`` holds no LoRA-Mixer layers yet, they are first created from the checkpoint's
    configuration (same names, shapes, routing settings and q/k/v packing) around the model's own
    ``nn.Linear`` modules; otherwise the existing layers are filled (``strict``: the checkpoint and the
    model must hold the same set of layers). A routers-only file (``save_mixer(..., experts=False)``)
    leaves the experts and their scaling as they are. Layers built here have trainable experts and
    routers: call :func:`mark_only_mixer_trainable` to choose. Returns the model's mixers by name.
    """
    st = _safetensors()
    where = "load_mixer"
    path = os.fspath(path)
    if not os.path.isfile(path):
        _fail(where, "path", f"{path!r} does not exist", FileNotFoundError)
    with st.safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != _FORMAT:
        _fail(where, "path", f"{path!r} is not a LoRA-Mixer checkpoint (format {meta.get('format')!r})")
    config = json.loads(meta["modules"])
    has_experts = meta.get("experts") == "True"
    tensors = st.load_file(path)
    mods = mixer_modules(model)
    if not mods:
        if not has_experts:
            _fail(where, "path", f"{path!r} holds routers only: build the experts first "
                  "(inject / from_peft), then load the routers into them")
        mods = _build_from_config(model, config, where)
    if strict and set(mods) != set(config):
        missing, extra = sorted(set(config) - set(mods)), sorted(set(mods) - set(config))
        _fail(where, "checkpoint", f"does not match the model's LoRA-Mixer layers (in the checkpoint "
              f"only: {missing[:5]}, in the model only: {extra[:5]})")
    with torch.no_grad():
        for n, m in mods.items():
            if n not in config:
                continue
            cfg = config[n]
            for attr in ("lora_a", "lora_b"):
                t = tensors.get(f"{n}.{attr}")
                if t is None:
                    continue
                p = getattr(m, attr)
                if t.shape != p.shape:
                    _fail(where, f"{n}.{attr}", f"has shape {list(t.shape)} in the checkpoint, "
                          f"{list(p.shape)} in the model")
                p.copy_(t)
            lead = cfg["router_of"]
            for pn, p in m.router.named_parameters():
                t = tensors[f"{lead}.router.{pn}"]
                if t.shape != p.shape:
                    _fail(where, f"{n}.router.{pn}", f"has shape {list(t.shape)} in the checkpoint, "
                          f"{list(p.shape)} in the model")
                p.copy_(t)
            # routing configuration as saved (a "hard" layer comes back as "topk": labels are data);
            # the scaling belongs to the experts, so a routers-only file leaves it alone
            if has_experts:
                m.scaling = float(cfg["scaling"])
            m.router_kind, m.arrow_temperature = cfg["router_kind"], float(cfg["arrow_temperature"])
            m.top_k, m.renormalize, m.routing = int(cfg["top_k"]), bool(cfg["renormalize"]), cfg["routing"]
            m.task_ids = None
            if m.group is not None:
                m.group.clear_cache()
    return mods


def _build_from_config(model, config, where):
    names = dict(model.named_modules())
    created = OrderedDict()
    for n, cfg in config.items():
        lin = names.get(n)
        if type(lin) is not nn.Linear:
            _fail(where, "model", f"has no nn.Linear at {n!r} (the checkpoint has a LoRA-Mixer there)")
        if (lin.in_features, lin.out_features) != (cfg["in_features"], cfg["out_features"]):
            _fail(where, n, f"is nn.Linear({lin.in_features}, {lin.out_features}) in the model, "
                  f"({cfg['in_features']}, {cfg['out_features']}) in the checkpoint")
        mod = LoRAMixerLinear(lin, cfg["num_experts"], cfg["r"], cfg["top_k"],
                              lora_alpha=cfg["lora_alpha"], use_rslora=cfg["use_rslora"],
                              routing=cfg["routing"], renormalize=cfg["renormalize"],
                              router_kind=cfg["router_kind"], arrow_temperature=cfg["arrow_temperature"],
                              dtype=getattr(torch, cfg["dtype"]), init_experts=False)
        _set_submodule(model, n, mod)
        created[n] = mod
    by_leader = OrderedDict()
    for n, cfg in config.items():
        by_leader.setdefault(cfg["router_of"], []).append(created[n])
    for members in by_leader.values():
        if len(members) > 1:
            LoRAMixerGroup(members)
    _freeze_base(model)
    return created


# ------------------------------------------------------------------------------------------------
# frozen experts from PEFT adapters
# ------------------------------------------------------------------------------------------------

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED_FLAGS = (
    ("use_dora", "DoRA adapters (use_dora=True): the magnitude vector re-normalises the merged "
                 "weight per layer, which is not a LoRA expert"),
    ("fan_in_fan_out", "fan_in_fan_out=True (Conv1D / GPT-2 style weights)"),
    ("lora_bias", "lora_bias=True (a bias on lora_B)"),
)


def _peft_fail(adapter, msg, exc=ValueError):
    raise exc(f"from_peft: adapter {adapter!r}: {msg}")


def _read_adapter(adapter_dir):
    """(config dict, {module name: (A [r, in], B [out, r])}) of one PEFT LoRA directory."""
    st = _safetensors()
    d = os.fspath(adapter_dir)
    cfg_path = os.path.join(d, "adapter_config.json")
    w_path = os.path.join(d, "adapter_model.safetensors")
    if not os.path.isdir(d):
        _peft_fail(d, "is not a directory", FileNotFoundError)
    if not os.path.isfile(cfg_path):
        _peft_fail(d, "has no adapter_config.json", FileNotFoundError)
    if not os.path.isfile(w_path):
        extra = (" (adapter_model.bin is not supported: re-save with safe_serialization=True)"
                 if os.path.isfile(os.path.join(d, "adapter_model.bin")) else "")
        _peft_fail(d, f"has no adapter_model.safetensors{extra}", FileNotFoundError)
    with open(cfg_path) as f:
        cfg = json.load(f)
    ptype = str(cfg.get("peft_type", "")).upper()
    if ptype != "LORA":
        _peft_fail(d, f"peft_type {cfg.get('peft_type')!r} is not supported (only LORA adapters "
                      "can be LoRA-Mixer experts)")
    for flag, what in _UNSUPPORTED_FLAGS:
        if cfg.get(flag):
            _peft_fail(d, f"{what} is not supported")
    for field in ("modules_to_save", "target_parameters", "trainable_token_indices"):
        if cfg.get(field):
            _peft_fail(d, f"{field}={cfg[field]!r} is not supported (it changes whole modules or "
                          "parameters, which a mixture of LoRA experts cannot represent)")
    raw = st.load_file(w_path)
    pairs = {}
    for key, t in raw.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            _peft_fail(d, f"holds {key!r}, which is not a lora_A / lora_B weight of a Linear layer "
                          "(embedding, DoRA and bias weights are not supported)")
        if t.dim() != 2:
            _peft_fail(d, f"{key} has shape {list(t.shape)}: only nn.Linear LoRA weights (2-D) are supported")
        pairs.setdefault(m["module"], {})[m["ab"]] = t
    out = {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            _peft_fail(d, f"module {name!r} has lora_{'A' if 'A' in ab else 'B'} but no "
                          f"lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        if b.shape[1] != a.shape[0]:
            _peft_fail(d, f"module {name!r}: lora_A is {list(a.shape)} but lora_B is {list(b.shape)} "
                          "(ranks differ)")
        out[name] = (a, b)
    if not out:
        _peft_fail(d, "holds no LoRA weights")
    return cfg, out


def _peft_scaling(cfg, module_name, rank, adapter):
    """PEFT's scaling for one module: lora_alpha / r (or / sqrt(r)), honouring rank / alpha patterns."""
    from_pattern = _pattern_value(cfg.get("rank_pattern") or {}, module_name)
    r = from_pattern if from_pattern is not None else cfg.get("r", rank)
    if int(r) != rank:
        _peft_fail(adapter, f"module {module_name!r}: lora_A has rank {rank} but the config says r={r}")
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module_name)
    alpha = cfg.get("lora_alpha", 8) if alpha is None else alpha
    return float(alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def _pattern_value(patterns, name):
    for key, val in patterns.items():  # PEFT's rule: the key matches a dotted suffix of the name
        if re.match(rf"(.*\.)?({key})$", name):
            return val
    return None


def _resolve_module(model_modules, key_name, adapter):
    if key_name in model_modules:
        return key_name
    parts = key_name.split(".")
    for i in range(1, len(parts)):  # e.g. adapter made on XForCausalLM, model is the bare XModel
        cand = ".".join(parts[i:])
        if cand in model_modules:
            return cand
    _peft_fail(adapter, f"targets module {key_name!r}, which the model does not have")


def from_peft(model: nn.Module, adapter_dirs, top_k: int, *, pack_qkv=False, dtype=None,
              train_experts: bool = False, **kw) -> "OrderedDict[str, LoRAMixerLinear]":
    """Frozen-experts regime: one expert per PEFT LoRA adapter directory, trainable routers.

    Each directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (as written by
    ``PeftModel.save_pretrained``). Expert e of a layer is adapter e's ``lora_B @ lora_A`` with the
    adapter's own scaling (``lora_alpha / r``, ``/ sqrt(r)`` for rsLoRA, rank / alpha patterns
    honoured) folded into its B, so adapters with different alpha and r mix correctly; ranks are
    zero-padded to the largest one, and a layer an adapter does not target gets a zero expert there.
    The layer's own ``scaling`` is 1.

    Parameters
    ----------
    model : nn.Module
        The base model the adapters were made for (modified in place).
    adapter_dirs : list of path
        One directory per expert, in expert order.
    top_k : int
        Experts per token in ``"topk"`` routing.
    pack_qkv : bool or tuple[str]
        As in :func:`inject`.
    dtype : torch.dtype, optional
        Experts' and routers' dtype (default: each base layer's weight dtype).
    train_experts : bool
        Leave the experts trainable (default False: only routers train).
    **kw
        ``routing``, ``renormalize``, ``router_kind``, ``arrow_temperature`` of :class:`LoRAMixerLinear`.

    Returns
    -------
    OrderedDict[str, LoRAMixerLinear]

    Raises
    ------
    ValueError / FileNotFoundError
        Unsupported adapter types (non-LORA ``peft_type``, DoRA, ``fan_in_fan_out``, ``lora_bias``,
        ``modules_to_save``), missing files, a target module the model lacks or whose shape differs.
    """
    where = "from_peft"
    if isinstance(adapter_dirs, (str, os.PathLike)):
        adapter_dirs = [adapter_dirs]
    adapter_dirs = list(adapter_dirs)
    if not adapter_dirs:
        _fail(where, "adapter_dirs", "must list at least one adapter directory")
    for k in ("r", "lora_alpha", "use_rslora", "init_experts"):
        if k in kw:
            _fail(where, k, "comes from each adapter's config and cannot be given", TypeError)
    E = len(adapter_dirs)
    _check_top_k(where, top_k, E)
    modules = dict(model.named_modules())
    per_module = OrderedDict()  # name -> {expert: (A, B scaled)}
    for e, d in enumerate(adapter_dirs):
        cfg, pairs = _read_adapter(d)
        for key_name, (a, b) in pairs.items():
            name = _resolve_module(modules, key_name, os.fspath(d))
            lin = modules[name]
            if isinstance(lin, LoRAMixerLinear):
                _fail(where, "model", f"already holds a LoRA-Mixer at {name!r}")
            if not isinstance(lin, nn.Linear):
                _peft_fail(os.fspath(d), f"targets {name!r}, a {type(lin).__name__}: only nn.Linear "
                                         "layers are supported")
            if a.shape[1] != lin.in_features or b.shape[0] != lin.out_features:
                _peft_fail(os.fspath(d), f"module {name!r}: lora_A {list(a.shape)} / lora_B "
                                         f"{list(b.shape)} do not fit nn.Linear({lin.in_features}, "
                                         f"{lin.out_features}) (shape mismatch: a different base model?)")
            s = _peft_scaling(cfg, name, a.shape[0], os.fspath(d))
            per_module.setdefault(name, {})[e] = (a.float(), b.float() * s)
    _freeze_base(model)
    created = OrderedDict()
    for name, experts in per_module.items():
        lin = modules[name]
        rmax = max(a.shape[0] for a, _ in experts.values())
        mod = LoRAMixerLinear(lin, E, rmax, top_k, lora_alpha=rmax, dtype=dtype,
                              init_experts=False, **kw)
        with torch.no_grad():
            for e, (a, b) in experts.items():
                r = a.shape[0]
                mod.lora_a[e, :r].copy_(a)
                mod.lora_b[e, :, :r].copy_(b)
        mod.lora_a.requires_grad_(train_experts)
        mod.lora_b.requires_grad_(train_experts)
        _set_submodule(model, name, mod)
        created[name] = mod
    _make_groups(created, pack_qkv)
    return created


# ------------------------------------------------------------------------------------------------
# Arrow-style training-free router initialisation
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def expert_prototypes(lora_a, lora_b) -> torch.Tensor:
    """``[E, in]`` unit top right-singular vectors of each expert's stacked ``B_s A_s`` (over the
    slices s of a packed group); zero rows for zero experts.

    Cheap for wide layers: with ``A_cat^T = Q R`` (QR of ``[in, sum r]``), ``stack_s B_s A_s =
    blockdiag(B) R^T Q^T``, so only the small ``[sum out, sum r]`` matrix is decomposed.
    """
    a_cat = torch.cat([a.float() for a in lora_a], dim=1)  # [E, R, in]
    q, rr = torch.linalg.qr(a_cat.transpose(1, 2))  # [E, in, K], [E, K, R]
    rt = rr.transpose(1, 2)  # [E, R, K]
    parts, off = [], 0
    for b in lora_b:
        r = b.shape[2]
        parts.append(b.float() @ rt[:, off:off + r])  # [E, out_s, K]
        off += r
    small = torch.cat(parts, dim=1)
    _, sv, vh = torch.linalg.svd(small, full_matrices=False)
    proto = (q @ vh[:, 0, :].unsqueeze(-1)).squeeze(-1)  # [E, in]
    proto = proto / proto.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    live = sv[:, 0] > sv[:, 0].max().clamp_min(1e-30) * 1e-6
    return proto * live.unsqueeze(-1)


@torch.no_grad()
def arrow_init(module_or_model: nn.Module, temperature: float = 1.0, renormalize: bool = True):
    """Training-free router initialisation (after PEFT's Arrow), for every LoRA-Mixer layer.

    Each expert's prototype is the top right-singular vector of its ``B A`` (input space,
    :func:`expert_prototypes`; a packed group uses the stack of its members' deltas). The router's
    weight rows become the prototypes, its bias zero, and the layer switches to
    ``router_kind="arrow"``: logits = ``|router.weight @ x| / (|x| * temperature) + router.bias``,
    i.e. the absolute cosine between the token and each prototype (the sign of a singular vector is
    arbitrary). The top-k experts by |cosine| are routed and, with ``renormalize=True`` (default,
    set on the layers), their gates are the softmax over the selected scores, as in PEFT's Arrow
    (top-1: gate 1). The router stays trainable; to fine-tune it in ``"soft"`` mode, sharpen the
    scores with a low ``temperature`` (e.g. 0.1: |cosine| lies in [0, 1], so at 1 the softmax is
    nearly uniform).
    Returns the modules initialised, by name.
    """
    mods = ({"": module_or_model} if isinstance(module_or_model, LoRAMixerLinear)
            else mixer_modules(module_or_model))
    if not mods:
        _fail("arrow_init", "module_or_model", "holds no LoRA-Mixer layers")
    done = set()
    for m in mods.values():
        if id(m.router) in done:
            continue
        done.add(id(m.router))
        members = m.group.members if m.group is not None else [m]
        proto = expert_prototypes([x.lora_a for x in members], [x.lora_b for x in members])
        m.router.weight.copy_(proto.to(m.router.weight.dtype))
        m.router.bias.zero_()
        for x in members:
            x.router_kind, x.arrow_temperature = "arrow", float(temperature)
            x.renormalize = bool(renormalize)
            if x.group is not None:
                x.group.clear_cache()
    return mods
