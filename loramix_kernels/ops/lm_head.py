"""Top-k of the LM head's logits without materialising them: ``lm_head_topk``.

``validate_lm_head_topk``, the launcher ``lm_head_topk_triton`` (tiles, vocabulary splits, the two
launches of ``kernels/lm_head.py``), the CPU kernel ``lm_head_topk_cpu`` (native C++ when built,
else ``reference/lm_head.py``'s chunked matmul + topk), the registration (``ops/_registry.py``; no
autograd: the indices are integers) and the public function.
"""

from __future__ import annotations

import torch

from .. import _backend, _native
from .._checks import FLOAT_DTYPES, check, check_tensor
from .._tiles import cdiv, next_pow2, pow2_at_least
from ..reference.lm_head import lm_head_topk_chunked
from ._registry import register_op

_OP = "lm_head_topk"

#: Largest k the Triton kernel keeps in registers; larger k (rare: Mirror-SD uses a handful of
#: candidates) runs the chunked torch kernel on the tensors' device.
MAX_TRITON_K = 64
#: Candidates per row the merge scans per pass at most (splits * k): bounds the splits for big k.
MAX_MERGE_CANDIDATES = 4096


def validate_lm_head_topk(hidden, weight, k):
    """Metadata checks (no value checks: every input value is valid). Returns ``(M, k)``."""
    op = _OP
    check_tensor(op, "hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=hidden.device)
    check(weight.dtype == hidden.dtype, op, "weight",
          f"must have hidden's dtype {hidden.dtype}, got {weight.dtype}", TypeError)
    M, H = hidden.shape
    V = weight.shape[0]
    check(weight.shape[1] == H, op, "weight", f"must have shape [V, H={H}], got {list(weight.shape)}")
    check(isinstance(k, int) and not isinstance(k, bool), op, "k", f"must be an int, got {type(k).__name__}",
          TypeError)
    check(1 <= k <= V, op, "k", f"must lie in [1, V={V}], got {k}")
    return M, k


def _config(M, V, H, k, t):
    """Tiles from the shapes only (no host sync): ``(BLOCK_M, BLOCK_V, BLOCK_K, splits, warps,
    stages)``."""
    if _backend.INTERPRET and t.device.type == "cpu":
        # interpreter: small tiles (numpy per op); tests force other split counts
        block_m, block_v, block_k = pow2_at_least(min(M, 32)), 32, min(32, pow2_at_least(H))
        return block_m, block_v, block_k, min(2, cdiv(V, block_v)), 4, 1
    # Decode-sized M: one row tile, so the weight streams once; the split count fills the GPU.
    # BLOCK_V 128 x BLOCK_K 64 bf16 weight tiles (16 KB) over 3 stages; the [BLOCK_M, 128] fp32
    # logit tile and the running top-k stay in registers.
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_v, block_k = 128, min(64, pow2_at_least(H))
    m_tiles, n_tiles = cdiv(M, block_m), cdiv(V, block_v)
    splits = cdiv(2 * _backend.sm_count(t), m_tiles)
    splits = min(splits, n_tiles, max(1, MAX_MERGE_CANDIDATES // next_pow2(k)))
    # 8 warps from 32 rows: at 4 warps the [64, 128] fp32 tile, the dot operands and the top-k
    # passes exceed 255 registers per thread and spill (tests/sm90_compile)
    return block_m, block_v, block_k, max(1, splits), 8 if block_m >= 32 else 4, 3


def lm_head_topk_triton(hidden, weight, k, splits=None):
    """Launcher: partial top-k per (row tile, vocabulary split), then the ordered merge.

    ``splits`` forces the number of vocabulary splits (tests); by default enough programs to
    fill the GPU (about two per SM) from the shapes alone.
    """
    M, H = hidden.shape
    V = weight.shape[0]
    if M == 0:
        return (hidden.new_empty(0, k, dtype=torch.float32), hidden.new_empty(0, k, dtype=torch.long))
    if k > MAX_TRITON_K:
        return lm_head_topk_chunked(hidden, weight, k)
    from ..kernels.lm_head import _lm_head_topk_merge_kernel, _lm_head_topk_partial_kernel

    block_m, block_v, block_k, auto_splits, warps, stages = _config(M, V, H, k, hidden)
    n_tiles = cdiv(V, block_v)
    splits = max(1, min(splits or auto_splits, n_tiles))
    tiles_per_split = cdiv(n_tiles, splits)
    splits = cdiv(n_tiles, tiles_per_split)  # no split without vocabulary
    dev = hidden.device
    ws_v = torch.empty(M, splits * k, dtype=torch.float32, device=dev)
    ws_i = torch.empty(M, splits * k, dtype=torch.long, device=dev)
    _lm_head_topk_partial_kernel[(cdiv(M, block_m), splits)](
        hidden, weight, ws_v, ws_i, M, V, H, k, tiles_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), ws_v.stride(0),
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, KP=next_pow2(k),
        DOT_FP32=_backend.dot_fp32(hidden.dtype), IEEE=hidden.dtype == torch.float32,
        num_warps=warps, num_stages=stages,
    )
    values = torch.empty(M, k, dtype=torch.float32, device=dev)
    indices = torch.empty(M, k, dtype=torch.long, device=dev)
    nc = splits * k
    block_r = min(4, next_pow2(M))
    block_c = min(next_pow2(nc), 256 if _backend.INTERPRET else 1024)
    _lm_head_topk_merge_kernel[(cdiv(M, block_r),)](
        ws_v, ws_i, values, indices, M, k, nc,
        ws_v.stride(0), values.stride(0), values.stride(1), indices.stride(0), indices.stride(1),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    return values, indices


#: Largest k of the native CPU kernel (``csrc/lm_head.cpp``: a sorted insertion per row, O(V k)
#: worst case); larger k runs the chunked torch kernel.
NATIVE_MAX_K = 64


def lm_head_topk_cpu(hidden, weight, k):
    """CPU kernel: the native one (``csrc/lm_head.cpp``: per vocabulary chunk an fp32 GEMM, then
    one pass per row keeping its k best under the tie rule) when built and ``k <=
    NATIVE_MAX_K``; else ``lm_head_topk_chunked`` (torch.topk, a tie check, stable re-sorts)."""
    if k <= NATIVE_MAX_K and hidden.device.type == "cpu" and _native.has_op("_lm_head_topk_cpu"):
        return _native.op("_lm_head_topk_cpu")(hidden, weight, k)
    return lm_head_topk_chunked(hidden, weight, k)


def _fake(info, hidden, weight, k):
    M, k = info
    return (hidden.new_empty(M, k, dtype=torch.float32), hidden.new_empty(M, k, dtype=torch.long))


_LM_HEAD_TOPK = register_op(
    "lm_head_topk",
    "(Tensor hidden, Tensor weight, int k) -> (Tensor values, Tensor indices)",
    validate=validate_lm_head_topk,
    triton=lm_head_topk_triton,
    cpu=lm_head_topk_cpu,
    fake=_fake,
    # in an autocast region the head runs in the region's dtype, like F.linear
    autocast=(0, 1),
    direct_cpu=True,
)


def lm_head_topk(hidden, weight, k):
    """The k largest logits ``hidden @ weight.T`` of every row and their vocabulary indices,
    without materialising the ``[M, V]`` logits.

    The early-exit candidates of Mirror-SD: ``lm_head_topk(h_layer, lm_head.weight, kappa)``.
    Logits are computed with fp32 accumulation; the k are ordered by value, descending, and a tie
    goes to the lower vocabulary index (on every backend; ``torch.topk`` leaves the order among
    ties unspecified). A NaN logit ranks as -inf (every path): indices are always real ids in [0, V).

    Parameters
    ----------
    hidden : torch.Tensor
        ``[M, H]`` fp16 / bf16 / fp32 hidden states.
    weight : torch.Tensor
        ``[V, H]`` the LM head's weight (``nn.Linear(H, V).weight``), hidden's dtype.
    k : int
        ``1 <= k <= V``. The CUDA kernel keeps up to 64 candidates per row in registers; a larger
        k runs a chunked matmul + topk instead (with host syncs: not CUDA-graph capturable).

    Returns
    -------
    values : torch.Tensor
        ``[M, k]`` fp32 logits, descending.
    indices : torch.Tensor
        ``[M, k]`` int64 vocabulary indices.

    Any strides. On CUDA: one Triton kernel streams the vocabulary in tiles (split across
    programs to fill the GPU) keeping a running top-k per row, a second merges the splits. On CPU:
    matmul + topk per vocabulary chunk. Contract: ``docs/API.md``.

    Examples
    --------
    >>> import torch
    >>> from loramix_kernels import lm_head_topk
    >>> hidden = torch.tensor([[1., 0.], [0., 1.]])
    >>> weight = torch.tensor([[1., 0.], [0., 2.], [1., 0.], [3., 0.]])
    >>> values, indices = lm_head_topk(hidden, weight, 2)
    >>> values.tolist(), indices.tolist()
    ([[3.0, 1.0], [2.0, 0.0]], [[3, 0], [1, 0]])
    """
    return _LM_HEAD_TOPK(hidden, weight, k)
