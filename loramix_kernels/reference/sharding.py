"""Plain-PyTorch references of the sharding ops (no triton import): ``routed_lora_shrink_ref``,
``routed_lora_expand_ref`` (per-slot gather + bmm), and the dense masked forms used by the CPU
kernels and by both ops' backward (``shrink_dense`` / ``expand_dense`` / ``*_backward``).

Conventions (docs/API.md, "Sharding"): ``h`` is ``[S, T, k, r_max]`` in the accumulation dtype
(fp32; float64 for float64 inputs), ``h[s, t, j, :r_s] = lora_a[s][e] @ x[t]`` for a valid slot
``e = expert_ids[t, j]`` in ``[0, E)``, zeros for empty (``-1``) or out-of-range slots and past
``r_s``. ``expand``: ``y[t, slice s] = scaling * sum_j gates[t, j] * lora_b[s][e] @ h[s, t, j, :r_s]``.
"""

from __future__ import annotations

import torch


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32, or float64 for float64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def valid_slots(expert_ids: torch.Tensor, E: int):
    """(valid [T, k] bool, clamped long ids [T, k]): empty and out-of-range slots are invalid."""
    ids = expert_ids.long()
    valid = (ids >= 0) & (ids < E)
    return valid, torch.where(valid, ids, 0)


def routed_lora_shrink_ref(x, lora_a, expert_ids, acc=None):
    """Per slot: gather the routed experts' A and one bmm. Returns h ``[S, T, k, r_max]``."""
    acc = acc or acc_dtype(x)
    T, k = expert_ids.shape
    E = lora_a[0].shape[0]
    r_max = max(a.shape[1] for a in lora_a)
    h = torch.zeros(len(lora_a), T, k, r_max, dtype=acc, device=x.device)
    valid, ids = valid_slots(expert_ids, E)
    xf = x.to(acc)
    for s, a in enumerate(lora_a):
        r = a.shape[1]
        for j in range(k):
            hs = torch.bmm(a[ids[:, j]].to(acc), xf.unsqueeze(-1)).squeeze(-1)  # [T, r]
            h[s, :, j, :r] = torch.where(valid[:, j, None], hs, 0)
    return h


def _expand_setup(h, lora_b, expert_ids, gates, scaling, acc):
    """What both expand formulations start from: the accumulation dtype, sizes, valid slots and
    the per-slot weights ``scaling * gate`` (0 on invalid slots)."""
    acc = acc or (torch.float64 if h.dtype == torch.float64 else torch.float32)
    T, k = expert_ids.shape
    E = lora_b[0].shape[0]
    valid, ids = valid_slots(expert_ids, E)
    return acc, T, k, E, valid, ids, torch.where(valid, gates.to(acc), 0) * scaling


def routed_lora_expand_ref(h, lora_b, expert_ids, gates, scaling, acc=None):
    """Per slot: gather the routed experts' B and one bmm. Returns y ``[T, sum n_s]`` in ``acc``."""
    acc, T, k, E, valid, ids, w = _expand_setup(h, lora_b, expert_ids, gates, scaling, acc)
    outs = []
    for s, b in enumerate(lora_b):
        r = b.shape[2]
        y = torch.zeros(T, b.shape[1], dtype=acc, device=h.device)
        for j in range(k):
            ys = torch.bmm(b[ids[:, j]].to(acc), h[s, :, j, :r].to(acc).unsqueeze(-1)).squeeze(-1)
            y += torch.where(valid[:, j, None], ys * w[:, j, None], 0)
        outs.append(y)
    return torch.cat(outs, 1)


# ------------------------------------------------------------------------------------------
# dense masked forms (GEMMs over all E experts; the CPU kernels and the backward)
# ------------------------------------------------------------------------------------------


def to_experts(v, valid, ids, E):
    """``[T, k, r]`` per-slot rows summed into ``[T, E, r]`` per-expert rows (invalid slots dropped)."""
    T, k, r = v.shape
    idx = torch.where(valid, ids, E)[:, :, None].expand(T, k, r)
    out = torch.zeros(T, E + 1, r, dtype=v.dtype, device=v.device)
    return out.scatter_add_(1, idx, v)[:, :E]


def from_experts(m, valid, ids):
    """``[T, E, r]`` per-expert rows gathered per slot to ``[T, k, r]`` (zeros on invalid slots)."""
    r = m.shape[2]
    got = m.gather(1, ids[:, :, None].expand(*ids.shape, r))
    return torch.where(valid[:, :, None], got, 0)


