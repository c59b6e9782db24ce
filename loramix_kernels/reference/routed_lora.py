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


def gates_and_routes(expert_ids, gates, num_experts, dtype=torch.float32):
    """From one pass over the slots: ``[T, E]`` summed gate of each expert per token in ``dtype``
    and the ``[T, E]`` bool route mask (token t routes to expert e through at least one slot).
    Empty / out-of-range slots are dropped: their gate is never read into the sum, so a NaN gate in
    an empty slot stays out."""
    T = expert_ids.shape[0]
    ids = expert_ids.long()
    valid = (ids >= 0) & (ids < num_experts)
    idx = torch.where(valid, ids, num_experts)
    gm = torch.zeros(T, num_experts + 1, dtype=dtype, device=gates.device)
    gm.scatter_add_(1, idx, torch.where(valid, gates.to(dtype), 0))
    routed = torch.zeros(T, num_experts + 1, dtype=torch.bool, device=gates.device).scatter_(1, idx, True)
    return gm[:, :num_experts], routed[:, :num_experts]


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
    gm = gates_and_routes(expert_ids, gates, E, dtype=x.dtype)[0] * scaling
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
    Every expert is computed, so it pays off when E*r is small or routing is dense. ``needs`` as
    in :func:`routed_lora_backward_ref`. Gradients are contiguous.

    Isolation, without a host sync (so on CUDA exactly as on CPU): the non-finite pattern is that
    of the per-expert form. H and U are element-local (H[t, e] reads only x[t] and A[e]) and the
    gating is a ``torch.where`` on the route mask, so an unrouted expert's inf / NaN in H or U
    never reaches a token. The second GEMMs would still multiply exact zeros of the mask by
    other tokens' / other experts' inf (0 * inf = NaN), so their operands x (for dA), dy (for dB)
    and A (for dx) have their non-finite entries zeroed, and NaN is set exactly where the
    per-expert form is non-finite through them: dA[e][:, c] where a token routed to e has a
    non-finite x[t, c]; dB[e][n, :] where a token routed to e has a non-finite dy[t, n]; dx[t, c]
    where t routes to an expert e with a non-finite A[e][:, c] (non-finite U, H or gates of routed
    pairs propagate through the GEMMs by themselves). Cost of this, paid on every call: an
    isfinite pass and a zeroed copy of x, dy and each A (only for the gradients needed) and three
    0/1 mask GEMMs, ``[E, T] @ [T, d_in]``, ``[E, T] @ [T, d_out]`` and ``[T, E] @ [E, d_in]``,
    1/r of the FLOPs of the main GEMMs.
    """
    need_x, need_a, need_b, need_g = NEEDS_ALL if needs is None else needs
    (T, d_in), E = x.shape, lora_a[0].shape[0]
    acc = acc_dtype
    nan = float("nan")
    gm, route = gates_and_routes(expert_ids, gates, E, dtype=acc)  # [T, E] each
    gm = gm * scaling
    routed = route.unsqueeze(-1)  # [T, E, 1]
    route_f = route.to(acc)
    xf, dyf = x.to(acc), grad_y.to(acc)
    if need_a:  # dA's GEMM on x with its non-finite entries zeroed; NaN where a routed token had one
        bad_x = ~torch.isfinite(xf)
        x0 = torch.where(bad_x, 0, xf)
        nan_a = (route_f.t() @ bad_x.to(acc) > 0).unsqueeze(1)  # [E, 1, d_in]
    if need_b:  # dB's GEMM on dy likewise
        bad_dy = ~torch.isfinite(dyf)
        dy0_all = torch.where(bad_dy, 0, dyf)
        nan_b = (route_f.t() @ bad_dy.to(acc) > 0).unsqueeze(-1)  # [E, d_out, 1]
    if need_x:  # dx's GEMM on A likewise: bad_a_cols[e, c] = A[e][:, c] not finite (any slice)
        bad_a_cols = torch.zeros(E, d_in, dtype=torch.bool, device=x.device)
    gx = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
    dgm = torch.zeros(T, E, dtype=acc, device=x.device) if need_g else None
    ga, gb = [], []
    col = 0
    for a, b in zip(lora_a, lora_b):
        r, n = a.shape[1], b.shape[1]
        a_cat = a.reshape(E * r, d_in).to(acc)
        dy = dyf[:, col:col + n]
        if need_x or need_a or need_g:
            # u[t, e] = dy[t] @ B[e]: a batched GEMM on B as stored (no repacking copy)
            u = torch.bmm(dy.unsqueeze(0).expand(E, T, n), b.to(acc)).transpose(0, 1)
        if need_g or need_b:
            h = (xf @ a_cat.t()).view(T, E, r)
        if need_g:
            dgm += torch.where(routed, u * h, 0).sum(-1)
        if need_x or need_a:
            du = torch.where(routed, u * gm.unsqueeze(-1), 0).view(T, E * r)
            if need_x:
                ok_a = torch.isfinite(a_cat)
                bad_a_cols |= (~ok_a).view(E, r, d_in).any(1)
                gx += du @ torch.where(ok_a, a_cat, 0)
            if need_a:
                da = (du.t() @ x0).view(E, r, d_in)
                ga.append(torch.where(nan_a, nan, da).to(a.dtype))
        if need_b:
            hg = torch.where(routed, h * gm.unsqueeze(-1), 0)
            # dB[e] = dy^T hg[:, e]: [E, n, r], contiguous like B
            dy0 = dy0_all[:, col:col + n]
            db = torch.bmm(dy0.t().unsqueeze(0).expand(E, n, T), hg.transpose(0, 1))
            gb.append(torch.where(nan_b[:, col:col + n], nan, db).to(b.dtype))
        col += n
    if need_x:
        gx = torch.where(route_f @ bad_a_cols.to(acc) > 0, nan, gx)
    if need_g:
        ids = expert_ids.long()
        valid = (ids >= 0) & (ids < E)
        gg = torch.where(valid, dgm.gather(1, ids.clamp(0, E - 1)), 0) * scaling
    return (gx.to(x.dtype) if need_x else _not_needed(x),
            ga if need_a else [_not_needed(a) for a in lora_a],
            gb if need_b else [_not_needed(b) for b in lora_b],
            gg.to(gates.dtype) if need_g else _not_needed(gates))
