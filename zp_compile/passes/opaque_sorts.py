"""Sorts over a dynamic length become ``zp_compile::sort``: the same kernel, without Inductor's guard.

A step's MoE routing sorts its ``tokens x top_k`` expert ids (transformers' grouped-mm experts). Inductor
lowers ``aten.sort`` by first guarding the length below 32,767 (the int16 index of its in-kernel sort),
and then, on a CPU (no sort kernel) or for a length not statically <= 512 on a GPU (no persistent
kernel), calls ``aten.sort`` anyway. The guard alone splits the model in two graphs at 32,767 routed pairs
(8,192 tokens x top-4): a second full compile at start-up, or inside a request's latency while serving.
Where the length is a dynamic size, the sort is the fallback whatever its value, so the pass calls that
fallback directly, as an op Inductor does not lower. Static lengths keep Inductor's lowering (a GPU
may sort them in a kernel).
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

from .. import ops  # noqa: F401  (declares zp_compile::sort)

_SORTS = (torch.ops.aten.sort.default, torch.ops.aten.sort.stable)


def _is_dynamic_sort(node: Node) -> bool:
    if node.op != "call_function" or node.target not in _SORTS:
        return False
    x = node.args[0].meta.get("val")
    if x is None or x.dim() == 0:
        return False
    dim = _sort_args(node)[0]
    return not isinstance(x.shape[dim], int)


def _sort_args(node: Node) -> tuple[int, bool, bool]:
    """(dim, descending, stable) of either ``aten.sort`` overload, defaults filled in."""
    if node.target is torch.ops.aten.sort.stable:  # sort.stable(self, *, stable, dim=-1, descending=False)
        kw = node.kwargs
        return kw.get("dim", -1), kw.get("descending", False), bool(kw.get("stable", False))
    args = list(node.args[1:]) + [None] * 2  # sort(self, dim=-1, descending=False)
    dim = node.kwargs.get("dim", args[0] if args[0] is not None else -1)
    descending = node.kwargs.get("descending", args[1] if args[1] is not None else False)
    return dim, descending, False


def opaque_dynamic_sorts(graph: Graph) -> None:
    for node in list(graph.nodes):
        if _is_dynamic_sort(node):
            dim, descending, stable = _sort_args(node)
            node.target = torch.ops.zp_compile.sort.default
            node.args, node.kwargs = (node.args[0], dim, descending, stable), {}
