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


def _chunk(M: int, k: int, chunk: int | None) -> int:
    return max(k, chunk if chunk is not None else CHUNK_ELEMS // max(M, 1))


def _merge(run_v, run_i, v, i, k):
    """Top-k of two candidate lists, each ordered (value desc, index asc), where every index of
    the first is below every index of the second: a stable descending sort of their concatenation
    keeps that order among equal values."""
    if run_v is None:
        return v, i
    cat_v, cat_i = torch.cat([run_v, v], 1), torch.cat([run_i, i], 1)
    order = cat_v.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return cat_v.gather(1, order), cat_i.gather(1, order)


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
        order = logits.sort(dim=1, descending=True, stable=True).indices[:, :k]
        run_v, run_i = _merge(run_v, run_i, logits.gather(1, order), order + v0, k)
    if run_v is None:  # V == 0 (rejected by the op's validation; kept total for direct calls)
        return hidden.new_empty(M, 0, dtype=torch.float32), hidden.new_empty(M, 0, dtype=torch.long)
    return run_v, run_i


def lm_head_topk_cpu(hidden, weight, k, chunk=None):
    """The CPU kernel (plain torch, any device): per vocabulary chunk, an fp32 matmul and
    ``torch.topk``; rows where the k-th value is tied beyond the selection (so topk's choice among
    the ties is arbitrary) are redone with a stable sort, then each chunk's k are ordered by
    (value desc, index asc) and merged. As fast as ``torch.topk(hidden @ weight.T, k)`` up to one
    comparison pass over the logits, without holding the ``[M, V]`` logits at once."""
    M, V = hidden.shape[0], weight.shape[0]
    h = hidden.float()
    c = _chunk(M, k, chunk)
    run_v = run_i = None
    for v0 in range(0, V, c):
        logits = h @ weight[v0: v0 + c].float().T
        kc = min(k, logits.shape[1])
        v, i = logits.topk(kc, dim=1, sorted=False)
        if M:
            kth = v.min(1, keepdim=True).values
            tied = (logits >= kth).sum(1) > kc  # a value equal to the k-th was left out
            if bool(tied.any()):
                r = tied.nonzero().flatten()
                order = logits[r].sort(dim=1, descending=True, stable=True).indices[:, :kc]
                v[r], i[r] = logits[r].gather(1, order), order
        # (value desc, index asc): sort by index, then a stable sort by value
        i, perm = i.sort(dim=1)
        v = v.gather(1, perm)
        v, perm = v.sort(dim=1, descending=True, stable=True)
        run_v, run_i = _merge(run_v, run_i, v, i.gather(1, perm) + v0, k)
    if run_v is None:
        return hidden.new_empty(M, 0, dtype=torch.float32), hidden.new_empty(M, 0, dtype=torch.long)
    return run_v, run_i
