"""The engine's kernel calls, in one place (the package's public ops; nothing re-implemented)."""

from loramix_kernels.ops.kv import compact_kv_layers_, kv_write_  # noqa: F401
from loramix_kernels.ops.lm_head import lm_head_topk  # noqa: F401
from loramix_kernels.ops.tree import build_tree, tree_attention  # noqa: F401
from loramix_kernels.ops.verify import match_branch, verify_greedy, verify_sampling  # noqa: F401
