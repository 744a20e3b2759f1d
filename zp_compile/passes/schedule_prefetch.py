"""Pass: issue each MoE layer's expert gathers ``prefetch`` layers ahead, wait just before first use.

Input: a graph where ``lower_expert_gathers`` has turned every expert-weight use into
all_gather -> wait -> narrow chains tagged with ``meta["zp_gather_key"] = (layer, slot)`` (a float8
shard's chain also holds the uint8 views around the collective; they move with the gather and the wait).
A quantized bank's chains carry the stored tensors (values, scales); the nodes computed from them alone
(the decoding) are part of the bank, not its readers: a layer is finished when what combines its decoded
weights with activations has run.

Placement, with gathered MoE layers numbered k = 0, 1, ... in ascending layer order and d = prefetch:
- wait(k): immediately before the first node that reads layer k's full weights;
- anchor(k), k >= 1: the first node (graph order) that depends on *every* node reading layer k-1's
  full weights (directly or through views), i.e. where layer k-1's experts are finished and its
  gathered buffers are dead;
- gather(k) for d >= 1: just before anchor(k - d), or before the first compute node when k - d <= 0;
  for d = 0: all of layer k's gathers just before its first wait (gather, then use).
So while layer k's experts run, layers k+1 .. k+d are in flight: at most d + 1 gathered layers are
alive at any node.

Shared-memory copies (``shm_gather``) are synchronous and need no peer: each goes just before its
layer's first read, in the same (layer, slot) order.

Invariant (deadlock freedom): placement depends only on graph structure and the (layer, slot) keys,
never on timing or rank, and the resulting gather order is ascending (layer, slot) on every rank;
the pass checks this and raises otherwise.
"""

from __future__ import annotations

from collections import defaultdict

from torch.fx import Graph, Node

from .predicates import expert_gather_key, is_all_gather, is_compute, is_shm_gather, is_view


def _chains(graph: Graph) -> dict[int, dict[int, list[Node]]]:
    """layer -> slot -> [(dtype view), all_gather, wait, (dtype view), narrow...] in graph order."""
    chains: dict[int, dict[int, list[Node]]] = defaultdict(lambda: defaultdict(list))
    for node in graph.nodes:
        key = expert_gather_key(node)
        if key is not None:
            chains[key[0]][key[1]].append(node)
    for layer, slots in chains.items():
        for slot, nodes in slots.items():
            if not any(is_all_gather(n) or is_shm_gather(n) for n in nodes):
                raise RuntimeError(f"expert gather ({layer}, {slot}) is not lowered: run lower_expert_gathers first")
    return chains


def _split(nodes: list[Node]) -> tuple[list[Node], list[Node]]:
    """A chain's nodes up to its gather (what is issued early) and after it (the wait and what reads it)."""
    i = next(i for i, n in enumerate(nodes) if is_all_gather(n) or is_shm_gather(n))
    return nodes[: i + 1], nodes[i + 1 :]


def _readers(slots: dict[int, list[Node]]) -> list[Node]:
    """Nodes outside the gather chains that take one layer's full expert weights as an input."""
    chain = {n for nodes in slots.values() for n in nodes}
    return [u for n in chain for u in n.users if u not in chain]


