"""Plain-PyTorch top-k of the LM head's logits: test oracle, CPU kernel, benchmark baseline.

Semantics (../shared/API.md, ``lm_head_topk``): the k largest entries of ``hidden @ weight.T`` per
row, in fp32, ordered by value (descending) and, among equal values, by vocabulary index
(ascending): the lower index wins a tie. ``torch.topk`` does not promise an order among ties, so
both functions here settle ties explicitly. Neither materialises the ``[M, V]`` logits at once:
they walk the vocabulary in chunks.
"""

from __future__ import annotations

import torch

#: Logit elements per chunk (``M * chunk``): 32 MB of fp32 logits at a time.
CHUNK_ELEMS = 1 << 23
#: Weight elements per chunk when fp16 / bf16 weights are upcast for fp32 logits (8 MB in fp32).
UPCAST_ELEMS = 1 << 21


def _chunk(M: int, k: int, chunk: int | None) -> int:
    return max(k, chunk if chunk is not None else CHUNK_ELEMS // max(M, 1))


def _merge_lists(vals, idxs, k):
    """Top-k of candidate lists, each ordered (value desc, index asc), the indices of each list
    below those of the next: a stable descending sort of their concatenation keeps that order
    among equal values."""
    if len(vals) == 1:
        return vals[0][:, :k], idxs[0][:, :k]
    cat_v, cat_i = torch.cat(vals, 1), torch.cat(idxs, 1)
    order = cat_v.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return cat_v.gather(1, order), cat_i.gather(1, order)


def _merge(run_v, run_i, v, i, k):
    """The running top-k merged with the next chunk's list."""
    return (v, i) if run_v is None else _merge_lists([run_v, v], [run_i, i], k)


def lm_head_topk_ref(hidden, weight, k, chunk=None):
    """The oracle: per vocabulary chunk, fp32 logits and a stable descending sort (ties keep
    index order), merged into the running top-k. Returns ``(values fp32, indices int64)``
    ``[M, k]``."""
    M, V = hidden.shape[0], weight.shape[0]
    h = hidden.float()
    run_v = run_i = None
    for v0 in range(0, V, _chunk(M, k, chunk)):
        w = weight[v0: v0 + _chunk(M, k, chunk)]
        logits = h @ w.float().T
        logits.masked_fill_(logits.isnan(), float("-inf"))  # NaN ranks as -inf on every path
        order = logits.sort(dim=1, descending=True, stable=True).indices[:, :k]
        run_v, run_i = _merge(run_v, run_i, logits.gather(1, order), order + v0, k)
    if run_v is None:  # V == 0 (rejected by the op's validation; kept total for direct calls)
        return hidden.new_empty(M, 0, dtype=torch.float32), hidden.new_empty(M, 0, dtype=torch.long)
    return run_v, run_i


def lm_head_topk_chunked(hidden, weight, k, chunk=None):
    """The CPU kernel (plain torch, any device): per vocabulary chunk, an fp32 matmul and a sorted
    ``torch.topk``. Where topk's choice may break the tie rule -- a value equal to the k-th left
    out, or equal values among the k (whose order topk leaves open) -- the row is redone with a
    stable sort. Chunks merge in (value desc, index asc) order. Costs ``torch.topk(hidden @
    weight.T, k)`` plus one comparison pass over the logits, without holding the ``[M, V]``
    logits at once."""
    M, V = hidden.shape[0], weight.shape[0]
    h = hidden.float()
    if chunk is None and weight.dtype != torch.float32:
        # half weights are upcast chunk by chunk: cache-sized chunks convert and multiply faster
        chunk = min(CHUNK_ELEMS // max(M, 1), UPCAST_ELEMS // max(weight.shape[1], 1))
    c = _chunk(M, k, chunk)
    vals, idxs = [], []
    for v0 in range(0, V, c):
        logits = h @ weight[v0: v0 + c].float().T
        logits.masked_fill_(logits.isnan(), float("-inf"))  # NaN ranks as -inf on every path
        kc = min(k, logits.shape[1])
        v, i = logits.topk(kc, dim=1)
        if M:
            fix = (logits >= v[:, -1:]).sum(1) > kc  # a value tied with the k-th was left out
            if kc > 1:
                fix |= (v[:, 1:] == v[:, :-1]).any(1)  # equal values among the k: order open
            if bool(fix.any()):
                r = fix.nonzero().flatten()
                order = logits[r].sort(dim=1, descending=True, stable=True).indices[:, :kc]
                v[r], i[r] = logits[r].gather(1, order), order
        vals.append(v)
        idxs.append(i + v0 if v0 else i)
    if not vals:
        return hidden.new_empty(M, 0, dtype=torch.float32), hidden.new_empty(M, 0, dtype=torch.long)
    # every chunk's list is ordered (value desc, index asc) and the chunks ascend in index
    return _merge_lists(vals, idxs, k)


def lm_head_topk_torch(hidden, weight, k):
    """The baseline a user would write: materialise the logits (in the inputs' dtype), then
    ``torch.topk`` (tie order unspecified)."""
    return torch.topk(hidden @ weight.T, k, dim=1)
