"""routed_lora's two halves as ops of their own, for tensor parallelism (docs/API.md, "Sharding"):
``routed_lora_shrink`` (h = A_e x per routed slot, fp32 ``[S, T, k, r_max]``), ``routed_lora_expand_``
(``out += scaling * sum_j g_j B_e h_j``, in place) and the functional ``routed_lora_expand``
(returns y; autograd to h, lora_b and gates).

A row-parallel projection (``loramix_kernels.distributed``) computes the partial shrink of its
input shard, all-reduces that rank-sized h (``T*k*r`` fp32 values, S-LoRA's trick: r << d), and
expands; the column-parallel side needs no split (routed_lora on the local rows of B).

Validators ``validate_routed_lora_shrink``, ``validate_routed_lora_expand`` (functional op) and
``validate_routed_lora_expand_inplace`` (``routed_lora_expand_``: the ladder's ``<op>`` drops the
trailing underscore, which would give the functional op's name, hence the suffix; the same for its
``*_inplace_cpu`` / ``*_inplace_triton``). Launchers: the expert-sorted Triton kernels of
``kernels/sharding.py`` (one launch per group of <= 3 slices, no host sync, any strides). CPU
(PyTorch, a few ops per call, no loop over tokens, slots or experts): a fast entry (the registry's
``checked_cpu``: the validator's checks as plain comparisons, the ids' range read once, unmasked
kernels when no slot is empty; anything else goes to the validator, which names the error) and two
forms: the routed slots' weights gathered, one bmm per token, when fewer slots than experts are
routed (decode), else one GEMM over all experts' rows plus a gather / scatter (``python -m
loramix_kernels.bench sharding`` compares them with the per-slot reference). Backward: the dense
masked GEMM forms (a few GEMMs over ``[T, E*r]`` per-expert rows, no host sync) on every device.
Precision: fp32 accumulation everywhere (float64 inputs: float64, on the PyTorch kernels); h is fp32
(float64 for float64 x); the expand rounds ``g * h`` to the weights' dtype before its dot for bf16 /
fp32 weights and keeps it fp32 for fp16, as routed_lora does; ``out += y`` is formed in fp32 and
rounded once. Deterministic mode (``set_deterministic``): the expand with k > 1 adds a token's slots
with fp32 atomics, so it runs the PyTorch dense form instead. Isolation: the forward kernels read
only the routed experts' weights (Triton: expert-sorted blocks; CPU: the dense expand is checked for
non-finite results and redone per slot), so an unrouted expert's inf / NaN does not reach a token;
known gap: the dense backward multiplies an unrouted expert's weights by 0, so their inf / NaN can
reach dx / dh (as routed_lora's dense backward on CUDA). Importing this module does not import
triton.
"""

from __future__ import annotations

import math

import torch

from .. import _backend
from .._checks import (FLOAT_DTYPES, INDEX_DTYPES, byte_ranges_meet, check, check_index_range,
                       check_no_alias, check_shape, check_tensor, check_writable)
from .._tiles import cdiv
from ..reference.sharding import acc_dtype, expand_backward, routed_lora_expand_ref, shrink_backward
from ._registry import OPS, register_op
from .routed_lora import (_groups, decode_shares, kernel_numerics, slice_kwargs,
                          sort_pairs, sorted_block_m, sorted_meta_kwargs)

