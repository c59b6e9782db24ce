"""Routing losses and routing-mode helpers for LoRA-Mixer training (plain PyTorch, differentiable).

* :func:`routing_specialization_loss`: the paper's balance + entropy loss (SBL, renamed RSL in
  the ICLR 2026 version), over probabilities you pass or over every LoRA-Mixer layer of a model.
* :func:`switch_balance_loss`: the Switch Transformer load-balancing loss ``E * sum_i f_i P_i``.
* :func:`routing_entropy`: the mean per-token entropy of the router's distribution.
* :func:`routing_statistics`: the per-expert means ``pbar`` (probability) and ``fbar`` (share of
  routed slots) the two losses are built from.
* :func:`expert_preservation_penalty`: ``beta * sum_{i in C} ||theta_i - theta_i0||^2`` for the
  experts ``C`` that must stay close to their initial (e.g. published) weights.
* :func:`hard_then_soft_schedule`: which routing mode (``"hard"``, ``"soft"``, ``"topk"``) a
  training step uses.

Batch statistics (all functions here): ``pbar`` and ``fbar`` are averages over EVERY token passed
in -- all sequences and positions of the batch, flattened -- not per sequence. The balance term
therefore asks the batch's load to be even while each token may still route sharply, which is the
paper's batch-level balance. Padding tokens are excluded with ``mask``. Under data parallelism each
rank sees its own batch; nothing here all-reduces.

Conventions: ``probs`` is ``[..., E]`` (router softmax over all E experts, e.g. the third output
of :func:`~loramix_kernels.ops.routing.route_topk`); ``expert_ids`` is ``[..., k]`` integer with
the same leading dimensions, ``-1`` marking an unused slot (ignored); ``mask`` is ``[...]`` bool,
True for tokens that count.
"""

from __future__ import annotations

from typing import Mapping

import torch

from . import _backend
from ._checks import check, check_index_range, check_tensor, fail

__all__ = [
    "ROUTING_MODES", "routing_specialization_loss", "switch_balance_loss", "routing_entropy",
    "routing_statistics", "expert_preservation_penalty", "hard_then_soft_schedule",
]

#: Routing modes of a LoRA-Mixer layer (``loramix_kernels.nn.set_routing``): dense softmax over all
#: experts, sparse top-k, and one expert per sample from a task label.
ROUTING_MODES = ("soft", "topk", "hard")

_ENTROPY_SIGNS = ("minimize", "maximize")


def _flat_inputs(op, probs, expert_ids, mask):
    """probs [T, E] (fp32 at least), ids [T, k] int64, token weights [T, 1] (or None)."""
    check_tensor(op, "probs", probs)
    check(probs.is_floating_point(), op, "probs", f"must be floating point, got {probs.dtype}", TypeError)
    check(probs.dim() >= 1 and probs.shape[-1] >= 1, op, "probs",
          f"must have shape [..., E] with E >= 1, got {list(probs.shape)}")
    lead, E = tuple(probs.shape[:-1]), probs.shape[-1]
    p = probs.reshape(-1, E)
    if p.dtype in (torch.float16, torch.bfloat16):
        p = p.float()
    ids = None
    if expert_ids is not None:
        check_tensor(op, "expert_ids", expert_ids, device=probs.device)
        check(not expert_ids.is_floating_point() and expert_ids.dtype != torch.bool, op,
              "expert_ids", f"must be an integer tensor, got {expert_ids.dtype}", TypeError)
        check(expert_ids.dim() == len(lead) + 1 and tuple(expert_ids.shape[:-1]) == lead, op,
              "expert_ids", f"must have shape [{', '.join(map(str, lead))}, k] like probs "
              f"{list(probs.shape)}, got {list(expert_ids.shape)}")
        if _backend.check_values(expert_ids):
            check_index_range(op, "expert_ids", expert_ids, -1, E)
        ids = expert_ids.reshape(p.shape[0], -1).long()
    w = None
    if mask is not None:
        check_tensor(op, "mask", mask, device=probs.device)
        check(tuple(mask.shape) == lead, op, "mask",
              f"must have probs' leading shape {list(lead)}, got {list(mask.shape)}")
        w = mask.reshape(-1, 1).to(p.dtype)
    return p, ids, w


def _pbar(p, w):
    if w is None:
        return p.mean(0) if p.shape[0] else p.new_zeros(p.shape[1])
    return (p * w).sum(0) / w.sum().clamp_min(1)


def _fbar(p, ids, w):
    """Share of the valid routed slots on each expert (sums to 1; all zeros with no valid slot)."""
    valid = (ids >= 0).to(p.dtype)
    if w is not None:
        valid = valid * w
    counts = p.new_zeros(p.shape[1]).scatter_add_(0, ids.clamp_min(0).reshape(-1), valid.reshape(-1))
    return counts / counts.sum().clamp_min(1)


