"""zp-compile: prefill-only serving of MoE LLMs with asynchronous expert-weight gathering (AsyncEP)."""

from .optimize import PRESETS, ZeroPrefillConfig, optimize

__all__ = ["optimize", "ZeroPrefillConfig", "PRESETS"]
__version__ = "0.1.0"
