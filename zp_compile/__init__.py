"""zp-compile: prefill-only serving of MoE LLMs with asynchronous expert-weight gathering (AsyncEP)."""

from .optimize import PRESETS, ZeroPrefillConfig, from_pretrained, optimize
from .threshold import MeasuredThreshold, measure_threshold

saturation_threshold = measure_threshold  # the name of releases up to 0.1.0, kept for their callers

__all__ = ["optimize", "from_pretrained", "measure_threshold", "MeasuredThreshold", "saturation_threshold", "ZeroPrefillConfig", "PRESETS"]
__version__ = "0.1.0"
