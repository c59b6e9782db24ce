"""Tensor- and data-parallel LoRA-Mixer over ``torch.distributed`` (nothing of its own).

Tensor parallelism (Megatron layout)
------------------------------------
* :class:`ColumnParallelLoRAMixerLinear` (q / k / v, gate / up): each rank holds the rows of the
  base weight and of every expert's ``lora_b`` for its output shard, the full ``lora_a`` and the
  full (replicated) router. The forward needs no communication: the router runs on the replicated
  input (same logits, same tie-breaking on every rank) and ``routed_lora`` runs locally on the
  shard (with autograd on: ``routed_lora_shrink`` replicated, ``routed_lora_expand`` on the shard).
  Output: the local shard ``[..., out/world]`` (``gather_output=True`` all-gathers it).
* :class:`RowParallelLoRAMixerLinear` (o, down): the input is split by columns (the output of a
  column-parallel layer). Each rank holds the base weight's columns of its input shard, the same
  columns of every ``lora_a`` and of the router weight, and the rows of ``lora_b`` of ONE output
  chunk. Forward: the partial router logits ``[T, E]`` are all-reduced (so every rank routes on
  the same logits); the partial shrink ``h_r = A[:, :, shard] x_r`` (``[T, k, r]`` fp32) is
  all-reduced -- S-LoRA's trick: ``T*k*r*4`` bytes instead of an all-reduce / all-gather of
  ``[T, d_out]`` activations; each rank then expands ``h`` with its ``lora_b`` chunk into ITS
  columns of its partial base output, so the base layer's own all-reduce of ``[T, d_out]`` sums
  the LoRA contribution too (no second ``[T, d_out]`` all-reduce).
* Autograd: Megatron's two conjugate functions, :func:`copy_to_group` (forward identity, backward
  all-reduce) in front of every rank-specific consumer of a replicated tensor and
  :func:`reduce_from_group` (forward all-reduce, backward identity) after every partial sum, so
  every parameter's gradient is complete on its rank with no gradient hook (replicated parameters
  get identical gradients on every rank).
* Bytes all-reduced in the forward are counted per layer in ``comm_bytes`` (``{"lora", "router",
  "base", "gather"}``, cumulative; :meth:`reset_comm_bytes`). ``comm_bytes["lora"]`` grows by
  exactly ``T*k*r*4`` per row-parallel forward and by 0 per column-parallel forward.
* :func:`shard_mixer` replaces the LoRA-Mixer layers of an injected model (``loramix_kernels.nn
  .inject``) by their parallel versions following a plan ``{name suffix: "column" | "row"}``.
  Routing modes ``"topk"`` and ``"soft"`` with the linear router are supported; packed q/k/v
  groups, ``"hard"`` routing and the arrow router raise.
* The parallel layers record ``last_router_probs`` / ``last_expert_ids`` like ``LoRAMixerLinear``;
  ``losses.routing_specialization_loss`` takes them as tensors (``mixer_modules`` does not list
  the parallel layers).

Data parallelism
----------------
A LoRA-Mixer model trains under ``DistributedDataParallel`` and under FSDP2 (``fully_shard``)
unchanged (tests/test_distributed.py, gloo on CPU): the ops are ordinary differentiable
``torch.ops``. The routing losses (``loramix_kernels.losses``) use the statistics of the tokens
each rank sees: they do NOT all-reduce, so under data parallelism the balance term balances each
rank's local batch, and the averaged gradient is the mean of the per-rank losses' gradients (not
that of the loss of the global batch). :func:`global_routing_statistics` all-reduces ``pbar`` /
``fbar`` (differentiably) for a loss on the global batch's statistics. Save checkpoints from one
rank (``nn.save_mixer`` on rank 0; with FSDP2 after gathering the full state, see the tests).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import nn as lnn
from .ops.routed_lora import routed_lora
from .ops.sharding import routed_lora_expand, routed_lora_shrink

__all__ = ["ColumnParallelLoRAMixerLinear", "RowParallelLoRAMixerLinear", "shard_mixer",
           "copy_to_group", "reduce_from_group", "global_routing_statistics", "shard_bounds"]


# ------------------------------------------------------------------------------------------
# conjugate communication functions (Megatron's f and g)
# ------------------------------------------------------------------------------------------


def _all_reduce(t, group):
    t = t.contiguous()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone(), ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


def copy_to_group(x, group=None):
    """Forward: ``x``; backward: the gradient all-reduced (sum) over ``group``. Put in front of a
    rank-specific use of a tensor that is replicated on every rank."""
    return _CopyToGroup.apply(x, group) if x.requires_grad else x


def reduce_from_group(x, group=None):
    """Forward: ``x`` all-reduced (sum) over ``group``; backward: identity. For partial sums whose
    result is used identically on every rank."""
    return _ReduceFromGroup.apply(x, group) if torch.is_grad_enabled() else _all_reduce(x.clone(), group)


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of ``rank``'s chunk of ``n`` items split ``world`` ways (``torch.tensor_split``:
    the first ``n % world`` chunks are one longer)."""
    q, rem = divmod(n, world)
    lo = rank * q + min(rank, rem)
    return lo, lo + q + (1 if rank < rem else 0)