def _entropy(p, w):
    # p log p with log(clamp(p, tiny)): the value is exact (0 log 0 = 0) and the gradient stays
    # finite at p = 0 (xlogy's is -inf there, and -inf * 0 from the softmax Jacobian is NaN).
    h = -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1, keepdim=True)
    if w is None:
        return h.mean() if h.numel() else h.sum()
    return (h * w).sum() / w.sum().clamp_min(1)


def routing_statistics(probs, expert_ids, *, mask=None):
    """Per-expert batch statistics: ``(pbar, fbar)``, each ``[E]``.

    ``pbar_i``: the mean router probability of expert i over the tokens (differentiable).
    ``fbar_i``: the share of valid routed slots (``expert_ids >= 0``) that went to expert i; a
    count, so it carries no gradient. Both sum to 1 (``fbar`` is all zeros when no slot is
    valid). fp16 / bf16 probabilities are averaged in fp32.

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels.losses import routing_statistics
    >>> probs = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]])
    >>> pbar, fbar = routing_statistics(probs, torch.tensor([[0, 1], [2, -1]]))
    >>> pbar.tolist(), [round(f, 4) for f in fbar.tolist()]
    ([0.375, 0.375, 0.25], [0.3333, 0.3333, 0.3333])
    """
    p, ids, w = _flat_inputs("routing_statistics", probs, expert_ids, mask)
    return _pbar(p, w), _fbar(p, ids, w)


def switch_balance_loss(probs, expert_ids, *, mask=None):
    """Switch Transformer load-balancing loss: ``E * sum_i fbar_i * pbar_i``.

    With top-1 routing ``fbar_i`` is the fraction of tokens dispatched to expert i, exactly
    Switch's ``f_i``; with top-k it is the share of routed slots (so it still sums to 1 and the
    value stays comparable across k). The value is 1 when routing is perfectly balanced (both
    uniform) and at most E; the gradient flows to the router through ``pbar`` only.

    Parameters
    ----------
    probs : torch.Tensor
        ``[..., E]`` router probabilities (softmax over all experts).
    expert_ids : torch.Tensor
        ``[..., k]`` integer routed experts; ``-1`` slots are ignored.
    mask : torch.Tensor, optional
        ``[...]`` bool; False excludes a token (padding) from both statistics.

    Returns
    -------
    torch.Tensor
        0-d, in probs' dtype (fp32 for fp16 / bf16).

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels.losses import switch_balance_loss
    >>> probs = torch.full((4, 2), 0.5)
    >>> switch_balance_loss(probs, torch.tensor([[0], [1], [0], [1]])).item()
    1.0
    """
    p, ids, w = _flat_inputs("switch_balance_loss", probs, expert_ids, mask)
    return p.shape[1] * (_pbar(p, w) * _fbar(p, ids, w)).sum()


def routing_entropy(probs, *, mask=None):
    """Mean over tokens of the router distribution's entropy ``-sum_i p_i log p_i`` (nats).

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels.losses import routing_entropy
    >>> round(routing_entropy(torch.full((3, 4), 0.25)).item(), 4)  # log 4
    1.3863
    """
    p, _, w = _flat_inputs("routing_entropy", probs, None, mask)
    return _entropy(p, w)


def _specialization(p, ids, w, alpha, entropy_weight, sign):
    E = p.shape[1]
    balance = alpha * E * (_pbar(p, w) * _fbar(p, ids, w)).sum()
    if entropy_weight == 0:
        return balance
    return balance + sign * entropy_weight * _entropy(p, w)


def _router_layers(model):
    """(name, probs, expert_ids) of every module exposing router statistics, each router once."""
    out, seen = [], set()
    for name, m in model.named_modules():
        probs = getattr(m, "last_router_probs", None)
        ids = getattr(m, "last_expert_ids", None)
        if probs is None or ids is None:
            continue
        if id(probs) in seen:  # packed q/k/v layers that share one routing decision
            continue
        seen.add(id(probs))
        out.append((name, probs, ids))
    return out


