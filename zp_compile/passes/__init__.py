"""Graph passes that turn expert-sharded MoE graphs into AsyncEP graphs.

This module is the one place that decides which passes run and in what order (like Inductor's
``fx_passes/post_grad.py``). Passes know FX graphs and node predicates only; nothing here imports
Hugging Face code.

1. ``reject_all_to_all``    - AsyncEP moves weights, never activations: refuse a graph still
                              dispatching tokens with all-to-all (the model rewrite removes it).
2. ``lower_expert_gathers`` - marker op -> all_gather + wait + narrow (where the gather is issued,
                              waited on and narrowed: ``lower_gathers.py``).
3. ``schedule_expert_prefetch`` - gathers ``prefetch`` layers ahead, waits just before first use
                              (where the buffer dies follows: after the layer's last reader).
4. ``pin_gather_order``     - control dependencies so Inductor's scheduler keeps that placement.
5. ``opaque_dynamic_sorts`` - sorts over a dynamic length call the kernel Inductor would fall back to,
                              without its guard on the length (one graph for every step size:
                              ``opaque_sorts.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch.fx import Graph

from .lower_gathers import lower_expert_gathers
from .opaque_sorts import opaque_dynamic_sorts
from .predicates import is_all_to_all
from .pin_order import pin_gather_order
from .schedule_prefetch import schedule_expert_prefetch


def reject_all_to_all(graph: Graph) -> None:
    found = [f"{n.name} ({n.target})" for n in graph.nodes if is_all_to_all(n)]
    if found:
        raise RuntimeError(
            "the graph still dispatches activations with all-to-all, which AsyncEP replaces: "
            + ", ".join(found[:5])
        )


def zero_prefill_passes(prefetch: int) -> list[Callable[[Graph], None]]:
    """The passes, in order, for a given prefetch depth."""
    return [
        reject_all_to_all,
        lower_expert_gathers,
        functools.partial(schedule_expert_prefetch, prefetch=prefetch),
        pin_gather_order,
        opaque_dynamic_sorts,
    ]


def run_passes(graph: Graph, prefetch: int) -> None:
    for graph_pass in zero_prefill_passes(prefetch):
        graph_pass(graph)
