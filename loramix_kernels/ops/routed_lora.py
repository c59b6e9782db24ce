"""Routed multi-LoRA projections (LoRA-Mixer): ``routed_lora``, ``routed_lora_add_``.

Registration (schema, CPU / CUDA / fake kernels, autograd), the launchers that validate, allocate,
pick a strategy and tiles and launch the Triton kernels, and the public functions.

Strategy heuristic (documented choice, see ``choose_strategy``)
---------------------------------------------------------------
* ``token_major`` when every slice's padded ``E * r`` is <= 256: the whole ``[BLOCK_T, E*r]``
  shrink result of a token tile and slice fits in registers, so every routed contribution is
  summed before one write of y, and x comes from HBM once (the slice programs of a token tile are
  adjacent and share it through L2): the traffic floor (x + active weights + y). The price is
  computing all E experts (masked by the gates): at ``E*r <= 256`` per slice the dense shrink
  stays below the H100 ridge point (~295 FLOP/B), i.e. free.
* Both Triton strategies split d_in and the columns across programs at decode (``plan_splits``),
  adding partial outputs with fp32 atomics, so that no program has to read all of A.
* ``dense_gemm`` when E*r is too large for registers and routing is dense or nearly so
  (``2 k >= E``, e.g. soft routing over 64 experts): every expert is computed anyway, so the work is
  two plain GEMMs ``((x A_cat^T) * gates) B_cat^T`` on cuBLAS, which no scatter kernel beats (the
  expert-sorted kernel would issue T*k*d_out atomics).
* ``expert_sorted`` otherwise (large E*r, sparse top-k, e.g. 64 experts of rank 64, k = 3): the T*k
  (token, slot) pairs are sorted by expert (on the device, no host sync) and a grouped GEMM computes
  only routed work, gathering x rows on load and scattering y rows on store (fp32 atomics if k > 1).

Backward (``loramix::routed_lora_backward``)
--------------------------------------------
* Shapes that run ``token_major`` / ``dense_gemm`` forward: the dense masked form in PyTorch
  (``routed_lora_backward_dense``): a few GEMMs, no host sync.
* ``expert_sorted`` shapes on the Triton path: ``routed_lora_backward_sorted``, two Triton launches
  on the forward's sorted metadata (recompute h and u per sorted row, then d_gates / dx / dA / dB
  with fp32 atomics). Why not the per-expert loop: it syncs with the host for the list of experts
  and launches ~10 small kernels per expert (E = 64: hundreds of launches), which dominates the
  time and cannot be captured in a CUDA graph. On the PyTorch path the per-expert loop stays
  (``routed_lora_backward_ref``): on CPU it computes only routed work with BLAS, which is fastest.
"""

from __future__ import annotations

import math

import torch
import triton

from .. import _backend
from .._checks import FLOAT_DTYPES, INDEX_DTYPES, check, check_index_range, check_shape, check_tensor
from ..reference.routed_lora import (
    gate_matrix, routed_lora_backward_dense, routed_lora_backward_ref, routed_lora_ref)

_OP = "routed_lora"
MAX_SLICES_PER_LAUNCH = 3

torch.library.define(
    "loramix::routed_lora",
    "(Tensor x, Tensor[] lora_a, Tensor[] lora_b, Tensor expert_ids, Tensor gates, float scaling) -> Tensor",
)
torch.library.define(
    "loramix::routed_lora_add_",
    "(Tensor(a!) out, Tensor x, Tensor[] lora_a, Tensor[] lora_b, Tensor expert_ids, Tensor gates, "
    "float scaling) -> ()",
)
torch.library.define(
    "loramix::routed_lora_backward",
    "(Tensor grad_y, Tensor x, Tensor[] lora_a, Tensor[] lora_b, Tensor expert_ids, Tensor gates, "
    "float scaling) -> (Tensor, Tensor[], Tensor[], Tensor)",
)


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


