"""Finding MoE layers by structure, and the errors for models we cannot shard."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zp_compile.models.discovery import UnsupportedModelError, find_moe_layers
from zp_compile.models import VERIFIED_FAMILIES, tiny_config


def build(family, **overrides):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config(family, **overrides))


@pytest.mark.parametrize("family", VERIFIED_FAMILIES)
def test_every_family_is_found(family):
    layers = find_moe_layers(build(family, layers=3, num_experts=5, hidden=48))
    assert [layer.index for layer in layers] == [0, 1, 2]
    for layer in layers:
        assert layer.num_experts == 5
        assert {"down_proj", layer.layout.up_proj} <= set(layer.expert_params)
        assert layer.router_path is not None, layer
        assert layer.layout.transposed is not None  # hidden 48 != 2 * expert width 64
    assert layers[0].layout.has_bias == (family == "gpt_oss")
    assert layers[0].layout.gate_up_interleaved == (family == "gpt_oss")
    assert layers[0].layout.transposed == (family in ("gpt_oss", "llama4_text"))
    has_shared = family in ("qwen2_moe", "deepseek_v3", "glm4_moe", "llama4_text")
    assert bool(layers[0].shared_expert_paths) == has_shared


def test_dense_layers_are_skipped():
    model = build("qwen3_moe", layers=4, mlp_only_layers=[0, 2])
    assert [layer.path for layer in find_moe_layers(model)] == ["model.layers.1.mlp.experts", "model.layers.3.mlp.experts"]


def test_dense_model_is_rejected_with_its_class_name():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM has no MoE layer"):
        find_moe_layers(LlamaForCausalLM(config))


class PerExpertMoE(nn.Module):
    """Experts as a ModuleList of per-expert MLPs: the pre-transformers-5 layout."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 4)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)) for _ in range(4))


def test_per_expert_modules_are_named_in_the_error():
    with pytest.raises(UnsupportedModelError, match="PerExpertMoE has no MoE layer.*'experts' is a ModuleList"):
        find_moe_layers(PerExpertMoE())


class OddExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(4, 16, 8))
        self.w2 = nn.Parameter(torch.zeros(4, 8, 16))


def test_unrecognised_stacked_layout_is_named():
    with pytest.raises(UnsupportedModelError, match=r"'' \(OddExperts\) has 3-D parameters w1 \(4, 16, 8\)"):
        find_moe_layers(OddExperts())


class Mismatched(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(4, 16, 8))
        self.down_proj = nn.Parameter(torch.zeros(3, 8, 8))


def test_mismatched_expert_counts_are_named():
    with pytest.raises(UnsupportedModelError, match="different leading"):
        find_moe_layers(Mismatched())
