"""Plain-PyTorch routed multi-LoRA: CPU fallback, test oracle and benchmark baselines.

Semantics (../shared/API.md, ``routed_lora``)::

    y[t, slice s] = scaling * sum_j gates[t, j] * lora_b[s][e] @ (lora_a[s][e] @ x[t]),
                    e = expert_ids[t, j], slots with e outside [0, E) contribute nothing.

Every function here accumulates in fp32 (or in ``acc_dtype``, float64 for the oracle).
"""

from __future__ import annotations

import torch


def _slice_offsets(lora_b):
    offs, o = [], 0
    for b in lora_b:
        offs.append(o)
        o += b.shape[1]
    return offs, o


def routed_lora_ref(x, lora_a, lora_b, expert_ids, gates, scaling, acc_dtype=torch.float32,
                    keep_acc=False):
    """Per-expert loop (the MixLoRA way: where / index_select / matmul / index_add_).

    Used as the CPU kernel, the test oracle (with ``acc_dtype=torch.float64``) and benchmark
    baseline (a). Returns y ``[T, sum d_out]`` in x's dtype (in ``acc_dtype`` when it is float64
    or ``keep_acc`` is set).
    """
    T, E = x.shape[0], lora_a[0].shape[0]
    offs, d_total = _slice_offsets(lora_b)
    y = torch.zeros(T, d_total, dtype=acc_dtype, device=x.device)
    if T == 0 or expert_ids.numel() == 0:
        return y if (keep_acc or acc_dtype == torch.float64) else y.to(x.dtype)
    ids = expert_ids.long()
    valid = (ids >= 0) & (ids < E)
    xf = x.to(acc_dtype)
    gf = gates.to(acc_dtype)
    for e in torch.unique(ids[valid]).tolist():
        rows, slots = torch.nonzero(ids == e, as_tuple=True)
        w = gf[rows, slots].unsqueeze(1) * scaling
        xe = xf.index_select(0, rows)
        for s, (a, b) in enumerate(zip(lora_a, lora_b)):
            h = xe @ a[e].to(acc_dtype).t()
            ys = (h * w) @ b[e].to(acc_dtype).t()
            y[:, offs[s]:offs[s] + b.shape[1]].index_add_(0, rows, ys)
    return y if (keep_acc or acc_dtype == torch.float64) else y.to(x.dtype)


def gate_matrix(expert_ids, gates, num_experts, dtype=torch.float32):
    """``[T, E]`` summed gate of each expert per token (empty / out-of-range slots dropped: their
    gate is never read into the sum, so a NaN gate in an empty slot stays out)."""
    T = expert_ids.shape[0]
    ids = expert_ids.long()
    valid = (ids >= 0) & (ids < num_experts)
    gm = torch.zeros(T, num_experts + 1, dtype=dtype, device=gates.device)
    gm.scatter_add_(1, torch.where(valid, ids, num_experts), torch.where(valid, gates.to(dtype), 0))
    return gm[:, :num_experts]


def route_mask(expert_ids, num_experts):
    """``[T, E]`` bool: token t routes to expert e through at least one slot."""
    T = expert_ids.shape[0]
    ids = expert_ids.long()
    ids = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    m = torch.zeros(T, num_experts + 1, dtype=torch.bool, device=expert_ids.device)
    return m.scatter_(1, ids, True)[:, :num_experts]


NEEDS_ALL = (True, True, True, True)


def _not_needed(t):
    """What a gradient that is not needed comes back as: an empty tensor of its dtype."""
    return t.new_empty(0)


def dense_pack(lora_a, lora_b):
    """Concatenate experts once (what a module would cache): A_cat ``[E*r, d_in]``, B_cat ``[d_out, E*r]``."""
    packed = []
    for a, b in zip(lora_a, lora_b):
        E, r, d_in = a.shape
        packed.append((a.reshape(E * r, d_in), b.permute(1, 0, 2).reshape(b.shape[1], E * r), r))
    return packed


def routed_lora_dense(x, packed, expert_ids, gates, scaling):
    """Benchmark baseline (b): dense masked two-GEMM form in torch,
    ``y_s = ((x A_cat^T) * gate_mask) B_cat^T`` (no sort, every expert computed)."""
    E = packed[0][0].shape[0] // packed[0][2]
    gm = gate_matrix(expert_ids, gates, E, dtype=x.dtype) * scaling
    outs = []
    for a_cat, b_cat, r in packed:
        h = x @ a_cat.t()
        h = (h.view(-1, E, r) * gm.unsqueeze(-1)).view(-1, E * r)
        outs.append(h @ b_cat.t())
    return torch.cat(outs, dim=1)


