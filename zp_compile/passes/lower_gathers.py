"""Pass: lower every ``zp_compile::gather_experts`` marker to functional collectives.

marker(shard [S, ...]) -> all_gather_into_tensor [N*S, ...] -> wait_tensor -> narrow to [E, ...]
(float8 shards are viewed as uint8 around the collective: ``ops.all_gather_rows``), or, with a shared-memory exchange (``zp_compile.transport``):
marker(shard [S, ...]) -> shm_gather [N*S, ...] (a memcpy, no collective) -> narrow to [E, ...]

Markers for the same (layer, slot) are merged first (a module that reads its expert tensor twice must
not gather it twice). The lowered nodes are placed where the marker was; ``schedule_prefetch`` moves
them. Each new node (gather, wait, narrow, dtype views) records its (layer, slot) in ``meta["zp_gather_key"]``.
The marker's value is the stored tensor (quantized values, scales): whatever decodes it is already in
the graph after the marker, so it comes after the wait.
"""

from __future__ import annotations

import functools

import torch
from torch.fx import Graph

from ..compat import insert_fn_trace_before_node
from ..ops import all_gather_rows
from ..sharding import unshard_rows
from .predicates import expert_gather_key, is_expert_gather_marker


def _gather_full(
    shard: torch.Tensor, *, num_experts: int, group_size: int, group_name: str
) -> tuple[torch.Tensor]:
    gathered = all_gather_rows(shard, group_size, group_name)  # [N*S, ...], in the stored dtype
    return (unshard_rows(gathered, num_experts),)  # [E, ...]


def _copy_full(shard: torch.Tensor, *, num_experts: int, exchange_id: str) -> tuple[torch.Tensor]:
    gathered = torch.ops.zp_compile.shm_gather(shard, exchange_id)  # [N*S, ...], a memcpy
    return (unshard_rows(gathered, num_experts),)  # [E, ...]


def merge_duplicate_markers(graph: Graph) -> None:
    first: dict[tuple[int, int], torch.fx.Node] = {}
    for node in list(graph.nodes):
        if not is_expert_gather_marker(node):
            continue
        key = expert_gather_key(node)
        if key in first:
            if first[key].args != node.args:
                raise RuntimeError(f"two different expert gathers claim (layer, slot) {key}: {first[key].args} vs {node.args}")
            node.replace_all_uses_with(first[key])
            graph.erase_node(node)
        else:
            first[key] = node


def lower_expert_gathers(graph: Graph) -> None:
    merge_duplicate_markers(graph)
    for marker in list(graph.nodes):
        if not is_expert_gather_marker(marker):
            continue
        shard, num_experts, group_size, group_name, layer, slot, exchange_id = marker.args
        if exchange_id:  # shared memory on one host: a synchronous copy, no collective
            fn = functools.partial(_copy_full, num_experts=num_experts, exchange_id=exchange_id)
        else:
            fn = functools.partial(_gather_full, num_experts=num_experts, group_size=group_size, group_name=group_name)
        _, new_nodes = insert_fn_trace_before_node(graph, fn, [shard.meta["val"]], marker, [shard], [marker])
        for node in new_nodes:
            node.meta.update({k: v for k, v in marker.meta.items() if k in ("nn_module_stack", "stack_trace")})
            node.meta["zp_gather_key"] = (layer, slot)
        graph.erase_node(marker)
