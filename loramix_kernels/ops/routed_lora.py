"""Routed multi-LoRA projections (LoRA-Mixer): ``routed_lora``, ``routed_lora_add_`` and the
backward op ``routed_lora_backward``.

``validate_routed_lora`` / ``validate_routed_lora_add`` / ``validate_routed_lora_backward``, the
launchers ``routed_lora_triton`` / ``routed_lora_add_triton`` / ``routed_lora_backward_triton``
(strategy, tiles, keyword arguments of ``kernels/routed_lora.py``), the CPU kernels
``routed_lora_cpu`` / ``routed_lora_add_cpu`` / ``routed_lora_backward_cpu``, the registration
(``ops/_registry.py``) and the public functions. Importing this module does not import triton.

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
* Only the gradients autograd needs are computed (the op's trailing ``needs`` flags come from
  ``ctx.needs_input_grad``): frozen experts cost no dA / dB work, a frozen input no dx.
* Shapes that run ``token_major`` / ``dense_gemm`` forward: the dense masked form in PyTorch
  (``routed_lora_backward_dense``): a few GEMMs, no host sync.
* ``expert_sorted`` shapes on the Triton path: ``routed_lora_backward_sorted``, two Triton launches
  on the forward's sorted metadata (recompute h and u per sorted row, then d_gates / dx / dA / dB
  with fp32 atomics). Why not the per-expert loop: it syncs with the host for the list of experts
  and launches ~10 small kernels per expert (E = 64: hundreds of launches), which dominates the
  time and cannot be captured in a CUDA graph. On the PyTorch path the per-expert loop stays
  (``routed_lora_backward_ref``): on CPU it computes only routed work with BLAS, which is fastest
  for large experts.
* CPU tensors (forward and backward) choose by cost instead (``dense_cheaper_cpu``, measured
  crossovers in its docstring): decode and small shapes are host-bound, so the dense masked form
  with the fewest ops (``_dense_forward_cpu`` / ``_dense_backward_cpu``: all slices' A in one
  GEMM, gates gathered onto the rank columns, no route mask, one finiteness check) wins there
  even where the Triton path sorts; large experts at sparse routing run the per-expert loop.
  Deterministic mode keeps the Triton path's choice (``_dense_on_device``).
* Training on CPU (``routed_lora`` with grad, eager, plain CPU tensors, no autocast; where
  ``dense_saved_cheaper_cpu`` picks the dense backward; ``_train_plan`` decides in one pass over
  the arguments): a plain autograd function (``_RoutedLoraTrain``) whose forward keeps what its
  backward reuses, so that the backward neither repacks the weights, nor recomputes h, nor
  validates again, nor checks its result (a finite forward means finite inputs; it checks
  grad_y and otherwise runs the op ``routed_lora_backward``, as it does under create_graph).
  Two forms:

  - sparse routing (``4 k <= E`` and every expert at most T / 4 of the tokens,
    ``_sparse_plan``): expert-grouped (``_sparse_forward`` / ``_sparse_backward``): the (token,
    slot) pairs sorted by expert into ``[E, cap]`` rows, every product a ``bmm`` on the weights
    as stored (PEFT layout, no repacking; dA / dB come out in it), only routed work (1/4 of the
    dense rows or less). Benchmark (quick shapes, 1 thread): top-2 of 64 experts at T 64, about
    1.9x the dense torch formulation.
  - otherwise dense (``_train_forward`` / ``_train_backward``): every slice's A in one GEMM for
    h, dx and dA; the gates scattered into a ``[T, E + 1]`` matrix (the scatter also checks the
    expert-id range) or, for dense soft routing passed as ``arange(E)`` expanded (as
    ``LoRAMixerLinear`` does), the gates themselves; d_gates by a matrix-vector product over the
    ranks. About as fast as the dense torch formulation (which keeps B in the layout the GEMMs
    want: ours repacks B from the PEFT layout on every call, and its gradient back).
* Double backward (a gradient of these gradients) is not supported: it raises.

Precision of each path (all accumulate in fp32; float64 inputs in float64)
--------------------------------------------------------------------------
* CPU: x and the weights are read in fp32 (float64 stays float64); the rank-sized intermediate
  ``h = A x`` and ``h * g * scaling`` stay fp32; y is rounded once to x's dtype (``out +=``: the
  sum ``out + y`` is formed in fp32 and rounded once). Except for bf16 inputs in the forward's
  dense and grouped forms where the GEMMs are large enough (``_gemm_dtype``: prefill, or large
  experts): their GEMMs run in bf16 (oneDNN, fp32 accumulation, 2x fp32's speed), so ``h``, the
  gated ``h`` (gated in fp32) and each GEMM's output are rounded to bf16, as the Triton path rounds
  the gated intermediate; the grouped form sums a token's k experts' contributions in fp32.
* Triton: the shrink dots take x / A in their dtype with fp32 accumulation (fp32 inputs: IEEE
  fp32, not tf32). The gated intermediate is rounded to the weights' dtype for the expand
  (tensor cores) for bf16 (fp32's exponent range: it cannot overflow) and fp32; for fp16 it stays
  fp32 and the expand runs on fp32 operands (tf32 tensor cores, whose 10-bit mantissa is fp16's),
  so ``|h|`` beyond 65504 does not overflow. The backward kernels do the same for dh = w u and h.
* float64: no Triton kernel; float64 inputs run the PyTorch kernels on every device (gradcheck).

Isolation: a token's output and gradients depend only on the experts it is routed to (and an
expert's gradients only on its tokens): inf / NaN in the weights of an expert a token does not use,
in the gate of an empty slot or in x rows of other tokens never reach it. On the CPU path the dense
forward GEMMs are checked for non-finite results and, if any, redone per expert; the Triton
token-major kernel zeroes non-finite B entries in its dense dot and sets the outputs of tokens
routed to such an expert to NaN (the per-expert form gives inf or NaN there). The dense PyTorch
backward (``routed_lora_backward_dense``, CUDA tensors) does the same without a host sync: it
zeroes the non-finite entries of x, grad_y and A in its GEMMs and sets NaN exactly where the
per-expert form is non-finite (0/1 mask GEMMs, 1/r of the main GEMMs' FLOPs). On CPU tensors the
fast dense backward checks all its gradients with one reduction and, if any is non-finite, runs
``routed_lora_backward_dense`` (an inf / NaN input always reaches that sum: 0 * inf is NaN).
"""

from __future__ import annotations

import functools
import math

import torch

from .. import _backend
from .._checks import (FLOAT_DTYPES, INDEX_DTYPES, check, check_index_range, check_no_alias,
                       check_shape, check_tensor, check_writable)
from .._tiles import cdiv, pow2_at_least
from ..reference.routed_lora import (NEEDS_ALL, gates_and_routes, routed_lora_backward_dense,
                                     routed_lora_backward_ref, routed_lora_ref)
from ._registry import LIB, OPS, register_op

MAX_SLICES_PER_LAUNCH = 3
#: Accepted x / weight / gate dtypes: the Triton kernels' fp16 / bf16 / fp32, plus float64 (run by
#: the PyTorch kernels on every device, for gradcheck).
DTYPES = FLOAT_DTYPES + (torch.float64,)


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


def _routed_metadata_ok(x, lora_a, lora_b, expert_ids, gates, scaling):
    """The metadata checks of :func:`_check_routed_metadata` as one boolean pass, no messages built
    (decode calls are host-bound: this keeps validation at a few microseconds). Returns
    (T, d_in, E, k, d_out), or None when something is wrong (the detailed pass then says what)."""
    T_ = torch.Tensor
    if not (isinstance(x, T_) and x.dim() == 2 and x.dtype in DTYPES and isinstance(lora_a, (list, tuple))
            and isinstance(lora_b, (list, tuple)) and 0 < len(lora_a) == len(lora_b)):
        return None
    T, d_in = x.shape
    dt, dev = x.dtype, x.device
    E = lora_a[0].shape[0] if isinstance(lora_a[0], T_) and lora_a[0].dim() == 3 else 0
    d_out = 0
    for a, b in zip(lora_a, lora_b):
        if not (isinstance(a, T_) and isinstance(b, T_) and a.dim() == 3 and b.dim() == 3
                and a.dtype == dt and b.dtype == dt and a.device == dev and b.device == dev):
            return None
        ea, r, da = a.shape
        eb, n, rb = b.shape
        if not (ea == E and eb == E and da == d_in and r >= 1 and rb == r):
            return None
        d_out += n
    if not (E > 0 and isinstance(expert_ids, T_) and expert_ids.dim() == 2
            and expert_ids.dtype in INDEX_DTYPES and expert_ids.device == dev
            and expert_ids.shape[0] == T and isinstance(gates, T_) and gates.dim() == 2
            and gates.dtype in DTYPES and gates.device == dev
            and tuple(gates.shape) == tuple(expert_ids.shape)
            and isinstance(scaling, (int, float)) and math.isfinite(scaling)):
        return None
    return T, d_in, E, expert_ids.shape[1], d_out


def _check_routed(op, x, lora_a, lora_b, expert_ids, gates, scaling):
    """The checks every routed_lora op shares; errors name ``op``. Returns (T, d_in, E, k, d_out)."""
    info = _routed_metadata_ok(x, lora_a, lora_b, expert_ids, gates, scaling)
    if info is None:
        info = _check_routed_metadata(op, x, lora_a, lora_b, expert_ids, gates, scaling)
    if _backend.check_values(expert_ids) and expert_ids.numel():
        lo, hi = torch.aminmax(expert_ids)
        if int(lo) < -1 or int(hi) >= info[2]:
            check_index_range(op, "expert_ids", expert_ids, -1, info[2])
    return info


def _check_routed_metadata(op, x, lora_a, lora_b, expert_ids, gates, scaling):
    """The metadata checks one by one, each failure with its message."""
    check_tensor(op, "x", x, ndim=2, dtypes=DTYPES)
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
    check_tensor(op, "gates", gates, ndim=2, dtypes=DTYPES, device=dev)
    check_shape(op, "gates", gates, (T, k))
    check(isinstance(scaling, (int, float)) and math.isfinite(scaling), op, "scaling",
          f"must be a finite float, got {scaling!r}")
    return T, d_in, E, k, d_out


def validate_routed_lora(x, lora_a, lora_b, expert_ids, gates, scaling):
    """Metadata checks (fake-safe) plus, where ``check_values`` allows, the expert-id range.
    Returns (T, d_in, E, k, d_out)."""
    return _check_routed("routed_lora", x, lora_a, lora_b, expert_ids, gates, scaling)


def validate_routed_lora_add(out, x, lora_a, lora_b, expert_ids, gates, scaling):
    """As :func:`validate_routed_lora` (errors name ``routed_lora_add_``), plus ``out``: shape,
    dtype, no overlapping elements (no ``expand()``-ed view) and no memory shared with an input."""
    op = "routed_lora_add_"
    info = _check_routed(op, x, lora_a, lora_b, expert_ids, gates, scaling)
    T, _, _, _, d_out = info
    check_tensor(op, "out", out, ndim=2, dtypes=DTYPES, device=x.device)
    check_shape(op, "out", out, (T, d_out))
    check_writable(op, "out", out)
    check_no_alias(op, "out", out, dict(x=x, lora_a=lora_a, lora_b=lora_b, expert_ids=expert_ids,
                                        gates=gates))
    return info


def validate_routed_lora_backward(grad_y, x, lora_a, lora_b, expert_ids, gates, scaling, needs=None):
    """As :func:`validate_routed_lora` (errors name ``routed_lora_backward``), plus ``grad_y``
    ``[T, d_out]`` and ``needs`` (None or four bools: dx, dA, dB, d_gates)."""
    op = "routed_lora_backward"
    info = _check_routed(op, x, lora_a, lora_b, expert_ids, gates, scaling)
    T, _, _, _, d_out = info
    check_tensor(op, "grad_y", grad_y, ndim=2, dtypes=DTYPES, device=x.device)
    check_shape(op, "grad_y", grad_y, (T, d_out))
    check(needs is None or (isinstance(needs, (list, tuple)) and len(needs) == 4
                            and all(isinstance(n, bool) for n in needs)), op, "needs",
          f"must be None or four bools [dx, dA, dB, d_gates], got {needs!r}")
    return info


