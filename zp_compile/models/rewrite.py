"""Shard a model's expert banks across ranks and make every read of them a gather.

Each experts module keeps ``<name>_shard`` parameters ([ceil(E/N), ...], this rank's rows) in place of
``<name>`` ([E, ...]). Its class is swapped for a subclass of the original where ``<name>`` is a
property returning ``zp_compile::gather_experts(<name>_shard, ...)``: whatever code reads
``self.gate_up_proj`` (transformers' grouped_mm / batched_mm paths, or a family's own forward) gets the
full bank, and dynamo records the read as one marker node the passes can schedule. The rewrite knows
nothing of graphs and the model code knows nothing of ranks.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import nn

from .. import ops  # noqa: F401  (registers torch.ops.zp_compile.gather_experts)
from ..sharding import ExpertShard, shard_rows
from .discovery import MoELayer

SHARD_SUFFIX = "_shard"


@dataclass(frozen=True)
class GatherSpec:
    """What one sharded experts module needs to rebuild its full banks."""

    num_experts: int
    group_size: int
    group_name: str
    layer: int
    slots: tuple[str, ...]  # expert parameter names; position = slot, the per-layer gather order
    exchange_id: str = ""  # a shared-memory exchange (zp_compile.transport) instead of collectives


def _gathered(name: str):
    def get(self: nn.Module) -> torch.Tensor:
        spec: GatherSpec = self._zp_gather
        return torch.ops.zp_compile.gather_experts(
            getattr(self, name + SHARD_SUFFIX),
            spec.num_experts,
            spec.group_size,
            spec.group_name,
            spec.layer,
            spec.slots.index(name),
            spec.exchange_id,
        )

    return property(get, doc=f"Full [E, ...] '{name}', gathered from every rank's '{name}{SHARD_SUFFIX}'.")


@functools.cache
def gathering_class(cls: type[nn.Module], names: tuple[str, ...]) -> type[nn.Module]:
    """``cls`` with each of ``names`` read through a gather (cached: one subclass per layout)."""
    return type(cls.__name__, (cls,), {"__module__": cls.__module__, **{n: _gathered(n) for n in names}})


def install_shards(layer: MoELayer, shards: dict[str, torch.Tensor], spec: GatherSpec) -> None:
    """Replace ``layer``'s full expert parameters by this rank's ``shards`` and route reads through gathers."""
    module = layer.module
    for name in spec.slots:
        module._parameters.pop(name, None)
        module.register_parameter(name + SHARD_SUFFIX, nn.Parameter(shards[name], requires_grad=False))
    module._zp_gather = spec
    module.__class__ = gathering_class(type(module), spec.slots)


def gather_spec(layer: MoELayer, group: torch.distributed.ProcessGroup) -> GatherSpec:
    return GatherSpec(
        num_experts=layer.num_experts,
        group_size=group.size(),
        group_name=group.group_name,
        layer=layer.index,
        slots=layer.expert_params,
    )


def shard_layer(layer: MoELayer, group: torch.distributed.ProcessGroup) -> None:
    """Keep this rank's rows of every expert tensor of ``layer`` and drop the full copies."""
    plan = ExpertShard(layer.num_experts, group.size(), group.rank())
    shards = {name: shard_rows(getattr(layer.module, name).detach(), plan) for name in layer.expert_params}
    install_shards(layer, shards, gather_spec(layer, group))


def use_shared_memory(layers: list[MoELayer], group: torch.distributed.ProcessGroup):
    """Collective: put every sharded layer's shards in one shared-memory exchange (ranks on one host),
    point the gathers at it and keep this rank's rows from the segment (no second private copy)."""
    from ..transport import ShmExpertExchange

    sharded = [layer for layer in layers if is_sharded(layer.module)]
    shards = {
        (layer.index, slot): getattr(layer.module, name + SHARD_SUFFIX)
        for layer in sharded
        for slot, name in enumerate(layer.expert_params)
    }
    exchange = ShmExpertExchange.create(group, {k: v.detach() for k, v in shards.items()})
    for layer in sharded:
        module = layer.module
        module._zp_gather = dataclasses.replace(module._zp_gather, exchange_id=exchange.exchange_id)
        for slot, name in enumerate(layer.expert_params):
            module._parameters[name + SHARD_SUFFIX] = nn.Parameter(exchange.local((layer.index, slot)), requires_grad=False)
    return exchange


def is_sharded(module: nn.Module) -> bool:
    return hasattr(module, "_zp_gather")


def expert_bytes(layers: list[MoELayer]) -> int:
    """Bytes of expert weights this rank holds (shards, or full banks of resident layers)."""
    return sum(
        p.numel() * p.element_size()
        for layer in layers
        for name, p in layer.module.named_parameters(recurse=False)
        if name.removesuffix(SHARD_SUFFIX) in layer.expert_params
    )