def _inputs_of_graph(graph: Graph) -> set[Node]:
    """Every node that depends on a graph input (placeholder), directly or not."""
    found: set[Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(i in found for i in node.all_input_nodes):
            found.add(node)
    return found


def _consumers(slots: dict[int, list[Node]], variable: set[Node]) -> list[Node]:
    """The nodes that combine one layer's full expert weights with something else (the expert matmuls),
    reached from the gathers through views (transpose, slice...) and through what is computed from the
    gathered tensors alone (decoding: FP8 values times their block scales, MXFP4 nibbles, a cast):
    once all of them ran, the gathered buffers and what was decoded from them are dead. ``variable``:
    the nodes that depend on a graph input; the others are constants, which decoding may use."""
    chain = {n for nodes in slots.values() for n in nodes}
    bank, found = set(chain), []
    for node in next(iter(chain)).graph.nodes:  # graph order: a node's inputs are classified before it
        if node in bank or not any(i in bank for i in node.all_input_nodes):
            continue
        if is_view(node) or all(i in bank or i not in variable for i in node.all_input_nodes):
            bank.add(node)
        else:
            found.append(node)
    return found


def _after_all(nodes: list[Node], readers: list[Node], pos: dict[Node, int]) -> Node | None:
    """First node in graph order that (transitively) depends on every node of ``readers``."""
    bit = {r: 1 << i for i, r in enumerate(readers)}
    full = (1 << len(readers)) - 1
    reach: dict[Node, int] = {}
    for node in nodes[min(pos[r] for r in readers) :]:
        mask = 0
        for inp in node.all_input_nodes:
            mask |= reach.get(inp, 0) | bit.get(inp, 0)
        if mask:
            reach[node] = mask
        if mask == full:
            return node
    return None


def schedule_expert_prefetch(graph: Graph, prefetch: int = 1) -> None:
    if prefetch < 0:
        raise ValueError(f"prefetch depth must be >= 0, got {prefetch}")
    chains = _chains(graph)
    if not chains:
        return
    layers = sorted(chains)

    # 1. Each wait (and its narrow) right before the first reader of that tensor.
    pos = {n: i for i, n in enumerate(graph.nodes)}
    first_read: dict[int, Node] = {}
    for layer in layers:
        for slot in sorted(chains[layer]):
            nodes = chains[layer][slot]
            readers = _readers({slot: nodes})
            if not readers:
                continue  # dead gather: the graph never reads it; DCE is Inductor's business
            first = min(readers, key=pos.__getitem__)
            for n in _split(nodes)[1]:
                first.prepend(n)
        readers = _readers(chains[layer])
        if readers:
            first_read[layer] = min(readers, key=pos.__getitem__)

    # 2. Anchors: where gathered layer k-1 is finished.
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    start = next(n for n in nodes if is_compute(n) and expert_gather_key(n) is None)
    variable = _inputs_of_graph(graph)
    consumers = {layer: _consumers(chains[layer], variable) for layer in layers}
    anchor: dict[int, Node] = {}
    for k in range(1, len(layers)):
        readers = consumers[layers[k - 1]]
        found = _after_all(nodes, readers, pos) if readers else None
        anchor[k] = found if found is not None else first_read.get(layers[k], start)

    # 3. Gathers, in ascending (layer, slot) order. Each records what it must follow (the readers of
    #    the layer whose buffers it replaces) and precede (its anchor), for ``pin_gather_order``.
    for k, layer in enumerate(layers):
        if layer not in first_read:
            continue  # nothing reads this layer's weights
        # A shared-memory copy is synchronous: issuing it early hides nothing and holds the buffer
        # longer, so it is gather-then-use whatever the prefetch depth.
        synchronous = any(is_shm_gather(n) for nodes in chains[layer].values() for n in nodes)
        if synchronous or prefetch == 0:
            tails = [(_split(nodes)[1] or [first_read[layer]])[0] for nodes in chains[layer].values()]
            target = min(tails, key=pos.__getitem__)
            after = consumers[layers[k - 1]] if k >= 1 and not synchronous else []
        else:
            target = anchor[k - prefetch] if k - prefetch >= 1 else start
            after = consumers[layers[k - prefetch - 1]] if k - prefetch >= 1 else []
        for slot in sorted(chains[layer]):
            issue = _split(chains[layer][slot])[0]
            for n in issue:
                target.prepend(n)
            gather = issue[-1]
            if not synchronous:
                gather.meta["zp_issue_after"] = after
                gather.meta["zp_issue_before"] = target

    issued = [
        expert_gather_key(n) for n in graph.nodes if (is_all_gather(n) or is_shm_gather(n)) and expert_gather_key(n) is not None
    ]
    if issued != sorted(issued):
        raise RuntimeError(f"expert gathers would be issued out of (layer, slot) order: {issued}")
    graph.lint()
