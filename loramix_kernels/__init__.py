"""loramix_kernels: kernels for LoRA-Mixer routed multi-LoRA projections and Mirror speculative
decoding, exposed as ``torch.ops.loramix.*`` and as the documented functions below.

Importing the package loads the native CPU extension (if built) and registers every op. The op
contract is ``docs/API.md``.
"""

from . import _backend, _native
from ._backend import set_deterministic, set_value_validation, use_backend

# Native CPU kernels (csrc/): built at install time, else compiled once on first import against the
# installed torch and cached; None, after one warning saying why, when neither works (_native.py).
_C = _native.load()

# Registration: each family module declares its schemas and registers its kernels.
from .ops.routed_lora import routed_lora, routed_lora_add_  # noqa: E402
from .ops.tree import build_tree, tree_attention  # noqa: E402
from .ops.verify import match_branch, verify_greedy, verify_sampling  # noqa: E402
from .ops.kv import compact_kv_, compact_kv_layers_, kv_write_  # noqa: E402
from .ops.lm_head import lm_head_topk  # noqa: E402
from .ops.routing import route_topk  # noqa: E402
from .ops.sharding import routed_lora_expand, routed_lora_expand_, routed_lora_shrink  # noqa: E402
from . import losses, nn  # noqa: E402  (modules and losses: torch only, HF packages imported lazily)

__all__ = [
    "routed_lora", "routed_lora_add_",
    "build_tree", "tree_attention",
    "verify_greedy", "verify_sampling", "match_branch",
    "compact_kv_", "compact_kv_layers_", "kv_write_", "lm_head_topk",
    "route_topk", "losses", "nn",
    "routed_lora_shrink", "routed_lora_expand_", "routed_lora_expand",
    "set_deterministic", "set_value_validation", "use_backend",
]
__version__ = "0.1.0"
