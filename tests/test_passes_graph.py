"""Graph-level invariants of the AsyncEP passes on generated configs (in-process, fake process group)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zp_compile
from zp_compile.models import tiny_config

from dist_utils import captured_graphs, fake_world
from graph_checks import check_async_ep_graph, decoder_layer


def compile_and_capture(
    config, world_size: int, prefetch: int, resident_first_layer: bool = False, tokens=(2, 5), dtype=torch.float32
):
    from transformers import AutoModelForCausalLM

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with fake_world(world_size), captured_graphs() as graphs:
        zp_compile.optimize(model, prefetch=prefetch, backend="aot_eager", resident_first_layer=resident_first_layer)
        with torch.inference_mode():
            model(input_ids=torch.randint(3, config.vocab_size, tokens))
    assert len(graphs) == 1, "the whole forward must be one graph"
    return model, graphs[0]


@st.composite
def moe_configs(draw):
    layers = draw(st.integers(1, 5))
    num_experts = draw(st.integers(2, 12))
    dense = draw(st.lists(st.booleans(), min_size=layers, max_size=layers))
    if all(dense):
        dense[draw(st.integers(0, layers - 1))] = False  # at least one MoE layer
    family = draw(st.sampled_from(["qwen3_moe", "qwen2_moe"]))
    config = tiny_config(
        family,
        layers=layers,
        hidden=draw(st.sampled_from([32, 64])),
        num_experts=num_experts,
        top_k=draw(st.integers(1, min(4, num_experts))),
        expert_size=draw(st.sampled_from([16, 48])),
        mlp_only_layers=[i for i, d in enumerate(dense) if d],
    )
    return config


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=moe_configs(),
    world_size=st.integers(2, 5),
    prefetch=st.integers(0, 3),
    resident_first_layer=st.booleans(),
)
def test_async_ep_invariants(config, world_size, prefetch, resident_first_layer):
    model, graph = compile_and_capture(config, world_size, prefetch, resident_first_layer)
    sharded = model.zero_prefill.sharded_layers
    expected = sum(len(layer.expert_params) for layer in sharded)
    stats = check_async_ep_graph(graph, prefetch=prefetch, layer_of_gather=decoder_layer, expected_gathers=expected)
    # The prefetch is real: as many layers in flight as the depth allows (not merely at most).
    assert stats["peak_live_layers"] == min(prefetch + 1, len(sharded)) or not sharded


def test_world_of_one_has_no_collectives():
    from transformers import AutoModelForCausalLM

    torch._dynamo.reset()
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe")).eval()
    with captured_graphs() as graphs:
        zp_compile.optimize(model, backend="aot_eager")
        with torch.inference_mode():
            model(input_ids=torch.randint(3, 256, (1, 4)))
    assert model.zero_prefill.world_size == 1 and not model.zero_prefill.sharded_layers
    assert not [n for n in graphs[0].nodes if "c10d" in str(n.target)]


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_llama4_double_read_gathers_once(prefetch):
    """Llama4's experts read gate_up_proj twice (shape and bmm): still one gather per tensor."""
    model, graph = compile_and_capture(tiny_config("llama4_text", layers=3), 2, prefetch)
    expected = sum(len(layer.expert_params) for layer in model.zero_prefill.sharded_layers)
    check_async_ep_graph(graph, prefetch=prefetch, layer_of_gather=decoder_layer, expected_gathers=expected)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_bf16_is_one_graph_too(family):
    """bf16 takes transformers' grouped_mm path (not the fp32 fallback op): still one graph, same invariants."""
    model, graph = compile_and_capture(tiny_config(family, layers=3), 2, 1, dtype=torch.bfloat16)
    expected = sum(len(layer.expert_params) for layer in model.zero_prefill.sharded_layers)
    check_async_ep_graph(graph, prefetch=1, layer_of_gather=decoder_layer, expected_gathers=expected)


def test_dynamic_shapes_keep_the_invariants():
    """A second batch shape makes dynamo recompile with symbolic sizes; the passes must still apply."""
    from transformers import AutoModelForCausalLM

    torch._dynamo.reset()
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe", layers=3)).eval()
    with fake_world(2), captured_graphs() as graphs:
        zp_compile.optimize(model, backend="aot_eager")
        with torch.inference_mode():
            for shape in [(2, 5), (3, 7), (4, 9)]:
                assert model(input_ids=torch.randint(3, 256, shape)).logits.shape == (*shape, 256)
    symbolic = [g for g in graphs if any(isinstance(n.meta.get("val"), torch.SymInt) for n in g.nodes)]
    assert symbolic, "expected a dynamic-shape recompile"
    check_async_ep_graph(symbolic[-1], prefetch=1, layer_of_gather=decoder_layer, expected_gathers=6)