DTYPES = FLOAT_DTYPES + (torch.float64,)
H_DTYPES = (torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


def _check_ids(op, expert_ids, T, E, dev):
    check_tensor(op, "expert_ids", expert_ids, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    if T is not None:
        check(expert_ids.shape[0] == T, op, "expert_ids", f"must be [T={T}, k], got {list(expert_ids.shape)}")
    if _backend.check_values(expert_ids) and expert_ids.numel():
        check_index_range(op, "expert_ids", expert_ids, -1, E)


def validate_routed_lora_shrink(x, lora_a, expert_ids):
    """x ``[T, d_in]``, lora_a non-empty list of ``[E, r_s, d_in]`` in x's dtype, expert_ids
    ``[T, k]`` int32 / int64 in ``[-1, E)`` (value check where ``check_values`` allows). Returns
    (T, d_in, E, k, r_max)."""
    op = "routed_lora_shrink"
    check_tensor(op, "x", x, ndim=2, dtypes=DTYPES)
    T, d_in = x.shape
    check(isinstance(lora_a, (list, tuple)) and len(lora_a) > 0, op, "lora_a",
          "must be a non-empty list of [E, r, d_in] tensors")
    E = None
    for s, a in enumerate(lora_a):
        check_tensor(op, f"lora_a[{s}]", a, ndim=3, dtypes=(x.dtype,), device=x.device)
        E = a.shape[0] if E is None else E
        check(E > 0, op, "lora_a[0]", "must hold at least one expert")
        check(a.shape[0] == E, op, f"lora_a[{s}]", f"has {a.shape[0]} experts, lora_a[0] has {E}")
        check(a.shape[1] >= 1, op, f"lora_a[{s}]", "must have rank r >= 1")
        check(a.shape[2] == d_in, op, f"lora_a[{s}]", f"must be [E, r, d_in={d_in}], got {list(a.shape)}")
    _check_ids(op, expert_ids, T, E, x.device)
    return T, d_in, E, expert_ids.shape[1], max(a.shape[1] for a in lora_a)


def _check_expand(op, h, lora_b, expert_ids, gates, scaling):
    check_tensor(op, "h", h, ndim=4, dtypes=H_DTYPES)
    dev = h.device
    check(isinstance(lora_b, (list, tuple)) and len(lora_b) > 0, op, "lora_b",
          "must be a non-empty list of [E, d_out, r] tensors")
    E = None
    for s, b in enumerate(lora_b):
        check_tensor(op, f"lora_b[{s}]", b, ndim=3, dtypes=(lora_b[0].dtype,) if s else DTYPES, device=dev)
        E = b.shape[0] if E is None else E
        check(E > 0, op, "lora_b[0]", "must hold at least one expert")
        check(b.shape[0] == E, op, f"lora_b[{s}]", f"has {b.shape[0]} experts, lora_b[0] has {E}")
        check(b.shape[2] >= 1, op, f"lora_b[{s}]", "must have rank r >= 1")
    r_max = max(b.shape[2] for b in lora_b)
    check_tensor(op, "expert_ids", expert_ids, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    T, k = expert_ids.shape
    check_shape(op, "h", h, (len(lora_b), T, k, None))
    check(h.shape[3] >= r_max, op, "h", f"must have r_max >= every slice's rank ({r_max}), got {list(h.shape)}")
    _check_ids(op, expert_ids, None, E, dev)
    check_tensor(op, "gates", gates, ndim=2, dtypes=DTYPES, device=dev)
    check_shape(op, "gates", gates, (T, k))
    check(isinstance(scaling, (int, float)) and math.isfinite(scaling), op, "scaling",
          f"must be a finite float, got {scaling!r}")
    return T, k, E, sum(b.shape[1] for b in lora_b)


def validate_routed_lora_expand(h, lora_b, expert_ids, gates, scaling):
    """h ``[S, T, k, r_max]`` fp32 (or float64), lora_b ``S`` tensors ``[E, n_s, r_s]`` (one float
    dtype, r_s <= r_max), expert_ids / gates ``[T, k]``, finite scaling. Returns (T, k, E, d_out)."""
    return _check_expand("routed_lora_expand", h, lora_b, expert_ids, gates, scaling)


def validate_routed_lora_expand_inplace(out, h, lora_b, expert_ids, gates, scaling):
    """As :func:`validate_routed_lora_expand` (errors name ``routed_lora_expand_``), plus ``out``
    ``[T, sum n_s]`` of any float dtype, no overlapping elements, no memory shared with an input."""
    op = "routed_lora_expand_"
    info = _check_expand(op, h, lora_b, expert_ids, gates, scaling)
    check_tensor(op, "out", out, ndim=2, dtypes=DTYPES, device=h.device)
    check_shape(op, "out", out, (info[0], info[3]))
    check_writable(op, "out", out)
    check_no_alias(op, "out", out, dict(h=h, lora_b=lora_b, expert_ids=expert_ids, gates=gates))
    return info


# ------------------------------------------------------------------------------------------
# CPU kernels (PyTorch; also CUDA tensors under LORAMIX_BACKEND=reference)
# ------------------------------------------------------------------------------------------


#: The ids' range is read as a Python list up to this many entries (decode: one call, half the
#: cost of ``aminmax`` plus two scalar reads), else with ``aminmax`` (the list grows per token).
_LIST_IDS = 8


def _slots(expert_ids, E, all_valid=None):
    """(valid ``[T, k]`` bool, ids ``[T, k]`` clamped into ``[0, E)``, in expert_ids' own integer
    dtype). ``all_valid`` True (every id known to lie in ``[0, E)``): ``(None, expert_ids)``, no
    op; False (ids known to lie in ``[-1, E)``) or None with validated values: two ops; else four
    (out-of-range ids are invalid, as in the reference)."""
    if all_valid:
        return None, expert_ids
    if all_valid is not None or _backend.check_values(expert_ids):
        return expert_ids >= 0, expert_ids.clamp(min=0)
    valid = (expert_ids >= 0) & (expert_ids < E)
    return valid, torch.where(valid, expert_ids, 0)


def _gathered_cpu(T, k, E) -> bool:
    """CPU: gather the routed slots' weights (``T * k`` experts' worth of copies, a handful of
    ops, only routed work) rather than the dense form over all ``E`` experts, when fewer slots
    than experts are routed (decode, small prefill); else the dense masked form (which reads
    every expert's weights once: faster as soon as the copies outgrow them)."""
    return T * k < E


def _h_of(zs, mask, r_max):
    """h ``[S, T, k, r_max]`` from the per-slice ``[T, k, r_s]`` results, invalid slots zeroed by
    one ``where`` each (``mask`` ``[T, k, 1]``; None: every slot valid). One slice of rank r_max:
    a view of its result, no copy."""
    if len(zs) == 1 and zs[0].shape[2] == r_max:
        z = zs[0] if mask is None else torch.where(mask, zs[0], 0)
        return z.unsqueeze(0)
    T, k = zs[0].shape[:2]
    h = zs[0].new_zeros(len(zs), T, k, r_max)
    for s, z in enumerate(zs):
        h[s, :, :, :z.shape[2]] = z if mask is None else torch.where(mask, z, 0)
    return h


def _shrink_gathered(x, lora_a, expert_ids, acc, all_valid=None):
    """Per slice: one ``index_select`` of the routed slots' A and one bmm over all slots (the k
    slots of a token read the same x row), invalid slots zeroed by one ``where`` (none when
    ``all_valid``: every id known to lie in ``[0, E)``)."""
    T, d_in = x.shape
    k = expert_ids.shape[1]
    valid, ids = _slots(expert_ids, lora_a[0].shape[0], all_valid)
    flat = ids.reshape(-1)
    xv = (x if x.dtype == acc else x.to(acc)).unsqueeze(-1)  # [T, d_in, 1]
    zs = []
    for a in lora_a:
        r = a.shape[1]
        a = a.index_select(0, flat)
        zs.append(torch.bmm((a if a.dtype == acc else a.to(acc)).view(T, k * r, d_in), xv).view(T, k, r))
    return _h_of(zs, None if valid is None else valid.view(T, k, 1), max(a.shape[1] for a in lora_a))


def _shrink_dense_cpu(x, lora_a, expert_ids, acc, all_valid=None):
    """``x @ A_cat^T`` over all experts (one GEMM per slice), then a gather of the routed slots;
    an unrouted expert's row is computed but never gathered (isolation), invalid slots zeroed."""
    T, d_in = x.shape
    k = expert_ids.shape[1]
    E = lora_a[0].shape[0]
    valid, ids = _slots(expert_ids, E, all_valid)
    xf = x if x.dtype == acc else x.to(acc)
    idx = ids.long().unsqueeze(-1)  # [T, k, 1]
    zs = []
    for a in lora_a:
        r = a.shape[1]
        a2 = a.reshape(E * r, d_in)
        full = torch.nn.functional.linear(xf, a2 if a2.dtype == acc else a2.to(acc)).view(T, E, r)
        zs.append(full.gather(1, idx.expand(T, k, r)))
    return _h_of(zs, None if valid is None else valid.view(T, k, 1), max(a.shape[1] for a in lora_a))


def routed_lora_shrink_cpu(x, lora_a, expert_ids, all_valid=None):
    """CPU kernel: the routed slots' A gathered (``_shrink_gathered``) at decode and small sizes,
    else the dense GEMM + gather (``_shrink_dense_cpu``); both only a few ops, no loop over
    tokens or slots. ``all_valid`` (as for ``_slots``): True, the caller knows every id lies in
    ``[0, E)`` (no masking); False, in ``[-1, E)``; None, validated as ``check_values`` says."""
    T, k = expert_ids.shape
    acc = acc_dtype(x)
    if not (T and k) or x.shape[1] == 0:
        return torch.zeros(len(lora_a), T, k, max(a.shape[1] for a in lora_a), dtype=acc, device=x.device)
    if _gathered_cpu(T, k, lora_a[0].shape[0]):
        return _shrink_gathered(x, lora_a, expert_ids, acc, all_valid)
    return _shrink_dense_cpu(x, lora_a, expert_ids, acc, all_valid)


def _slot_weights(valid, gates, scaling, acc):
    """``scaling * gate`` per slot in ``acc``, 0 on invalid slots (a NaN gate there stays out);
    ``valid`` None: every slot valid."""
    g = gates if gates.dtype == acc else gates.to(acc)
    w = g if valid is None else torch.where(valid, g, 0)
    return w * scaling if scaling != 1.0 else w


def _expand_gathered(h, lora_b, expert_ids, gates, scaling, acc, out=None, all_valid=None):
    """Per slice: one ``index_select`` of the routed slots' B, transposed (``[T*k, r, n]``: a
    token's k slots side by side, ``[k*r, n]``), its invalid slots' rows and h zeroed (an
    unrouted expert is never used: isolation; nothing to zero when ``all_valid``), one bmm per token
    row with the weighted h ``scaling * g_j * h_j`` (``[1, k*r]``), which also sums the token's k
    slots. One batch per token: at decode (T = 1) no op of this form runs a parallel region
    (a batch of T * k would: with 2 threads on a busy machine, a stall of milliseconds). Returns
    y ``[T, sum n_s]`` in acc; with ``out`` (in acc), adds into it instead (``baddbmm_`` on its
    column slices) and returns None."""
    T, k = expert_ids.shape
    E = lora_b[0].shape[0]
    valid, ids = _slots(expert_ids, E, all_valid)
    flat = ids.reshape(-1)
    w = _slot_weights(valid, gates, scaling, acc).unsqueeze(-1)  # [T, k, 1]
    invalid = None if valid is None else ~valid
    hf = h if h.dtype == acc else h.to(acc)
    r_max = h.shape[3]
    outs, col = [], 0
    for s, b in enumerate(lora_b):
        n, r = b.shape[1], b.shape[2]
        bt = b.transpose(1, 2).index_select(0, flat)  # [T*k, r, n]
        bt = bt if bt.dtype == acc else bt.to(acc)
        hw = (hf[s] if r == r_max else hf[s, :, :, :r]) * w  # [T, k, r]
        if invalid is not None:  # both factors: 0 * inf of either would be NaN
            bt.masked_fill_(invalid.reshape(T * k, 1, 1), 0)
            hw.masked_fill_(invalid.unsqueeze(-1), 0)
        hw = hw.reshape(T, 1, k * r)
        if out is not None:
            o = out if len(lora_b) == 1 else out.narrow(1, col, n)
            o.unsqueeze(1).baddbmm_(hw, bt.view(T, k * r, n))
            col += n
        else:
            outs.append(torch.bmm(hw, bt.view(T, k * r, n)).view(T, n))
    return None if out is not None else outs[0] if len(outs) == 1 else torch.cat(outs, 1)


def _expand_dense_cpu(h, lora_b, expert_ids, gates, scaling, acc, all_valid=None):
    """The dense masked form: the weighted h scattered onto per-expert rows ``[T, E (+ 1), r]``
    (column E takes the invalid slots; none when ``all_valid``), then per slice one GEMM over
    the experts' rows ``[T, E*r] @ [E*r, n]`` (B repacked to ``[n, E*r]``, ``E*n*r`` elements:
    less than a bmm over the experts' ``[E, T, n]`` partial outputs as soon as T > r, and no
    parallel region per expert at small T). None if not finite (0 * inf of an expert a token does
    not use): the caller redoes it per slot."""
    T, k = expert_ids.shape
    E = lora_b[0].shape[0]
    valid, ids = _slots(expert_ids, E, all_valid)
    w = _slot_weights(valid, gates, scaling, acc).unsqueeze(-1)  # [T, k, 1]
    idx = (ids if valid is None else torch.where(valid, ids, E)).long().unsqueeze(-1)
    cols = E if valid is None else E + 1
    hf = h if h.dtype == acc else h.to(acc)
    r_max = h.shape[3]
    outs = []
    for s, b in enumerate(lora_b):
        n, r = b.shape[1], b.shape[2]
        he = torch.zeros(T, cols, r, dtype=acc, device=h.device).scatter_add_(
            1, idx.expand(T, k, r), (hf[s] if r == r_max else hf[s, :, :, :r]) * w)
        he = he if cols == E else he[:, :E]
        b_cat = b.permute(1, 0, 2).reshape(n, E * r)  # [n, E*r]
        b_cat = b_cat if b_cat.dtype == acc else b_cat.to(acc)
        outs.append(torch.nn.functional.linear(he.reshape(T, E * r), b_cat))
    y = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    return y if math.isfinite(y.sum().item()) else None


def _expand_torch(h, lora_b, expert_ids, gates, scaling, all_valid=None, out=None):
    """y in the accumulation dtype: the gathered form at decode and small sizes, else the dense
    form, redone per slot (the reference) if not finite. ``out`` (of the accumulation dtype):
    the gathered form adds into it and this returns None."""
    T, k = expert_ids.shape
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    if not (T and k):
        return torch.zeros(T, sum(b.shape[1] for b in lora_b), dtype=acc, device=h.device)
    if _gathered_cpu(T, k, lora_b[0].shape[0]):
        return _expand_gathered(h, lora_b, expert_ids, gates, scaling, acc,
                                out if out is not None and out.dtype == acc else None, all_valid)
    y = _expand_dense_cpu(h, lora_b, expert_ids, gates, scaling, acc, all_valid)
    return y if y is not None else routed_lora_expand_ref(h, lora_b, expert_ids, gates, scaling, acc)


def routed_lora_expand_inplace_cpu(out, h, lora_b, expert_ids, gates, scaling, all_valid=None):
    """``out += y``, the sum formed in fp32 (float64) and rounded once. The gathered form adds
    into an ``out`` of the accumulation dtype directly."""
    y = _expand_torch(h, lora_b, expert_ids, gates, scaling, all_valid, out)
    if y is None:
        return
    if out.dtype == y.dtype:
        out.add_(y)
    else:
        out.copy_(out.to(y.dtype) + y)


def routed_lora_expand_cpu(h, lora_b, expert_ids, gates, scaling, all_valid=None):
    """y ``[T, sum n_s]`` in lora_b's dtype."""
    return _expand_torch(h, lora_b, expert_ids, gates, scaling, all_valid).to(lora_b[0].dtype)


# ------------------------------------------------------------------------------------------
# CPU fast entry (the registry's ``checked_cpu``): checks in one pass, then the kernel
# ------------------------------------------------------------------------------------------


def _ids_fast(expert_ids, T, k, E):
    """The validator's checks of expert_ids as plain comparisons, its value range read once:
    True (every id in ``[0, E)``: the kernels need no mask), False (some ``-1``, the rest in
    range), None (anything else: a metadata error, an id out of range, no slots; the caller
    hands over to the validator, which names the error, or to the general path)."""
    if (expert_ids.dim() != 2 or expert_ids.dtype not in INDEX_DTYPES or not expert_ids.is_cpu
            or expert_ids.shape[0] != T or (k is not None and expert_ids.shape[1] != k)):
        return None
    n = expert_ids.numel()
    if n == 0:
        return None
    if n <= _LIST_IDS:
        v = expert_ids.tolist()
        lo, hi = min(map(min, v)), max(map(max, v))
    else:
        lo, hi = (int(t) for t in expert_ids.aminmax())
    if lo < -1 or hi >= E:
        return None
    return lo >= 0


def _shrink_checked(x, lora_a, expert_ids):
    """``checked_cpu`` of routed_lora_shrink: what ``validate_routed_lora_shrink`` accepts, checked
    as plain comparisons (no message built), the ids read once, then the CPU kernel (unmasked
    when every slot is valid). Anything else returns NotImplemented: the validator then names the
    error, or runs before the kernel as for every op."""
    if x.dim() != 2 or x.dtype not in DTYPES or not lora_a:
        return NotImplemented
    T, d_in = x.shape
    a0 = lora_a[0]
    E = a0.shape[0] if a0.dim() == 3 else 0
    for a in lora_a:
        if (a.dim() != 3 or a.dtype != x.dtype or not a.is_cpu or a.shape[0] != E or a.shape[1] < 1
                or a.shape[2] != d_in):
            return NotImplemented
    ok = _ids_fast(expert_ids, T, None, E) if E > 0 else None
    if ok is None:
        return NotImplemented
    return routed_lora_shrink_cpu(x, lora_a, expert_ids, ok)


def _expand_fast(h, lora_b, expert_ids, gates, scaling):
    """``_check_expand``'s checks as plain comparisons: ``(d_out, all_valid)``, or None where the
    validator must decide."""
    if (h.dim() != 4 or h.dtype not in H_DTYPES or not lora_b or len(lora_b) != h.shape[0]
            or not math.isfinite(scaling)):
        return None
    _, T, k, r_max = h.shape
    b0 = lora_b[0]
    if b0.dim() != 3 or b0.dtype not in DTYPES:
        return None
    E, dt, d_out = b0.shape[0], b0.dtype, 0
    for b in lora_b:
        if (b.dim() != 3 or b.dtype != dt or not b.is_cpu or b.shape[0] != E or b.shape[2] < 1
                or b.shape[2] > r_max):
            return None
        d_out += b.shape[1]
    if (E < 1 or gates.dim() != 2 or gates.dtype not in DTYPES or not gates.is_cpu
            or gates.shape[0] != T or gates.shape[1] != k):
        return None
    ok = _ids_fast(expert_ids, T, k, E)
    return None if ok is None else (d_out, ok)


def _expand_checked(h, lora_b, expert_ids, gates, scaling):
    """``checked_cpu`` of routed_lora_expand (as ``_shrink_checked``)."""
    fast = _expand_fast(h, lora_b, expert_ids, gates, scaling)
    if fast is None:
        return NotImplemented
    return routed_lora_expand_cpu(h, lora_b, expert_ids, gates, scaling, fast[1])


def _expand_inplace_checked(out, h, lora_b, expert_ids, gates, scaling):
    """``checked_cpu`` of routed_lora_expand_ (as ``_shrink_checked``): ``out`` also has no
    overlapping elements and shares no byte range with an input (address ranges that meet go to
    the validator, which decides exactly)."""
    fast = _expand_fast(h, lora_b, expert_ids, gates, scaling)
    if (fast is None or out.dim() != 2 or out.dtype not in DTYPES or not out.is_cpu
            or out.shape[0] != h.shape[1] or out.shape[1] != fast[0]
            or (not out.is_contiguous() and torch._debug_has_internal_overlap(out) == 1)):
        return NotImplemented
    if byte_ranges_meet(out, (h, expert_ids, gates, *lora_b)):
        return NotImplemented
    routed_lora_expand_inplace_cpu(out, h, lora_b, expert_ids, gates, scaling, fast[1])
    return None


# ------------------------------------------------------------------------------------------
# Triton launchers
# ------------------------------------------------------------------------------------------


def _h_kwargs(h, idx):
    pad = list(idx) + [idx[0]] * (3 - len(idx))
    return {f"h{j}_ptr": h[s] for j, s in enumerate(pad)}


def routed_lora_shrink_triton(x, lora_a, expert_ids, *, splits=None):
    """h = zeros ``[S, T, k, r_max]`` fp32, then one ``_routed_lora_shrink_kernel`` launch per group
    of <= 3 slices over the expert-sorted pairs (``sort_pairs``, no host sync). At decode d_in is
    split ``decode_shares`` ways (fp32 atomics into h; none in deterministic mode); ``splits``
    overrides the number of d_in chunks (tests). float64: PyTorch."""
    if x.dtype == torch.float64:
        return routed_lora_shrink_cpu(x, lora_a, expert_ids)
    from ..kernels.sharding import _routed_lora_shrink_kernel

    T, d_in = x.shape
    E, K = lora_a[0].shape[0], expert_ids.shape[1]
    h = torch.zeros(len(lora_a), T, K, max(a.shape[1] for a in lora_a), dtype=torch.float32,
                    device=x.device)
    P = T * K
    if P == 0 or d_in == 0:
        return h
    block_m = sorted_block_m(P, E)
    block_k = 32 if _backend.INTERPRET else 64
    meta = sort_pairs(expert_ids, E, block_m)
    num = kernel_numerics(x.dtype)
    est_blocks = max(cdiv(P, block_m), min(E, P))
    for idx in _groups(len(lora_a)):
        ksplit = 1 if _backend.deterministic() else (
            splits or decode_shares(x, est_blocks * len(idx), cdiv(d_in, block_k)))
        k_chunk = cdiv(cdiv(d_in, ksplit), block_k) * block_k
        ksplit = cdiv(d_in, k_chunk)
        _routed_lora_shrink_kernel[(meta[-1] * ksplit * len(idx),)](
            x_ptr=x, **_h_kwargs(h, idx), **sorted_meta_kwargs(meta), D_IN=d_in, K_CHUNK=k_chunk,
            KSPLIT=ksplit, E=E, K=K,
            stride_xt=x.stride(0), stride_xk=x.stride(1), stride_ht=h.stride(1),
            stride_hk=h.stride(2), stride_hr=h.stride(3), BLOCK_M=block_m,
            BLOCK_K=block_k, DOT_FP32=num["DOT_FP32"], IEEE=num["IEEE"],
            num_warps=8 if block_m >= 64 else 4,
            **slice_kwargs(lora_a, lora_a, idx, b=False, cols=False))
    return h


def routed_lora_expand_inplace_triton(out, h, lora_b, expert_ids, gates, scaling, *, splits=None):
    """``out += y``: one ``_routed_lora_expand_kernel`` launch per group of <= 3 slices over the
    expert-sorted pairs; k > 1 adds with fp32 atomics (into ``out`` if fp32, else into an fp32
    workspace added to ``out`` once), k == 1 reads, adds and stores ``out`` directly. float64, and
    k > 1 in deterministic mode: the PyTorch kernel. ``splits`` overrides the column shares per
    block (NSPLIT; tests)."""
    T, K = expert_ids.shape
    E = lora_b[0].shape[0]
    if (h.dtype == torch.float64 or lora_b[0].dtype == torch.float64 or out.dtype == torch.float64
            or gates.dtype == torch.float64 or (K > 1 and _backend.deterministic())):
        return routed_lora_expand_inplace_cpu(out, h, lora_b, expert_ids, gates, scaling)
    from ..kernels.sharding import _routed_lora_expand_kernel

    P = T * K
    if P == 0 or out.shape[1] == 0:
        return
    interp = _backend.INTERPRET
    block_m = sorted_block_m(P, E)
    block_n = 32 if interp else (64 if block_m >= 64 else 128)
    meta = sort_pairs(expert_ids, E, block_m)
    atomic = K > 1
    dst = out if (not atomic or out.dtype == torch.float32) else torch.zeros(
        out.shape, dtype=torch.float32, device=out.device)
    num = kernel_numerics(lora_b[0].dtype)
    n_tiles = max(cdiv(b.shape[1], block_n) for b in lora_b)
    est_blocks = max(cdiv(P, block_m), min(E, P))
    ranks_view = [b.transpose(1, 2) for b in lora_b]  # [E, r, n]: slice_kwargs reads r from dim 1
    for idx in _groups(len(lora_b)):
        nsplit = splits or decode_shares(out, est_blocks * len(idx), n_tiles)
        _routed_lora_expand_kernel[(meta[-1] * nsplit * len(idx),)](
            y_ptr=dst, **_h_kwargs(h, idx), gates_ptr=gates, **sorted_meta_kwargs(meta), E=E, K=K,
            stride_yt=dst.stride(0), stride_yn=dst.stride(1), stride_ht=h.stride(1),
            stride_hk=h.stride(2), stride_hr=h.stride(3), stride_gt=gates.stride(0),
            stride_gk=gates.stride(1), scaling=float(scaling), BLOCK_M=block_m, BLOCK_N=block_n,
            NSPLIT=nsplit, ATOMIC=atomic, ACCUMULATE=not atomic, num_warps=8 if block_m >= 64 else 4,
            **num, **slice_kwargs(ranks_view, lora_b, idx, a=False))
    if dst is not out:
        out.add_(dst)


def routed_lora_expand_triton(h, lora_b, expert_ids, gates, scaling):
    """Functional expand: a zeroed y in lora_b's dtype, then the in-place launcher."""
    y = torch.zeros(expert_ids.shape[0], sum(b.shape[1] for b in lora_b), dtype=lora_b[0].dtype,
                    device=h.device)
    routed_lora_expand_inplace_triton(y, h, lora_b, expert_ids, gates, scaling)
    return y


# ------------------------------------------------------------------------------------------
# registration, autograd
# ------------------------------------------------------------------------------------------


def _shrink_setup(ctx, inputs, output):
    x, lora_a, expert_ids = inputs
    ctx.n = len(lora_a)
    ctx.save_for_backward(x, expert_ids, *lora_a)


def _shrink_backward(ctx, grad_h):
    x, expert_ids, *lora_a = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_x, need_a = bool(need[0]), any(need[1])
    dx, da = shrink_backward(grad_h, x, lora_a, expert_ids, need_x, need_a)
    return (dx.to(x.dtype) if need_x else None,
            [g.to(a.dtype) if nd else None for g, a, nd in zip(da, lora_a, need[1])] if need_a
            else [None] * ctx.n, None)


def _expand_setup(ctx, inputs, output):
    h, lora_b, expert_ids, gates, scaling = inputs
    ctx.n, ctx.scaling = len(lora_b), scaling
    ctx.save_for_backward(h, expert_ids, gates, *lora_b)


def _expand_backward(ctx, grad_y):
    h, expert_ids, gates, *lora_b = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_h, need_b, need_g = bool(need[0]), any(need[1]), bool(need[3])
    dh, db, dg = expand_backward(grad_y, h, lora_b, expert_ids, gates, ctx.scaling, need_h, need_b, need_g)
    return (dh.to(h.dtype) if need_h else None,
            [g.to(b.dtype) if nd else None for g, b, nd in zip(db, lora_b, need[1])] if need_b
            else [None] * ctx.n, None, dg.to(gates.dtype) if need_g else None, None)


def _fake_shrink(info, x, lora_a, expert_ids):
    T, _, _, k, r_max = info
    return x.new_empty(len(lora_a), T, k, r_max, dtype=acc_dtype(x))


def _fake_expand(info, h, lora_b, *args):
    T, _, _, d_out = info
    return lora_b[0].new_empty(T, d_out)


register_op(
    "routed_lora_shrink", "(Tensor x, Tensor[] lora_a, Tensor expert_ids) -> Tensor",
    validate=validate_routed_lora_shrink, triton=routed_lora_shrink_triton, cpu=routed_lora_shrink_cpu,
    fake=_fake_shrink, backward=_shrink_backward, setup_context=_shrink_setup, autocast=(0, 1),
    checked_cpu=_shrink_checked,
)
register_op(
    "routed_lora_expand_",
    "(Tensor(a!) out, Tensor h, Tensor[] lora_b, Tensor expert_ids, Tensor gates, float scaling) -> ()",
    validate=validate_routed_lora_expand_inplace, triton=routed_lora_expand_inplace_triton,
    cpu=routed_lora_expand_inplace_cpu, fake=lambda info, *args: None, autocast=(2,),
    checked_cpu=_expand_inplace_checked,
)
register_op(
    "routed_lora_expand",
    "(Tensor h, Tensor[] lora_b, Tensor expert_ids, Tensor gates, float scaling) -> Tensor",
    validate=validate_routed_lora_expand, triton=routed_lora_expand_triton, cpu=routed_lora_expand_cpu,
    fake=_fake_expand, backward=_expand_backward, setup_context=_expand_setup, autocast=(1,),
    checked_cpu=_expand_checked,
)


# ------------------------------------------------------------------------------------------
# public functions
# ------------------------------------------------------------------------------------------


def routed_lora_shrink(x, lora_a, expert_ids):
    """First half of :func:`routed_lora`: ``h[s, t, j, :r_s] = lora_a[s][e] @ x[t]`` for each routed
    slot ``e = expert_ids[t, j]`` (``-1``: empty slot, zeros; columns past ``r_s`` are zero).

    Parameters
    ----------
    x : torch.Tensor
        ``[T, d_in]`` fp16 / bf16 / fp32 (float64: PyTorch kernels), any strides.
    lora_a : list[torch.Tensor]
        Per slice ``[E, r_s, d_in]`` in x's dtype (ranks may differ).
    expert_ids : torch.Tensor
        ``[T, k]`` int32 / int64, entries in ``[-1, E)``.

    Returns
    -------
    torch.Tensor
        h ``[S, T, k, r_max]`` fp32 (float64 for float64 x), contiguous. Differentiable in x and
        lora_a. In a row-parallel layer this is the partial sum that is all-reduced.

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels import routed_lora_shrink
    >>> x = torch.randn(3, 16); A = [torch.randn(4, 2, 16), torch.randn(4, 3, 16)]
    >>> h = routed_lora_shrink(x, A, torch.tensor([[0, 1], [3, -1], [2, 2]]))
    >>> h.shape, h.dtype, h[0, 1, 1].abs().sum().item(), h[0, 0, 0, 2].item()
    (torch.Size([2, 3, 2, 3]), torch.float32, 0.0, 0.0)
    """
    return OPS["routed_lora_shrink"](x, list(lora_a), expert_ids)


def routed_lora_expand_(out, h, lora_b, expert_ids, gates, scaling=1.0):
    """Second half of :func:`routed_lora_add_`, in place:
    ``out[t, slice s] += scaling * sum_j gates[t, j] * lora_b[s][e] @ h[s, t, j, :r_s]``.

    ``out`` ``[T, sum_s n_s]`` of any float dtype and strides (sum formed in fp32, rounded once;
    no overlapping elements, no memory shared with an input); h ``[S, T, k, r_max]`` fp32 as from
    :func:`routed_lora_shrink`; lora_b per slice ``[E, n_s, r_s]``; expert_ids / gates ``[T, k]``.
    ``routed_lora_add_(out, x, A, B, ids, g, c)`` equals
    ``routed_lora_expand_(out, routed_lora_shrink(x, A, ids), B, ids, g, c)``. Returns ``out``.

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels import routed_lora_add_, routed_lora_expand_, routed_lora_shrink
    >>> x = torch.randn(4, 16); A = [torch.randn(3, 2, 16)]; B = [torch.randn(3, 8, 2)]
    >>> ids = torch.tensor([[0, 2], [1, -1], [2, 0], [1, 1]]); g = torch.rand(4, 2)
    >>> y1 = routed_lora_add_(torch.ones(4, 8), x, A, B, ids, g, 0.5)
    >>> y2 = routed_lora_expand_(torch.ones(4, 8), routed_lora_shrink(x, A, ids), B, ids, g, 0.5)
    >>> torch.allclose(y1, y2, atol=1e-5)
    True
    """
    OPS["routed_lora_expand_"](out, h, list(lora_b), expert_ids, gates, float(scaling))
    return out


def routed_lora_expand(h, lora_b, expert_ids, gates, scaling=1.0):
    """Functional :func:`routed_lora_expand_`: returns y ``[T, sum_s n_s]`` in lora_b's dtype
    (contiguous), differentiable in h, lora_b and gates.

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels import routed_lora, routed_lora_expand, routed_lora_shrink
    >>> x = torch.randn(4, 16); A = [torch.randn(3, 2, 16)]; B = [torch.randn(3, 8, 2)]
    >>> ids = torch.tensor([[0, 2], [1, -1], [2, 0], [1, 1]]); g = torch.rand(4, 2)
    >>> y = routed_lora_expand(routed_lora_shrink(x, A, ids), B, ids, g, 0.5)
    >>> torch.allclose(y, routed_lora(x, A, B, ids, g, 0.5), atol=1e-5)
    True
    """
    return OPS["routed_lora_expand"](h, list(lora_b), expert_ids, gates, float(scaling))
