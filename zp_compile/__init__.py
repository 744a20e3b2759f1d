"""zp-compile: prefill-only serving of MoE LLMs with asynchronous expert-weight gathering (AsyncEP)."""

from .optimize import PRESETS, ZeroPrefillConfig, from_pretrained, optimize
from .threshold import saturation_threshold

__all__ = ["optimize", "from_pretrained", "saturation_threshold", "ZeroPrefillConfig", "PRESETS"]
__version__ = "0.1.0"
