"""Independent checks of AsyncEP graph invariants, written against node metadata (which decoder layer
a node came from) rather than the pass's own anchors, so they can catch a wrong pass.

Quantized banks: a gather sends a shard as stored (float8 values as uint8 bytes, uint8 MXFP4 blocks,
scales), its wait delivers the same dtype, nothing computes with a shard before its gather, and the
nodes that decode it run after the wait and count as the layer's bank until the expert matmuls."""

from __future__ import annotations

import re

import torch
from torch.fx import Graph, Node

C10D = torch.ops._c10d_functional
_LAYER = re.compile(r"layers\.(\d+)\.")


def decoder_layer(node: Node) -> int | None:
    """Index of the decoder layer a node was traced from (innermost module path), if any."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    m = _LAYER.search(path + ".")
    return int(m.group(1)) if m else None


def is_control_deps(node: Node) -> bool:
    return node.op == "call_function" and "control_deps" in str(node.target)


def target(node: Node):
    """The op a node runs, seeing through Inductor's ``control_deps(deps, subgraph, *args)`` wrapper."""
    if is_control_deps(node):
        sub = getattr(node.graph.owning_module, node.args[1].target)
        (inner,) = [n for n in sub.graph.nodes if n.op == "call_function"]
        return inner.target
    return node.target if node.op == "call_function" else None


def is_view(node: Node) -> bool:
    t = target(node)
    return isinstance(t, torch._ops.OpOverload) and t.is_view


def is_ordering_only(node: Node, dep: Node) -> bool:
    """``node`` takes ``dep`` only as a control dependency, not as data."""
    return is_control_deps(node) and dep in node.args[0] and dep not in node.args[2:]


def is_collective(node: Node) -> bool:
    return target(node) in (C10D.all_gather_into_tensor.default, C10D.wait_tensor.default)


def sends_only(node: Node) -> bool:
    """A view that only feeds all-gathers (a float8 shard seen as uint8 for the wire): no compute."""
    return is_view(node) and bool(node.users) and all(
        target(u) is C10D.all_gather_into_tensor.default or sends_only(u) for u in node.users if not is_ordering_only(u, node)
    )


def readers(buffer: Node) -> list[Node]:
    """Non-view nodes reading ``buffer`` (as data, not as a mere ordering dependency), also through views."""
    out, todo = [], [u for u in buffer.users if not is_ordering_only(u, buffer)]
    while todo:
        n = todo.pop()
        if is_view(n) or target(n) is C10D.wait_tensor.default:
            todo.extend(u for u in n.users if not is_ordering_only(u, n))
        else:
            out.append(n)
    return out


def gathers(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if target(n) is C10D.all_gather_into_tensor.default]


def data_inputs(node: Node) -> list[Node]:
    """The nodes whose values ``node`` computes with (a ``control_deps`` wrapper's dependencies excluded)."""
    if is_control_deps(node):
        return [a for a in node.args[2:] if isinstance(a, Node)]
    return node.all_input_nodes