def shrink_dense(x, lora_a, expert_ids, acc=None):
    """``x @ A_cat^T`` over all experts, then a gather of the routed slots (an unrouted expert's
    row is computed but never gathered, so its inf / NaN does not leak)."""
    acc = acc or acc_dtype(x)
    T, k = expert_ids.shape
    E = lora_a[0].shape[0]
    r_max = max(a.shape[1] for a in lora_a)
    valid, ids = valid_slots(expert_ids, E)
    xf = x.to(acc)
    h = torch.zeros(len(lora_a), T, k, r_max, dtype=acc, device=x.device)
    for s, a in enumerate(lora_a):
        r = a.shape[1]
        full = (xf @ a.reshape(E * r, -1).to(acc).t()).view(T, E, r)
        h[s, :, :, :r] = from_experts(full, valid, ids)
    return h


def expand_dense(h, lora_b, expert_ids, gates, scaling, acc=None):
    """``(sum_j g_j h_j scattered to experts) @ B_cat^T``: one GEMM per slice. A non-finite entry
    of an expert a token does not use gives NaN there (0 * inf): callers check and fall back."""
    acc, T, k, E, valid, ids, w = _expand_setup(h, lora_b, expert_ids, gates, scaling, acc)
    outs = []
    for s, b in enumerate(lora_b):
        n, r = b.shape[1], b.shape[2]
        he = to_experts(h[s, :, :, :r].to(acc) * w[:, :, None], valid, ids, E)  # [T, E, r]
        outs.append(he.reshape(T, E * r) @ b.to(acc).permute(1, 0, 2).reshape(n, E * r).t())
    return torch.cat(outs, 1)


def shrink_backward(grad_h, x, lora_a, expert_ids, need_x=True, need_a=True):
    """(dx in acc, [dA_s] in acc or None): dx[t] = sum_{s,j} A_s[e]^T gh[s,t,j,:r_s],
    dA_s[e] = sum_{(t,j) -> e} gh[s,t,j,:r_s] x[t]^T, as GEMMs over the per-expert rows."""
    acc = acc_dtype(x)
    T, d = x.shape
    E = lora_a[0].shape[0]
    valid, ids = valid_slots(expert_ids, E)
    xf = x.to(acc)
    dx = torch.zeros(T, d, dtype=acc, device=x.device) if need_x else None
    da = [] if need_a else None
    for s, a in enumerate(lora_a):
        r = a.shape[1]
        ue = to_experts(grad_h[s, :, :, :r].to(acc), valid, ids, E).reshape(T, E * r)
        if need_x:
            dx += ue @ a.reshape(E * r, d).to(acc)
        if need_a:
            da.append((ue.t() @ xf).view(E, r, d))
    return dx, da


def expand_backward(grad_y, h, lora_b, expert_ids, gates, scaling, need_h=True, need_b=True,
                    need_g=True):
    """(dh, [dB_s], d_gates) in acc (None where not needed) of ``expand``."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    T, k = expert_ids.shape
    E = lora_b[0].shape[0]
    valid, ids = valid_slots(expert_ids, E)
    g = torch.where(valid, gates.to(acc), 0)
    dyf = grad_y.to(acc)
    dh = torch.zeros(h.shape, dtype=acc, device=h.device) if need_h else None
    dg = torch.zeros(T, k, dtype=acc, device=h.device) if need_g else None
    db = [] if need_b else None
    col = 0
    for s, b in enumerate(lora_b):
        n, r = b.shape[1], b.shape[2]
        dy = dyf[:, col:col + n]
        col += n
        hs = h[s, :, :, :r].to(acc)
        if need_h or need_g:
            b_cat = b.to(acc).permute(1, 0, 2).reshape(n, E * r)
            v = from_experts((dy @ b_cat).view(T, E, r), valid, ids)  # B_s[e]^T dy per slot
            if need_h:
                dh[s, :, :, :r] = v * (g * scaling)[:, :, None]
            if need_g:
                dg += scaling * (v * hs).sum(-1)
        if need_b:
            he = to_experts(hs * (g * scaling)[:, :, None], valid, ids, E).reshape(T, E * r)
            db.append((dy.t() @ he).view(n, E, r).permute(1, 0, 2))
    return dh, db, dg
