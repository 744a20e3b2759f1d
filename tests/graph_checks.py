"""Independent checks of AsyncEP graph invariants, written against node metadata (which decoder layer
a node came from) rather than the pass's own anchors, so they can catch a wrong pass."""

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


def check_async_ep_graph(graph: Graph, *, prefetch: int, layer_of_gather, expected_gathers: int) -> dict:
    """Assert the AsyncEP invariants on a post-pass ATen graph; return a few measurements.

    ``layer_of_gather(ag) -> decoder layer index`` says which decoder layer a gather serves.
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

    layers = sorted({layer_of_gather(ag) for ag in ags})
    by_layer = {layer: [ag for ag in ags if layer_of_gather(ag) == layer] for layer in layers}
    first_compute = {}
    for n in nodes:
        d = decoder_layer(n)
        if d is not None and d not in first_compute and target(n) is not None and not is_collective(n):
            first_compute[d] = n
    first_read = {L: min((r for ag in by_layer[L] for r in readers(ag)), key=pos.__getitem__) for L in layers}
    last_read = {L: max((r for ag in by_layer[L] for r in readers(ag)), key=pos.__getitem__) for L in layers}

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
    return {"peak_live_layers": peak, "gathers": len(ags)}
