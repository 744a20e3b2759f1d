"""Small named node predicates the passes are built from (graph-only: no Hugging Face knowledge)."""

from __future__ import annotations

import torch
from torch.fx import Node

from .. import ops  # noqa: F401  (declares the zp_compile ops these predicates name)

_c10d = torch.ops._c10d_functional


def is_expert_gather_marker(node: Node) -> bool:
    """``zp_compile::gather_experts``: a use of one MoE layer's full expert tensor, not yet lowered (in
    dynamo's graph the op, in AOTAutograd's its overload)."""
    marker = torch.ops.zp_compile.gather_experts
    return node.op == "call_function" and (node.target is marker.default or node.target is marker)


def is_all_gather(node: Node) -> bool:
    return node.op == "call_function" and node.target is _c10d.all_gather_into_tensor.default


def is_shm_gather(node: Node) -> bool:
    """``zp_compile::shm_gather``: a synchronous copy of every rank's rows out of shared memory."""
    return node.op == "call_function" and node.target is torch.ops.zp_compile.shm_gather.default


def is_wait(node: Node) -> bool:
    return node.op == "call_function" and node.target is _c10d.wait_tensor.default


def is_all_to_all(node: Node) -> bool:
    """Any all-to-all, functional or in-place: activation dispatch that AsyncEP must not contain."""
    if node.op != "call_function":
        return False
    name = str(node.target)
    return "all_to_all" in name or "alltoall" in name


def is_view(node: Node) -> bool:
    """An ATen view: its output aliases its input, so the input buffer lives as long as the view."""
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.target.is_view


def is_compute(node: Node) -> bool:
    """A node that does work at run time (not an input, constant, output or collective plumbing)."""
    return node.op in ("call_function", "call_method", "call_module") and not (
        is_all_gather(node) or is_wait(node) or is_expert_gather_marker(node) or is_shm_gather(node)
    )


def expert_gather_key(node: Node) -> tuple[int, int] | None:
    """(layer, slot) of a marker or of a node the lowering created; None for any other node.

    Ascending (layer, slot) is the order in which every rank issues its gathers.
    """
    if is_expert_gather_marker(node):
        return tuple(node.args[4:6])
    return node.meta.get("zp_gather_key")
