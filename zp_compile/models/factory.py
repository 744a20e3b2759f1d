"""Tiny random MoE checkpoints built from transformers configs: for tests, the demo and benchmarks.

``tiny("qwen3_moe", num_experts=16)`` writes a real safetensors checkpoint directory (``config.json`` +
``model.safetensors``, saved by transformers itself so the on-disk key names are the family's own) and
returns its path. No download is involved.

Generic overrides (``layers``, ``hidden``, ``num_experts``, ``top_k``, ``expert_size``, ``vocab``,
``heads``, ``kv_heads``) are mapped onto each family's field names; any other keyword is passed to the
config unchanged, so every field of the family's config can be set.

``tiny(..., quantization="fp8" | "mxfp4")`` writes the random weights in a published quantized layout
(``quantized.py``): block-FP8 as Qwen3-*-FP8 and DeepSeek-V3 ship it (every linear layer and expert,
per-expert keys where the family saves them so; embeddings, norms, routers and ``lm_head`` unconverted
and listed so), or MXFP4 experts as gpt-oss ships them. Block-FP8 uses published 128 x 128 blocks, so
sizes of 128 or multiples of it (``hidden=256, expert_size=128``) exercise whole blocks.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

# Plain RoPE where a family's default is YaRN (whose factors warn on a 512-token tiny model).
_PLAIN_ROPE = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
# DeepSeek-V3 and GLM4-MoE: one shared expert, every layer MoE, one routing group.
_SHARED_ONE_GROUP = {"intermediate_size": 64, "n_shared_experts": 1, "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1}

# model_type -> (field for num_experts, field for expert width, family-specific defaults)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": ("num_local_experts", "intermediate_size", {}),
    "qwen2_moe": (
        "num_experts",
        "moe_intermediate_size",
        {"shared_expert_intermediate_size": 64, "intermediate_size": 64, "decoder_sparse_step": 1},
    ),
    "qwen3_moe": ("num_experts", "moe_intermediate_size", {"head_dim": 16, "intermediate_size": 64}),
    "olmoe": ("num_experts", "intermediate_size", {}),
    "deepseek_v3": (
        "n_routed_experts",
        "moe_intermediate_size",
        {
            **_SHARED_ONE_GROUP,
            **_PLAIN_ROPE,
            "kv_lora_rank": 16,
            "q_lora_rank": 32,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "rope_interleave": False,
        },
    ),
    "gpt_oss": (
        "num_local_experts",
        "intermediate_size",
        {"head_dim": 16, "sliding_window": 8, **_PLAIN_ROPE},
    ),
    "granitemoe": ("num_local_experts", "intermediate_size", {}),
    "phimoe": ("num_local_experts", "intermediate_size", {}),
    "glm4_moe": (
        "n_routed_experts",
        "moe_intermediate_size",
        {**_SHARED_ONE_GROUP, "head_dim": 16},
    ),
    "llama4_text": (
        "num_local_experts",
        "intermediate_size",
        {"intermediate_size_mlp": 64, "head_dim": 16, "interleave_moe_layer_step": 1, "attention_chunk_size": 64},
    ),
}

_MLA_FAMILIES = {"deepseek_v3"}

# The families the test suite verifies end to end; README's support table lists the same ones.
VERIFIED_FAMILIES = tuple(FAMILIES)


def tiny_config(
    family: str,
    *,
    layers: int = 2,
    hidden: int = 64,
    num_experts: int = 8,
    top_k: int = 2,
    expert_size: int = 32,
    vocab: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    **fields: Any,
):
    """A transformers config for a tiny model of ``family`` (a transformers ``model_type``)."""
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")
    experts_field, width_field, defaults = FAMILIES[family]
    kwargs: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "num_experts_per_tok": top_k,
        # Larger than the families' 0.02 so router logits are well separated: top-k choices then do
        # not flip on float rounding when compiled and eager code sum in different orders.
        "initializer_range": 0.1,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **defaults,
        experts_field: num_experts,
        width_field: expert_size,
    }
    if family in _MLA_FAMILIES:
        kwargs["num_key_value_heads"] = heads  # multi-head latent attention has no grouped KV heads
    kwargs.update(fields)
    return AutoConfig.for_model(family, **kwargs)


# The --quantization choices: quantization_config["quant_method"] of the published layouts we write.
QUANTIZATIONS = ("fp8", "mxfp4")


def tiny(
    family: str = "qwen3_moe",
    path: str | Path | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    quantization: str | None = None,
    **overrides: Any,
) -> Path:
    """Write a tiny random ``family`` checkpoint (safetensors) to ``path`` (a new temp dir if None).

    ``quantization``: None, or one of ``QUANTIZATIONS`` (the layouts in the module docstring).
    ``dtype``: of the tensors left unquantized; default float32, bfloat16 (as published) when quantized."""
    from transformers import AutoModelForCausalLM

    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"unknown quantization {quantization!r}; known: {', '.join(QUANTIZATIONS)}")
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    default_dtype = torch.bfloat16 if quantization else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or default_dtype)
    out = Path(path) if path is not None else Path(tempfile.mkdtemp(prefix=f"zp-tiny-{family}-"))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if quantization:
        _quantize_saved(out, model, quantization)
    return out


def _quantize_saved(path: Path, model, method: str) -> None:
    """Rewrite the checkpoint ``model`` was just saved to in the published ``method`` layout."""
    from safetensors.torch import load_file, save_file

    from .quantized import BlockFp8, Mxfp4

    codec = BlockFp8() if method == "fp8" else Mxfp4()
    file = path / "model.safetensors"
    tensors = load_file(file)  # a tiny model: one file
    converted = _fp8_keys(model, tensors) if method == "fp8" else _mxfp4_keys(model, tensors)
    stored: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key in converted:
            stored.update({codec.keys(key)[role]: t for role, t in codec.encode(value).items()})
        else:
            stored[key] = value
    save_file(stored, file, metadata={"format": "pt"})
    owners = {k.rpartition(".")[0] for k in converted}
    # Published configs list the modules left in the model dtype (Qwen3-*-FP8 names each one).
    kept = {k.rpartition(".")[0] for k in tensors} - owners
    kept = sorted(m for m in kept if not any(m.startswith(k + ".") for k in kept))  # "x.self_attn", not its parts too
    fields = {"fmt": "e4m3", "weight_block_size": list(codec.block), "activation_scheme": "dynamic"} if method == "fp8" else {}
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, **fields, "modules_to_not_convert": kept}
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _fp8_keys(model, tensors: dict[str, torch.Tensor]) -> set[str]:
    """The weights published block-FP8 checkpoints convert: every linear layer's and every expert's,
    not the output head's (embeddings, norms and routers are not linear layers)."""
    from .discovery import find_moe_layers

    linear = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    linear.discard(next(n for n, m in model.named_modules() if m is model.get_output_embeddings()))
    experts = tuple(layer.path + "." for layer in find_moe_layers(model))
    return {
        k for k, t in tensors.items()
        if k.endswith(".weight") and t.dim() == 2 and (k.removesuffix(".weight") in linear or k.startswith(experts))
    }


