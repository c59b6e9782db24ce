"""The engine's kernel calls, in one place.

Every op the engine runs goes through here: the package's public ops where they exist, and, for the
three engine ops that are being added on other branches (``lm_head_topk``, ``kv_write_``,
``compact_kv_layers_``), a plain-PyTorch stand-in with the same signature until they are merged.
``FALLBACKS`` names the stand-ins in use (the demo reports it).
"""

from __future__ import annotations

import loramix_kernels as _lk
from loramix_kernels import (build_tree, compact_kv_, match_branch, tree_attention,  # noqa: F401
                             verify_greedy, verify_sampling)
import torch

#: Names of engine ops that run a plain-PyTorch stand-in (the package does not provide them yet).
FALLBACKS: list[str] = []


def _lm_head_topk_torch(hidden, weight, k):
    logits = hidden.float() @ weight.float().T
    values, indices = torch.topk(logits, k, dim=-1)
    return values, indices


def _kv_write_torch(k_cache, v_cache, k, v, slot_mapping):
    nb, bs, h, d = k_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(nb * bs, h, d)[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(nb * bs, h, d)[slots] = v[keep].to(v_cache.dtype)


def _compact_kv_layers_torch(k_caches, v_caches, block_table, seq_lens, accept_index, accept_len):
    for layer in range(k_caches.shape[0]):
        compact_kv_(k_caches[layer], v_caches[layer], block_table, seq_lens, accept_index, accept_len)


lm_head_topk = getattr(_lk, "lm_head_topk", None)
if lm_head_topk is None:
    lm_head_topk = _lm_head_topk_torch
    FALLBACKS.append("lm_head_topk")
kv_write_ = getattr(_lk, "kv_write_", None)
if kv_write_ is None:
    kv_write_ = _kv_write_torch
    FALLBACKS.append("kv_write_")
compact_kv_layers_ = getattr(_lk, "compact_kv_layers_", None)
if compact_kv_layers_ is None:
    compact_kv_layers_ = _compact_kv_layers_torch
    FALLBACKS.append("compact_kv_layers_")
