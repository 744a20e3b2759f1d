"""Pass: make the prefetch placement survive Inductor's scheduler.

Inductor reorders its scheduler nodes after the post-grad passes; ``reorder_for_peak_memory`` in
particular sinks an all-gather (which allocates) down to its wait, undoing the prefetch. Inductor's own
overlap passes keep their placement with control dependencies (``preserve_node_ordering``: the
``control_deps`` higher-order op), and so do we: the first compute node after each group of issued
gathers is made to depend on those gathers, so no gather can move below it.
"""

from __future__ import annotations

from torch._inductor.fx_passes.control_dependencies import preserve_node_ordering
from torch.fx import Graph, Node
from torch.utils._ordered_set import OrderedSet

from .predicates import expert_gather_key, is_all_gather, is_compute, is_view


def pin_gather_order(graph: Graph) -> None:
    deps: dict[Node, OrderedSet[Node]] = {}
    pending: list[Node] = []
    for node in graph.nodes:
        if is_all_gather(node) and expert_gather_key(node) is not None:
            pending.append(node)
        elif pending and is_compute(node) and not is_view(node) and expert_gather_key(node) is None:
            deps.setdefault(node, OrderedSet()).update(pending)
            pending = []
    preserve_node_ordering(graph, deps)
