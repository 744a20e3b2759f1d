"""Regional compilation (``regional=True``): a decoder layer at a time, each distinct layer compiled once,
with the one-layer-ahead prefetch kept (graph checks here; logits in test_numerics)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import fx

import zp_compile
from zp_compile.models import tiny_config
from zp_compile.passes.predicates import is_expert_gather_marker
from zp_compile.regions import assign_pieces, decoder_layers, piece_key

from dist_utils import captured_graphs, fake_world
from graph_checks import C10D, is_collective, readers, sends_only, target

LAYERS = 5


def _model(layers: int = LAYERS, family: str = "qwen3_moe"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(family, layers=layers), dtype=torch.float32).eval()


def dynamo_graph(model, world_size: int = 2) -> fx.GraphModule:
    """The graph dynamo hands the backend for ``model`` optimized over a fake world (nothing compiled)."""
    optimize_module = sys.modules["zp_compile.optimize"]  # the module (the package exports its function)
    seen = []

    def spy(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    torch._dynamo.reset()
    real = optimize_module.zero_prefill_backend
    optimize_module.zero_prefill_backend = lambda *args: spy
    try:
        with fake_world(world_size):
            zp_compile.optimize(model, backend="aot_eager")
            with torch.inference_mode():
                model(input_ids=torch.randint(3, 200, (2, 7)))
    finally:
        optimize_module.zero_prefill_backend = real
    (gm,) = seen
    return gm


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_pieces_are_layers_and_markers_move_prefetch_layers_ahead(prefetch):
    gm = dynamo_graph(_model())
    layer_of = decoder_layers(gm.graph)
    assert sorted(set(layer_of.values())) == list(range(LAYERS))
    piece = assign_pieces(gm.graph, prefetch)
    markers = [n for n in gm.graph.nodes if is_expert_gather_marker(n)]
    assert len(markers) == 2 * LAYERS  # gate_up_proj and down_proj of every (sharded) MoE layer
    for node, p in piece.items():
        if is_expert_gather_marker(node):
            # Gathered layer k is issued in the piece of layer k - prefetch (the first piece when k < prefetch).
            assert p == max(layer_of[node] - prefetch, 0), (node.name, layer_of[node], p)
        elif node in layer_of:
            assert p == layer_of[node], node.name
    # The head (the last linear) runs with the last layer, the embedding with the first.
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert piece[[n for n in calls if "linear" in str(n.target)][-1]] == LAYERS - 1
    assert piece[next(n for n in calls if "embedding" in str(n.target))] == 0


def test_one_layer_models_are_compiled_whole():
    assert assign_pieces(dynamo_graph(_model(layers=1)).graph, 1) is None


def compile_regional(model, prefetch: int, world_size: int = 2) -> list[fx.Graph]:
    """The post-pass graphs of ``model`` compiled a decoder layer at a time over a fake world."""
    torch._dynamo.reset()
    with fake_world(world_size), captured_graphs() as graphs:
        zp_compile.optimize(model, prefetch=prefetch, backend="aot_eager", regional=True)
        with torch.inference_mode():
            model(input_ids=torch.randint(3, 200, (2, 7)))
    return graphs


@pytest.mark.parametrize("prefetch, compiles", [(0, 3), (1, 3), (2, 4)])
def test_each_distinct_layer_is_compiled_once(prefetch, compiles):
    """5 layers: the first (embedding), the middle ones alike, the last (head); at depth 2 the layer
    before the last issues no gather, and differs from the middle ones."""
    assert len(compile_regional(_model(), prefetch)) == compiles


@pytest.mark.parametrize("prefetch", [1, 2])
def test_a_piece_issues_the_layers_ahead_first_and_waits_for_them_last(prefetch):
    """In every compiled piece, a gather for a later layer is issued before the piece computes anything
    and waited for after everything it computes: its transfer spans the whole decoder layer."""
    with_ahead = []
    for graph in compile_regional(_model(), prefetch):
        nodes = list(graph.nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        compute = [n for n in nodes if target(n) is not None and not is_collective(n) and not sends_only(n)
                   and n.op == "call_function" and not (isinstance(target(n), torch._ops.OpOverload) and target(n).is_view)]  # fmt: skip
        gathers = [n for n in nodes if target(n) is C10D.all_gather_into_tensor.default]
        ahead = [ag for ag in gathers if not any(r.op != "output" for r in readers(ag))]  # read by a later piece
        own = [ag for ag in gathers if ag not in ahead]
        with_ahead.append(bool(ahead))
        for ag in ahead:
            (wait,) = [u for u in ag.users if target(u) is C10D.wait_tensor.default]
            assert pos[ag] < min(pos[n] for n in compute), f"{ag.name} is issued after the piece started computing"
            assert pos[wait] > max(pos[n] for n in compute), f"{wait.name} waits before the piece finished computing"
        for ag in own:  # the first piece's own layer(s): gathered before, and read after, their wait
            (wait,) = [u for u in ag.users if target(u) is C10D.wait_tensor.default]
            assert all(pos[r] > pos[wait] for r in readers(ag))
    # Compiled in order: the first layer, the middle ones, then the last `prefetch` (nothing left ahead).
    assert with_ahead == [True, True] + [False] * prefetch, with_ahead


def test_a_piece_is_shared_only_when_identical():
    """The key separates pieces that differ in a constant they hold, an input's shape or its aliasing."""

    def piece(constant: torch.Tensor) -> fx.GraphModule:
        root = torch.nn.Module()
        root.attr0 = constant
        graph = fx.Graph()
        x = graph.placeholder("a0")
        graph.output((graph.call_function(torch.add, (x, graph.get_attr("attr0"))),))
        return fx.GraphModule(root, graph)

    a, b = torch.zeros(3), torch.zeros(3)
    same = piece(a)
    assert piece_key(same, [a]) == piece_key(piece(a), [a])
    assert piece_key(same, [a]) != piece_key(piece(b), [a])  # equal values, another tensor: not shared
    assert piece_key(same, [a]) != piece_key(same, [torch.zeros(4)])
    assert piece_key(same, [a, a]) != piece_key(same, [a, b])  # two inputs aliasing, or not
    # Views of one buffer at different offsets (expert shards in one shared-memory segment) share while
    # their data is aligned as Inductor assumes; a misaligned one does not.
    segment = torch.zeros(64)
    assert piece_key(same, [segment[0:3]]) == piece_key(same, [segment[16:19]]) != piece_key(same, [segment[1:4]])