# ------------------------------------------------------------------------------------------
# routing (the replicated part)
# ------------------------------------------------------------------------------------------


def _check_supported(m, where):
    if not isinstance(m, lnn.LoRAMixerLinear):
        raise TypeError(f"{where}: module must be a LoRAMixerLinear, got {type(m).__name__}")
    if m.group is not None:
        raise ValueError(f"{where}: module is packed in a q/k/v group (pack_qkv); shard unpacked layers")
    if m.routing not in ("topk", "soft"):
        raise ValueError(f"{where}: routing {m.routing!r} is not supported under tensor parallelism "
                         "(use 'topk' or 'soft')")
    if m.router_kind != "linear":
        raise ValueError(f"{where}: router_kind {m.router_kind!r} is not supported (use 'linear')")


def _route(cfg, logits):
    """(gates, ids, probs, reported ids) from ``[T, E]`` logits, as ``LoRAMixerLinear.route``."""
    E, k = cfg.num_experts, cfg.top_k
    if cfg.routing == "soft":
        _, top_ids, probs = lnn._route_topk(logits, k, False)
        ids = torch.arange(E, device=logits.device, dtype=torch.int32).expand(logits.shape[0], E)
        return probs, ids, probs, top_ids
    if k == 1 and cfg.renormalize:
        _, ids, probs = lnn._route_topk(logits, 1, False)
        return lnn._straight_through_one(probs.gather(1, ids.long())), ids, probs, ids
    gates, ids, probs = lnn._route_topk(logits, k, cfg.renormalize)
    return gates, ids, probs, ids


class _ParallelBase(nn.Module):
    def __init__(self, m, group):
        super().__init__()
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.in_features, self.out_features = m.in_features, m.out_features
        self.num_experts, self.r, self.top_k, self.scaling = m.num_experts, m.r, m.top_k, m.scaling
        self.routing, self.renormalize = m.routing, m.renormalize
        self.last_router_probs = self.last_expert_ids = None
        self.last_gates = None
        self.comm_bytes = {"lora": 0, "router": 0, "base": 0, "gather": 0}

    def reset_comm_bytes(self):
        for key in self.comm_bytes:
            self.comm_bytes[key] = 0

    def _count(self, key, t):
        self.comm_bytes[key] += t.numel() * t.element_size()

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}/{self.world}, "
                f"num_experts={self.num_experts}, r={self.r}, top_k={self.top_k}")


def _param(t, trainable):
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=trainable)