def _mxfp4_keys(model, tensors: dict[str, torch.Tensor]) -> set[str]:
    """The stacked expert weights (not biases), in the [E, in, out] layout gpt-oss's MXFP4 decodes to."""
    from .discovery import find_moe_layers

    keys = set()
    for layer in find_moe_layers(model):
        names = [f"{layer.path}.{p}" for p in layer.expert_params if not p.endswith("_bias")]
        if layer.layout.transposed is not True or not all(n in tensors and tensors[n].dim() == 3 for n in names):
            raise ValueError(
                f"{type(model).__name__}: MXFP4 is published for stacked [E, in, out] experts (gpt-oss); "
                f"{layer.path} is saved otherwise"
            )
        keys.update(names)
    return keys


def tiny_with_tokenizer(family: str, path: str | Path, **overrides: Any) -> Path:
    """``tiny`` plus the tokenizer made locally (``tokenizer.tiny_tokenizer``) in the same directory, with
    the model's vocabulary sized to the tokenizer's: a checkpoint a server can load and serve text with."""
    from .tokenizer import tiny_tokenizer

    tokenizer = tiny_tokenizer(path)
    return tiny(family, path, vocab=len(tokenizer), **overrides)


# The embedded default of the demo and of ``zp-compile serve``: 4 MoE layers x 16 experts, top-4.
DEFAULT = {"family": "qwen3_moe", "layers": 4, "num_experts": 16, "hidden": 128, "expert_size": 128, "top_k": 4}


def default_checkpoint(quantization: str | None = None) -> Path:
    """The embedded default checkpoint with a tokenizer made locally, built once (fixed seed) under the
    user's cache directory; the same on every machine. ``quantization``: the same sizes stored in that
    published layout; MXFP4 is published for gpt-oss's experts, so that one is a gpt_oss model."""
    spec = {**DEFAULT, "family": "gpt_oss"} if quantization == "mxfp4" else DEFAULT
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zp-compile"
    path = root / ("default-{family}-L{layers}-E{num_experts}-H{hidden}".format(**spec) + (f"-{quantization}" if quantization else ""))
    if not (path / "model.safetensors").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root))  # built aside, then renamed: concurrent builders never see half
        overrides = {k: v for k, v in spec.items() if k != "family"}
        tiny_with_tokenizer(spec["family"], tmp, max_position_embeddings=2048, quantization=quantization, **overrides)
        if not path.exists():
            tmp.rename(path)
    return path