def routing_specialization_loss(model_or_probs, expert_ids=None, *, alpha=1.0, entropy_weight=0.1,
                                entropy_sign="minimize", mask=None, layer_reduction="mean"):
    """The LoRA-Mixer routing loss (SBL / RSL): balance + entropy.

    ``L = alpha * E * sum_i pbar_i * fbar_i  +  s * entropy_weight * mean_x H(p(x))``

    * ``pbar_i``: mean router probability of expert i over the batch's tokens (full softmax);
      ``fbar_i``: share of the routed slots (``expert_ids``, ``-1`` ignored) on expert i. See
      :func:`routing_statistics`; both are batch-level (module docstring).
    * Normalisation: the paper writes ``alpha * sum_i pbar_i fbar_i``; we multiply by E (the
      Switch convention), so the balance term is ``alpha`` at perfect balance whatever E is, and
      ``alpha`` means the same for 6 or 64 experts. Pass ``alpha / E`` for the paper's raw value.
    * ``H(p(x)) = -sum_i p_i(x) log p_i(x)``, averaged over tokens. The paper is inconsistent on
      its sign: its text says entropy MINIMISATION sharpens routing (each token commits to few
      experts) while the batch-level balance keeps the load even; its formula subtracts the
      entropy. ``entropy_sign="minimize"`` (default) adds ``+entropy_weight * H`` (training
      lowers the entropy: specialisation); ``"maximize"`` adds ``-entropy_weight * H`` (the
      formula as printed: smoother routing).

    The gradient reaches the router logits through ``pbar`` and the entropy (``fbar`` counts the
    discrete routing and is constant). Add it to the task loss with your own coefficient.

    Parameters
    ----------
    model_or_probs : torch.Tensor or torch.nn.Module
        Either router probabilities ``[..., E]`` (then ``expert_ids`` is required), or a module
        tree: every submodule with non-None ``last_router_probs`` ``[T, E]`` and
        ``last_expert_ids`` ``[T, k]`` attributes (``loramix_kernels.nn.LoRAMixerLinear`` sets them
        on each forward) contributes one layer loss; layers that share one probability tensor
        (packed q/k/v routed once) count once.
    expert_ids : torch.Tensor, optional
        ``[..., k]`` integer routed experts, ``-1`` for unused slots. In soft routing (all E
        experts mixed), pass the top-k the router would pick (``route_topk``'s ids for the
        layer's ``top_k``): with every expert routed ``fbar`` is uniform and the balance term is
        a constant.
    alpha : float, default 1.0
        Weight of the balance term.
    entropy_weight : float, default 0.1
        ``lambda`` of the entropy term (0 disables it).
    entropy_sign : {"minimize", "maximize"}, default "minimize"
        Direction the entropy is pushed (see above).
    mask : torch.Tensor, optional
        ``[...]`` bool, False for padding tokens (excluded from every statistic). With a model,
        it must have ``T`` elements for every layer.
    layer_reduction : {"mean", "sum"}, default "mean"
        How a model's layer losses combine ("mean" keeps the scale independent of depth).

    Returns
    -------
    torch.Tensor
        0-d loss (fp32 for fp16 / bf16 probabilities).

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels.losses import routing_specialization_loss
    >>> probs = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    >>> ids = torch.tensor([[0], [1]])
    >>> loss = routing_specialization_loss(probs, ids, alpha=1.0, entropy_weight=0.0)
    >>> round(loss.item(), 4)  # balanced: alpha * E * (0.5 * 0.5 + 0.5 * 0.5)
    1.0
    """
    op = "routing_specialization_loss"
    check(entropy_sign in _ENTROPY_SIGNS, op, "entropy_sign",
          f"must be one of {_ENTROPY_SIGNS}, got {entropy_sign!r}")
    check(layer_reduction in ("mean", "sum"), op, "layer_reduction",
          f"must be 'mean' or 'sum', got {layer_reduction!r}")
    sign = 1.0 if entropy_sign == "minimize" else -1.0
    if isinstance(model_or_probs, torch.Tensor):
        check(expert_ids is not None, op, "expert_ids",
              "is required with a probability tensor (the routed slots give fbar)")
        p, ids, w = _flat_inputs(op, model_or_probs, expert_ids, mask)
        return _specialization(p, ids, w, alpha, entropy_weight, sign)
    if not isinstance(model_or_probs, torch.nn.Module):
        fail(op, "model_or_probs", f"must be a Tensor of probabilities or an nn.Module, got "
             f"{type(model_or_probs).__name__}", TypeError)
    check(expert_ids is None, op, "expert_ids",
          "must be None with a model (each layer's last_expert_ids are used)")
    layers = _router_layers(model_or_probs)
    check(bool(layers), op, "model_or_probs",
          "has no LoRA-Mixer layer with router statistics (non-None last_router_probs and "
          "last_expert_ids): run a forward pass first")
    losses = []
    for name, probs, ids in layers:
        where = f"{op} (layer {name!r})"
        m = mask
        if m is not None:
            check(m.numel() == probs[..., 0].numel(), where, "mask",
                  f"must have one entry per token ({probs[..., 0].numel()}), got shape {list(m.shape)}")
            m = m.reshape(probs.shape[:-1])
        p, i, w = _flat_inputs(where, probs, ids, m)
        losses.append(_specialization(p, i, w, alpha, entropy_weight, sign))
    total = torch.stack(losses).sum()
    return total / len(losses) if layer_reduction == "mean" else total