class ColumnParallelLoRAMixerLinear(_ParallelBase):
    """Output-split LoRA-Mixer projection built from a full :class:`~loramix_kernels.nn.LoRAMixerLinear`
    (same values on every rank, e.g. the same seed): base rows, ``lora_b`` rows of this rank's output
    shard (``shard_bounds(out, world, rank)``), full ``lora_a`` and router. No forward communication.

    Examples
    --------
    Under ``torch.distributed`` (see tests/test_distributed.py)::

        layer = ColumnParallelLoRAMixerLinear(mixer_layer, group=None)
        y_local = layer(x)          # [..., out / world], this rank's columns
    """

    def __init__(self, m, group=None, gather_output: bool = False):
        _check_supported(m, "ColumnParallelLoRAMixerLinear")
        super().__init__(m, group)
        self.gather_output = gather_output
        self.lo, self.hi = shard_bounds(m.out_features, self.world, self.rank)
        self.weight = _param(m.base.weight[self.lo:self.hi], False)
        self.bias = None if m.base.bias is None else _param(m.base.bias[self.lo:self.hi], False)
        self.router = nn.Linear(m.in_features, m.num_experts, device=m.router.weight.device,
                                dtype=m.router.weight.dtype)
        self.router.load_state_dict(m.router.state_dict())
        self.router.requires_grad_(m.router.weight.requires_grad)
        self.lora_a = _param(m.lora_a, m.lora_a.requires_grad)
        self.lora_b = _param(m.lora_b[:, self.lo:self.hi], m.lora_b.requires_grad)

    def forward(self, x):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        gates, ids, probs, shown = _route(self, self.router(x2.to(self.router.weight.dtype)))
        self.last_router_probs, self.last_expert_ids, self.last_gates = probs, shown, gates
        y = F.linear(copy_to_group(x2, self.group), self.weight, self.bias)
        xl = x2.to(self.lora_a.dtype)
        if torch.is_grad_enabled() and (self.lora_a.requires_grad or x2.requires_grad or gates.requires_grad):
            # h is computed identically on every rank; its (and the gates') gradient is the sum of
            # every rank's expand, hence copy_to_group: all-reduce of [T, k, r] in the backward.
            h = copy_to_group(routed_lora_shrink(xl, [self.lora_a], ids), self.group)
            delta = routed_lora_expand(h, [self.lora_b], ids, copy_to_group(gates, self.group), self.scaling)
        else:
            delta = routed_lora(xl, [self.lora_a], [self.lora_b], ids, gates, self.scaling)
        y = (y + delta.to(y.dtype)).reshape(*lead, self.hi - self.lo)
        if self.gather_output:
            y = _gather_last(y, self.group, self.out_features, self)
        return y


def _gather_last(y, group, n, layer):
    """All-gather the last dimension (uneven chunks allowed), differentiable."""
    return _GatherLast.apply(y, group, n, layer)


class _GatherLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group, n, layer):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        bounds = [shard_bounds(n, world, r) for r in range(world)]
        width = max(hi - lo for lo, hi in bounds)
        pad = torch.zeros(*y.shape[:-1], width, dtype=y.dtype, device=y.device)
        pad[..., : y.shape[-1]] = y
        parts = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(parts, pad, group=group)
        layer.comm_bytes["gather"] += pad.numel() * pad.element_size() * world
        ctx.lo, ctx.hi = bounds[rank]
        return torch.cat([p[..., : hi - lo] for p, (lo, hi) in zip(parts, bounds)], -1)

    @staticmethod
    def backward(ctx, g):
        return g[..., ctx.lo:ctx.hi].contiguous(), None, None, None


class RowParallelLoRAMixerLinear(_ParallelBase):
    """Input-split LoRA-Mixer projection built from a full :class:`~loramix_kernels.nn.LoRAMixerLinear`:
    this rank's input columns ``shard_bounds(in, world, rank)`` of the base weight, of every
    ``lora_a`` and of the router weight; ``lora_b`` rows of its output chunk ``shard_bounds(out,
    world, rank)``; bias and router bias replicated. Input: the local shard ``[..., in / world]``;
    output: the full ``[..., out]`` on every rank (one all-reduce of the base output carries the
    LoRA part; the LoRA part itself all-reduces only ``h``: ``T*k*r*4`` bytes, and the router
    ``T*E*4`` bytes of logits)."""

    def __init__(self, m, group=None):
        _check_supported(m, "RowParallelLoRAMixerLinear")
        super().__init__(m, group)
        self.lo, self.hi = shard_bounds(m.in_features, self.world, self.rank)
        self.out_lo, self.out_hi = shard_bounds(m.out_features, self.world, self.rank)
        self.weight = _param(m.base.weight[:, self.lo:self.hi], False)
        self.bias = None if m.base.bias is None else _param(m.base.bias, False)
        train_router = m.router.weight.requires_grad
        self.router_weight = _param(m.router.weight[:, self.lo:self.hi], train_router)
        self.router_bias = _param(m.router.bias, train_router)
        self.lora_a = _param(m.lora_a[:, :, self.lo:self.hi], m.lora_a.requires_grad)
        self.lora_b = _param(m.lora_b[:, self.out_lo:self.out_hi], m.lora_b.requires_grad)

    def forward(self, x):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.hi - self.lo)
        T = x2.shape[0]
        part = F.linear(x2.to(self.router_weight.dtype), self.router_weight)
        self._count("router", part)
        logits = reduce_from_group(part, self.group) + self.router_bias
        gates, ids, probs, shown = _route(self, logits)
        self.last_router_probs, self.last_expert_ids, self.last_gates = probs, shown, gates
        h_part = routed_lora_shrink(x2.to(self.lora_a.dtype), [self.lora_a], ids)  # [1, T, k, r] fp32
        self._count("lora", h_part)
        h = reduce_from_group(h_part, self.group)
        delta = routed_lora_expand(copy_to_group(h, self.group), [self.lora_b], ids,
                                   copy_to_group(gates, self.group), self.scaling)
        y = F.linear(x2, self.weight)
        y = torch.cat([y[:, : self.out_lo], y[:, self.out_lo:self.out_hi] + delta.to(y.dtype),
                       y[:, self.out_hi:]], 1)
        self._count("base", y)
        y = reduce_from_group(y, self.group)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