def routed_lora_backward_ref(grad_y, x, lora_a, lora_b, expert_ids, gates, scaling, needs=None,
                             acc_dtype=torch.float32):
    """Gradients of :func:`routed_lora_ref` (m-LoRA's hand-written form, per expert).

    With h = A_e x, u = B_e^T dy:  d_gate = scaling <u, h>,  dB_e += scaling g dy h^T,
    dA_e += scaling g u x^T,  dx += scaling g A_e^T u.  Accumulates in ``acc_dtype``; grads in the
    input dtypes. ``needs`` = (dx, dA, dB, d_gates) flags: a gradient not needed is neither
    computed nor allocated and comes back as an empty tensor (one per slice for dA / dB). Only
    the tokens routed to an expert touch its gradients and only a token's experts touch its own.
    """
    need_x, need_a, need_b, need_g = NEEDS_ALL if needs is None else needs
    T, E = x.shape[0], lora_a[0].shape[0]
    offs, _ = _slice_offsets(lora_b)
    acc = acc_dtype
    gx = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
    ga = [torch.zeros(a.shape, dtype=acc, device=a.device) for a in lora_a] if need_a else None
    gb = [torch.zeros(b.shape, dtype=acc, device=b.device) for b in lora_b] if need_b else None
    gg = torch.zeros(gates.shape, dtype=acc, device=gates.device) if need_g else None
    if T and expert_ids.numel() and any((need_x, need_a, need_b, need_g)):
        ids = expert_ids.long()
        valid = (ids >= 0) & (ids < E)
        xf, dyf, gf = x.to(acc), grad_y.to(acc), gates.to(acc)
        for e in torch.unique(ids[valid]).tolist():
            rows, slots = torch.nonzero(ids == e, as_tuple=True)
            w = gf[rows, slots].unsqueeze(1)
            xe = xf.index_select(0, rows)
            dye = dyf.index_select(0, rows)
            dgate = torch.zeros(rows.shape[0], dtype=acc, device=x.device)
            dxe = torch.zeros_like(xe) if need_x else None
            for s, (a, b) in enumerate(zip(lora_a, lora_b)):
                ae, be = a[e].to(acc), b[e].to(acc)
                dy = dye[:, offs[s]:offs[s] + b.shape[1]]
                u = dy @ be
                dh = scaling * w * u
                if need_g or need_b:
                    h = xe @ ae.t()
                    if need_g:
                        dgate += scaling * (u * h).sum(1)
                    if need_b:
                        gb[s][e] += scaling * (dy * w).t() @ h
                if need_a:
                    ga[s][e] += dh.t() @ xe
                if need_x:
                    dxe += dh @ ae
            if need_g:
                gg.index_put_((rows, slots), dgate, accumulate=True)
            if need_x:
                gx.index_add_(0, rows, dxe)
    return (gx.to(x.dtype) if need_x else _not_needed(x),
            [g.to(a.dtype) for g, a in zip(ga, lora_a)] if need_a else [_not_needed(a) for a in lora_a],
            [g.to(b.dtype) for g, b in zip(gb, lora_b)] if need_b else [_not_needed(b) for b in lora_b],
            gg.to(gates.dtype) if need_g else _not_needed(gates))


def routed_lora_backward_dense(grad_y, x, lora_a, lora_b, expert_ids, gates, scaling, needs=None,
                               acc_dtype=torch.float32):
    """Gradients of routed_lora in the dense masked form: plain GEMMs, no host sync.

    With G[t, e] = scaling * sum_j g[t,j] [ids[t,j] == e], H = x A_cat^T and U = dy B_cat:
    dx = (U * G) A_cat, dA_cat = (U * G)^T x, dB_cat = dy^T (H * G),
    d_gates[t, j] = scaling * sum_s <U_s[t, e], H_s[t, e]> at e = ids[t, j].
    Every expert is computed, so it pays off when E*r is small or routing is dense. The gating is
    a ``torch.where`` on the route mask (an unused expert's inf / NaN in H or U does not reach
    the token), but the GEMMs still multiply unused experts' weights by exact zeros: with
    non-finite weights of an unused expert (or a non-finite x / dy row) dx, dA, dB can turn
    non-finite where the per-expert form would not (callers that can check, check the result and
    fall back to :func:`routed_lora_backward_ref`). ``needs`` as there. Gradients are contiguous.
    """
    need_x, need_a, need_b, need_g = NEEDS_ALL if needs is None else needs
    T, E = x.shape[0], lora_a[0].shape[0]
    acc = acc_dtype
    gm = gate_matrix(expert_ids, gates, E, dtype=acc) * scaling  # [T, E]
    routed = route_mask(expert_ids, E).unsqueeze(-1)  # [T, E, 1]
    xf, dyf = x.to(acc), grad_y.to(acc)
    gx = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
    dgm = torch.zeros(T, E, dtype=acc, device=x.device) if need_g else None
    ga, gb = [], []
    col = 0
    for a, b in zip(lora_a, lora_b):
        r, n = a.shape[1], b.shape[1]
        a_cat = a.reshape(E * r, -1).to(acc)
        dy = dyf[:, col:col + n]
        col += n
        bf = b.to(acc)
        if need_x or need_a or need_g:
            # u[t, e] = dy[t] @ B[e]: a batched GEMM on B as stored (no repacking copy)
            u = torch.bmm(dy.unsqueeze(0).expand(E, T, n), bf).transpose(0, 1)
        if need_g or need_b:
            h = (xf @ a_cat.t()).view(T, E, r)
        if need_g:
            dgm += torch.where(routed, u * h, 0).sum(-1)
        if need_x or need_a:
            du = torch.where(routed, u * gm.unsqueeze(-1), 0).view(T, E * r)
            if need_x:
                gx += du @ a_cat
            if need_a:
                ga.append((du.t() @ xf).view(E, r, -1).to(a.dtype))
        if need_b:
            hg = torch.where(routed, h * gm.unsqueeze(-1), 0)
            # dB[e] = dy^T hg[:, e]: [E, n, r], contiguous like B
            gb.append(torch.bmm(dy.t().unsqueeze(0).expand(E, n, T), hg.transpose(0, 1)).to(b.dtype))
    if need_g:
        ids = expert_ids.long()
        valid = (ids >= 0) & (ids < E)
        gg = torch.where(valid, dgm.gather(1, ids.clamp(0, E - 1)), 0) * scaling
    return (gx.to(x.dtype) if need_x else _not_needed(x),
            ga if need_a else [_not_needed(a) for a in lora_a],
            gb if need_b else [_not_needed(b) for b in lora_b],
            gg.to(gates.dtype) if need_g else _not_needed(gates))
