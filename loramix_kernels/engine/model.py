"""A transformers ``LlamaForCausalLM`` run over the paged cache: the model's own embedding, RMSNorms,
projections (LoRA-Mixer layers included), MLPs, rotary embedding and LM head; attention is ours
(:func:`~loramix_kernels.tree_attention` over :class:`~loramix_kernels.engine.PagedKVCache`)."""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from . import _ops


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class OpTimer:
    """Wall time per op name (seconds, accumulated). ``sync`` waits for CUDA work at each boundary
    so the times are the ops' own (slower; the demo's profiled pass only)."""

    def __init__(self, enabled: bool = False, sync: bool = False):
        self.enabled = enabled
        self.sync = sync
        self.total = defaultdict(float)
        self.calls = defaultdict(int)

    def __call__(self, name, fn, *args):
        if not self.enabled:
            return fn(*args)
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*args)
        if self.sync:
            torch.cuda.synchronize()
        self.total[name] += time.perf_counter() - t0
        self.calls[name] += 1
        return out


class LlamaRunner:
    """Runs (a range of) a Llama model's decoder layers on a batch of token trees.

    One call processes ``tokens [R, N]`` at ``positions [R, N]`` (prefix length + tree depth):
    each layer writes its K/V at ``slots`` (``kv_write_``) and attends with ``tree_attention``
    (every cached position before ``seq_lens[r] - N`` plus the node's ancestors in ``tree_mask``).
    """

    def __init__(self, model, timer: OpTimer | None = None):
        self.model = model
        inner = model.model
        cfg = model.config
        self.embed = inner.embed_tokens
        self.layers = inner.layers
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = model.lm_head
        self.num_layers = len(self.layers)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.sm_scale = float(getattr(self.layers[0].self_attn, "scaling", self.head_dim ** -0.5))
        self.vocab_size = cfg.vocab_size
        self.timer = timer or OpTimer()

    def rope(self, x, positions):
        return self.rotary(x, positions.long())

    @torch.no_grad()
    def layers_forward(self, x, cos, sin, cache, start, end, table, seq_lens, tree_mask, slots):
        """Decoder layers ``[start, end)`` on hidden states ``x [R, N, H]``; returns the new x."""
        R, N, _ = x.shape
        T = self.timer
        cos_, sin_ = cos[:, :, None, :], sin[:, :, None, :]
        for li in range(start, end):
            layer = self.layers[li]
            attn = layer.self_attn
            h = T("model: norms, projections, MLP", layer.input_layernorm, x)
            q = T("model: norms, projections, MLP", attn.q_proj, h).view(R, N, self.num_heads, self.head_dim)
            k = T("model: norms, projections, MLP", attn.k_proj, h).view(R, N, self.num_kv_heads, self.head_dim)
            v = T("model: norms, projections, MLP", attn.v_proj, h).view(R, N, self.num_kv_heads, self.head_dim)
            q = q * cos_ + _rotate_half(q) * sin_
            k = k * cos_ + _rotate_half(k) * sin_
            T("kv_write_", _ops.kv_write_, cache.k[li], cache.v[li],
              k.reshape(R * N, self.num_kv_heads, self.head_dim),
              v.reshape(R * N, self.num_kv_heads, self.head_dim), slots)
            o = T("tree_attention", _ops.tree_attention, q.to(cache.k.dtype), cache.k[li], cache.v[li],
                  table, seq_lens, tree_mask, self.sm_scale)
            x = x + T("model: norms, projections, MLP", attn.o_proj,
                      o.reshape(R, N, self.num_heads * self.head_dim).to(x.dtype))
            x = x + T("model: norms, projections, MLP",
                      lambda y: layer.mlp(layer.post_attention_layernorm(y)), x)
        return x

    @torch.no_grad()
    def logits(self, x):
        """Final RMSNorm and the LM head: ``[..., V]`` fp32."""
        return self.timer("lm_head", lambda y: self.lm_head(self.norm(y)).float(), x)

    @torch.no_grad()
    def exit_topk(self, x, k):
        """Early-exit candidates: ``lm_head_topk`` on the final-normed hidden ``x [M, H]`` with the
        shared LM head. Returns ``(values [M, k] fp32, indices [M, k] int64)``."""
        h = self.norm(x)
        return self.timer("lm_head_topk", _ops.lm_head_topk, h, self.lm_head.weight, k)
