"""The router of a mixture of LoRA experts: ``route_topk`` (fused softmax + top-k).

``validate_route_topk``, the launcher ``route_topk_triton`` (tiles, launch of
``kernels/routing.py``), the CPU kernel ``route_topk_cpu`` (native C++ when built, else
``route_topk_keyed`` in ``reference/routing.py``), the registration (``ops/_registry.py``), the
autograd rule and the public function.
"""

from __future__ import annotations

import torch

from .. import _native
from .._checks import FLOAT_DTYPES, check, check_tensor
from .._tiles import cdiv, next_pow2
from ..reference.routing import (compute_dtype, route_topk_backward_ref, route_topk_keyed,
                                 route_topk_ref)
from ._registry import register_op

_OP = "route_topk"

#: Largest number of experts: a row lives in one program's registers (one [BLOCK_T, E] tile).
MAX_EXPERTS = 1024

__all__ = ["route_topk", "validate_route_topk", "route_topk_triton", "route_topk_ref",
           "route_topk_cpu", "route_topk_keyed", "MAX_EXPERTS"]


def validate_route_topk(logits, k, renormalize):
    """Metadata checks only (no value depends on the data: any finite or -inf logit is valid)."""
    op = _OP
    check_tensor(op, "logits", logits, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,))
    check(logits.dtype != torch.float64 or logits.device.type in ("cpu", "meta"), op, "logits",
          f"may be float64 only on CPU (for gradcheck); on {logits.device} use "
          "float16 / bfloat16 / float32")
    T, E = logits.shape
    check(E >= 1, op, "logits", "must have at least one expert column (shape [T, E], E >= 1)")
    check(E <= MAX_EXPERTS, op, "logits",
          f"must have at most {MAX_EXPERTS} experts (shape [T, E]), got E={E}")
    check(isinstance(k, (int, torch.SymInt)) and not isinstance(k, bool), op, "k",
          f"must be an int, got {type(k).__name__}", TypeError)
    check(1 <= k <= E, op, "k", f"must lie in [1, E={E}], got {k}")
    return T, E


