"""The one custom op the model rewrite leaves in a traced graph.

``zp_compile::gather_experts(shard, num_experts, group_size, group_name, layer, slot, exchange_id)`` stands for "the
full ``[E, ...]`` expert tensor number ``slot`` of MoE layer ``layer``, rebuilt from every rank's
``[ceil(E/N), ...]`` shard". ``(layer, slot)`` is also the order in which every rank issues the gathers.
``exchange_id`` names a shared-memory exchange (``zp_compile.transport``) to copy from instead of
all-gathering over the group ("" for collectives).
Dynamo records it as one opaque node, so the passes in ``zp_compile.passes`` see exactly where each
layer's full expert weights are used and can lower the marker to functional collectives
(all-gather + wait + narrow) placed one layer ahead.

Outside a compiled region (plain eager forward) the op runs a blocking all-gather: correct, with no
overlap. That keeps an optimized model usable before or without compilation.
"""

from __future__ import annotations

import torch

from .sharding import unshard_rows

OP_NAMESPACE = "zp_compile"


@torch.library.custom_op(f"{OP_NAMESPACE}::gather_experts", mutates_args=())
def gather_experts(
    shard: torch.Tensor, num_experts: int, group_size: int, group_name: str, layer: int, slot: int, exchange_id: str
) -> torch.Tensor:
    """[ceil(E/N), ...] shard on every rank -> [E, ...] full expert tensor (blocking in eager)."""
    if exchange_id:
        from . import transport  # noqa: F401  (registers zp_compile::shm_gather; imports this module)

        gathered = torch.ops.zp_compile.shm_gather(shard, exchange_id, layer, slot)
        return unshard_rows(gathered, num_experts).clone()  # the pool keeps `gathered`: never alias it
    gathered = torch.ops._c10d_functional.all_gather_into_tensor(shard.contiguous(), group_size, group_name)
    gathered = torch.ops._c10d_functional.wait_tensor(gathered)
    # A custom op may not return a view of a buffer it allocated and then drops; copy only when padded.
    if gathered.shape[0] != num_experts:
        return unshard_rows(gathered, num_experts).clone()
    return gathered


@gather_experts.register_fake
def _(
    shard: torch.Tensor, num_experts: int, group_size: int, group_name: str, layer: int, slot: int, exchange_id: str
) -> torch.Tensor:
    return shard.new_empty((num_experts, *shard.shape[1:]))
