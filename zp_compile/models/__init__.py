"""Hugging Face knowledge: finding MoE layers, sharding them, loading checkpoints, tiny test models.

``zp_compile.models.tiny(family, **overrides)`` writes a tiny random checkpoint of a transformers MoE
family (see ``factory.py``).
"""

from .factory import DEFAULT, FAMILIES, QUANTIZATIONS, VERIFIED_FAMILIES, default_checkpoint, tiny, tiny_config, tiny_with_tokenizer
from .tokenizer import tiny_tokenizer

__all__ = ["DEFAULT", "FAMILIES", "QUANTIZATIONS", "VERIFIED_FAMILIES", "default_checkpoint", "tiny", "tiny_config", "tiny_tokenizer", "tiny_with_tokenizer"]