def _needs(needs):
    return NEEDS_ALL if needs is None else tuple(bool(n) for n in needs)


# ------------------------------------------------------------------------------------------
# strategy, splits, kernel arguments
# ------------------------------------------------------------------------------------------


def choose_strategy(E: int, ranks, k: int = 1) -> str:
    """``token_major`` if the padded ``E * r`` rows of every slice fit the register budget, else
    ``dense_gemm`` for dense-ish routing (``2 k >= E``), else ``expert_sorted``."""
    if max(pow2_at_least(E * r) for r in ranks) <= 256:
        return "token_major"
    return "dense_gemm" if 2 * k >= E else "expert_sorted"


def _groups(n):
    return [list(range(i, min(i + MAX_SLICES_PER_LAUNCH, n))) for i in range(0, n, MAX_SLICES_PER_LAUNCH)]


def col_offsets(lora_b):
    """First output column of each slice."""
    cols, o = [], 0
    for b in lora_b:
        cols.append(o)
        o += b.shape[1]
    return cols


def slice_kwargs(lora_a, lora_b, idx, *, slots=MAX_SLICES_PER_LAUNCH, a=True, b=True, cols=True,
                 rank="r", row_offsets=None, grads=None):
    """THE builder of the per-slice keyword arguments of every routed_lora kernel launch.

    Slot ``j`` (``0 <= j < slots``) of the launch holds slice ``idx[j]``; slots past
    ``len(idx)`` repeat ``idx[0]`` and are never touched by the kernels (``NUM_SLICES``). Per slot,
    with ``cols``: ``n{j}`` (width) and ``col{j}`` (first output column); with ``a``: ``a{j}_ptr`` and
    ``stride_a{j}e / r / k`` (lora_a ``[E, r, d_in]``); with ``b``: ``b{j}_ptr`` and
    ``stride_b{j}e / n / r`` (lora_b ``[E, d_out, r]``); ``rank="r"``: runtime ``r{j}`` and its
    padded ``RP{j}`` (constexpr), ``rank="R"``: constexpr ``R{j}`` and ``ER{j}`` (padded ``E*r``;
    16 for unused slots); ``row_offsets``: ``ro{j}`` (column of the slice in an fp32 [pairs, sum r]
    workspace); ``grads`` = (dA list, dB list): ``da{j}_ptr`` / ``db{j}_ptr``.
    """
    pad = list(idx) + [idx[0]] * (slots - len(idx))
    first_col = col_offsets(lora_b)
    kw = {"NUM_SLICES": len(idx)} if slots > 1 else {}
    for j, s in enumerate(pad):
        A, B = lora_a[s], lora_b[s]
        r = A.shape[1]
        if cols:
            kw[f"n{j}"] = B.shape[1]
            kw[f"col{j}"] = first_col[s]
        if a:
            kw[f"a{j}_ptr"] = A
            kw.update({f"stride_a{j}{d}": st for d, st in zip("erk", A.stride())})
        if b:
            kw[f"b{j}_ptr"] = B
            kw.update({f"stride_b{j}{d}": st for d, st in zip("enr", B.stride())})
        if rank == "r":
            kw[f"r{j}"] = r
            kw[f"RP{j}"] = pow2_at_least(r)
        else:
            kw[f"R{j}"] = r
            kw[f"ER{j}"] = pow2_at_least(A.shape[0] * r) if j < len(idx) else 16
        if row_offsets is not None:
            kw[f"ro{j}"] = row_offsets[s]
        if grads is not None:
            kw[f"da{j}_ptr"] = grads[0][s]
            kw[f"db{j}_ptr"] = grads[1][s]
    return kw


def kernel_numerics(dtype):
    """Constexprs shared by every launch: DOT_FP32 (bf16 under the interpreter, see
    ``_backend.dot_fp32``), H_FP32 (fp16: the gated rank-sized intermediate stays fp32 into the
    expand, it could overflow fp16) and IEEE (fp32 inputs: full fp32 products, not tf32)."""
    return dict(DOT_FP32=_backend.dot_fp32(dtype), H_FP32=dtype == torch.float16,
                IEEE=dtype == torch.float32)


def decode_shares(x, programs: int, max_shares: int) -> int:
    """Programs per row tile: 1 when the row tiles alone give at least half a wave (prefill), else
    about two programs per SM in all, at most ``max_shares`` (at most 2 under the interpreter, to
    keep its grids small; tests force larger splits)."""
    if programs >= _backend.sm_count(x) // 2:
        return 1
    per = cdiv(2 * _backend.sm_count(x), max(programs, 1))
    if _backend.INTERPRET:
        per = min(per, 2)
    return max(1, min(per, max_shares))