def variable_nodes(graph: Graph) -> set[Node]:
    """Nodes whose value depends on a graph input (activations, parameters, shards); the rest are constants."""
    found: set[Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder" or any(i in found for i in data_inputs(n)):
            found.add(n)
    return found


def bank(waits: list[Node], variable: set[Node]) -> set[Node]:
    """What a layer's full expert weights are made of once gathered: the waits' outputs, their views and
    everything computed from them (and constants) alone, such as the dequantization of stored bytes."""
    found = set(waits)
    for n in waits[0].graph.nodes:
        inputs = data_inputs(n)
        if n not in found and any(i in found for i in inputs) and (is_view(n) or all(i in found or i not in variable for i in inputs)):
            found.add(n)
    return found


def bank_readers(waits: list[Node], variable: set[Node]) -> list[Node]:
    """The nodes that use a layer's gathered (and decoded) weights with anything else: the expert matmuls."""
    made_of = bank(waits, variable)
    return [n for n in waits[0].graph.nodes if n not in made_of and any(i in made_of for i in data_inputs(n))]


def gathered_dtype(ag: Node) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the shard fed to the gather, dtype its wait delivers after the dtype views around the
    collective): float8 shards cross gloo as uint8 and come back as float8."""
    source = shard_of(ag)
    (wait,) = [u for u in ag.users if target(u) is C10D.wait_tensor.default]
    delivered = wait
    while len(delivered.users) == 1 and is_view(next(iter(delivered.users))):
        delivered = next(iter(delivered.users))
    return source.meta["val"].dtype, delivered.meta["val"].dtype


def shard_of(ag: Node) -> Node:
    """The graph input (this rank's shard) an all-gather sends, seen through views."""
    node = ag.args[0] if not is_control_deps(ag) else ag.args[2]
    while is_view(node):
        node = data_inputs(node)[0]
    return node


def check_async_ep_graph(graph: Graph, *, prefetch: int, layer_of_gather, expected_gathers: int) -> dict:
    """Assert the AsyncEP invariants on a post-pass ATen graph; return a few measurements.

    ``layer_of_gather(ag) -> decoder layer index`` says which decoder layer a gather serves. A layer's
    gathered weights are alive until the last node that uses them, or what is decoded from them, with
    anything else (``bank_readers``): a quantized bank counts with its dequantized copy.
    """
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    ags = gathers(graph)
    assert len(ags) == expected_gathers, f"{len(ags)} gathers, expected one per sharded expert tensor ({expected_gathers})"
    assert not [n for n in nodes if "all_to_all" in str(target(n))], "all_to_all remains"

    # Every gathered buffer is read only through its wait, and only after the wait.
    for ag in ags:
        waits = [u for u in ag.users if target(u) is C10D.wait_tensor.default]
        others = [u for u in ag.users if u not in waits and not is_ordering_only(u, ag)]
        assert len(waits) == 1 and not others, f"{ag.name} is used by {[u.target for u in ag.users]}"
        (wait,) = waits
        for r in readers(wait):
            assert pos[r] > pos[wait], f"{r.name} reads {ag.name} before its wait"
        # Nothing computes with a shard before it is gathered (a quantized one is decoded after the wait).
        shard = shard_of(ag)
        assert shard.op == "placeholder", f"{ag.name} gathers {shard.name} ({shard.target}), not a shard as stored"
        before = [u for u in readers(shard) if target(u) is not C10D.all_gather_into_tensor.default]
        assert not before, f"{[u.name for u in before]} compute with shard {shard.name} before its gather"
        sent, delivered = gathered_dtype(ag)
        assert sent == delivered, f"{ag.name} sends {sent} and delivers {delivered}"

    layers = sorted({layer_of_gather(ag) for ag in ags})
    by_layer = {layer: [ag for ag in ags if layer_of_gather(ag) == layer] for layer in layers}
    first_compute = {}
    for n in nodes:
        d = decoder_layer(n)
        if d is not None and d not in first_compute and target(n) is not None and not is_collective(n) and not sends_only(n):
            first_compute[d] = n
    first_read = {L: min((r for ag in by_layer[L] for r in readers(ag)), key=pos.__getitem__) for L in layers}
    variable = variable_nodes(graph)
    wait_of = {ag: next(u for u in ag.users if target(u) is C10D.wait_tensor.default) for ag in ags}
    used = {L: bank_readers([wait_of[ag] for ag in by_layer[L]], variable) for L in layers}
    last_read = {L: max(used[L], key=pos.__getitem__) for L in layers}

    for k, L in enumerate(layers):
        issue = max(pos[ag] for ag in by_layer[L])
        # Issued early enough: before the decoder layer `prefetch` gathered layers back starts.
        ahead = layers[k - prefetch] if k - prefetch >= 0 else None
        if prefetch == 0:
            assert issue < pos[first_read[L]], f"layer {L} gathered after its first use"
        elif ahead is not None:
            assert issue < pos[first_compute[ahead]], (
                f"gather of layer {L} issued after decoder layer {ahead} started (prefetch {prefetch})"
            )
        # ...and not earlier than needed: after layer k-prefetch-1's experts are done.
        if k - prefetch - 1 >= 0:
            before = layers[k - prefetch - 1]
            assert min(pos[ag] for ag in by_layer[L]) > pos[last_read[before]], (
                f"gather of layer {L} issued before layer {before}'s experts finished"
            )

    # Liveness of gathered layers: from the first gather to the last read.
    live, peak = set(), 0
    starts = {min(pos[ag] for ag in by_layer[L]): L for L in layers}
    ends = {}
    for L in layers:
        ends.setdefault(pos[last_read[L]], []).append(L)
    for i in range(len(nodes)):
        if i in starts:
            live.add(starts[i])
        peak = max(peak, len(live))
        for L in ends.get(i, []):
            live.discard(L)
    assert peak <= prefetch + 1, f"{peak} gathered layers alive at once, more than prefetch + 1 = {prefetch + 1}"

    order = [layer_of_gather(ag) for ag in ags]
    assert order == sorted(order), f"gathers issued out of layer order: {order}"
    decoded = {L: bank([wait_of[ag] for ag in by_layer[L]], variable) for L in layers}
    # The dtypes the expert matmuls take the weights in, and how many nodes decode them on the way.
    used_dtypes = {i.meta["val"].dtype for L in layers for r in used[L] for i in data_inputs(r) if i in decoded[L]}
    return {
        "peak_live_layers": peak,
        "gathers": len(ags),
        "gathered_dtypes": sorted({str(gathered_dtype(ag)[1]).removeprefix("torch.") for ag in ags}),
        "used_dtypes": sorted(str(d).removeprefix("torch.") for d in used_dtypes),
        "decode_nodes": sum(1 for L in layers for n in decoded[L] if not is_view(n) and target(n) is not C10D.wait_tensor.default),
    }