def test_routing_sorts_of_a_dynamic_length_are_opaque_to_inductor():
    """The MoE routing sorts its tokens x top_k expert ids. Where that length is symbolic, the sort is
    ``zp_compile::sort`` (Inductor's lowering of ``aten.sort`` would guard it below 32,767, then call the
    same kernel); a static length keeps ``aten.sort``, which a GPU may lower to a kernel."""
    from transformers import AutoModelForCausalLM

    aten_sorts = (torch.ops.aten.sort.default, torch.ops.aten.sort.stable)
    torch._dynamo.reset()
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe", layers=3)).eval()
    with fake_world(2), captured_graphs() as graphs:
        zp_compile.optimize(model, backend="aot_eager", dynamic=True)
        with torch.inference_mode():
            model(input_ids=torch.randint(3, 256, (2, 5)))
    (graph,) = graphs
    ours = [n for n in graph.nodes if n.target is torch.ops.zp_compile.sort.default]
    assert len(ours) == 3 and not [n for n in graph.nodes if n.target in aten_sorts]
    assert all(isinstance(n.args[0].meta["val"].shape[n.args[1]], torch.SymInt) for n in ours)
    check_async_ep_graph(graph, prefetch=1, layer_of_gather=decoder_layer, expected_gathers=6)

    _, static = compile_and_capture(tiny_config("qwen3_moe", layers=3), 2, 1)
    assert len([n for n in static.nodes if n.target in aten_sorts]) == 3
    assert not [n for n in static.nodes if n.target is torch.ops.zp_compile.sort.default]


# Quantized checkpoints at sizes with whole and partial 128-blocks; what their gathers move: the stored
# values and their scales (MXFP4: uint8 blocks and e8m0 scales, bf16 biases).
QUANTIZED_SIZES = {"layers": 4, "hidden": 256, "expert_size": 128, "num_experts": 6}
STORED_DTYPES = {"fp8": ["float32", "float8_e4m3fn"], "mxfp4": ["bfloat16", "uint8"]}


def compile_checkpoint(path, world_size: int, prefetch: int, **kwargs):
    torch._dynamo.reset()
    with fake_world(world_size) as group, captured_graphs() as graphs:
        model = zp_compile.from_pretrained(path, group, dtype=torch.float32, prefetch=prefetch, backend="aot_eager", **kwargs)
        with torch.inference_mode():
            model(input_ids=torch.randint(3, model.config.vocab_size, (2, 5)))
    assert len(graphs) == 1, "the whole forward must be one graph"
    return model, graphs[0]


@pytest.mark.parametrize(
    "family, method, prefetch",
    [("qwen3_moe", "fp8", 0), ("qwen3_moe", "fp8", 1), ("qwen3_moe", "fp8", 2), ("deepseek_v3", "fp8", 1), ("gpt_oss", "mxfp4", 1)],
)
def test_quantized_banks_are_gathered_as_stored(checkpoints, family, method, prefetch):
    """The gathers move the checkpoint's bytes (float8 / uint8 and their scales), the dequantization runs
    after the waits, the expert matmuls get fp32 weights, and the AsyncEP invariants hold with the
    decoded copies counted as part of their layer."""
    model, graph = compile_checkpoint(checkpoints(family, quantization=method, **QUANTIZED_SIZES), 2, prefetch)
    sharded = model.zero_prefill.sharded_layers
    expected = sum(len(layer.module._zp_gather.slots) for layer in sharded)
    # FP8: gate and up (two per-expert pieces) and down, each values + scales; MXFP4: blocks, scales, bias each.
    assert expected == 6 * len(sharded)
    stats = check_async_ep_graph(graph, prefetch=prefetch, layer_of_gather=decoder_layer, expected_gathers=expected)
    assert stats["gathered_dtypes"] == STORED_DTYPES[method]
    assert stats["used_dtypes"] == ["float32"] and stats["decode_nodes"] >= 2 * len(sharded)
    assert stats["peak_live_layers"] == min(prefetch + 1, len(sharded))


def test_checks_tell_stored_from_decoded_gathers(checkpoints):
    """Controls for the checks above: an unquantized checkpoint gathers fp32 and decodes nothing; a graph
    that computes with a shard before gathering it (decoding first) is refused."""
    _, graph = compile_checkpoint(checkpoints("qwen3_moe", **QUANTIZED_SIZES), 2, 1)
    stats = check_async_ep_graph(graph, prefetch=1, layer_of_gather=decoder_layer, expected_gathers=8)
    assert stats["gathered_dtypes"] == ["float32"] and stats["decode_nodes"] == 0

    _, graph = compile_checkpoint(checkpoints("qwen3_moe", quantization="fp8", **QUANTIZED_SIZES), 2, 1)
    ag = next(n for n in graph.nodes if "all_gather_into_tensor" in str(n.target))
    sent = ag.args[0]
    with graph.inserting_before(ag):
        early = graph.call_function(torch.ops.aten.bitwise_not.default, (sent,))
    early.meta["val"] = sent.meta["val"]
    ag.replace_input_with(sent, early)
    with pytest.raises(AssertionError, match="not a shard as stored"):
        check_async_ep_graph(graph, prefetch=1, layer_of_gather=decoder_layer, expected_gathers=24)
