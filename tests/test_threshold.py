"""The measured saturation threshold: the same T on every rank, consistent with its parts."""

from __future__ import annotations

import math

import pytest

from zp_compile.costmodel.flops import threshold_at
from zp_compile.costmodel.spec import spec_from_config

from dist_utils import run_ranks
from workers import measured_threshold


@pytest.mark.parametrize("transport", ["collective", "shm"])
def test_every_rank_agrees_on_t(checkpoints, transport):
    from transformers import AutoConfig

    path = checkpoints("qwen3_moe", layers=2, num_experts=8)
    results = run_ranks(2, measured_threshold, str(path), transport)
    assert results[0] == results[1], "ranks must schedule against the same T"
    r = results[0]
    assert r["t_gather_s"] > 0 and r["peak_flops"] > 0
    assert math.isclose(r["flops_per_layer"], r["t_gather_s"] * r["peak_flops"] * 1.2)
    expected = threshold_at(spec_from_config(AutoConfig.from_pretrained(path)), r["t_gather_s"], r["peak_flops"], 1.2, 256)
    assert [r["flops_per_layer"], r["tokens"], r["flops_per_step"]] == pytest.approx(list(expected))
    assert r["flops_per_step"] > r["flops_per_layer"]  # the whole model does more than one MoE layer


def test_unoptimized_model_is_refused():
    from transformers import AutoModelForCausalLM

    import zp_compile
    from zp_compile.models import tiny_config

    with pytest.raises(ValueError, match="not optimized"):
        zp_compile.saturation_threshold(AutoModelForCausalLM.from_config(tiny_config("qwen3_moe")))