def validate(x, lora_a, lora_b, expert_ids, gates, scaling, op=_OP):
    """Metadata checks (fake-safe) plus, where ``check_values`` allows, the expert-id range.

    Returns (T, d_in, E, k, d_out_total).
    """
    check_tensor(op, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    T, d_in = x.shape
    dev = x.device
    check(isinstance(lora_a, (list, tuple)) and len(lora_a) > 0, op, "lora_a",
          "must be a non-empty list of [E, r, d_in] tensors")
    check(isinstance(lora_b, (list, tuple)) and len(lora_b) == len(lora_a), op, "lora_b",
          f"must be a list with one tensor per slice of lora_a ({len(lora_a)}), got "
          f"{len(lora_b) if isinstance(lora_b, (list, tuple)) else type(lora_b).__name__}")
    E = None
    d_out = 0
    for s, (a, b) in enumerate(zip(lora_a, lora_b)):
        check_tensor(op, f"lora_a[{s}]", a, ndim=3, dtypes=(x.dtype,), device=dev)
        check_tensor(op, f"lora_b[{s}]", b, ndim=3, dtypes=(x.dtype,), device=dev)
        if E is None:
            E = a.shape[0]
            check(E > 0, op, "lora_a[0]", "must hold at least one expert")
        check(a.shape[0] == E, op, f"lora_a[{s}]", f"has {a.shape[0]} experts, lora_a[0] has {E}")
        check(b.shape[0] == E, op, f"lora_b[{s}]", f"has {b.shape[0]} experts, lora_a has {E}")
        check(a.shape[2] == d_in, op, f"lora_a[{s}]", f"must be [E, r, d_in={d_in}], got {list(a.shape)}")
        check(a.shape[1] >= 1, op, f"lora_a[{s}]", "must have rank r >= 1")
        check(b.shape[2] == a.shape[1], op, f"lora_b[{s}]",
              f"must be [E, d_out, r={a.shape[1]}] (rank of lora_a[{s}]), got {list(b.shape)}")
        d_out += b.shape[1]
    check_tensor(op, "expert_ids", expert_ids, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    check(expert_ids.shape[0] == T, op, "expert_ids", f"must be [T={T}, k], got {list(expert_ids.shape)}")
    k = expert_ids.shape[1]
    check_tensor(op, "gates", gates, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    check_shape(op, "gates", gates, (T, k))
    check(isinstance(scaling, (int, float)) and math.isfinite(scaling), op, "scaling",
          f"must be a finite float, got {scaling!r}")
    if _backend.check_values(expert_ids):
        check_index_range(op, "expert_ids", expert_ids, -1, E)
    return T, d_in, E, k, d_out


# ------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def choose_strategy(E: int, ranks, k: int = 1) -> str:
    """``token_major`` if the padded ``E * r`` rows of every slice fit the register budget, else
    ``dense_gemm`` for dense-ish routing (``2 k >= E``), else ``expert_sorted``."""
    if max(_pow2(E * r) for r in ranks) <= 256:
        return "token_major"
    return "dense_gemm" if 2 * k >= E else "expert_sorted"


def _groups(n):
    return [list(range(i, min(i + MAX_SLICES_PER_LAUNCH, n))) for i in range(0, n, MAX_SLICES_PER_LAUNCH)]


def _slice_args(lora_a, lora_b, idx, cols):
    """Per-slice pointers / sizes / strides for the 3 slice slots (unused slots repeat slot 0)."""
    pad = idx + [idx[0]] * (MAX_SLICES_PER_LAUNCH - len(idx))
    ptrs = [t for s in pad for t in (lora_a[s], lora_b[s])]
    ranks = [lora_a[s].shape[1] for s in pad]
    widths = [lora_b[s].shape[1] for s in pad]
    col = [cols[s] for s in pad]
    strides = [st for s in pad for st in (*lora_a[s].stride(), *lora_b[s].stride())]
    return ptrs, ranks, widths, col, strides


def _col_offsets(lora_b):
    cols, o = [], 0
    for b in lora_b:
        cols.append(o)
        o += b.shape[1]
    return cols


def plan_splits(x, programs, n_tiles, d_in, block_k, a_over_b, splits=None):
    """(NSPLIT, KSPLIT, K_CHUNK): how many column shares and d_in chunks each row tile is cut into.

    Nothing is split when the row tiles alone give at least half a wave (prefill). Otherwise (decode)
    aim at two programs per SM, cutting d_in and the columns in the ratio of the A and B bytes each
    program would read (``a_over_b``), so that every program moves about the same number of bytes.
    ``splits`` overrides the choice (tests).
    """
    kmax = triton.cdiv(d_in, block_k)
    if splits is not None:
        nsplit, ksplit = splits
    elif programs >= _backend.sm_count(x) // 2:
        nsplit, ksplit = 1, 1
    else:
        per = triton.cdiv(2 * _backend.sm_count(x), max(programs, 1))
        ksplit = int(round(math.sqrt(per * a_over_b)))
        ksplit = max(1, min(ksplit, kmax, per))
        nsplit = max(1, min(per // ksplit, n_tiles))
        if _backend.INTERPRET:  # keep interpreter grids small; tests force larger splits
            nsplit, ksplit = min(nsplit, 2), min(ksplit, 2)
    k_chunk = triton.cdiv(triton.cdiv(d_in, max(1, ksplit)), block_k) * block_k
    return max(1, nsplit), max(1, triton.cdiv(d_in, k_chunk)), k_chunk


def _destination(y, accumulate, atomic):
    """Where kernels write. Atomic adds need an fp32 target: y itself when it is fp32 (zeroed
    first unless accumulating), else a zeroed fp32 workspace added / copied into y afterwards."""
    if not atomic or y.dtype == torch.float32:
        if atomic and not accumulate:
            y.zero_()
        return y
    return torch.zeros(y.shape, dtype=torch.float32, device=y.device)


def _finish(y, dst, accumulate):
    if dst is not y:
        if accumulate:
            y.add_(dst)
        else:
            y.copy_(dst)


def token_major_tiles(T: int, er: int):
    """(BLOCK_T, BLOCK_N, BLOCK_K, num_warps, num_stages) for a slice of ``er`` padded E*r rows.

    BLOCK_T: the weights are re-read (from L2) once per token tile, so a tall tile keeps that
    traffic below the x and y traffic at prefill; it is bounded by the registers of the fp32
    [BLOCK_T, ER] shrink tile. Every table entry compiles for sm_90 without register spills
    (tests/test_sm90_compile.py checks it).
    """
    if _backend.INTERPRET:
        return min(64, 16384 // er, _pow2(T)), 32, 32, 4, 1
    # From compiling the candidates for sm_90 (triton 3.9, launch-time specialisation): the
    # tallest tiles without register spills (128 x 128 at E*r = 128 uses ~166 registers).
    block_t, block_n = {16: (128, 128), 32: (128, 128), 64: (128, 64), 128: (128, 128), 256: (64, 128)}[er]
    block_t = min(block_t, _pow2(T))
    return block_t, block_n, 64, 8 if block_t * er >= 4096 else 4, 2


def _token_major(x, lora_a, lora_b, ids, gates, scaling, y, accumulate, splits=None):
    from ..kernels.routed_lora import _routed_lora_token_major_kernel

    T, d_in = x.shape
    E, K = lora_a[0].shape[0], ids.shape[1]
    cols = _col_offsets(lora_b)
    er_all = [_pow2(E * a.shape[1]) for a in lora_a]
    interp = _backend.INTERPRET
    launches = []
    for idx in _groups(len(lora_a)):
        ptrs, ranks, widths, col, strides = _slice_args(lora_a, lora_b, idx, cols)
        er = [er_all[s] for s in idx] + [16] * (MAX_SLICES_PER_LAUNCH - len(idx))
        er_max = max(er[: len(idx)])
        block_t, block_n, block_k, warps, stages = token_major_tiles(T, er_max)
        n_tiles = max(triton.cdiv(w, block_n) for w in widths[: len(idx)])
        n_t = triton.cdiv(T, block_t)
        a_over_b = d_in * len(idx) / sum(widths[: len(idx)])
        nsplit, ksplit, k_chunk = plan_splits(x, n_t * len(idx), n_tiles, d_in, block_k, a_over_b, splits)
        launches.append(dict(
            args=(ptrs, widths, col, strides, k_chunk), grid=(n_t * len(idx) * nsplit * ksplit,),
            meta=dict(NUM_SLICES=len(idx), R0=ranks[0], R1=ranks[1], R2=ranks[2],
                      ER0=er[0], ER1=er[1], ER2=er[2], BLOCK_T=block_t, BLOCK_K=block_k,
                      BLOCK_N=block_n, NSPLIT=nsplit, KSPLIT=ksplit, ATOMIC=ksplit > 1,
                      num_warps=warps, num_stages=stages)))
    # One destination for every slice group (their columns are disjoint).
    dst = _destination(y, accumulate, any(ln["meta"]["ATOMIC"] for ln in launches))
    for ln in launches:
        ptrs, widths, col, strides, k_chunk = ln["args"]
        _routed_lora_token_major_kernel[ln["grid"]](
            x, ids, gates, dst, *ptrs,
            T, d_in, k_chunk, E, K, *widths, *col,
            x.stride(0), x.stride(1), ids.stride(0), ids.stride(1), gates.stride(0), gates.stride(1),
            dst.stride(0), dst.stride(1), *strides, float(scaling),
            ACCUMULATE=accumulate and dst is y, DOT_FP32=_backend.dot_fp32(x.dtype),
            IEEE=x.dtype == torch.float32, **ln["meta"],
        )
    _finish(y, dst, accumulate)


def sort_pairs(ids: torch.Tensor, E: int, block_m: int):
    """Expert-sorted (token, slot) pairs and per-block metadata, all on the device (no sync).

    Returns ``order`` (pair index t*k+j in expert order; empty / out-of-range slots last) and, for
    a fixed upper bound of ``cdiv(T*k, block_m) + E`` blocks, each block's expert (E = idle),
    first row and end row into ``order``.
    """
    P = ids.numel()
    flat = ids.reshape(-1).to(torch.int64)
    flat = torch.where((flat >= 0) & (flat < E), flat, E)
    _, order = torch.sort(flat, stable=True)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    counts = counts[:E]
    starts = torch.cumsum(counts, 0) - counts
    nblk = (counts + block_m - 1) // block_m
    blk_cum = torch.cumsum(nblk, 0)
    max_blocks = triton.cdiv(P, block_m) + E
    b = torch.arange(max_blocks, device=ids.device)
    blk_expert = torch.searchsorted(blk_cum, b, right=True)
    e_c = blk_expert.clamp(max=E - 1)
    first_blk = blk_cum[e_c] - nblk[e_c]
    blk_start = starts[e_c] + (b - first_blk) * block_m
    blk_end = starts[e_c] + counts[e_c]
    return (order.to(torch.int32), blk_expert.to(torch.int32), blk_start.to(torch.int32),
            blk_end.to(torch.int32), max_blocks)


def sorted_block_m(P: int, E: int) -> int:
    """Rows per expert-sorted block: 64 once experts average more than 64 pairs, else 16."""
    return 16 if (_backend.INTERPRET or P <= 64 * E) else 64


def _sorted_config(x, P, E, lora_a, lora_b, splits=None):
    interp = _backend.INTERPRET
    block_m = sorted_block_m(P, E)
    # BLOCK_M = 64 rows: 64-wide column tiles at 8 warps, BLOCK_M = 16: 128 wide at 4 warps, the
    # widest tiles that compile for sm_90 without register spills (tests/test_sm90_compile.py).
    block_n = 32 if interp else (64 if block_m >= 64 else 128)
    block_k = 32 if interp else 64
    d_in = x.shape[1]
    n_tiles = sum(triton.cdiv(b.shape[1], block_n) for b in lora_b)
    # Blocks that will really have rows: one per active expert at decode, ~P / BLOCK_M at prefill.
    est_blocks = max(triton.cdiv(P, block_m), min(E, P))
    a_over_b = d_in * sum(a.shape[1] for a in lora_a) / sum(b.shape[1] * b.shape[2] for b in lora_b)
    nsplit, ksplit, k_chunk = plan_splits(x, est_blocks, n_tiles, d_in, block_k, a_over_b, splits)
    return block_m, block_n, block_k, nsplit, ksplit, k_chunk


def _expert_sorted(x, lora_a, lora_b, ids, gates, scaling, y, accumulate, splits=None):
    from ..kernels.routed_lora import _routed_lora_sorted_kernel

    T, d_in = x.shape
    E, K = lora_a[0].shape[0], ids.shape[1]
    P = T * K
    block_m, block_n, block_k, nsplit, ksplit, k_chunk = _sorted_config(x, P, E, lora_a, lora_b, splits)
    order, blk_e, blk_s, blk_t, max_blocks = sort_pairs(ids, E, block_m)
    # k == 1 without a d_in split: every token is one row of exactly one block, so rows are
    # stored without atomics (tokens whose only slot is empty get no row: y is zeroed first).
    atomic = K > 1 or ksplit > 1
    dst = _destination(y, accumulate, atomic)
    if not atomic and not accumulate:
        y.zero_()
    accumulate_dst = accumulate and dst is y
    cols = _col_offsets(lora_b)
    for idx in _groups(len(lora_a)):
        ptrs, ranks, widths, col, strides = _slice_args(lora_a, lora_b, idx, cols)
        rp = [_pow2(r) for r in ranks]
        _routed_lora_sorted_kernel[(max_blocks * nsplit * ksplit,)](
            x, gates, dst, order, blk_e, blk_s, blk_t, *ptrs,
            d_in, k_chunk, E, K, *ranks, *widths, *col,
            x.stride(0), x.stride(1), gates.stride(0), gates.stride(1), dst.stride(0), dst.stride(1),
            *strides, float(scaling),
            NUM_SLICES=len(idx), RP0=rp[0], RP1=rp[1], RP2=rp[2],
            BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, NSPLIT=nsplit, KSPLIT=ksplit,
            ATOMIC=atomic, ACCUMULATE=accumulate_dst, DOT_FP32=_backend.dot_fp32(x.dtype),
            IEEE=x.dtype == torch.float32, num_warps=8 if block_m >= 64 else 4,
        )
    _finish(y, dst, accumulate)


def _dense_gemm(x, lora_a, lora_b, ids, gates, scaling, y, accumulate, splits=None):
    """Dense routing with large E*r: two cuBLAS GEMMs per slice around an fp32 gate scaling."""
    T = x.shape[0]
    E = lora_a[0].shape[0]
    gm = gate_matrix(ids, gates, E) * scaling  # [T, E] fp32, empty / out-of-range slots dropped
    for a, b, col in zip(lora_a, lora_b, _col_offsets(lora_b)):
        r, n = a.shape[1], b.shape[1]
        h = x @ a.reshape(E * r, -1).t()
        hg = (h.view(T, E, r).float() * gm.unsqueeze(-1)).to(x.dtype).view(T, E * r)
        ys = hg @ b.permute(1, 0, 2).reshape(n, E * r).t()
        if accumulate:
            y[:, col:col + n] += ys
        else:
            y[:, col:col + n] = ys


def routed_lora_forward(x, lora_a, lora_b, expert_ids, gates, scaling, out=None, strategy=None,
                        splits=None):
    """Launcher: validate, allocate, pick a strategy (``choose_strategy`` unless given), launch.

    With ``out`` given, adds into it in place (``routed_lora_add_``) and returns it. ``strategy``
    and ``splits`` = (column shares, d_in chunks) override the heuristics (tests, benchmarks).
    """
    T, d_in, E, k, d_out = validate(x, lora_a, lora_b, expert_ids, gates, scaling)
    accumulate = out is not None
    if accumulate:
        check_tensor("routed_lora_add_", "out", out, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape("routed_lora_add_", "out", out, (T, d_out))
        y = out
    else:
        y = torch.empty(T, d_out, dtype=x.dtype, device=x.device)
    if T == 0 or d_out == 0:
        return y
    if k == 0:
        return y if accumulate else y.zero_()
    strategy = strategy or choose_strategy(E, [a.shape[1] for a in lora_a], k)
    if strategy not in _STRATEGIES:
        raise ValueError(f"routed_lora: strategy must be one of {list(_STRATEGIES)}, got {strategy!r}")
    _STRATEGIES[strategy](x, lora_a, lora_b, expert_ids, gates, scaling, y, accumulate, splits)
    return y


_STRATEGIES = {"token_major": _token_major, "expert_sorted": _expert_sorted, "dense_gemm": _dense_gemm}


def _grad_workspace(t):
    """Zeroed fp32 accumulator for the gradient of ``t`` (contiguous, as the kernels index it)."""
    return torch.zeros(t.shape, dtype=torch.float32, device=t.device)


def routed_lora_backward_sorted(grad_y, x, lora_a, lora_b, expert_ids, gates, scaling, splits=None,
                                validated=False):
    """Triton backward of the expert-sorted regime: (dx, [dA_s], [dB_s], d_gates), no host sync.

    Why: the per-expert PyTorch loop syncs once (``unique(...).tolist()``) and issues a dozen small
    launches per active expert, which at E = 64 costs more than the math and cannot be captured in
    a CUDA graph. This reuses the forward's ``sort_pairs`` metadata (device-side sort of the T*k
    (token, slot) pairs by expert, fixed upper-bound grid of ``cdiv(T*k, BLOCK_M) + E`` blocks) and
    runs two launches per group of <= 3 slices:

    1. ``_routed_lora_bwd_shrink_kernel``, grid (block, KSPLIT share): recomputes h = A_s[e] x and
       u = B_s[e]^T dy of every sorted row (fp32 workspace ``[T*k, sum r]``, one x pass for all
       slices). Both are full reductions (over d_in and d_out), which is why they get a launch of
       their own instead of being recomputed by every d_in share of the second kernel.
    2. ``_routed_lora_bwd_expand_kernel``, grid (block, NSPLIT share): d_gates = scaling sum_s <u, h>
       (share 0, one writer per pair), then the block's d_in tiles (dx = sum_s w u A_s, dA_s += w u^T x)
       and d_out tiles (dB_s += (w dy)^T h) dealt round robin to the shares. dA / dB are shared by
       every block of an expert and dx by a token's k slots, so they are fp32 atomic adds into zeroed
       workspaces, cast to the input dtypes at the end (``ctx.needs_input_grad`` is not visible to
       the op, so all four gradients are computed).

    At prefill the blocks fill the GPU and nothing is split; at decode (few blocks) KSPLIT / NSPLIT
    follow ``plan_splits`` as in the forward. ``splits`` = (NSPLIT, KSPLIT) overrides (tests).
    Gradients come back contiguous, in the inputs' dtypes (d_gates in gates' dtype).
    """
    from ..kernels.routed_lora import _routed_lora_bwd_expand_kernel, _routed_lora_bwd_shrink_kernel

    if validated:  # by the op's kernel, just before
        T, d_in, E, K = x.shape[0], x.shape[1], lora_a[0].shape[0], expert_ids.shape[1]
    else:
        T, d_in, E, K, d_out = _validate_backward(grad_y, x, lora_a, lora_b, expert_ids, gates, scaling)
    dev = x.device
    gx = torch.zeros(T, d_in, dtype=torch.float32, device=dev)
    ga = [_grad_workspace(a) for a in lora_a]
    gb = [_grad_workspace(b) for b in lora_b]
    P = T * K
    gg = torch.zeros(P, dtype=torch.float32, device=dev)
    if P > 0 and d_in > 0:
        interp = _backend.INTERPRET
        block_m = sorted_block_m(P, E)
        block_k = 32 if interp else 64
        block_n = 32 if interp else 64
        rsum = sum(a.shape[1] for a in lora_a)
        est_blocks = max(triton.cdiv(P, block_m), min(E, P))
        n_tiles = triton.cdiv(d_in, block_k) + sum(triton.cdiv(b.shape[1], block_n) for b in lora_b)
        if splits is not None:
            nsplit, ksplit = splits
        elif est_blocks >= _backend.sm_count(x) // 2:
            nsplit = ksplit = 1
        else:  # decode: about two programs per SM in each launch
            per = triton.cdiv(2 * _backend.sm_count(x), est_blocks)
            nsplit = ksplit = min(per, n_tiles)
            if interp:  # keep interpreter grids small; tests force larger splits
                nsplit = ksplit = min(nsplit, 2)
        order, blk_e, blk_s, blk_t, max_blocks = sort_pairs(expert_ids, E, block_m)
        # Sorted rows' h and u; zeroed only when split shares add into them.
        alloc = torch.zeros if ksplit > 1 else torch.empty
        h_ws = alloc(P, rsum, dtype=torch.float32, device=dev)
        u_ws = alloc(P, rsum, dtype=torch.float32, device=dev)
        ro = [sum(a.shape[1] for a in lora_a[:s]) for s in range(len(lora_a))]  # workspace columns
        cols = _col_offsets(lora_b)
        groups = _groups(len(lora_a))
        dfp32, ieee = _backend.dot_fp32(x.dtype), x.dtype == torch.float32
        # 8 warps for 64-row blocks: at 4 warps the [64, 64] fp32 dx / dA / dB tiles next to the
        # per-slice dh tiles exceed 255 registers per thread and spill (tests/sm90_compile).
        common = dict(BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, DOT_FP32=dfp32, IEEE=ieee,
                      num_warps=8 if block_m >= 64 else 4)
        for idx in groups:
            pad = idx + [idx[0]] * (MAX_SLICES_PER_LAUNCH - len(idx))
            ranks = [lora_a[s].shape[1] for s in pad]
            widths = [lora_b[s].shape[1] for s in pad]
            rp = [_pow2(r) for r in ranks]
            meta = dict(NUM_SLICES=len(idx), RP0=rp[0], RP1=rp[1], RP2=rp[2], **common)
            sizes = (*ranks, *widths, *[cols[s] for s in pad], *[ro[s] for s in pad])
            a_str = [st for s in pad for st in lora_a[s].stride()]
            b_str = [st for s in pad for st in lora_b[s].stride()]
            ab = [t for s in pad for t in (lora_a[s], lora_b[s])]
            _routed_lora_bwd_shrink_kernel[(max_blocks * ksplit,)](
                x, grad_y, gates, h_ws, u_ws, order, blk_e, blk_s, blk_t, *ab, d_in, E, K, *sizes,
                x.stride(0), x.stride(1), grad_y.stride(0), grad_y.stride(1),
                gates.stride(0), gates.stride(1), h_ws.stride(0),
                *[v for s in range(3) for v in (*a_str[3 * s:3 * s + 3], *b_str[3 * s:3 * s + 3])],
                KSPLIT=ksplit, ATOMIC=ksplit > 1, **meta)
            grads = [t for s in pad for t in (ga[s], gb[s])]
            _routed_lora_bwd_expand_kernel[(max_blocks * nsplit,)](
                x, grad_y, gates, h_ws, u_ws, gx, gg, order, blk_e, blk_s, blk_t,
                *[lora_a[s] for s in pad], *grads, d_in, E, K, *sizes,
                x.stride(0), x.stride(1), grad_y.stride(0), grad_y.stride(1),
                gates.stride(0), gates.stride(1), gx.stride(0), h_ws.stride(0), *a_str, float(scaling),
                NSPLIT=nsplit, GATE_ATOMIC=len(groups) > 1, **meta)
    return (gx.to(x.dtype), [g.to(a.dtype) for g, a in zip(ga, lora_a)],
            [g.to(b.dtype) for g, b in zip(gb, lora_b)], gg.view(T, K).to(gates.dtype))


def routed_lora_two_launch(x, lora_a, lora_b, expert_ids, gates, scaling):
    """Benchmark baseline (c): the vLLM design, shrink and expand as two launches per slice with an
    fp32 ``[T*k, r]`` intermediate in global memory (same expert-sorted metadata as ours)."""
    from ..kernels.routed_lora import _sorted_expand_kernel, _sorted_shrink_kernel

    T, d_in, E, K, d_out = validate(x, lora_a, lora_b, expert_ids, gates, scaling)
    ws = torch.zeros(T, d_out, dtype=torch.float32, device=x.device)
    if T == 0 or K == 0:
        return ws.to(x.dtype)
    P = T * K
    block_m, block_n, block_k, nsplit, _, _ = _sorted_config(x, P, E, lora_a, lora_b, splits=None)
    order, blk_e, blk_s, blk_t, max_blocks = sort_pairs(expert_ids, E, block_m)
    dfp32, ieee = _backend.dot_fp32(x.dtype), x.dtype == torch.float32
    for a, b, col in zip(lora_a, lora_b, _col_offsets(lora_b)):
        R = a.shape[1]
        h = torch.empty(P, R, dtype=torch.float32, device=x.device)
        _sorted_shrink_kernel[(max_blocks,)](
            x, gates, h, order, blk_e, blk_s, blk_t, a, d_in, E, K, R,
            x.stride(0), x.stride(1), gates.stride(0), gates.stride(1), *a.stride(), h.stride(0),
            float(scaling), RP=_pow2(R), BLOCK_M=block_m, BLOCK_K=block_k, DOT_FP32=dfp32, IEEE=ieee)
        _sorted_expand_kernel[(max_blocks * nsplit,)](
            h, ws, gates, order, blk_e, blk_s, blk_t, b, b.shape[1], col, E, K, R,
            gates.stride(0), gates.stride(1), *b.stride(), ws.stride(0), ws.stride(1), h.stride(0),
            RP=_pow2(R), BLOCK_M=block_m, BLOCK_N=block_n, NSPLIT=nsplit, DOT_FP32=dfp32, IEEE=ieee,
            num_warps=8 if block_m >= 64 else 4)
    return ws.to(x.dtype)


# ------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------


def routed_lora_torch(x, lora_a, lora_b, expert_ids, gates, scaling, out=None):
    """The PyTorch path: the CPU kernel (and CUDA under ``LORAMIX_BACKEND=reference``).

    Where the Triton path would run dense (small E*r, or dense routing) this is the dense masked
    form on BLAS GEMMs, several times faster on CPU than looping over experts; otherwise the
    per-expert loop, which computes only routed work. With ``out``, adds into it.
    """
    op = _OP if out is None else "routed_lora_add_"
    T, d_in, E, k, d_out = validate(x, lora_a, lora_b, expert_ids, gates, scaling, op=op)
    if out is not None:
        check_tensor(op, "out", out, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape(op, "out", out, (T, d_out))
    if choose_strategy(E, [a.shape[1] for a in lora_a], k) == "expert_sorted":
        y = routed_lora_ref(x, lora_a, lora_b, expert_ids, gates, scaling, keep_acc=out is not None)
        return y if out is None else out.add_(y)
    y = out if out is not None else torch.empty(T, d_out, dtype=x.dtype, device=x.device)
    if T and d_out and k:
        _dense_gemm(x, lora_a, lora_b, expert_ids, gates, scaling, y, out is not None)
    elif out is None:
        y.zero_()
    return y


def _routed_lora_impl(x, lora_a, lora_b, expert_ids, gates, scaling):
    if _backend.use_triton(x):
        return routed_lora_forward(x, lora_a, lora_b, expert_ids, gates, scaling)
    return routed_lora_torch(x, lora_a, lora_b, expert_ids, gates, scaling)


torch.library.register_kernel("loramix::routed_lora", "cpu", _routed_lora_impl)
torch.library.register_kernel("loramix::routed_lora", "cuda", _routed_lora_impl)


@torch.library.register_fake("loramix::routed_lora")
def _routed_lora_fake(x, lora_a, lora_b, expert_ids, gates, scaling):
    T, _, _, _, d_out = validate(x, lora_a, lora_b, expert_ids, gates, scaling)
    return x.new_empty(T, d_out)


def _routed_lora_add_impl(out, x, lora_a, lora_b, expert_ids, gates, scaling):
    if _backend.use_triton(x):
        routed_lora_forward(x, lora_a, lora_b, expert_ids, gates, scaling, out=out)
    else:
        routed_lora_torch(x, lora_a, lora_b, expert_ids, gates, scaling, out=out)


torch.library.register_kernel("loramix::routed_lora_add_", "cpu", _routed_lora_add_impl)
torch.library.register_kernel("loramix::routed_lora_add_", "cuda", _routed_lora_add_impl)


@torch.library.register_fake("loramix::routed_lora_add_")
def _routed_lora_add_fake(out, x, lora_a, lora_b, expert_ids, gates, scaling):
    T, _, _, _, d_out = validate(x, lora_a, lora_b, expert_ids, gates, scaling, op="routed_lora_add_")
    check_tensor("routed_lora_add_", "out", out, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    check_shape("routed_lora_add_", "out", out, (T, d_out))


def _routed_lora_backward_impl(grad_y, x, lora_a, lora_b, expert_ids, gates, scaling):
    # Where the forward would run dense (small E*r, or dense routing) the backward is the dense
    # masked form in PyTorch on both devices: a handful of GEMMs, no host sync. In the
    # expert-sorted regime the Triton path runs the sorted backward kernels (only routed work, no
    # host sync, graph-capturable); the PyTorch path keeps the per-expert loop, which computes
    # only routed work at one host sync for the list of experts in use.
    _, _, E, k, _ = _validate_backward(grad_y, x, lora_a, lora_b, expert_ids, gates, scaling)
    if choose_strategy(E, [a.shape[1] for a in lora_a], k) != "expert_sorted":
        return routed_lora_backward_dense(grad_y, x, lora_a, lora_b, expert_ids, gates, scaling)
    if _backend.use_triton(x):
        return routed_lora_backward_sorted(grad_y, x, lora_a, lora_b, expert_ids, gates, scaling,
                                           validated=True)
    return routed_lora_backward_ref(grad_y, x, lora_a, lora_b, expert_ids, gates, scaling)


def _validate_backward(grad_y, x, lora_a, lora_b, expert_ids, gates, scaling):
    op = "routed_lora_backward"
    T, d_in, E, k, d_out = validate(x, lora_a, lora_b, expert_ids, gates, scaling, op=op)
    check_tensor(op, "grad_y", grad_y, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    check_shape(op, "grad_y", grad_y, (T, d_out))
    return T, d_in, E, k, d_out


torch.library.register_kernel("loramix::routed_lora_backward", "cpu", _routed_lora_backward_impl)
torch.library.register_kernel("loramix::routed_lora_backward", "cuda", _routed_lora_backward_impl)


@torch.library.register_fake("loramix::routed_lora_backward")
def _routed_lora_backward_fake(grad_y, x, lora_a, lora_b, expert_ids, gates, scaling):
    return (torch.empty_like(x), [torch.empty_like(a) for a in lora_a],
            [torch.empty_like(b) for b in lora_b], torch.empty_like(gates))


def _setup_context(ctx, inputs, output):
    x, lora_a, lora_b, expert_ids, gates, scaling = inputs
    ctx.n_slices = len(lora_a)
    ctx.scaling = scaling
    ctx.save_for_backward(x, expert_ids, gates, *lora_a, *lora_b)


def _backward(ctx, grad_y):
    x, expert_ids, gates, *w = ctx.saved_tensors
    n = ctx.n_slices
    lora_a, lora_b = w[:n], w[n:]
    gx, ga, gb, gg = torch.ops.loramix.routed_lora_backward(
        grad_y, x, list(lora_a), list(lora_b), expert_ids, gates, ctx.scaling)
    need = ctx.needs_input_grad
    return (gx if need[0] else None, ga, gb, None, gg if need[4] else None, None)


torch.library.register_autograd("loramix::routed_lora", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------
# public functions
# ------------------------------------------------------------------------------------------


def routed_lora(x, lora_a, lora_b, expert_ids, gates, scaling=1.0):
    r"""Routed mixture of LoRA experts over one or more packed output slices.

    .. math:: y[t, s] = \text{scaling} \sum_j g_{t,j}\, B_s[e_{t,j}]\, A_s[e_{t,j}]\, x_t

    Parameters
    ----------
    x : torch.Tensor
        ``[T, d_in]`` activations, fp16 / bf16 / fp32 (any strides).
    lora_a : list[torch.Tensor]
        Per slice ``s``: ``[E, r_s, d_in]`` LoRA A weights (PEFT ``lora_A`` layout), x's dtype.
    lora_b : list[torch.Tensor]
        Per slice ``s``: ``[E, d_out_s, r_s]`` LoRA B weights; widths and ranks may differ per
        slice (packed q/k/v with GQA).
    expert_ids : torch.Tensor
        ``[T, k]`` int32 / int64 expert of each routing slot; ``-1`` marks an empty slot. Dense
        soft routing is ``k = E`` with every expert listed.
    gates : torch.Tensor
        ``[T, k]`` slot weights (any float dtype).
    scaling : float
        LoRA scale (``alpha / r``), default ``1.0``.

    Returns
    -------
    torch.Tensor
        ``[T, sum_s d_out_s]`` in x's dtype, slices' columns in order, accumulated in fp32.
        Differentiable in ``x``, every ``lora_a`` / ``lora_b`` and ``gates``.

    Examples
    --------
    >>> import torch, loramix_kernels
    >>> x = torch.randn(5, 64)
    >>> A = [torch.randn(8, 16, 64)]; B = [torch.randn(8, 32, 16)]
    >>> ids = torch.randint(0, 8, (5, 2)); g = torch.rand(5, 2)
    >>> torch.ops.loramix.routed_lora(x, A, B, ids, g, 0.5).shape
    torch.Size([5, 32])
    """
    return torch.ops.loramix.routed_lora(x, list(lora_a), list(lora_b), expert_ids, gates, float(scaling))


def routed_lora_add_(out, x, lora_a, lora_b, expert_ids, gates, scaling=1.0):
    """In place ``out += routed_lora(x, ...)`` (after the base projection's GEMM; inference path).

    ``out`` is ``[T, sum_s d_out_s]`` of any float dtype; the sum is formed in fp32 and rounded
    once. See :func:`routed_lora` for the other parameters.
    """
    torch.ops.loramix.routed_lora_add_(out, x, list(lora_a), list(lora_b), expert_ids, gates, float(scaling))
    return out
