"""Pass: make the prefetch placement survive Inductor's scheduler.

Inductor reorders and fuses scheduler nodes after the post-grad passes: ``reorder_for_peak_memory``
sinks an all-gather (it allocates) down to its wait, undoing the prefetch, and a gather can also be
hoisted above the kernel that last reads the previous layer's buffers, keeping one more layer alive.
Inductor's own overlap passes keep their placement with control dependencies
(``preserve_node_ordering``: the ``control_deps`` higher-order op), and so do we, from what
``schedule_expert_prefetch`` recorded on each gather:
- the gather runs after every reader of the gathered layer it succeeds (``meta["zp_issue_after"]``);
- the first non-view compute node at or after its anchor (``meta["zp_issue_before"]``) runs after it.
"""

from __future__ import annotations

from torch.fx import Graph, Node
from torch.utils._ordered_set import OrderedSet

from ..compat import preserve_node_ordering
from .predicates import expert_gather_key, is_all_gather, is_compute, is_view


def _first_compute_from(node: Node) -> Node | None:
    while node.op != "output":
        if is_compute(node) and not is_view(node) and expert_gather_key(node) is None:
            return node
        node = node.next
    return None


def pin_gather_order(graph: Graph) -> None:
    deps: dict[Node, OrderedSet[Node]] = {}
    for gather in [n for n in graph.nodes if is_all_gather(n) and "zp_issue_before" in n.meta]:
        after = gather.meta.pop("zp_issue_after")
        before = _first_compute_from(gather.meta.pop("zp_issue_before"))
        if after:
            deps.setdefault(gather, OrderedSet()).update(after)
        if before is not None:
            deps.setdefault(before, OrderedSet()).add(gather)
    preserve_node_ordering(graph, deps)
