"""Shard a model's expert banks across ranks and make every read of them a gather.

Each experts module keeps ``<name>_shard`` parameters ([ceil(E/N), ...], this rank's rows) in place of
``<name>`` ([E, ...]). Its class is swapped for a subclass of the original where ``<name>`` is a
property returning ``zp_compile::gather_experts(<name>_shard, ...)``: whatever code reads
``self.gate_up_proj`` (transformers' grouped_mm / batched_mm paths, or a family's own forward) gets the
full bank, and dynamo records the read as one marker node the passes can schedule. The rewrite knows
nothing of graphs and the model code knows nothing of ranks.

A quantized checkpoint's shards stay as stored (``StoredExperts``): a parameter is then several stored
tensors, each its own shard and its own gather (its own slot), e.g. ``down_proj_weight_shard``
(float8_e4m3fn) and ``down_proj_scale_shard`` (fp32 block scales), or MXFP4's uint8
``gate_up_proj_blocks_shard`` and ``gate_up_proj_scales_shard``. The property gathers them, then
decodes them with the codec's plain-torch ``decode``: traced into the compiled graph after the gathers'
waits, where Inductor can fuse it into one kernel, and run after the blocking gather in eager mode.
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
from .quantized import Codec

SHARD_SUFFIX = "_shard"


@dataclass(frozen=True)
class StoredPiece:
    """One stored weight of an expert parameter: its tensors, each gathered as its own slot."""

    slots: tuple[tuple[str, str], ...]  # (codec role, slot name); role "" when stored unquantized
    codec: Codec | None = None
    transpose: tuple[int, int] | None = None  # the checkpoint's layout -> the parameter's

    def decode(self, gathered: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        parts = {role: gathered[slot] for role, slot in self.slots}
        if self.codec is not None:
            value = self.codec.decode(parts, dtype)
        else:
            value = parts[""] if parts[""].dtype == dtype else parts[""].to(dtype)
        return value.transpose(*self.transpose) if self.transpose else value


@dataclass(frozen=True)
class StoredExperts:
    """How expert parameter ``name`` [E, ...] (in ``dtype``) is rebuilt from the stored tensors its
    gathers bring: each piece decoded, the pieces concatenated along ``dim`` (a fused gate/up projection
    stored as per-expert gate and up weights, each with its own block scales)."""

    name: str
    dtype: torch.dtype
    pieces: tuple[StoredPiece, ...]
    dim: int = 1

    @property
    def slots(self) -> tuple[str, ...]:
        return tuple(slot for piece in self.pieces for _, slot in piece.slots)

    def decode(self, gathered: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [piece.decode(gathered, self.dtype) for piece in self.pieces]
        return parts[0] if len(parts) == 1 else torch.cat(parts, self.dim)


def as_is(name: str, dtype: torch.dtype) -> StoredExperts:
    """A parameter sharded in its own dtype: one slot, the shard of ``name`` itself, nothing to decode."""
    return StoredExperts(name, dtype, (StoredPiece((("", name),)),))


@dataclass(frozen=True)
class GatherSpec:
    """What one sharded experts module needs to rebuild its full banks."""

    num_experts: int
    group_size: int
    group_name: str
    layer: int
    banks: tuple[StoredExperts, ...]  # one per expert parameter, in the module's parameter order
    exchange_id: str = ""  # a shared-memory exchange (zp_compile.transport) instead of collectives

    @property
    def slots(self) -> tuple[str, ...]:
        """Every stored tensor's name; position = slot, the per-layer gather order. Reading the
        parameters in ``banks`` order issues the slots in ascending order."""
        return tuple(slot for bank in self.banks for slot in bank.slots)

    @property
    def roles(self) -> dict[str, str]:
        """slot name -> what it stores: a codec's role ("weight", "scale", "blocks", "scales") or "" (as is)."""
        return {slot: role for bank in self.banks for piece in bank.pieces for role, slot in piece.slots}

    def bank(self, name: str) -> StoredExperts:
        for bank in self.banks:
            if bank.name == name:
                return bank
        raise KeyError(name)


def _gather_slot(module: nn.Module, spec: GatherSpec, slot: str) -> torch.Tensor:
    return torch.ops.zp_compile.gather_experts(
        getattr(module, slot + SHARD_SUFFIX),
        spec.num_experts,
        spec.group_size,
        spec.group_name,
        spec.layer,
        spec.slots.index(slot),
        spec.exchange_id,
    )