def shard_mixer(model: nn.Module, group=None, plan=None) -> dict:
    """Replace the LoRA-Mixer layers of ``model`` (in place) by their tensor-parallel versions.

    ``plan`` maps module-name suffixes to ``"column"`` or ``"row"`` (e.g. ``{"q_proj": "column",
    "k_proj": "column", "v_proj": "column", "o_proj": "row", "up_proj": "column", "down_proj":
    "row"}``); every rank must call it on an identical model (same seed or the same checkpoint).
    A LoRA-Mixer layer that matches no suffix stays as it is (replicated). Returns ``{name: new
    module}``. If ``model`` itself is a LoRA-Mixer layer, ``plan`` is ``"column"`` or ``"row"`` and
    the new module is returned under ``""`` (the caller replaces it)."""
    if plan is None or not isinstance(plan, (dict, str)):
        raise ValueError(f"shard_mixer: plan must be a dict {{suffix: 'column' | 'row'}}, got {plan!r}")
    kinds = {"column": ColumnParallelLoRAMixerLinear, "row": RowParallelLoRAMixerLinear}
    for kind in ([plan] if isinstance(plan, str) else plan.values()):
        if kind not in kinds:
            raise ValueError(f"shard_mixer: plan values must be 'column' or 'row', got {kind!r}")
    if isinstance(model, lnn.LoRAMixerLinear):
        kind = plan if isinstance(plan, str) else None
        if kind is None:
            raise ValueError("shard_mixer: plan must be 'column' or 'row' for a single LoRAMixerLinear")
        return {"": kinds[kind](model, group)}
    out = {}
    for name, m in list(lnn.mixer_modules(model).items()):
        kind = next((v for s, v in plan.items() if lnn._matches(name, [s])), None)
        if kind is None:
            continue
        new = kinds[kind](m, group)
        lnn._set_submodule(model, name, new)
        out[name] = new
    if not out:
        raise ValueError(f"shard_mixer: no LoRA-Mixer layer of the model matches the plan {plan!r}")
    return out


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone(), ctx.group), None


def global_routing_statistics(probs, expert_ids, group=None):
    """(pbar, fbar) ``[E]`` of the GLOBAL batch under data parallelism: the per-rank sums of the
    router probabilities and of the routed-slot counts all-reduced over ``group`` and divided by
    the global token / slot counts. Differentiable in ``probs``; the backward all-reduces, so that
    after DDP's average over the ranks a balance loss built from them,
    ``E * (pbar * fbar).sum()``, computed identically on every rank and averaged by DDP, trains as
    the single-process loss of the whole batch (tests/test_distributed.py).
    """
    E = probs.shape[-1]
    p = probs.reshape(-1, E).float()
    ids = expert_ids.reshape(p.shape[0], -1).long()
    valid = (ids >= 0).float()
    counts = torch.zeros(E, device=p.device).scatter_add_(0, ids.clamp_min(0).reshape(-1), valid.reshape(-1))
    n = torch.tensor([float(p.shape[0])], device=p.device)
    # Backward: all-reduce of the (replicated) gradient, i.e. world x the global gradient on each
    # rank, which DDP's average over the ranks turns into exactly the global gradient.
    psum = _AllReduceSum.apply(p.sum(0), group)
    counts = _all_reduce(counts, group)
    n = _all_reduce(n, group)
    return psum / n.clamp_min(1), counts / counts.sum().clamp_min(1)
