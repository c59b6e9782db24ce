"""A small decoding engine on the package's ops: paged KV cache, batched prefill, plain decoding and
Mirror speculative decoding (tree drafts, early-exit candidates, branch reuse) for transformers
Llama models, LoRA-Mixer layers included. See :class:`Engine`."""

from .cache import PagedKVCache
from .engine import Engine, GenerationResult, SamplingParams
from .model import LlamaRunner, OpTimer

__all__ = ["Engine", "GenerationResult", "SamplingParams", "PagedKVCache", "LlamaRunner", "OpTimer"]