def _as_tensors(op, arg, params):
    if isinstance(params, torch.Tensor):
        return {"": params}
    if isinstance(params, Mapping):
        return dict(params)
    if isinstance(params, (list, tuple)):
        return {str(i): t for i, t in enumerate(params)}
    fail(op, arg, f"must be a Tensor, a list of Tensors or a dict of Tensors, got "
         f"{type(params).__name__}", TypeError)


def expert_preservation_penalty(params, initial_params, beta, experts=None):
    """``beta * sum_{i in experts} ||theta_i - theta_i0||^2``: keep chosen experts near their
    initial weights (the paper's preservation term for published / frozen-then-tuned experts).

    Parameters
    ----------
    params : torch.Tensor, list of torch.Tensor, or dict of str to torch.Tensor
        Expert parameters stacked along dim 0: each tensor is ``[E, ...]`` (e.g. a layer's
        ``lora_a`` ``[E, r, in]`` and ``lora_b`` ``[E, out, r]``, several layers at once).
    initial_params
        The same structure (same keys / order and shapes): the reference weights, e.g. a
        ``{k: v.detach().clone() ...}`` snapshot taken before training. Treated as constants.
    beta : float
        Weight of the penalty.
    experts : sequence of int or torch.Tensor, optional
        Indices (into dim 0) of the preserved experts ``C``; default: every expert.

    Returns
    -------
    torch.Tensor
        0-d penalty, differentiable with respect to ``params`` (fp32 accumulation).

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels.losses import expert_preservation_penalty
    >>> a0 = torch.zeros(3, 2)
    >>> a = torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, 3.0]])
    >>> expert_preservation_penalty(a, a0, beta=0.5, experts=[0, 2]).item()  # 0.5 * (1 + 9)
    5.0
    """
    op = "expert_preservation_penalty"
    cur = _as_tensors(op, "params", params)
    ref = _as_tensors(op, "initial_params", initial_params)
    check(cur.keys() == ref.keys(), op, "initial_params",
          f"must have the same structure as params: keys {sorted(cur)} vs {sorted(ref)}")
    check(len(cur) > 0, op, "params", "must hold at least one tensor")
    total = None
    for key, t in cur.items():
        where = f"params[{key!r}]" if key else "params"
        t0 = ref[key]
        check_tensor(op, where, t)
        check_tensor(op, "initial_params" + where[6:], t0, device=t.device)
        check(t.dim() >= 1 and t0.shape == t.shape, op, "initial_params" + where[6:],
              f"must have {where}'s shape {list(t.shape)} (experts stacked on dim 0), "
              f"got {list(t0.shape)}")
        d = t.float() - t0.detach().float()
        if experts is not None:
            idx = torch.as_tensor(experts, dtype=torch.long, device=t.device).reshape(-1)
            if _backend.check_values(idx):
                check_index_range(op, "experts", idx, 0, t.shape[0])
            d = d.index_select(0, idx)
        s = d.square().sum()
        total = s if total is None else total + s
    return beta * total


def hard_then_soft_schedule(step, hard_steps, *, training=True, inference_mode="topk"):
    """Routing mode for a training step: ``"hard"`` for the first ``hard_steps`` steps, then
    ``"soft"``; ``inference_mode`` (default ``"topk"``, the paper's sparse top-k) when not
    training.

    The paper's recipe: hard routing first (each sample to the expert of its task label, so every
    expert learns its own domain), then soft routing (a dense softmax mixture the router learns
    end to end), and sparse top-k at inference. Feed the result to
    ``loramix_kernels.nn.set_routing(model, mode, task_ids)``.

    Parameters
    ----------
    step : int
        0-based training step.
    hard_steps : int
        Number of hard-routed steps (0: soft from the start).
    training : bool, default True
        False returns ``inference_mode``.
    inference_mode : {"topk", "soft", "hard"}, default "topk"

    Examples
    --------
    >>> from loramix_kernels.losses import hard_then_soft_schedule
    >>> [hard_then_soft_schedule(s, 2) for s in range(4)]
    ['hard', 'hard', 'soft', 'soft']
    >>> hard_then_soft_schedule(10, 2, training=False)
    'topk'
    """
    op = "hard_then_soft_schedule"
    for arg, v in (("step", step), ("hard_steps", hard_steps)):
        check(isinstance(v, int) and not isinstance(v, bool), op, arg,
              f"must be an int, got {type(v).__name__}", TypeError)
        check(v >= 0, op, arg, f"must be >= 0, got {v}")
    check(inference_mode in ROUTING_MODES, op, "inference_mode",
          f"must be one of {ROUTING_MODES}, got {inference_mode!r}")
    if not training:
        return inference_mode
    return "hard" if step < hard_steps else "soft"