def _gathered(name: str):
    def get(self: nn.Module) -> torch.Tensor:
        spec: GatherSpec = self._zp_gather
        bank = spec.bank(name)
        # Gather every stored tensor of the parameter, then decode: never the other way round.
        return bank.decode({slot: _gather_slot(self, spec, slot) for slot in bank.slots})

    return property(get, doc=f"Full [E, ...] '{name}', gathered from every rank's shards of it and decoded.")


def gather_stored(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every stored tensor of a sharded experts module, gathered in slot order and not decoded: what
    crosses the link for one layer (the start-up measurement of t_gather)."""
    spec: GatherSpec = module._zp_gather
    return {slot: _gather_slot(module, spec, slot) for slot in spec.slots}


@functools.cache
def gathering_class(cls: type[nn.Module], names: tuple[str, ...]) -> type[nn.Module]:
    """``cls`` with each of ``names`` read through a gather (cached: one subclass per layout)."""
    return type(cls.__name__, (cls,), {"__module__": cls.__module__, **{n: _gathered(n) for n in names}})


def install_shards(layer: MoELayer, shards: dict[str, torch.Tensor], spec: GatherSpec) -> None:
    """Replace ``layer``'s full expert parameters by this rank's ``shards`` (slot name -> [S, ...]
    stored tensor) and route reads through gathers."""
    module = layer.module
    names = tuple(bank.name for bank in spec.banks)
    for name in names:
        module._parameters.pop(name, None)
    for slot in spec.slots:
        module.register_parameter(slot + SHARD_SUFFIX, nn.Parameter(shards[slot], requires_grad=False))
    module._zp_gather = spec
    module.__class__ = gathering_class(type(module), names)


def gather_spec(layer: MoELayer, group: torch.distributed.ProcessGroup, banks: tuple[StoredExperts, ...] | None = None) -> GatherSpec:
    """``banks``: how each expert parameter is stored; default, each sharded as it is in the model."""
    if banks is None:
        banks = tuple(as_is(name, getattr(layer.module, name).dtype) for name in layer.expert_params)
    return GatherSpec(
        num_experts=layer.num_experts,
        group_size=group.size(),
        group_name=group.group_name,
        layer=layer.index,
        banks=banks,
    )


def shard_layer(layer: MoELayer, group: torch.distributed.ProcessGroup) -> None:
    """Keep this rank's rows of every expert tensor of ``layer`` and drop the full copies."""
    plan = ExpertShard(layer.num_experts, group.size(), group.rank())
    shards = {name: shard_rows(getattr(layer.module, name).detach(), plan) for name in layer.expert_params}
    install_shards(layer, shards, gather_spec(layer, group))


def shards(module: nn.Module) -> dict[str, torch.Tensor]:
    """slot name -> this rank's stored [S, ...] shard, of a sharded experts module."""
    return {slot: getattr(module, slot + SHARD_SUFFIX) for slot in module._zp_gather.slots}


def use_shared_memory(layers: list[MoELayer], group: torch.distributed.ProcessGroup):
    """Collective: put every sharded layer's shards in one shared-memory exchange (ranks on one host),
    point the gathers at it and keep this rank's rows from the segment (no second private copy).
    Quantized shards go in as stored: the exchange holds their bytes and scales."""
    from ..transport import ShmExpertExchange

    sharded = [layer for layer in layers if is_sharded(layer.module)]
    tensors = {
        (layer.index, slot): shard.detach()
        for layer in sharded
        for slot, shard in enumerate(shards(layer.module).values())
    }
    exchange = ShmExpertExchange.create(group, tensors)
    for layer in sharded:
        module = layer.module
        module._zp_gather = dataclasses.replace(module._zp_gather, exchange_id=exchange.exchange_id)
        for slot, name in enumerate(module._zp_gather.slots):
            module._parameters[name + SHARD_SUFFIX] = nn.Parameter(exchange.local((layer.index, slot)), requires_grad=False)
    return exchange


def is_sharded(module: nn.Module) -> bool:
    return hasattr(module, "_zp_gather")


def expert_tensors(layer: MoELayer) -> dict[str, torch.Tensor]:
    """What this rank holds of ``layer``'s experts: its stored shards, or the full banks when resident."""
    if is_sharded(layer.module):
        return shards(layer.module)
    return {name: getattr(layer.module, name) for name in layer.expert_params}


def expert_bytes(layers: list[MoELayer]) -> int:
    """Bytes of expert weights this rank holds (shards as stored, scales included, or full banks of
    resident layers)."""
    return sum(t.numel() * t.element_size() for layer in layers for t in expert_tensors(layer).values())
