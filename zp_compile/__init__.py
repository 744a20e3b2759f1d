"""zp-compile: prefill-only serving of MoE LLMs with asynchronous expert-weight gathering (AsyncEP)."""

from .optimize import PRESETS, ZeroPrefillConfig, from_pretrained, optimize

__all__ = ["optimize", "from_pretrained", "ZeroPrefillConfig", "PRESETS"]
__version__ = "0.1.0"
