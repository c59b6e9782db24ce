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
    """``[T, E]`` summed gate of each expert per token (empty / out-of-range slots dropped)."""
    T = expert_ids.shape[0]
    ids = expert_ids.long()
    valid = (ids >= 0) & (ids < num_experts)
    gm = torch.zeros(T, num_experts + 1, dtype=dtype, device=gates.device)
    gm.scatter_add_(1, torch.where(valid, ids, num_experts), gates.to(dtype) * valid)
    return gm[:, :num_experts]


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


def routed_lora_backward_ref(grad_y, x, lora_a, lora_b, expert_ids, gates, scaling):
    """Gradients of :func:`routed_lora_ref` (m-LoRA's hand-written form, per expert).

    With h = A_e x, u = B_e^T dy:  d_gate = scaling <u, h>,  dB_e += scaling g dy h^T,
    dA_e += scaling g u x^T,  dx += scaling g A_e^T u.  fp32 accumulation; grads in input dtypes.
    """
    T, E = x.shape[0], lora_a[0].shape[0]
    offs, _ = _slice_offsets(lora_b)
    acc = torch.float32
    gx = torch.zeros(x.shape, dtype=acc, device=x.device)
    ga = [torch.zeros(a.shape, dtype=acc, device=a.device) for a in lora_a]
    gb = [torch.zeros(b.shape, dtype=acc, device=b.device) for b in lora_b]
    gg = torch.zeros(gates.shape, dtype=acc, device=gates.device)
    if T and expert_ids.numel():
        ids = expert_ids.long()
        valid = (ids >= 0) & (ids < E)
        xf, dyf, gf = x.to(acc), grad_y.to(acc), gates.to(acc)
        for e in torch.unique(ids[valid]).tolist():
            rows, slots = torch.nonzero(ids == e, as_tuple=True)
            w = gf[rows, slots].unsqueeze(1)
            xe = xf.index_select(0, rows)
            dgate = torch.zeros(rows.shape[0], dtype=acc, device=x.device)
            dxe = torch.zeros_like(xe)
            for s, (a, b) in enumerate(zip(lora_a, lora_b)):
                ae, be = a[e].to(acc), b[e].to(acc)
                h = xe @ ae.t()
                dy = dyf.index_select(0, rows)[:, offs[s]:offs[s] + b.shape[1]]
                u = dy @ be
                dgate += scaling * (u * h).sum(1)
                dh = scaling * w * u
                gb[s][e] += scaling * (dy * w).t() @ h
                ga[s][e] += dh.t() @ xe
                dxe += dh @ ae
            gg.index_put_((rows, slots), dgate, accumulate=True)
            gx.index_add_(0, rows, dxe)
    return (gx.to(x.dtype), [g.to(a.dtype) for g, a in zip(ga, lora_a)],
            [g.to(b.dtype) for g, b in zip(gb, lora_b)], gg.to(gates.dtype))


def routed_lora_backward_dense(grad_y, x, lora_a, lora_b, expert_ids, gates, scaling):
    """Gradients of routed_lora in the dense masked form: plain GEMMs, no host sync.

    With G[t, e] = scaling * sum_j g[t,j] [ids[t,j] == e], H = x A_cat^T and U = dy B_cat:
    dx = (U * G) A_cat, dA_cat = (U * G)^T x, dB_cat = dy^T (H * G),
    d_gates[t, j] = scaling * sum_s <U_s[t, e], H_s[t, e]> at e = ids[t, j].
    Every expert is computed, so it pays off when E*r is small or routing is dense.
    """
    T, E = x.shape[0], lora_a[0].shape[0]
    acc = torch.float32
    gm = gate_matrix(expert_ids, gates, E) * scaling  # [T, E]
    xf, dyf = x.to(acc), grad_y.to(acc)
    gx = torch.zeros(x.shape, dtype=acc, device=x.device)
    dgm = torch.zeros(T, E, dtype=acc, device=x.device)
    ga, gb = [], []
    col = 0
    for a, b in zip(lora_a, lora_b):
        r, n = a.shape[1], b.shape[1]
        a_cat = a.reshape(E * r, -1).to(acc)
        b_cat = b.permute(1, 0, 2).reshape(n, E * r).to(acc)
        dy = dyf[:, col:col + n]
        col += n
        h = (xf @ a_cat.t()).view(T, E, r)
        u = (dy @ b_cat).view(T, E, r)
        dgm += (u * h).sum(-1)
        du = (u * gm.unsqueeze(-1)).view(T, E * r)
        gx += du @ a_cat
        ga.append((du.t() @ xf).view(E, r, -1).to(a.dtype))
        gb.append((dy.t() @ (h * gm.unsqueeze(-1)).view(T, E * r)).view(n, E, r).permute(1, 0, 2).to(b.dtype))
    ids = expert_ids.long()
    valid = (ids >= 0) & (ids < E)
    gg = torch.where(valid, dgm.gather(1, ids.clamp(0, E - 1)), 0.0) * scaling
    return gx.to(x.dtype), ga, gb, gg.to(gates.dtype)
