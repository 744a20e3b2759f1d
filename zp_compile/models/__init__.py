"""Hugging Face knowledge: finding MoE layers, sharding them, loading checkpoints, tiny test models.

``zp_compile.models.tiny(family, **overrides)`` writes a tiny random checkpoint of a transformers MoE
family (see ``factory.py``).
"""

from .factory import FAMILIES, VERIFIED_FAMILIES, tiny, tiny_config

__all__ = ["FAMILIES", "VERIFIED_FAMILIES", "tiny", "tiny_config"]
