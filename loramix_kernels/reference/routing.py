"""Plain-PyTorch router top-k: test oracle, CPU kernel and benchmark baselines.

Semantics (docs/API.md, ``route_topk``): ``probs = softmax(logits)`` in fp32 (fp64 for fp64
logits); the k experts of largest probability, ties to the lower expert index; ``gates`` their
probabilities, divided by their sum when ``renormalize``; ``expert_ids`` int32.

Ties are decided on the computed probabilities, not the logits. The selection key maps a NaN
probability (a row of all ``-inf`` logits, or a NaN logit) to ``-0.5``: below every real
probability, so such a row still yields k distinct experts in index order (with NaN gates).
"""

from __future__ import annotations

import torch

#: Selection key of a NaN probability: below every probability (>= 0), above nothing else.
NAN_KEY = -0.5


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16 / bf16 / fp32 logits, fp64 for fp64 ones (gradcheck on CPU)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def route_topk_ref(logits: torch.Tensor, k: int, renormalize: bool):
    """Oracle: softmax, then a stable descending sort (``stable=True`` keeps equal keys in index
    order, which is the tie rule; ``torch.topk`` guarantees no order among ties)."""
    probs = torch.softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)
    key = torch.nan_to_num(probs, nan=NAN_KEY)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]
    gates = probs.gather(1, order)
    if renormalize:
        gates = gates / gates.sum(-1, keepdim=True)
    return gates, order.to(torch.int32), probs


def route_topk_keyed(logits: torch.Tensor, k: int, renormalize: bool):
    """CPU kernel without the native extension: ``torch.topk`` over a key with no ties, so its
    order is fully determined.

    For probabilities p >= 0 the IEEE bit pattern of fp32 p, read as an int32, grows with p; the
    int64 key ``bits(p) * 2^32 + (E - 1 - index)`` is therefore unique per row and orders by
    (p descending, index ascending), exactly the reference's rule. A NaN probability gets bits -1
    (below every p >= 0, as in the reference). Faster than the full sort for k << E.
    fp64 logits (gradcheck only) take the reference.
    """
    if logits.dtype == torch.float64:
        return route_topk_ref(logits, k, renormalize)
    T, E = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    bits = probs.view(torch.int32).to(torch.int64)
    bits = torch.where(torch.isnan(probs), -1, bits)
    key = bits * (1 << 32) + (E - 1 - torch.arange(E, device=logits.device))
    ids = torch.topk(key, k, dim=-1, sorted=True).indices
    gates = probs.gather(1, ids)
    if renormalize:
        gates = gates / gates.sum(-1, keepdim=True)
    return gates, ids.to(torch.int32), probs


def route_topk_unfused(logits: torch.Tensor, k: int, renormalize: bool):
    """Benchmark baseline: what models write today (MixLoRA, HF MoE routers): fp32 softmax,
    ``torch.topk``, renormalisation; three or four launches, and no tie rule."""
    probs = torch.softmax(logits.float(), dim=-1)
    gates, ids = probs.topk(k, dim=-1)
    if renormalize:
        gates = gates / gates.sum(-1, keepdim=True)
    return gates, ids, probs


def route_topk_backward_ref(probs, gates, expert_ids, grad_gates, grad_probs, renormalize: bool):
    """Gradient of the logits from the gradients of ``gates`` and ``probs`` (either may be None).

    With p = softmax(z), S = sum_j p[e_j] and g_j = p[e_j] (/ S when renormalised):

    * through the gates, dL/dp[e_j] = dg_j, or with renormalisation
      dL/dp[e_j] = (dg_j - sum_l dg_l g_l) / S (quotient rule: dg_l/dp[e_j] = (delta_lj - g_l) / S);
    * v = dL/dp (probs' own gradient plus the scatter of the above);
    * softmax Jacobian: dL/dz = p * (v - sum_i v_i p_i).

    Returns fp32 (fp64 for fp64 probs); the caller casts to the logits' dtype.
    """
    v = grad_probs.to(probs.dtype) if grad_probs is not None else torch.zeros_like(probs)
    if grad_gates is not None:
        idx = expert_ids.long()
        dg = grad_gates.to(probs.dtype)
        if renormalize:
            s = probs.gather(1, idx).sum(-1, keepdim=True)
            dg = (dg - (dg * gates).sum(-1, keepdim=True)) / s
        v = v.scatter_add(1, idx, dg)
    return probs * (v - (v * probs).sum(-1, keepdim=True))