def _tiles(T: int, E: int, k: int):
    """(BLOCK_T, BLOCK_E, BLOCK_K, num_warps). A program holds BLOCK_T whole rows: up to 2K
    elements per [BLOCK_T, BLOCK_E] tile, fewer rows when T is small so that short prefills still
    spread over many programs, and one warp per 256 elements (8 per thread: the probabilities,
    the selection key and the index tiles stay in registers without spills at sm_90)."""
    block_e = next_pow2(E)
    block_t = max(1, min(128, 2048 // block_e, next_pow2(cdiv(T, 256))))
    num_warps = max(1, min(8, block_t * block_e // 256))
    return block_t, block_e, next_pow2(k), num_warps


def route_topk_triton(logits, k, renormalize):
    """Launcher: one launch of ``_route_topk_kernel`` over row blocks; contiguous outputs."""
    T, E = logits.shape
    cdt = compute_dtype(logits.dtype)
    probs = torch.empty(T, E, dtype=cdt, device=logits.device)
    gates = torch.empty(T, k, dtype=cdt, device=logits.device)
    ids = torch.empty(T, k, dtype=torch.int32, device=logits.device)
    if T == 0:
        return gates, ids, probs
    from ..kernels.routing import _route_topk_kernel

    block_t, block_e, block_k, num_warps = _tiles(T, E, k)
    _route_topk_kernel[(cdiv(T, block_t),)](
        logits, gates, ids, probs, T, E, k, logits.stride(0), logits.stride(1),
        RENORMALIZE=bool(renormalize), BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return gates, ids, probs


def route_topk_cpu(logits, k, renormalize):
    """CPU kernel: native (``csrc/routing.cpp``: the same fp32 softmax, then one pass per row
    with the tie rule) when built; else ``route_topk_keyed`` (softmax, a unique integer key,
    ``torch.topk``). fp64 logits (gradcheck) take the reference."""
    if logits.dtype != torch.float64 and _native.runs_on(logits, "_route_topk_cpu"):
        return _native.op("_route_topk_cpu")(logits, k, renormalize)
    return route_topk_keyed(logits, k, renormalize)


def _route_topk_fake(info, logits, k, renormalize):
    T, E = info
    cdt = compute_dtype(logits.dtype)
    return (logits.new_empty((T, k), dtype=cdt), logits.new_empty((T, k), dtype=torch.int32),
            logits.new_empty((T, E), dtype=cdt))


def _setup_context(ctx, inputs, output):
    logits, k, renormalize = inputs
    gates, ids, probs = output
    ctx.renormalize = renormalize
    ctx.logits_dtype = logits.dtype
    ctx.save_for_backward(gates, ids, probs)


def _backward(ctx, grad_gates, grad_ids, grad_probs):
    gates, ids, probs = ctx.saved_tensors
    d = route_topk_backward_ref(probs, gates, ids, grad_gates, grad_probs, ctx.renormalize)
    return d.to(ctx.logits_dtype), None, None


_ROUTE_TOPK = register_op(
    "route_topk",
    "(Tensor logits, int k, bool renormalize) -> (Tensor gates, Tensor expert_ids, Tensor probs)",
    validate=validate_route_topk,
    triton=route_topk_triton,
    cpu=route_topk_cpu,
    fake=_route_topk_fake,
    backward=_backward,
    setup_context=_setup_context,
    direct_cpu=True,
)


def route_topk(logits, k, renormalize=False):
    """Router probabilities and the top-k experts of every token, in one fused launch.

    ``probs = softmax(logits)`` computed in fp32; the ``k`` experts of largest probability per row,
    in decreasing order, ties going to the lower expert index; their probabilities as ``gates``,
    divided by their sum when ``renormalize`` (so each row's gates sum to 1).

    Parameters
    ----------
    logits : torch.Tensor
        ``[T, E]`` router scores (float16 / bfloat16 / float32, any strides; float64 on CPU only,
        for gradcheck). ``E <= 1024``. ``-inf`` masks an expert out; a row of all ``-inf`` gives
        NaN probabilities and gates (and ids in index order).
    k : int
        Experts per token, ``1 <= k <= E``. ``k = E`` is soft routing (all experts, sorted).
    renormalize : bool, default False
        Divide the k gates by their sum (the MixLoRA / Mixtral convention).

    Returns
    -------
    gates : torch.Tensor
        ``[T, k]`` float32 (float64 for float64 logits), contiguous.
    expert_ids : torch.Tensor
        ``[T, k]`` int32 expert indices, contiguous; feed them with ``gates`` to
        :func:`~loramix_kernels.routed_lora`.
    probs : torch.Tensor
        ``[T, E]`` float32 (float64 for float64 logits) softmax over all experts, contiguous:
        what the routing losses (:mod:`loramix_kernels.losses`) read.

    Notes
    -----
    Differentiable with respect to ``logits`` through ``gates`` and ``probs`` (the selection
    itself is piecewise constant). With ``k = 1`` and ``renormalize=True`` the gate is the
    constant 1 and carries no gradient: the router then learns only through ``probs`` (a routing
    loss) or through un-renormalised gates. On CUDA (and under the test switch) one Triton launch
    computes everything, with no host synchronisation; on CPU a vectorised PyTorch kernel with the
    same tie rule. Contract: ``docs/API.md``.

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels.ops.routing import route_topk
    >>> logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    >>> gates, ids, probs = route_topk(logits, 2, renormalize=True)
    >>> ids.tolist()
    [[1, 2]]
    >>> gates.tolist()
    [[0.5, 0.5]]
    >>> round(probs.sum().item(), 6)
    1.0
    """
    return _ROUTE_TOPK(logits, k, renormalize)