def plan_splits(x, programs, n_tiles, d_in, block_k, a_over_b, splits=None):
    """(NSPLIT, KSPLIT, K_CHUNK): how many column shares and d_in chunks each row tile is cut into.

    Nothing is split when the row tiles alone give at least half a wave (prefill). Otherwise (decode)
    ``decode_shares`` programs per row tile, cutting d_in and the columns in the ratio of the A and
    B bytes each program would read (``a_over_b``), so that every program moves about the same
    number of bytes. ``splits`` overrides the choice (tests).
    """
    kmax = cdiv(d_in, block_k)
    if splits is not None:
        nsplit, ksplit = splits
    else:
        per = decode_shares(x, programs, kmax * n_tiles)
        ksplit = max(1, min(int(round(math.sqrt(per * a_over_b))), kmax, per))
        nsplit = max(1, min(per // ksplit, n_tiles))
    if _backend.deterministic():  # d_in chunks add up with fp32 atomics; column shares do not
        ksplit = 1
    k_chunk = cdiv(cdiv(d_in, max(1, ksplit)), block_k) * block_k
    return max(1, nsplit), max(1, cdiv(d_in, k_chunk)), k_chunk


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


def token_major_tiles(T: int, er: int, h_fp32: bool = False):
    """(BLOCK_T, BLOCK_N, BLOCK_K, num_warps, num_stages) for a slice of ``er`` padded E*r rows.

    BLOCK_T: the weights are re-read (from L2) once per token tile, so a tall tile keeps that
    traffic below the x and y traffic at prefill; it is bounded by the registers of the fp32
    [BLOCK_T, ER] shrink tile. Every table entry compiles for sm_90 without register spills
    (tests/test_sm90_compile.py checks it).
    """
    if _backend.INTERPRET:
        return min(64, 16384 // er, pow2_at_least(T)), 32, 32, 4, 1
    # From compiling the candidates for sm_90 (triton 3.9, launch-time specialisation): the
    # tallest tiles without register spills (128 x 128 at E*r = 128 uses ~166 registers).
    block_t, block_n = {16: (128, 128), 32: (128, 128), 64: (128, 64), 128: (128, 128), 256: (64, 128)}[er]
    if h_fp32:  # fp16: the [BLOCK_T, ER] gated tile and the [ER, BLOCK_N] B tile are fp32 in the expand
        block_t, block_n = min(block_t, 8192 // er), min(block_n, 16384 // er)
    block_t = min(block_t, pow2_at_least(T))
    return block_t, block_n, 64, 8 if block_t * er >= 4096 else 4, 2


def _token_major(x, lora_a, lora_b, ids, gates, scaling, y, accumulate, splits=None):
    from ..kernels.routed_lora import _routed_lora_token_major_kernel

    T, d_in = x.shape
    launches = []
    for idx in _groups(len(lora_a)):
        kw = slice_kwargs(lora_a, lora_b, idx, rank="R")
        er_max = max(kw[f"ER{j}"] for j in range(len(idx)))
        block_t, block_n, block_k, warps, stages = token_major_tiles(T, er_max, x.dtype == torch.float16)
        widths = [lora_b[s].shape[1] for s in idx]
        n_tiles = max(cdiv(w, block_n) for w in widths)
        n_t = cdiv(T, block_t)
        a_over_b = d_in * len(idx) / sum(widths)
        nsplit, ksplit, k_chunk = plan_splits(x, n_t * len(idx), n_tiles, d_in, block_k, a_over_b, splits)
        kw.update(K_CHUNK=k_chunk, BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_N=block_n, NSPLIT=nsplit,
                  KSPLIT=ksplit, ATOMIC=ksplit > 1, num_warps=warps, num_stages=stages)
        launches.append(((n_t * len(idx) * nsplit * ksplit,), kw))
    # One destination for every slice group (their columns are disjoint).
    dst = _destination(y, accumulate, any(kw["ATOMIC"] for _, kw in launches))
    for grid, kw in launches:
        _routed_lora_token_major_kernel[grid](
            x_ptr=x, ids_ptr=ids, gates_ptr=gates, y_ptr=dst, T=T, D_IN=d_in,
            E=lora_a[0].shape[0], K=ids.shape[1],
            stride_xt=x.stride(0), stride_xk=x.stride(1), stride_it=ids.stride(0),
            stride_ik=ids.stride(1), stride_gt=gates.stride(0), stride_gk=gates.stride(1),
            stride_yt=dst.stride(0), stride_yn=dst.stride(1), scaling=float(scaling),
            ACCUMULATE=accumulate and dst is y, **kernel_numerics(x.dtype), **kw)
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
    max_blocks = cdiv(P, block_m) + E
    b = torch.arange(max_blocks, device=ids.device)
    blk_expert = torch.searchsorted(blk_cum, b, right=True)
    e_c = blk_expert.clamp(max=E - 1)
    first_blk = blk_cum[e_c] - nblk[e_c]
    blk_start = starts[e_c] + (b - first_blk) * block_m
    blk_end = starts[e_c] + counts[e_c]
    return (order.to(torch.int32), blk_expert.to(torch.int32), blk_start.to(torch.int32),
            blk_end.to(torch.int32), max_blocks)


def sorted_meta_kwargs(sorted_meta):
    order, blk_e, blk_s, blk_t, _ = sorted_meta
    return dict(order_ptr=order, blk_expert_ptr=blk_e, blk_start_ptr=blk_s, blk_end_ptr=blk_t)


def sorted_block_m(P: int, E: int) -> int:
    """Rows per expert-sorted block: 64 once experts average more than 64 pairs, else 16."""
    return 16 if (_backend.INTERPRET or P <= 64 * E) else 64


def sorted_config(x, P, E, lora_a, lora_b, splits=None):
    """(BLOCK_M, BLOCK_N, BLOCK_K, NSPLIT, KSPLIT, K_CHUNK) of the expert-sorted forward."""
    interp = _backend.INTERPRET
    block_m = sorted_block_m(P, E)
    # BLOCK_M = 64 rows: 64-wide column tiles at 8 warps, BLOCK_M = 16: 128 wide at 4 warps, the
    # widest tiles that compile for sm_90 without register spills (tests/test_sm90_compile.py).
    block_n = 32 if interp else (64 if block_m >= 64 else 128)
    block_k = 32 if interp else 64
    d_in = x.shape[1]
    n_tiles = sum(cdiv(b.shape[1], block_n) for b in lora_b)
    # Blocks that will really have rows: one per active expert at decode, ~P / BLOCK_M at prefill.
    est_blocks = max(cdiv(P, block_m), min(E, P))
    a_over_b = d_in * sum(a.shape[1] for a in lora_a) / sum(b.shape[1] * b.shape[2] for b in lora_b)
    nsplit, ksplit, k_chunk = plan_splits(x, est_blocks, n_tiles, d_in, block_k, a_over_b, splits)
    return block_m, block_n, block_k, nsplit, ksplit, k_chunk


def _expert_sorted(x, lora_a, lora_b, ids, gates, scaling, y, accumulate, splits=None):
    from ..kernels.routed_lora import _routed_lora_sorted_kernel

    T, d_in = x.shape
    E, K = lora_a[0].shape[0], ids.shape[1]
    P = T * K
    block_m, block_n, block_k, nsplit, ksplit, k_chunk = sorted_config(x, P, E, lora_a, lora_b, splits)
    meta = sort_pairs(ids, E, block_m)
    # k == 1 without a d_in split: every token is one row of exactly one block, so rows are
    # stored without atomics (tokens whose only slot is empty get no row: y is zeroed first).
    atomic = K > 1 or ksplit > 1
    dst = _destination(y, accumulate, atomic)
    if not atomic and not accumulate:
        y.zero_()
    for idx in _groups(len(lora_a)):
        _routed_lora_sorted_kernel[(meta[-1] * nsplit * ksplit,)](
            x_ptr=x, gates_ptr=gates, y_ptr=dst, **sorted_meta_kwargs(meta), D_IN=d_in, K_CHUNK=k_chunk,
            E=E, K=K, stride_xt=x.stride(0), stride_xk=x.stride(1), stride_gt=gates.stride(0),
            stride_gk=gates.stride(1), stride_yt=dst.stride(0), stride_yn=dst.stride(1),
            scaling=float(scaling), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n,
            NSPLIT=nsplit, KSPLIT=ksplit, ATOMIC=atomic, ACCUMULATE=accumulate and dst is y,
            num_warps=8 if block_m >= 64 else 4, **kernel_numerics(x.dtype),
            **slice_kwargs(lora_a, lora_b, idx))
    _finish(y, dst, accumulate)


def _dense_gemm(x, lora_a, lora_b, ids, gates, scaling, y, accumulate, splits=None):
    """Dense routing with large E*r: two cuBLAS GEMMs per slice around an fp32 gate scaling.

    Isolation without a host sync: the gating is a torch.where on the route mask (an unused
    expert's inf / NaN in h does not reach a token), the expand GEMM runs on B with its non-finite
    entries zeroed, and the outputs of tokens routed to an expert with a non-finite B entry in a
    column are set to NaN there (what the per-expert form gives is inf or NaN). fp16: h and the
    expand in fp32 (no fp16 overflow of the rank-sized intermediate)."""
    T = x.shape[0]
    E = lora_a[0].shape[0]
    cdt = torch.float32 if x.dtype == torch.float16 else x.dtype
    gm, routed = gates_and_routes(ids, gates, E)  # [T, E] fp32, empty / out-of-range slots dropped
    gm = gm * scaling
    for a, b, col in zip(lora_a, lora_b, col_offsets(lora_b)):
        r, n = a.shape[1], b.shape[1]
        h = x.to(cdt) @ a.reshape(E * r, -1).to(cdt).t()
        hg = torch.where(routed.unsqueeze(-1), h.view(T, E, r).float() * gm.unsqueeze(-1), 0)
        b_cat = b.permute(1, 0, 2).reshape(n, E * r)
        finite = torch.isfinite(b_cat)
        ys = hg.to(cdt).view(T, E * r) @ torch.where(finite, b_cat, 0).to(cdt).t()
        bad_cols = (~finite).view(n, E, r).any(-1).t()  # [E, n]: expert e has a non-finite B[e, col]
        ys = torch.where(routed.to(cdt) @ bad_cols.to(cdt) > 0, float("nan"), ys)
        if accumulate:
            y[:, col:col + n] += ys
        else:
            y[:, col:col + n] = ys


_STRATEGIES = {"token_major": _token_major, "expert_sorted": _expert_sorted, "dense_gemm": _dense_gemm}


def routed_lora_triton(x, lora_a, lora_b, expert_ids, gates, scaling, *, out=None, strategy=None,
                       splits=None):
    """Launcher (called after validation): allocate, pick a strategy (``choose_strategy`` unless
    given), launch. With ``out``, adds into it in place (the ``routed_lora_add_`` launcher) and
    returns it. ``strategy`` and ``splits`` = (column shares, d_in chunks) override the heuristics
    (tests, benchmarks). float64 inputs run the PyTorch kernels (no float64 Triton kernel)."""
    if x.dtype == torch.float64:
        return _routed_lora_torch(x, lora_a, lora_b, expert_ids, gates, scaling, out)
    T, d_in = x.shape
    k = expert_ids.shape[1]
    d_out = sum(b.shape[1] for b in lora_b)
    accumulate = out is not None
    y = out if accumulate else torch.empty(T, d_out, dtype=x.dtype, device=x.device)
    if T == 0 or d_out == 0:
        return y
    if k == 0 or d_in == 0:  # nothing routed, or an empty reduction: y = 0
        return y if accumulate else y.zero_()
    strategy = strategy or choose_strategy(lora_a[0].shape[0], [a.shape[1] for a in lora_a], k)
    if strategy == "expert_sorted" and k > 1 and _backend.deterministic():
        strategy = "dense_gemm"  # the sorted kernel scatters k > 1 rows with fp32 atomics
    if strategy not in _STRATEGIES:
        raise ValueError(f"routed_lora: strategy must be one of {list(_STRATEGIES)}, got {strategy!r}")
    _STRATEGIES[strategy](x, lora_a, lora_b, expert_ids, gates, scaling, y, accumulate, splits)
    return y


def routed_lora_add_triton(out, x, lora_a, lora_b, expert_ids, gates, scaling):
    """Launcher of ``routed_lora_add_``: ``routed_lora_triton`` adding into ``out``."""
    routed_lora_triton(x, lora_a, lora_b, expert_ids, gates, scaling, out=out)


def _grad_workspace(t):
    """Zeroed fp32 accumulator for the gradient of ``t`` (contiguous, as the kernels index it)."""
    return torch.zeros(t.shape, dtype=torch.float32, device=t.device)


def routed_lora_backward_sorted(grad_y, x, lora_a, lora_b, expert_ids, gates, scaling, needs=None,
                                splits=None):
    """Triton backward of the expert-sorted regime: (dx, [dA_s], [dB_s], d_gates), no host sync.
    Called after validation.

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
       workspaces, cast to the input dtypes at the end.

    ``needs`` = (dx, dA, dB, d_gates): a gradient not needed gets no workspace and no work (its
    code is compiled out) and comes back as an empty tensor of its dtype (one per slice for dA /
    dB). At prefill the blocks fill the GPU and nothing is split; at decode (few blocks) KSPLIT /
    NSPLIT are ``decode_shares`` (the rule of ``plan_splits``) of each launch's tiles.
    ``splits`` = (NSPLIT, KSPLIT) overrides (tests). Gradients come back contiguous, in the
    inputs' dtypes (d_gates in gates' dtype).
    """
    from ..kernels.routed_lora import _routed_lora_bwd_expand_kernel, _routed_lora_bwd_shrink_kernel

    need_x, need_a, need_b, need_g = _needs(needs)
    T, d_in = x.shape
    E, K = lora_a[0].shape[0], expert_ids.shape[1]
    dev = x.device
    gx = torch.zeros(T, d_in, dtype=torch.float32, device=dev) if need_x else None
    ga = [_grad_workspace(a) for a in lora_a] if need_a else None
    gb = [_grad_workspace(b) for b in lora_b] if need_b else None
    P = T * K
    gg = torch.zeros(P, dtype=torch.float32, device=dev) if need_g else None
    if P > 0 and d_in > 0 and any((need_x, need_a, need_b, need_g)):
        interp = _backend.INTERPRET
        block_m = sorted_block_m(P, E)
        block_k = 32 if interp else 64
        block_n = 32 if interp else 64
        rsum = sum(a.shape[1] for a in lora_a)
        est_blocks = max(cdiv(P, block_m), min(E, P))
        n_tiles = cdiv(d_in, block_k) + sum(cdiv(b.shape[1], block_n) for b in lora_b)
        if splits is not None:
            nsplit, ksplit = splits
        else:  # decode: about two programs per SM in each launch
            nsplit = ksplit = decode_shares(x, est_blocks, n_tiles)
        meta = sort_pairs(expert_ids, E, block_m)
        # Sorted rows' h and u; zeroed only when split shares add into them.
        alloc = torch.zeros if ksplit > 1 else torch.empty
        h_ws = alloc(P, rsum, dtype=torch.float32, device=dev)
        u_ws = alloc(P, rsum, dtype=torch.float32, device=dev)
        ro = [sum(a.shape[1] for a in lora_a[:s]) for s in range(len(lora_a))]  # workspace columns
        groups = _groups(len(lora_a))
        # A gradient that is not needed: its kernel pointer is a placeholder that is never touched.
        grads = ([g if g is not None else [x] * len(lora_a) for g in (ga, gb)])
        num = kernel_numerics(x.dtype)
        if num["H_FP32"]:  # fp16: dh and h stay fp32, so every dot of the expand takes fp32 operands
            num["DOT_FP32"] = True
        # 8 warps for 64-row blocks: at 4 warps the [64, 64] fp32 dx / dA / dB tiles next to the
        # per-slice dh tiles exceed 255 registers per thread and spill (tests/sm90_compile).
        common = dict(x_ptr=x, dy_ptr=grad_y, gates_ptr=gates, h_ptr=h_ws, u_ptr=u_ws,
                      **sorted_meta_kwargs(meta), D_IN=d_in, E=E, K=K,
                      stride_xt=x.stride(0), stride_xk=x.stride(1), stride_dyt=grad_y.stride(0),
                      stride_dyn=grad_y.stride(1), stride_gt=gates.stride(0),
                      stride_gk=gates.stride(1), stride_hw=h_ws.stride(0),
                      BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, DOT_FP32=num["DOT_FP32"],
                      IEEE=num["IEEE"], num_warps=8 if block_m >= 64 else 4)
        for idx in groups:
            _routed_lora_bwd_shrink_kernel[(meta[-1] * ksplit,)](
                KSPLIT=ksplit, ATOMIC=ksplit > 1, **common,
                **slice_kwargs(lora_a, lora_b, idx, row_offsets=ro))
            _routed_lora_bwd_expand_kernel[(meta[-1] * nsplit,)](
                dx_ptr=gx if need_x else x, dg_ptr=gg if need_g else x,
                stride_dxt=gx.stride(0) if need_x else 0, scaling=float(scaling), NSPLIT=nsplit,
                GATE_ATOMIC=len(groups) > 1, NEED_DX=need_x, NEED_DA=need_a, NEED_DB=need_b,
                NEED_DG=need_g, H_FP32=num["H_FP32"], **common,
                **slice_kwargs(lora_a, lora_b, idx, b=False, row_offsets=ro, grads=grads))
    return (gx.to(x.dtype) if need_x else x.new_empty(0),
            [g.to(a.dtype) for g, a in zip(ga, lora_a)] if need_a else [a.new_empty(0) for a in lora_a],
            [g.to(b.dtype) for g, b in zip(gb, lora_b)] if need_b else [b.new_empty(0) for b in lora_b],
            gg.view(T, K).to(gates.dtype) if need_g else gates.new_empty(0))


def routed_lora_backward_triton(grad_y, x, lora_a, lora_b, expert_ids, gates, scaling, needs=None):
    """Launcher of the backward: the expert-sorted Triton kernels where the forward runs
    ``expert_sorted``; elsewhere the dense masked form in PyTorch on the device (a handful of
    GEMMs, no host sync); float64, and deterministic mode (the sorted kernels add with fp32
    atomics): the PyTorch kernels."""
    E, k = lora_a[0].shape[0], expert_ids.shape[1]
    if (x.dtype != torch.float64 and not _backend.deterministic()
            and choose_strategy(E, [a.shape[1] for a in lora_a], k) == "expert_sorted"):
        return routed_lora_backward_sorted(grad_y, x, lora_a, lora_b, expert_ids, gates, scaling, needs)
    return routed_lora_backward_cpu(grad_y, x, lora_a, lora_b, expert_ids, gates, scaling, needs)


# ------------------------------------------------------------------------------------------
# CPU kernels (plain PyTorch; they also run CUDA tensors under LORAMIX_BACKEND=reference)
# ------------------------------------------------------------------------------------------


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=64)
def _column_experts(E: int, ranks: tuple, device: torch.device) -> torch.Tensor:
    """Expert of each column of the slices' concatenated ``[T, sum_s E * r_s]`` rank space (slice
    major, then expert, then rank): gathers the ``[T, E]`` gate matrix onto those columns."""
    return torch.cat([torch.arange(E, device=device).repeat_interleave(r) for r in ranks])


@functools.lru_cache(maxsize=64)
def _column_slices(d_outs: tuple, device: torch.device) -> torch.Tensor:
    """``[1, 1, sum d_outs]`` int64: the slice of each output column."""
    return torch.cat([torch.full((n,), s, dtype=torch.long, device=device)
                      for s, n in enumerate(d_outs)]).view(1, 1, -1)


def _gate_matrix(expert_ids, gates, E, scaling, acc):
    """``gm [T, E + 1]`` in ``acc``: scaling * the summed gate of each expert per token, column E
    holding the empty / out-of-range slots (never read, so a NaN gate there stays out); and ``idx``
    ``[T, k]`` int64, the column of each slot. One scatter, no route mask (the CPU dense paths
    check their result instead)."""
    if _backend.check_values(expert_ids):  # validated: ids in [-1, E), one op fewer
        idx = expert_ids.long().remainder(E + 1)  # -1 -> E
    else:  # unchecked values (CUDA, value checks off): clamp, -1 and out of range -> E
        idx = expert_ids.clamp(-1, E).long().remainder_(E + 1)
    g = gates if gates.dtype == acc else gates.to(acc)
    if scaling != 1.0:
        g = g * scaling
    gm = torch.zeros(expert_ids.shape[0], E + 1, dtype=acc, device=gates.device).scatter_add_(1, idx, g)
    return gm, idx


def _packed_a(lora_a, acc):
    """All slices' A as one ``[sum_s E * r_s, d_in]`` matrix in ``acc`` (one copy, converted after
    the concatenation: a converting ``cat`` takes a slow path)."""
    d_in = lora_a[0].shape[2]
    if len(lora_a) == 1:
        return lora_a[0].reshape(-1, d_in).to(acc)
    if len({a.shape[1] for a in lora_a}) == 1:  # equal ranks: one cat of the [E, r, d_in] tensors
        return torch.cat(lora_a).to(acc).view(-1, d_in)
    return torch.cat([a.reshape(-1, d_in) for a in lora_a]).to(acc)


def _packed_b(b, acc):
    """One slice's B ``[E, n, r]`` as B_cat ``[n, E * r]`` in ``acc`` (columns expert-major, like
    the packed A's rows): one copy that converts and repacks (this permutation copies about 1.5x
    faster than the ``[E * r, n]`` one: contiguous runs of r)."""
    E, n, r = b.shape
    return b.permute(1, 0, 2).to(acc, memory_format=torch.contiguous_format).reshape(n, E * r)


@functools.lru_cache(maxsize=256)
def dense_cheaper_cpu(T, d_in, E, ranks, d_outs, k, backward=False) -> bool:
    """CPU: whether the dense masked form (every expert, a few large GEMMs) beats the per-expert
    loop (only routed work, but a few small ops per expert and slice).

    A cost model in units of one weight element converted to fp32 (about 0.5 ns): a multiply-add
    costs 1/12 (one core's fp32 GEMM vs copy throughput), a small op 16000 (about 8 us of host
    time with its Python). Forward: dense converts every expert's weights, the loop only the
    active experts'. Backward: dense also writes, checks and converts every expert's dA / dB
    (4 passes over all weights), the loop zero-fills and converts them (2 passes); 3x the GEMM
    work of the forward on both sides. Measured on a 2-core AVX-512 EPYC, 1 thread, bf16, to
    check it: the benchmark's quick shapes (d_in 64, E 8-32) run 2-10x faster dense (model:
    dense); packed q/k/v at d_in 4096, E 8, r 16, top-2, forward: per-expert 2x faster at T 1,
    even at T 8 and 32 (model: dense at 8, per-expert at 32), per-expert 1.3x faster at T 128;
    64 experts top-3, T 1-16: per-expert 6-40x faster; backward at T 4 / 16 / 64: per-expert
    1.35x / 1.0x / 1.4x faster (model: per-expert from T 4 on).
    """
    if k >= E:
        return True
    dense, per_expert = _cpu_costs(T, d_in, E, ranks, d_outs, k, backward)
    return dense <= per_expert


#: One small op's host time (about 8 us with its Python), in the CPU cost model's units.
_OP_COST = 16000


def _cpu_costs(T, d_in, E, ranks, d_outs, k, backward=False):
    """``(dense, per_expert)`` costs of ``dense_cheaper_cpu``'s model."""
    active = min(E, T * k)  # experts the per-expert loop visits (at most)
    w = sum(r * (d_in + n) for r, n in zip(ranks, d_outs))  # weights of one expert, all slices
    mac = (3 if backward else 1) * w / 12  # GEMM cost of one (token, expert) pair
    if backward:
        dense = 4 * E * w + T * E * mac
        per_expert = 2 * E * w + active * w + T * k * mac + active * _OP_COST * (6 * len(ranks) + 4)
    else:
        dense = E * w + T * E * mac
        per_expert = active * w + T * k * mac + active * _OP_COST * (4 * len(ranks) + 4)
    return dense, per_expert


def grouped_cost_cpu(d_in, E, ranks, d_outs, cap) -> float:
    """Forward cost of the expert-grouped form (``_sparse_forward``) in ``dense_cheaper_cpu``'s
    units: every expert's weights converted once, ``E * cap`` rows of GEMM work, each row's x
    gathered (a plain copy: 0.4 of a converted weight per element) and its ``d_out`` outputs
    written, concatenated and added into y (6 per element: k times y's size in fresh temporaries),
    and ~12 + 2 S small ops (the plan's sort included). Fitted to the measurements in
    ``forward_form_cpu``."""
    w = sum(r * (d_in + n) for r, n in zip(ranks, d_outs))
    return E * w + E * cap * (w / 12 + 0.4 * d_in + 6 * sum(d_outs)) + _OP_COST * (12 + 2 * len(ranks))


@functools.lru_cache(maxsize=256)
def forward_form_cpu(T, d_in, E, ranks, d_outs, k) -> str:
    """CPU forward: ``"dense"`` (the masked form, every expert), ``"loop"`` (per expert, routed
    work only, a few small ops per expert and slice) or ``"grouped"`` (the (token, slot) pairs
    sorted by expert into ``[E, cap]`` rows, one ``bmm`` per product: routed work plus padding,
    a fixed number of ops). Costs of ``dense_cheaper_cpu``'s model, the loop's GEMMs (on gathered
    rows) counted at half the dense form's speed (``_forward_costs``). Grouped only at sparse
    routing (``4 k <= E``), where its cost (``grouped_cost_cpu``) at a balanced routing
    (``cap = ceil(T k / E)``) beats both others; the caller then checks the real ``cap``
    (``grouped_accepts``).

    Measured on the 2-core AVX-512 EPYC, 1 thread, fp32, against the model: top-2 of 8 at T 64-512
    (d_in 512-4096): grouped 1.1-1.9x faster than the better of the others (model: grouped);
    T 16-32 at d_in 64-512: dense 1.1-1.5x faster (model: dense); top-2 of 64 at d_in 4096: loop
    2x faster at T 16 (model: loop), grouped 1.35x faster at T 64 (model: grouped); top-3 of 6 at
    T 1024-2048, d_in 256: dense 1.7x faster than the loop (model: dense); top-2 of 8 at T 4096,
    d_in 256: grouped 1.7x slower than dense and loop (its k-times-y temporaries; model: loop);
    top-2 of 64 at T 2048, d_in 256: grouped 3.5x faster than the loop (model: grouped). The
    model misses by at most ~1.3x where it errs (top-2 of 8: T 128 at d_in 4096 and T 2048 at
    d_in 512, grouped 1.1-1.3x faster than its loop). Soft routing (k = E): dense."""
    if k >= E:
        return "dense"
    dense, loop = _forward_costs(T, d_in, E, ranks, d_outs, k)
    if 4 * k <= E and E <= T * k and \
            grouped_cost_cpu(d_in, E, ranks, d_outs, -(-T * k // E)) < min(dense, loop):
        return "grouped"
    return "dense" if dense <= loop else "loop"


def _forward_costs(T, d_in, E, ranks, d_outs, k):
    """``(dense, loop)`` forward costs for ``forward_form_cpu``: ``_cpu_costs``, the loop's GEMM
    work counted twice (half speed, as in ``_saved_costs``)."""
    dense, loop = _cpu_costs(T, d_in, E, ranks, d_outs, k)
    return dense, loop + T * k * sum(r * (d_in + n) for r, n in zip(ranks, d_outs)) / 12


def grouped_accepts(T, d_in, E, ranks, d_outs, k, cap) -> bool:
    """Whether the grouped forward still beats the dense form and the loop with the real
    ``cap`` (the most pairs any expert has)."""
    return grouped_cost_cpu(d_in, E, ranks, d_outs, cap) < min(_forward_costs(T, d_in, E, ranks, d_outs, k))


def _dense_on_device(x, lora_a, lora_b, k, backward=False) -> bool:
    """Whether the PyTorch kernels take the dense masked form: CPU tensors where
    ``dense_cheaper_cpu`` says so, except in deterministic mode (``set_deterministic``), which
    keeps the previous, device-independent choice (``choose_strategy``): with the cost model,
    64 experts at T = 4 went dense, and y differed in its last bits between two runs of
    tests/test_routed_lora.py::test_deterministic_mode in a full run of that file, under load (not
    reproduced alone; presumably MKL's run-time choice of threads for the long reduction over the
    E * r columns). Other devices: where the Triton path would run dense."""
    E = lora_a[0].shape[0]
    ranks = tuple(a.shape[1] for a in lora_a)
    if x.device.type == "cpu" and not _backend.deterministic():  # (cached: ranks, widths as tuples)
        return dense_cheaper_cpu(x.shape[0], x.shape[1], E, ranks, tuple(b.shape[1] for b in lora_b), k,
                                 backward)
    return choose_strategy(E, ranks, k) != "expert_sorted"


def _forward_form(x, lora_a, lora_b, k) -> str:
    """The PyTorch forward's form: ``forward_form_cpu`` for CPU tensors (not in deterministic
    mode), else dense or loop as ``_dense_on_device`` says."""
    E = lora_a[0].shape[0]
    if x.device.type == "cpu" and not _backend.deterministic():
        return forward_form_cpu(x.shape[0], x.shape[1], E, tuple(a.shape[1] for a in lora_a),
                                tuple(b.shape[1] for b in lora_b), k)
    return "dense" if _dense_on_device(x, lora_a, lora_b, k) else "loop"


def _gemm_dtype(x, acc, n_cols):
    """The dtype of the CPU dense and grouped forwards' GEMMs, ``n_cols`` the width of the first
    (``E * sum_s r_s``): bf16 for bf16 CPU inputs where the first GEMM has at least 2^22
    multiply-adds or its weights 2^17 elements (oneDNN's bf16 GEMMs accumulate in fp32 at twice
    fp32's throughput and need no conversion of the weights, but cost ~18 us per call: measured,
    1 thread, ``[T, d_in] x [d_in, 384]`` alone is 1.3-3.1x faster than converting to fp32 from
    T 4 / d_in 512 and T 1 / d_in 4096 on, and 2x slower at T 1 / d_in 64; in the whole dense form,
    with its smaller expand GEMMs, T 64 / d_in 64 still ran 1.4x slower in bf16, hence 2^22),
    else ``acc`` (fp16 GEMMs are 3-5x slower than fp32 on CPU; other devices keep ``acc``)."""
    if x.dtype is not torch.bfloat16 or x.device.type != "cpu":
        return acc
    T, d_in = x.shape
    return x.dtype if (T * d_in * n_cols >= 1 << 22 or d_in * n_cols >= 1 << 17) else acc


def _dense_forward_cpu(x, lora_a, lora_b, expert_ids, gates, scaling, acc):
    """The dense masked forward with the fewest ops (decode is host-bound):
    ``y_s = ((x A_cat^T) * G) B_cat_s`` with all slices' A in one GEMM and the gates gathered onto
    the rank columns; the GEMMs in ``_gemm_dtype`` (y in it: ``acc``, or bf16 for bf16 inputs).
    No route mask: a non-finite value anywhere makes y non-finite (0 * inf is NaN), which the
    caller checks; a finite y is then exactly the masked result."""
    T, d_in = x.shape
    E = lora_a[0].shape[0]
    ranks = tuple(a.shape[1] for a in lora_a)
    S, equal = len(ranks), len(set(ranks)) == 1
    gm, _ = _gate_matrix(expert_ids, gates, E, scaling, acc)
    gd = _gemm_dtype(x, acc, E * sum(ranks))
    hg = torch.mm(x.to(gd), _packed_a(lora_a, gd).t())
    # The gating in acc (bf16 GEMMs: h converted, gated, rounded once; a broadcast multiply of
    # bf16 runs 4-5x slower than this round trip through fp32, measured at [2048, 384])
    hf = hg if hg.dtype is acc else hg.to(acc)
    if equal:  # broadcast the [T, E] gates over [T, S, E, r]
        hf.view(T, S, E, ranks[0]).mul_(gm.narrow(1, 0, E).view(T, 1, E, 1))
    else:
        hf.mul_(gm.index_select(1, _column_experts(E, ranks, x.device)))
    if hf is not hg:
        hg = hf.to(gd)
    if S == 1:
        return torch.mm(hg, _packed_b(lora_b[0], gd).t())
    d_outs = tuple(b.shape[1] for b in lora_b)
    d_out = sum(d_outs)
    if T <= 8 and equal:
        # Decode, equal ranks: one repack of every slice's B, one GEMM of each slice's gated h
        # against all of it (S x the expand FLOPs, negligible at T <= 8) and a gather of each
        # column's own slice: 4 heavy ops instead of 3 per slice (measured -10% at T = 1).
        b_cat = torch.cat([b.permute(1, 0, 2) for b in lora_b]).to(gd)  # [d_out, E, r]
        z = torch.mm(hg.view(T * S, -1), b_cat.view(d_out, -1).t()).view(T, S, d_out)
        return z.gather(1, _column_slices(d_outs, x.device).expand(T, 1, d_out)).view(T, d_out)
    y = torch.empty(T, d_out, dtype=gd, device=x.device)
    # torch.split: one call for all slices' views (slicing each costs as much host time)
    for h, ys, b in zip(torch.split(hg, [E * r for r in ranks], 1), torch.split(y, d_outs, 1), lora_b):
        torch.mm(h, _packed_b(b, gd).t(), out=ys)
    return y


@functools.lru_cache(maxsize=256)
def dense_saved_cheaper_cpu(T, d_in, E, ranks, d_outs, k, needs) -> bool:
    """CPU, forward already dense: whether the training step's dense backward on the forward's
    saved tensors (``_train_backward``: no repacking, no recomputed h, no result check) beats the
    per-expert loop. Same units as ``dense_cheaper_cpu``; both sides write every expert's dA / dB
    (one pass each) only where they are needed."""
    if k >= E:
        return True
    dense, per_expert = _saved_costs(T, d_in, E, ranks, d_outs, k, needs)
    return dense <= per_expert


def _saved_costs(T, d_in, E, ranks, d_outs, k, needs):
    """``(dense, per_expert)`` backward costs of ``dense_saved_cheaper_cpu``'s model."""
    need_x, need_a, need_b, need_g = needs
    active = min(E, T * k)
    w = sum(r * (d_in + n) for r, n in zip(ranks, d_outs))
    gemms = (need_x or need_a or need_g) + need_x + need_a + need_b  # d_gates: elementwise
    # A multiply-add at 1/24: one core's fp32 GEMM here (~90 GFLOP/s in the training profiles);
    # the loop's per-expert GEMMs on gathered rows run at half that (measured: top-3 of 6 experts,
    # packed q/k/v at d_in 256, T 1024, joint: the loop 1.3x slower than the dense form, which
    # the model at 1/24 had 1.6x faster; the crossover is now T ~ 200, measured T 256 at parity).
    mac = gemms * w / 24
    writes = 2 * E * w if (need_a or need_b) else 0
    dense = writes + T * E * mac
    per_expert = writes + active * w + 2 * T * k * mac + active * _OP_COST * (6 * len(ranks) + 4)
    return dense, per_expert


@functools.lru_cache(maxsize=64)
def _gate_sum_weights(E: int, ranks: tuple, scaling: float, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """Weights that sum the rank columns of ``U * H`` into each expert's d_gates, scaling
    included: equal ranks, ``[r]`` (a matrix-vector product over the ranks of every (token,
    slice, expert), then a sum over the slices); unequal ranks, ``[E, sum_s E r_s]`` (one GEMM
    against its transpose)."""
    if ranks.count(ranks[0]) == len(ranks):
        return torch.full((ranks[0],), scaling, dtype=dtype, device=device)
    cols = _column_experts(E, ranks, device)
    m = torch.zeros(E, cols.numel(), dtype=dtype, device=device)
    return m.index_put_((cols, torch.arange(cols.numel(), device=device)),
                        torch.tensor(scaling, dtype=dtype, device=device))


@functools.lru_cache(maxsize=64)
def _expert_range(E: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.arange(E, dtype=dtype, device=device)


def _train_gates(expert_ids, gates, E, scaling, acc):
    """The gates of a training step in ``acc``: ``(gE, idx)`` with ``gE`` a ``[T, E]`` matrix
    (view) of scaling * the summed gate of each expert per token and ``idx`` the column of each
    slot in the ``[T, E + 1]`` matrix ``gE`` is columns 1.. of (column 0: the empty slots; their
    gates are never read, so a NaN gate there stays out); ``idx`` is None for dense soft routing
    passed as ``arange(E)`` expanded over the tokens (as ``LoRAMixerLinear`` does): then
    ``gE`` is the gates themselves, scaled, with no scatter.

    Validated values (CPU): the id range is checked by the scatter itself (an id outside
    [-1, E) is an index outside the matrix and makes it raise; the caller then names the
    argument), one reduction and two host reads fewer than ``validate_routed_lora``'s check."""
    g = gates if gates.dtype is acc else gates.to(acc)
    if scaling != 1.0:
        g = g * scaling
    if (expert_ids.shape[1] == E and expert_ids.stride(0) == 0
            and torch.equal(expert_ids[0], _expert_range(E, expert_ids.dtype, expert_ids.device))):
        return g, None
    idx = expert_ids.long() + 1  # -1 -> 0
    if not _backend.check_values(expert_ids):  # unchecked values: out of range -> empty
        idx.masked_fill_((idx < 0) | (idx > E), 0)
    gm = torch.zeros(expert_ids.shape[0], E + 1, dtype=acc, device=gates.device)
    return gm.scatter_add_(1, idx, g).narrow(1, 1, E), idx


def _rank_gates(gE, E, ranks):
    """``gE [T, E]`` on the ``[T, sum_s E r_s]`` rank columns: a broadcast view ``[T, S, E, r]``
    for equal ranks (no copy), else a gathered ``[T, R]`` copy."""
    if ranks.count(ranks[0]) == len(ranks):
        st = gE.stride()
        return gE.as_strided((gE.shape[0], len(ranks), E, ranks[0]), (st[0], 0, st[1], 0),
                             gE.storage_offset())
    return gE.index_select(1, _column_experts(E, tuple(ranks), gE.device))


def _train_forward(x, lora_a, lora_b, expert_ids, gates, scaling, needs):
    """The dense masked forward of a CPU training step (``_RoutedLoraTrain``), in fp32 (float64
    for float64 inputs): ``y_s = ((x A^T) * G) B_cat_s^T`` with every slice's A in one GEMM and G
    the gates on the rank columns. Returns ``(y, saved)``, or None when y is not finite (then
    the caller runs the op, whose isolated forward gives the per-expert result).

    No route mask: an inf / NaN anywhere in the inputs (a weight of an expert a token does not
    use, a used gate) makes y non-finite (0 * inf is NaN), which one reduction detects; a finite
    y is exactly the masked result, and means x, every weight and every used gate are finite.

    ``saved`` is what ``_train_backward`` needs for the gradients in ``needs`` (None where not
    needed): ``(idx, gE, h, hg, a_all, xf, *b_cats)``: the slot columns and gates of
    ``_train_gates``, h = x A^T ``[T, R]`` (d_gates), hg = h gated (dB), every slice's A as
    one ``[R, d_in]`` matrix (dx), x in the accumulation dtype (dA) and each slice's B as
    ``B_cat [n, E r]`` (dx, dA, d_gates). Raises the op's error for an expert id out of range."""
    need_x, need_a, need_b, need_g = needs
    T, d_in = x.shape
    E, S = lora_a[0].shape[0], len(lora_a)
    ranks = [a.shape[1] for a in lora_a]
    acc = torch.float64 if x.dtype is torch.float64 else torch.float32
    try:
        gE, idx = _train_gates(expert_ids, gates, E, scaling, acc)
    except (RuntimeError, IndexError):
        check_index_range("routed_lora", "expert_ids", expert_ids, -1, E)
        raise
    xf = x if x.dtype is acc else x.to(acc)
    if S == 1:
        a_all = lora_a[0].reshape(-1, d_in)
    elif ranks.count(ranks[0]) == S:  # one copy of every slice's A: one GEMM for h, dx and dA
        a_all = torch.cat(lora_a).view(-1, d_in)
    else:
        a_all = torch.cat([a.reshape(-1, d_in) for a in lora_a])
    if a_all.dtype is not acc:
        a_all = a_all.to(acc)
    h = torch.nn.functional.linear(xf, a_all)  # [T, R]
    gcols = _rank_gates(gE, E, ranks)
    hv = h.view(gcols.shape)
    hg = (hv.mul_(gcols) if not need_g else hv * gcols).view(h.shape)
    if S > 1 and ranks.count(ranks[0]) == S:  # one copy of every slice's B: [d_out, E, r]
        b_all = torch.cat([b.permute(1, 0, 2) for b in lora_b])
        if b_all.dtype is not acc:
            b_all = b_all.to(acc)
        b_cats = b_all.view(-1, E * ranks[0]).split_with_sizes([b.shape[1] for b in lora_b])
    else:
        b_cats = [b.permute(1, 0, 2).to(acc, memory_format=torch.contiguous_format).view(b.shape[1], -1)
                  if b.dtype is not acc else b.permute(1, 0, 2).reshape(b.shape[1], -1) for b in lora_b]
    if S == 1:
        y = torch.nn.functional.linear(hg, b_cats[0])
    else:
        y = torch.empty(T, sum(b.shape[1] for b in lora_b), dtype=acc, device=x.device)
        for hs, ys, bc in zip(hg.split_with_sizes([E * r for r in ranks], 1),
                              y.split_with_sizes([b.shape[1] for b in lora_b], 1), b_cats):
            torch.mm(hs, bc.t(), out=ys)
    # One reduction instead of an isfinite pass (a finite sum that overflows only costs the
    # exact per-expert recompute).
    if not math.isfinite(y.sum().item()):
        return None
    keep_b = need_x or need_a or need_g
    saved = (idx, gE, h if need_g else None, hg if need_b else None, a_all if need_x else None,
             xf if need_a else None, *(b_cats if keep_b else [None] * S))
    return (y if y.dtype is x.dtype else y.to(x.dtype)), saved


def _train_backward(grad_y, x, lora_a, lora_b, gates, scaling, needs, saved):
    """The dense backward of a CPU training step on the forward's saved tensors
    (``_train_forward``); None when grad_y is not finite (the caller then runs the isolated op).

    With G the gates on the rank columns (scaling included), H = x A^T, HG = H G and
    U_s = dy_s B_cat_s: dx = (U G) A, dA = (U G)^T x (one GEMM each over all slices), dB_s =
    dy_s^T HG_s, d_gates[t, j] = scaling * sum over the columns of expert ids[t, j] of U H.
    The forward kept these only when its y was finite, which (0 * inf is NaN in the dense form)
    means x, every weight and every used gate are finite; with grad_y finite too, every product
    of the dense form that the per-expert form leaves out is an exact 0, so the result equals the
    isolated one and needs no check. Never writes into a saved tensor (a second backward with
    ``retain_graph`` reads them again). Gradients in the inputs' dtypes, contiguous (dA of
    several slices: row blocks of one matrix); None where not needed."""
    need_x, need_a, need_b, need_g = needs
    idx, gE, h, hg, a_all, xf, *b_cats = saved
    T = grad_y.shape[0]
    E, S = lora_a[0].shape[0], len(lora_a)
    ranks = [a.shape[1] for a in lora_a]
    acc = gE.dtype
    dyf = grad_y if grad_y.dtype is acc else grad_y.to(acc)
    if not math.isfinite(dyf.sum().item()):
        return None
    d_outs = [b.shape[1] for b in lora_b]
    cols = [E * r for r in ranks]
    dys = dyf.split_with_sizes(d_outs, 1) if S > 1 else (dyf,)
    gx = ga = gb = gg = None
    if need_x or need_a or need_g:
        if S == 1:
            u = torch.mm(dyf, b_cats[0])
        else:
            u = torch.empty(T, sum(cols), dtype=acc, device=grad_y.device)
            for dy, us, bc in zip(dys, u.split_with_sizes(cols, 1), b_cats):
                torch.mm(dy, bc, out=us)
        if need_g:  # scaling * each expert's sum of U H; gathered onto the slots
            wsum = _gate_sum_weights(E, tuple(ranks), scaling, acc, u.device)
            uh = u * h
            if wsum.dim() == 1:
                gg = torch.mv(uh.view(-1, ranks[0]), wsum)
                gg = gg.view(T, S, E).sum(1) if S > 1 else gg.view(T, E)
            else:
                gg = torch.mm(uh, wsum.t())
            if idx is not None:  # column 0: the empty slots' zero
                gg = torch.constant_pad_nd(gg, (1, 0)).gather(1, idx)
            if gg.dtype is not gates.dtype:
                gg = gg.to(gates.dtype)
        if need_x or need_a:
            gcols = _rank_gates(gE, E, ranks)
            du = u.view(gcols.shape).mul_(gcols).view(u.shape)
            if need_x:
                gx = torch.mm(du, a_all)
                if gx.dtype is not x.dtype:
                    gx = gx.to(x.dtype)
            if need_a:
                ga_all = torch.mm(du.t(), xf)
                parts = ga_all.split_with_sizes(cols) if S > 1 else (ga_all,)
                ga = [p.view(a.shape) if a.dtype is acc else p.view(a.shape).to(a.dtype)
                      for p, a in zip(parts, lora_a)]
    if need_b:
        hgs = hg.split_with_sizes(cols, 1) if S > 1 else (hg,)
        gb = []
        for dy, hs, b, r, n in zip(dys, hgs, lora_b, ranks, d_outs):
            g = torch.mm(dy.t(), hs).view(n, E, r).permute(1, 0, 2)  # B_cat's layout -> [E, n, r]
            gb.append(g.contiguous() if b.dtype is acc
                      else g.to(b.dtype, memory_format=torch.contiguous_format))
    return gx, ga, gb, gg


def _sparse_plan(expert_ids, E, T, accept=None):
    """The expert-grouped layout of a sparse step, or None where another form is cheaper:
    ``(gp, tok, cap)`` with ``gp [E * cap]`` the (token, slot) pair in each of ``cap`` rows per
    expert (expert-major, in token order; ``T * k`` for a padding row) and ``tok`` its token
    (padding rows: token T - 1, with a zero gate). ``accept(cap)`` decides on the real ``cap``;
    by default (the training step) every expert must have at most a third of the tokens
    (``3 * cap <= T``, after cheap pre-tests: ``3 k <= E``, and ``T k >= 2 E``, at least two
    pairs per expert on average, else its fixed ops dominate): the grouped form then computes at
    most 1/3 of the dense form's rows (measured, 1 thread, T 512-1024: grouped 1.2x faster than
    the dense torch form at top-2 of 8, cap ~0.28 T; 0.6-0.9x at cap ~T / 2). Raises the op's error for an expert id out of range (a
    negative bin or one past E)."""
    k = expert_ids.shape[1]
    if accept is None:  # the training step's rule
        if 3 * k > E or T * k < 2 * E:
            return None
        accept = lambda cap: 3 * cap <= T  # noqa: E731
    if not _backend.check_values(expert_ids):
        return None
    P = T * k
    flat = expert_ids.reshape(-1).long() + 1  # -1 (empty) -> 0
    try:
        counts = torch.bincount(flat, minlength=E + 1)  # raises for an id below -1
        if counts.shape[0] > E + 1:  # an id >= E
            raise IndexError("expert id out of range")
    except (RuntimeError, IndexError):
        check_index_range("routed_lora", "expert_ids", expert_ids, -1, E)
        raise
    cap = int(counts[1:].max())
    if cap == 0 or not accept(cap):
        return None
    order = torch.argsort(flat, stable=True)  # empty slots first, then expert by expert
    se = flat[order]
    pos = torch.arange(P, device=flat.device) - (counts.cumsum(0) - counts)[se]
    dump = E * cap
    gp = torch.full((dump + 1,), P, dtype=torch.long, device=flat.device)
    gp[torch.where(se > 0, (se - 1) * cap + pos, dump)] = order
    gp = gp[:dump]
    return gp, (gp // k).clamp_(max=T - 1), cap


def _sparse_forward(x, lora_a, lora_b, gates, scaling, needs, plan, acc, keep_acc=False, gemm=None):
    """The expert-grouped forward of a sparse CPU training step: only routed work, batched over
    the experts on their ``cap`` rows (``_sparse_plan``): gather x's rows, ``h = x A_e^T`` and
    ``y_rows = (h g) B_e^T`` by ``bmm`` on the weights as stored (no repacking), add the rows
    into y. Returns ``(y, saved)``, or None when y is not finite.

    Every expert has at least one row (padding rows read token T - 1 with a zero gate), so a
    finite y means every weight is finite, as in the dense form: then the padding rows add exact
    zeros, and so do they in the backward if grad_y is finite.
    ``saved``: ``(gp, tok, w, xg, h, hg, a_all)``, None where not needed. y in ``acc`` with
    ``keep_acc``, else in x's dtype. ``gemm``: the GEMMs' dtype (default ``acc``; the inference
    forward passes ``_gemm_dtype``: then h and h g are rounded to it, y's rows too, and y is
    summed in ``acc``)."""
    need_x, need_a, need_b, need_g = needs
    gp, tok, cap = plan
    T, d_in = x.shape
    E = lora_a[0].shape[0]
    S = len(lora_a)
    ranks = [a.shape[1] for a in lora_a]
    gd = acc if gemm is None else gemm
    xf = x if x.dtype is gd else x.to(gd)
    g = gates.reshape(-1)
    g = g if g.dtype is acc else g.to(acc)
    w = torch.cat([g * scaling if scaling != 1.0 else g, g.new_zeros(1)]).index_select(0, gp).view(E, cap, 1)
    a_all = lora_a[0] if S == 1 else torch.cat(lora_a, 1)  # [E, R, d_in]
    if a_all.dtype is not gd:
        a_all = a_all.to(gd)
    xg = xf.index_select(0, tok).view(E, cap, d_in)
    h = torch.bmm(xg, a_all.transpose(1, 2))  # [E, cap, R]
    hg = h * w if need_g else h.mul_(w)
    bs = [b if b.dtype is gd else b.to(gd) for b in lora_b]
    if S == 1:
        yr = torch.bmm(hg, bs[0].transpose(1, 2))
    else:
        yr = torch.cat([torch.bmm(hs, b.transpose(1, 2))
                        for hs, b in zip(hg.split_with_sizes(ranks, 2), bs)], 2)
    yr = yr.view(E * cap, -1)
    y = torch.zeros(T, yr.shape[1], dtype=acc, device=x.device).index_add_(
        0, tok, yr if yr.dtype is acc else yr.to(acc))
    if not math.isfinite(y.sum().item()):
        return None
    saved = (gp, tok, w, xg if need_a else None, h if need_g else None, hg if need_b else None,
             a_all if need_x else None)
    return (y if keep_acc or y.dtype is x.dtype else y.to(x.dtype)), saved


def _sparse_backward(grad_y, x, lora_a, lora_b, gates, scaling, needs, saved):
    """The backward of ``_sparse_forward`` on its saved tensors; None when grad_y is not finite.
    Per expert e on its rows: u = dy B_e, d_gates = scaling <u, h> (one per pair), du = u g,
    dx rows = du A_e (added into dx), dA_e = du^T x_rows, dB_e = dy_rows^T (h g): the weights'
    gradients come out of ``bmm`` in their own layout, contiguous."""
    need_x, need_a, need_b, need_g = needs
    gp, tok, w, xg, h, hg, a_all = saved
    acc = w.dtype
    dyf = grad_y if grad_y.dtype is acc else grad_y.to(acc)
    if not math.isfinite(dyf.sum().item()):
        return None
    T, d_in = x.shape
    E, cap = w.shape[0], w.shape[1]
    S = len(lora_a)
    ranks = [a.shape[1] for a in lora_a]
    d_outs = [b.shape[1] for b in lora_b]
    dyg = dyf.index_select(0, tok).view(E, cap, -1)
    dygs = dyg.split_with_sizes(d_outs, 2) if S > 1 else (dyg,)
    gx = ga = gb = gg = None
    if need_x or need_a or need_g:
        bs = [b if b.dtype is acc else b.to(acc) for b in lora_b]
        u = torch.bmm(dyg, bs[0]) if S == 1 else torch.cat([torch.bmm(d, b) for d, b in zip(dygs, bs)], 2)
        if need_g:
            dg = (u * h).sum(2)
            if scaling != 1.0:
                dg.mul_(scaling)
            P = gates.numel()
            gg = dg.new_zeros(P + 1).index_put_((gp,), dg.view(-1))[:P].view(gates.shape)
            if gg.dtype is not gates.dtype:
                gg = gg.to(gates.dtype)
        if need_x or need_a:
            du = u.mul_(w)
            if need_x:
                gx = torch.zeros(T, d_in, dtype=acc, device=x.device).index_add_(
                    0, tok, torch.bmm(du, a_all).view(E * cap, d_in))
                if gx.dtype is not x.dtype:
                    gx = gx.to(x.dtype)
            if need_a:
                dus = du.split_with_sizes(ranks, 2) if S > 1 else (du,)
                ga = [torch.bmm(d.transpose(1, 2), xg) for d in dus]
                ga = [g if g.dtype is a.dtype else g.to(a.dtype) for g, a in zip(ga, lora_a)]
    if need_b:
        hgs = hg.split_with_sizes(ranks, 2) if S > 1 else (hg,)
        gb = [torch.bmm(d.transpose(1, 2), hs) for d, hs in zip(dygs, hgs)]
        gb = [g if g.dtype is b.dtype else g.to(b.dtype) for g, b in zip(gb, lora_b)]
    return gx, ga, gb, gg


def _routed_lora_torch(x, lora_a, lora_b, expert_ids, gates, scaling, out=None):
    """The PyTorch forward: the dense masked form on BLAS GEMMs where it is cheaper (CPU tensors:
    ``forward_form_cpu``; other devices: where the Triton path would run dense), several times
    faster on CPU than looping over experts at decode; the expert-grouped form (``bmm`` over the
    experts' sorted rows) at sparse routing over many tokens (CPU); otherwise the per-expert loop,
    which computes only routed work. A dense or grouped result that is not finite everywhere is
    redone per expert (both multiply weights by 0 where a token does not use them, or pad rows,
    and 0 * inf is NaN). With ``out``, adds into it."""
    T, d_in = x.shape
    k = expert_ids.shape[1]
    acc = _acc_dtype(x)
    y = None
    form = _forward_form(x, lora_a, lora_b, k) if T and d_in and k else "loop"
    if form == "grouped":
        E = lora_a[0].shape[0]
        shape = (T, d_in, E, tuple(a.shape[1] for a in lora_a), tuple(b.shape[1] for b in lora_b), k)
        plan = _sparse_plan(expert_ids, E, T, lambda cap: grouped_accepts(*shape, cap))
        if plan is not None:  # (else an unbalanced routing: the better of the others)
            got = _sparse_forward(x, lora_a, lora_b, gates, scaling, (False,) * 4, plan, acc,
                                  keep_acc=True, gemm=_gemm_dtype(x, acc, E * sum(shape[3])))
            if got is None:  # not finite: the per-expert form below
                form = "loop"
            else:
                y = got[0]
        else:
            dense, loop = _forward_costs(*shape)
            form = "dense" if dense <= loop else "loop"
    if form == "dense":
        y = _dense_forward_cpu(x, lora_a, lora_b, expert_ids, gates, scaling, acc)
        # One reduction instead of an isfinite pass over y: any inf / NaN makes the sum
        # non-finite (a finite sum that overflows only costs the exact per-expert recompute).
        if not math.isfinite(y.sum().item()):
            y = None
    if y is None:
        y = routed_lora_ref(x, lora_a, lora_b, expert_ids, gates, scaling, acc_dtype=acc, keep_acc=True)
    if out is None:
        return y.to(x.dtype)
    if out.dtype == acc:
        return out.add_(y)
    return out.copy_(out.to(acc) + y)


def routed_lora_cpu(x, lora_a, lora_b, expert_ids, gates, scaling):
    """CPU kernel of ``routed_lora`` (see ``_routed_lora_torch``)."""
    return _routed_lora_torch(x, lora_a, lora_b, expert_ids, gates, scaling)


def routed_lora_add_cpu(out, x, lora_a, lora_b, expert_ids, gates, scaling):
    """CPU kernel of ``routed_lora_add_``: ``out += y`` with the sum formed in fp32, rounded once."""
    _routed_lora_torch(x, lora_a, lora_b, expert_ids, gates, scaling, out)


def _dense_backward_cpu(grad_y, x, lora_a, lora_b, expert_ids, gates, scaling, needs, acc):
    """The dense masked backward with the fewest ops, for CPU tensors; None when a gradient is not
    finite (the caller then runs the isolated form).

    With G the gates on the rank columns (``_gate_matrix``), H = x A_cat^T and U_s = dy_s B_cat_s
    (all slices side by side, ``[T, sum_s E r_s]``): dx = (U G) A_cat, dA_cat = (U G)^T x,
    dB_s = dy_s^T (H G)_s, d_gates[t, j] = scaling * sum over the columns of expert ids[t, j] of
    U H. Every fp32 result is written into one workspace, so one reduction checks them all: as in
    the forward, an inf / NaN anywhere in the inputs makes it non-finite (0 * inf), so a finite
    result equals the masked (isolated) one."""
    need_x, need_a, need_b, need_g = needs
    T, d_in = x.shape
    E = lora_a[0].shape[0]
    ranks = tuple(a.shape[1] for a in lora_a)
    d_outs = [b.shape[1] for b in lora_b]
    R = E * sum(ranks)
    dev = x.device
    sizes = [T * d_in if need_x else 0, R * d_in if need_a else 0,
             E * sum(r * n for r, n in zip(ranks, d_outs)) if need_b else 0, T * E if need_g else 0]
    ws = torch.empty(sum(sizes), dtype=acc, device=dev)
    gx, ga, gb, gg = torch.split(ws, sizes)
    gm, idx = _gate_matrix(expert_ids, gates, E, scaling, acc)
    gcols = gm.index_select(1, _column_experts(E, ranks, dev))
    xf = x.to(acc)
    a_all = _packed_a(lora_a, acc) if (need_x or need_b or need_g) else None
    h = torch.mm(xf, a_all.t()) if (need_b or need_g) else None
    dyf = grad_y.to(acc)
    cols = [E * r for r in ranks]
    dys = torch.split(dyf, d_outs, 1)
    u = None
    if need_x or need_a or need_g:
        u = torch.empty(T, R, dtype=acc, device=dev)
        for dy, us, b in zip(dys, torch.split(u, cols, 1), lora_b):
            torch.mm(dy, _packed_b(b, acc), out=us)
    if need_g:
        uh = u * h
        dg = gg.view(T, E)
        if len(set(ranks)) == 1:
            torch.sum(uh.view(T, len(ranks), E, ranks[0]), dim=(1, 3), out=dg)
        else:
            dg.zero_()
            for part, r in zip(torch.split(uh, cols, 1), ranks):
                dg += part.view(T, E, r).sum(-1)
    if need_x or need_a:
        du = u.mul_(gcols)
        if need_x:
            torch.mm(du, a_all, out=gx.view(T, d_in))
        if need_a:
            torch.mm(du.t(), xf, out=ga.view(R, d_in))
    b_sizes = [c * n for c, n in zip(cols, d_outs)]
    if need_b:  # dB_s as B_cat's [n, E * r]
        hg = h.mul_(gcols)
        for hs, dy, part, n in zip(torch.split(hg, cols, 1), dys, torch.split(gb, b_sizes), d_outs):
            torch.mm(dy.t(), hs, out=part.view(n, -1))
    if ws.numel() and not math.isfinite(ws.sum().item()):
        return None
    # Copies: the gradients never share memory.
    out_a = [part.view(a.shape).to(a.dtype, copy=True)
             for part, a in zip(torch.split(ga, [c * d_in for c in cols]), lora_a)] if need_a else []
    out_b = [part.view(n, E, r).permute(1, 0, 2).to(b.dtype, memory_format=torch.contiguous_format,
                                                    copy=True)
             for part, b, r, n in zip(torch.split(gb, b_sizes), lora_b, ranks, d_outs)] if need_b else []
    if need_g:
        gsel = torch.cat([gg.view(T, E), gg.new_zeros(T, 1)], 1).gather(1, idx)
        gsel = gsel.mul_(scaling) if scaling != 1.0 else gsel
    return (gx.view(T, d_in).to(x.dtype, copy=True) if need_x else x.new_empty(0),
            out_a if need_a else [a.new_empty(0) for a in lora_a],
            out_b if need_b else [b.new_empty(0) for b in lora_b],
            gsel.to(gates.dtype) if need_g else gates.new_empty(0))


def routed_lora_backward_cpu(grad_y, x, lora_a, lora_b, expert_ids, gates, scaling, needs=None):
    """CPU kernel of the backward: the dense masked form where it is cheaper, else the per-expert
    loop (only routed work; the host sync is free on CPU).

    CPU tensors: ``dense_cheaper_cpu`` picks; the dense form is ``_dense_backward_cpu`` (fewest
    ops, its result checked for non-finite values by one reduction), and where that finds one the
    isolated ``routed_lora_backward_dense``. Other devices (CUDA tensors: float64, the dense regime
    of the Triton path, or LORAMIX_BACKEND=reference): the dense form where the Triton path would
    run dense, ``routed_lora_backward_dense``, isolated by itself with no host sync (non-finite
    x / dy / A entries are zeroed in its GEMMs and NaN is set where the per-expert form is
    non-finite); no check of the result, no fallback."""
    needs = _needs(needs)
    E, k = lora_a[0].shape[0], expert_ids.shape[1]
    acc = _acc_dtype(x)
    args = (grad_y, x, lora_a, lora_b, expert_ids, gates, scaling, needs, acc)
    if x.device.type == "cpu":
        T, d_in = x.shape
        if T and d_in and k and _dense_on_device(x, lora_a, lora_b, k, backward=True):
            got = _dense_backward_cpu(*args) if any(needs) else None
            return got if got is not None else routed_lora_backward_dense(*args)
        return routed_lora_backward_ref(*args)
    dense = choose_strategy(E, [a.shape[1] for a in lora_a], k) != "expert_sorted"
    if dense or _backend.deterministic():  # no index_add_ atomics
        return routed_lora_backward_dense(*args)
    return routed_lora_backward_ref(*args)


# ------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------

_ARGS = "Tensor x, Tensor[] lora_a, Tensor[] lora_b, Tensor expert_ids, Tensor gates, float scaling"


def _setup_context(ctx, inputs, output):
    x, lora_a, lora_b, expert_ids, gates, scaling = inputs
    ctx.n_slices = len(lora_a)
    ctx.scaling = scaling
    ctx.save_for_backward(x, expert_ids, gates, *lora_a, *lora_b)


def _backward(ctx, grad_y):
    x, expert_ids, gates, *w = ctx.saved_tensors
    n = ctx.n_slices
    lora_a, lora_b = w[:n], w[n:]
    # needs_input_grad holds one bool per tensor, a list of them for the Tensor[] arguments.
    need = ctx.needs_input_grad
    needs = [bool(need[0]), any(need[1]), any(need[2]), bool(need[4])]
    gx, ga, gb, gg = torch.ops.loramix.routed_lora_backward(
        grad_y, x, list(lora_a), list(lora_b), expert_ids, gates, ctx.scaling, needs)
    return (gx if needs[0] else None, [g if nd else None for g, nd in zip(ga, need[1])],
            [g if nd else None for g, nd in zip(gb, need[2])], None, gg if needs[3] else None, None)


class _RoutedLoraTrain(torch.autograd.Function):
    """The CPU training path of ``routed_lora`` (eager, grad enabled, CPU tensors, no autocast;
    see ``routed_lora`` and ``_train_plan``): a plain autograd function, cheaper per step than
    torch.library's generated one, whose forward (``_train_forward``, after the metadata checks)
    keeps what the dense backward reuses (packed weights, gate matrix, h) and whose backward runs
    ``_train_backward`` on it. Where the forward did not keep them (a per-expert forward, a
    non-finite dense y, the Triton test switch), where the dense backward declines (non-finite
    grad_y) or under create_graph, the backward is the op ``routed_lora_backward`` as for the
    registered autograd (which raises for double backward). Inputs: ``x, expert_ids, gates,
    scaling, n_slices, needs, *lora_a, *lora_b``."""

    @staticmethod
    def forward(ctx, x, expert_ids, gates, scaling, plan, *w):
        n, needs, dense = plan
        inputs = (x, expert_ids, gates, *w)  # saved as given: the op backward's double-backward error
        # Detached aliases (same data and version counters): the kernels' ops and views then
        # skip autograd's bookkeeping for inputs that require grad.
        x, gates, w = x.detach(), gates.detach(), [t.detach() if t.requires_grad else t for t in w]
        lora_a, lora_b = w[:n], w[n:]
        got = None
        mode = 0
        T, k = expert_ids.shape
        # The metadata were checked by _train_plan; the expert-id range is checked here (by the
        # scatter or bincount of the dense / grouped path) or by validate_routed_lora.
        if dense and T and x.shape[1] and k and not _backend.use_triton(x):
            plan = _sparse_plan(expert_ids, lora_a[0].shape[0], T)
            if plan is not None:
                mode, got = 2, _sparse_forward(x, lora_a, lora_b, gates, scaling, needs, plan,
                                               torch.float64 if x.dtype is torch.float64 else torch.float32)
            elif dense is True:  # ("sparse" without a plan: the op's forward and backward)
                mode, got = 1, _train_forward(x, lora_a, lora_b, expert_ids, gates, scaling, needs)
        if got is None:
            # The op's own implementation without the dispatcher round trip (the Triton test
            # switch keeps its launcher).
            validate_routed_lora(x, lora_a, lora_b, expert_ids, gates, scaling)
            if _backend.use_triton(x):
                y = routed_lora_triton(x, lora_a, lora_b, expert_ids, gates, scaling)
            else:
                y = routed_lora_cpu(x, lora_a, lora_b, expert_ids, gates, scaling)
            ctx.mode = 0
            ctx.save_for_backward(*inputs)
        else:
            y, saved = got
            ctx.mode = mode
            ctx.save_for_backward(*inputs, *saved)
        ctx.n_slices, ctx.scaling, ctx.train_needs = n, scaling, needs
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, expert_ids, gates, *w = ctx.saved_tensors
        n = ctx.n_slices
        lora_a, lora_b, saved = w[:n], w[n:2 * n], w[2 * n:]
        need = ctx.needs_input_grad
        need_a, need_b = need[5:5 + n], need[5 + n:5 + 2 * n]
        needs = (need[0], any(need_a), any(need_b), need[2])
        got = None
        if (ctx.mode and not torch.is_grad_enabled()
                and all(t or not nd for t, nd in zip(ctx.train_needs, needs))):
            got = (_train_backward if ctx.mode == 1 else _sparse_backward)(
                grad_y, x, lora_a, lora_b, gates, ctx.scaling, needs, saved)
        if got is None:
            got = torch.ops.loramix.routed_lora_backward(
                grad_y, x, list(lora_a), list(lora_b), expert_ids, gates, ctx.scaling, list(needs))
        gx, ga, gb, gg = got
        ga = [g if nd else None for g, nd in zip(ga, need_a)] if needs[1] else [None] * n
        gb = [g if nd else None for g, nd in zip(gb, need_b)] if needs[2] else [None] * n
        return (gx if needs[0] else None, None, gg if needs[3] else None, None, None, *ga, *gb)


def _fake_forward(info, x, *args):
    T, _, _, _, d_out = info
    return x.new_empty(T, d_out)


def _fake_backward(info, grad_y, x, lora_a, lora_b, expert_ids, gates, scaling, needs=None):
    """Contiguous gradients in the inputs' dtypes; an empty tensor where not needed."""
    need_x, need_a, need_b, need_g = _needs(needs)
    return (x.new_empty(x.shape if need_x else (0,)),
            [a.new_empty(a.shape if need_a else (0,)) for a in lora_a],
            [b.new_empty(b.shape if need_b else (0,)) for b in lora_b],
            gates.new_empty(gates.shape if need_g else (0,)))


_ROUTED_LORA = register_op(
    "routed_lora", f"({_ARGS}) -> Tensor",
    validate=validate_routed_lora, triton=routed_lora_triton, cpu=routed_lora_cpu,
    fake=_fake_forward, backward=_backward, setup_context=_setup_context,
    autocast=(0, 1, 2),  # x, lora_a, lora_b follow the autocast dtype; gates stay as given
)
register_op(
    "routed_lora_add_", f"(Tensor(a!) out, {_ARGS}) -> ()",
    validate=validate_routed_lora_add, triton=routed_lora_add_triton, cpu=routed_lora_add_cpu,
    fake=lambda info, *args: None, autocast=(1, 2, 3),
)
register_op(
    "routed_lora_backward",
    f"(Tensor grad_y, {_ARGS}, bool[]? needs=None) -> (Tensor, Tensor[], Tensor[], Tensor)",
    validate=validate_routed_lora_backward, triton=routed_lora_backward_triton,
    cpu=routed_lora_backward_cpu, fake=_fake_backward,
)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "routed_lora: double backward (differentiating routed_lora's gradients, e.g. a second "
        "backward through a graph built with create_graph=True) is not supported")


# Registered outside register_op on purpose: the backward op is not differentiable (OPS marks
# it so), but a second-order use must fail loudly instead of warning and returning no gradient.
torch.library.register_autograd("loramix::routed_lora_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None, lib=LIB)


# ------------------------------------------------------------------------------------------
# public functions
# ------------------------------------------------------------------------------------------


def routed_lora(x, lora_a, lora_b, expert_ids, gates, scaling=1.0):
    r"""Routed mixture of LoRA experts over one or more packed output slices.

    .. math:: y[t, s] = \text{scaling} \sum_j g_{t,j}\, B_s[e_{t,j}]\, A_s[e_{t,j}]\, x_t

    Parameters
    ----------
    x : torch.Tensor
        ``[T, d_in]`` activations, fp16 / bf16 / fp32, or float64 (PyTorch kernels, for
        gradcheck). Any strides.
    lora_a : list[torch.Tensor]
        Per slice ``s``: ``[E, r_s, d_in]`` LoRA A weights (PEFT ``lora_A`` layout), x's dtype.
    lora_b : list[torch.Tensor]
        Per slice ``s``: ``[E, d_out_s, r_s]`` LoRA B weights; widths and ranks may differ per
        slice (packed q/k/v with GQA).
    expert_ids : torch.Tensor
        ``[T, k]`` int32 / int64 expert of each routing slot; ``-1`` marks an empty slot. Dense
        soft routing is ``k = E`` with every expert listed.
    gates : torch.Tensor
        ``[T, k]`` slot weights (any float dtype; autocast leaves them as given).
    scaling : float
        LoRA scale (``alpha / r``), default ``1.0``.

    Returns
    -------
    torch.Tensor
        ``[T, sum_s d_out_s]`` in x's dtype (contiguous), slices' columns in order, accumulated in
        fp32 (precision of each path: module docstring of ``loramix_kernels.ops.routed_lora``).
        Differentiable in ``x``, every ``lora_a`` / ``lora_b`` and ``gates``; only the gradients
        autograd needs are computed. Under ``torch.autocast`` x and the weights run in the autocast
        dtype (fp32 master weights get fp32 gradients). Double backward raises. A token's output
        and gradients depend only on the experts it is routed to (inf / NaN in other experts'
        weights does not reach it). Contract: ``docs/API.md``.

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels import routed_lora
    >>> x = torch.randn(5, 64)
    >>> A = [torch.randn(8, 16, 64)]; B = [torch.randn(8, 32, 16)]
    >>> ids = torch.randint(0, 8, (5, 2)); g = torch.rand(5, 2)
    >>> routed_lora(x, A, B, ids, g, 0.5).shape
    torch.Size([5, 32])
    """
    lora_a, lora_b, scaling = list(lora_a), list(lora_b), float(scaling)
    # Plain eager CPU tensors only: no compile, autocast, functorch transform, tensor subclass or
    # Python dispatch / function mode (the training path calls the kernel without the dispatcher).
    if (type(x) is torch.Tensor and x.device.type == "cpu" and torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
            and not torch._C._are_functorch_transforms_active()
            and not torch._C._len_torch_dispatch_stack()
            and not torch._C._is_torch_function_mode_enabled()):
        plan = _train_plan(x, lora_a, lora_b, expert_ids, gates, scaling)
        if plan is not None:
            return _RoutedLoraTrain.apply(x, expert_ids, gates, scaling, plan, *lora_a, *lora_b)
    return _ROUTED_LORA(x, lora_a, lora_b, expert_ids, gates, scaling)


def _train_plan(x, lora_a, lora_b, expert_ids, gates, scaling):
    """Whether a training call (CPU tensors, grad enabled; see ``routed_lora``) takes the CPU
    training path (``_RoutedLoraTrain``), in one pass over the arguments: None, or
    ``(n_slices, needs, dense_forward)`` with ``needs`` the gradients it needs ``(dx, dA, dB,
    d_gates)``. Taken where something needs a gradient, not in deterministic mode, the metadata
    checks of ``validate_routed_lora`` pass (all on CPU; a bad argument takes the registered
    path and gets its message there; the expert-id range is checked by the path itself) and
    ``dense_saved_cheaper_cpu`` says so; ``dense_forward``: ``dense_cheaper_cpu``'s choice for
    the forward (else the per-expert forward and the op's backward)."""
    T_ = torch.Tensor
    S = len(lora_a)
    if not (S and len(lora_b) == S and x.dim() == 2 and x.dtype in DTYPES and type(gates) is T_
            and type(expert_ids) is T_ and expert_ids.dim() == 2 and gates.dim() == 2
            and type(lora_a[0]) is T_ and lora_a[0].dim() == 3) or _backend.deterministic():
        return None
    dt = x.dtype
    T, d_in = x.shape
    E = lora_a[0].shape[0]
    ranks, d_outs = [], []
    need_a = need_b = False
    for a, b in zip(lora_a, lora_b):
        if not (type(a) is T_ and type(b) is T_ and a.dtype is dt and b.dtype is dt and a.is_cpu
                and b.is_cpu and a.dim() == 3 and b.dim() == 3):
            return None
        ea, r, da = a.shape
        eb, n, rb = b.shape
        if not (ea == E and eb == E and da == d_in and r >= 1 and rb == r):
            return None
        ranks.append(r)
        d_outs.append(n)
        need_a = need_a or a.requires_grad
        need_b = need_b or b.requires_grad
    if not (E > 0 and expert_ids.dtype in INDEX_DTYPES and expert_ids.is_cpu and gates.is_cpu
            and gates.dtype in DTYPES and expert_ids.shape[0] == T and gates.shape == expert_ids.shape
            and math.isfinite(scaling)):
        return None
    needs = (x.requires_grad, need_a, need_b, gates.requires_grad)
    if not (needs[0] or need_a or need_b or needs[3]):
        return None
    choice = _train_choice(T, d_in, E, tuple(ranks), tuple(d_outs), expert_ids.shape[1], needs)
    return None if choice is None else (S, needs, choice)


@functools.lru_cache(maxsize=256)
def _train_choice(T, d_in, E, ranks, d_outs, k, needs):
    """None (not the training path), or its forward (``_train_plan``): True = dense (grouped
    first, on the real cap, where the routing is sparse), False = the op's forward and backward,
    ``"sparse"`` = grouped if the real cap allows, else the op's. Where the dense backward on saved
    tensors wins, the forward is dense too unless the loop's forward is cheaper by more than the
    dense backward saves over the op's backward. Sparse routing over many tokens (``3 k <= E``,
    ``T k >= 2 E``) is the training path too: grouped when balanced enough (``_sparse_plan``),
    else dense only where the model says so."""
    dense = None
    if dense_saved_cheaper_cpu(T, d_in, E, ranks, d_outs, k, needs):
        dense = True
        if not dense_cheaper_cpu(T, d_in, E, ranks, d_outs, k):
            dense_f, loop_f = _forward_costs(T, d_in, E, ranks, d_outs, k)
            dense_b, loop_b = _saved_costs(T, d_in, E, ranks, d_outs, k, needs)
            dense = dense_f + dense_b <= loop_f + loop_b
    if 3 * k <= E and T * k >= 2 * E and dense is not True:
        return "sparse"
    return dense


def routed_lora_add_(out, x, lora_a, lora_b, expert_ids, gates, scaling=1.0):
    """In place ``out += routed_lora(x, ...)`` (after the base projection's GEMM; inference path).

    ``out`` is ``[T, sum_s d_out_s]`` of any float dtype and any strides; the sum is formed in fp32
    and rounded once. ``out`` must not have overlapping elements (no ``expand()``-ed view) and must
    not share memory with any input (errors name ``out``). See :func:`routed_lora` for the other
    parameters.

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels import routed_lora_add_
    >>> x = torch.randn(3, 16); out = torch.zeros(3, 8)
    >>> A = [torch.randn(4, 2, 16)]; B = [torch.randn(4, 8, 2)]
    >>> ids = torch.tensor([[0], [3], [-1]]); g = torch.ones(3, 1)
    >>> routed_lora_add_(out, x, A, B, ids, g)[2].abs().sum().item()
    0.0
    """
    OPS["routed_lora_add_"](out, x, list(lora_a), list(lora_b), expert_ids, gates, float(scaling))
    return out
