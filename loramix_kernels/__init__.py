"""loramix_kernels: GPU kernels for LoRA-Mixer routed multi-LoRA projections and Mirror
speculative decoding, exposed as ``torch.ops.loramix.*``.

Importing the package loads the native CPU extension (if built) and registers every op.
"""

from . import _backend
from ._backend import set_value_validation, use_backend

try:  # native CPU kernels (csrc/), built by setup.py
    from . import _C  # noqa: F401
except ImportError:  # a source tree without a build: the ops fall back to plain PyTorch
    _C = None

# Registration: each family module declares its schemas and registers its kernels.
from .ops import routed_lora as _routed_lora_ops  # noqa: E402,F401
from .ops import verify as _verify_ops  # noqa: E402,F401
from .ops import kv as _kv_ops  # noqa: E402,F401
from .ops import tree as _tree_ops  # noqa: E402,F401

__all__ = ["set_value_validation", "use_backend"]
__version__ = "0.1.0"
