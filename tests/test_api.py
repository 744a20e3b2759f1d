"""optimize()/from_pretrained() contract: prefill only, clear errors, empty batches, transformers' EP."""

from __future__ import annotations

import pytest
import torch

import zp_compile
from zp_compile.models import tiny_config

from dist_utils import run_ranks
from workers import empty_batch_on_rank_zero, transformers_ep_adopted


@pytest.fixture
def model():
    from transformers import AutoModelForCausalLM

    torch._dynamo.reset()
    return zp_compile.optimize(AutoModelForCausalLM.from_config(tiny_config("qwen3_moe")).eval(), backend="eager")


def test_training_mode_is_refused(model):
    model.train()
    with pytest.raises(RuntimeError, match="training mode.*model.eval"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long))


def test_gradients_are_refused(model):
    with pytest.raises(RuntimeError, match="gradients requested"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long))


def test_generate_is_refused(model):
    with pytest.raises(RuntimeError, match="generate.*prefill only"):
        model.generate(torch.ones(1, 3, dtype=torch.long))


def test_optimizing_twice_is_refused(model):
    with pytest.raises(RuntimeError, match="already optimized"):
        zp_compile.optimize(model)


def test_same_class_and_logits_in_a_world_of_one(model):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"))
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(3, 256, (2, 6))
    with torch.inference_mode():
        assert torch.allclose(model(input_ids=ids).logits, reference.eval()(input_ids=ids).logits, atol=1e-5)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_prefetch_is_named(bad):
    with pytest.raises(ValueError, match="prefetch must be an int >= 0"):
        zp_compile.ZeroPrefillConfig(prefetch=bad)


def test_bad_backend_is_named():
    with pytest.raises(ValueError, match="backend must be one of"):
        zp_compile.ZeroPrefillConfig(backend="tvm")


@pytest.mark.parametrize("backend", ["aot_eager", "eager"])
def test_rank_with_empty_batch_does_not_hang(checkpoints, backend):
    path = str(checkpoints("qwen2_moe", layers=3))
    results = run_ranks(2, empty_batch_on_rank_zero, path, backend)
    assert [s["shape"][1] for s in results[0]] == [0, 9, 0]
    for rank_results in results:
        for step in rank_results:
            assert step["max_abs_diff"] <= 1e-4, step


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_transformers_expert_parallel_dispatch_is_replaced(checkpoints, family):
    path = str(checkpoints(family, layers=2))
    for r in run_ranks(2, transformers_ep_adopted, path):
        assert r["dispatch_before"] and not r["dispatch_after"], r
        assert r["graphs"] == 1 and r["all_to_all"] == 0 and r["all_gather"] > 0, r
        assert r["max_abs_diff"] <= 1e-4, r


def test_config_and_keywords_together_are_refused():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe")).eval()
    with pytest.raises(ValueError, match="either as config= or as keywords"):
        zp_compile.optimize(model, prefetch=2, config=zp_compile.PRESETS["paper"])
