"""Pass: issue each MoE layer's expert gathers ``prefetch`` layers ahead, wait just before first use.

Input: a graph where ``lower_expert_gathers`` has turned every expert-weight use into
all_gather -> wait -> narrow chains tagged with ``meta["zp_gather_key"] = (layer, slot)``.

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
    """layer -> slot -> [all_gather, wait, narrow...] in graph order."""
    chains: dict[int, dict[int, list[Node]]] = defaultdict(lambda: defaultdict(list))
    for node in graph.nodes:
        key = expert_gather_key(node)
        if key is not None:
            chains[key[0]][key[1]].append(node)
    for layer, slots in chains.items():
        for slot, nodes in slots.items():
            if not (is_all_gather(nodes[0]) or is_shm_gather(nodes[0])):
                raise RuntimeError(f"expert gather ({layer}, {slot}) is not lowered: run lower_expert_gathers first")
    return chains


def _readers(slots: dict[int, list[Node]]) -> list[Node]:
    """Nodes outside the gather chains that take one layer's full expert weights as an input."""
    chain = {n for nodes in slots.values() for n in nodes}
    return [u for n in chain for u in n.users if u not in chain]


def _consumers(slots: dict[int, list[Node]]) -> list[Node]:
    """The non-view nodes that read one layer's full expert weights, directly or through views
    (transpose, slice...): once all of them ran, the gathered buffers are dead."""
    found: list[Node] = []
    todo = _readers(slots)
    seen = set(todo)
    while todo:
        node = todo.pop()
        if not is_view(node):
            found.append(node)
            continue
        for user in node.users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
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
            for n in nodes[1:]:
                first.prepend(n)
        readers = _readers(chains[layer])
        if readers:
            first_read[layer] = min(readers, key=pos.__getitem__)

    # 2. Anchors: where gathered layer k-1 is finished.
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    start = next(n for n in nodes if is_compute(n) and expert_gather_key(n) is None)
    anchor: dict[int, Node] = {}
    for k in range(1, len(layers)):
        readers = _consumers(chains[layers[k - 1]])
        found = _after_all(nodes, readers, pos) if readers else None
        anchor[k] = found if found is not None else first_read.get(layers[k], start)

    # 3. Gathers, in ascending (layer, slot) order. Each records what it must follow (the readers of
    #    the layer whose buffers it replaces) and precede (its anchor), for ``pin_gather_order``.
    for k, layer in enumerate(layers):
        if layer not in first_read:
            continue  # nothing reads this layer's weights
        # A shared-memory copy is synchronous: issuing it early hides nothing and holds the buffer
        # longer, so it is gather-then-use whatever the prefetch depth.
        synchronous = any(is_shm_gather(nodes[0]) for nodes in chains[layer].values())
        if synchronous or prefetch == 0:
            tails = [nodes[1] if len(nodes) > 1 else first_read[layer] for nodes in chains[layer].values()]
            target = min(tails, key=pos.__getitem__)
            after = _consumers(chains[layers[k - 1]]) if k >= 1 and not synchronous else []
        else:
            target = anchor[k - prefetch] if k - prefetch >= 1 else start
            after = _consumers(chains[layers[k - prefetch - 1]]) if k - prefetch >= 1 else []
        for slot in sorted(chains[layer]):
            gather = chains[layer][slot][0]
            target.prepend(gather)
            if not synchronous:
                gather.meta["zp_issue_after"] = after
                gather.meta["zp_issue_before"] = target

    issued = [
        expert_gather_key(n) for n in graph.nodes if (is_all_gather(n) or is_shm_gather(n)) and expert_gather_key(n) is not None
    ]
    if issued != sorted(issued):
        raise RuntimeError(f"expert gathers would be issued out of (layer, slot) order: {issued}")
    graph.lint()
