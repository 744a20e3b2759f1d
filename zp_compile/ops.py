"""Every custom op zp-compile puts in a traced graph: the schemas, in one place.

- ``zp_compile::gather_experts(shard, num_experts, group_size, group_name, layer, slot, exchange_id)``
  stands for "the full ``[E, ...]`` expert tensor number ``slot`` of MoE layer ``layer``, rebuilt from
  every rank's ``[ceil(E/N), ...]`` shard". ``(layer, slot)`` is also the order in which every rank
  issues the gathers. ``exchange_id`` names a shared-memory exchange (``zp_compile.transport``) to copy
  from instead of all-gathering over the group ("" for collectives). Dynamo records it as one opaque
  node, so the passes in ``zp_compile.passes`` see exactly where each layer's full expert weights are
  used and lower the marker to functional collectives (all-gather + wait + narrow) placed one layer
  ahead. Outside a compiled region (plain eager forward) it runs a blocking gather: correct, with no
  overlap, so an optimized model is usable before or without compilation. Implemented here. The shard
  is gathered in whatever dtype it is stored in (float8 values, uint8 MXFP4 blocks, their scales):
  decoding to the compute dtype is the caller's, after the gather (``zp_compile.models.rewrite``).
- ``zp_compile::shm_gather(shard, exchange_id)``: every rank's ``[S, ...]`` rows of the key whose
  rows on this rank ``shard`` is, copied out of a shared-memory exchange, ``[N * S, ...]``. Implemented (kernel and
  fake) by ``zp_compile.transport``, which owns the exchanges the op looks up; an ``exchange_id`` only
  exists once that module has made one.
- ``zp_compile::packed_attention(query, key, value, rows, ranges, scale, window, chunk, sinks)``: one
  packed serving step's attention for one layer (``zp_compile.rank.packed`` implements it and documents
  the layout and the mask rule).
- ``zp_compile::sort(self, dim, descending, stable)``: ``torch.sort``, opaque to Inductor. The pass
  ``passes.opaque_sorts.opaque_dynamic_sorts`` puts it where a sort's length is a dynamic size (the MoE routing's
  tokens x top-k): Inductor's own lowering of ``aten.sort`` guards that length below 32,767 before it
  falls back to this same kernel, and the guard recompiles the model at the first step of >= 32,767
  routed pairs. Implemented here.

The schemas are declared with ``torch.library.define`` so that a module that only needs an op's
identity (the passes' predicates) imports this leaf module and nothing that implements it.
"""

from __future__ import annotations

import torch

from .sharding import unshard_rows

OP_NAMESPACE = "zp_compile"

_lib = torch.library.Library(OP_NAMESPACE, "FRAGMENT")  # noqa: TOR901 - the namespace's schemas live as long as the process
_lib.define("shm_gather(Tensor shard, str exchange_id) -> Tensor")
_lib.define("packed_attention(Tensor query, Tensor key, Tensor value, Tensor rows, Tensor ranges, float scale, int window=0, "
            "int chunk=0, Tensor? sinks=None) -> Tensor")

_lib.define("sort(Tensor self, int dim, bool descending, bool stable) -> (Tensor values, Tensor indices)")

SHM_GATHER = f"{OP_NAMESPACE}::shm_gather"
PACKED_ATTENTION = f"{OP_NAMESPACE}::packed_attention"


# gloo has no float8 type: these travel as their bytes (a same-size dtype view, no copy), on every
# backend alike, so the graph is the same whatever the group's backend.
_SENT_AS_BYTES = (torch.float8_e4m3fn, torch.float8_e5m2)


def all_gather_rows(shard: torch.Tensor, group_size: int, group_name: str) -> torch.Tensor:
    """Functional all-gather of every rank's ``[S, ...]`` shard, then its wait: ``[N * S, ...]`` in the
    shard's dtype. Traced as is by the lowering pass (which moves the gather and the wait apart)."""
    wire = shard.view(torch.uint8) if shard.dtype in _SENT_AS_BYTES else shard
    gathered = torch.ops._c10d_functional.all_gather_into_tensor(wire.contiguous(), group_size, group_name)
    gathered = torch.ops._c10d_functional.wait_tensor(gathered)
    return gathered if wire is shard else gathered.view(shard.dtype)


@torch.library.custom_op(f"{OP_NAMESPACE}::gather_experts", mutates_args=())
def gather_experts(
    shard: torch.Tensor, num_experts: int, group_size: int, group_name: str, layer: int, slot: int, exchange_id: str
) -> torch.Tensor:
    """[ceil(E/N), ...] shard on every rank -> [E, ...] full expert tensor (blocking in eager)."""
    if exchange_id:
        gathered = torch.ops.zp_compile.shm_gather(shard, exchange_id)
        return unshard_rows(gathered, num_experts).clone()  # the pool keeps `gathered`: never alias it
    gathered = all_gather_rows(shard, group_size, group_name)
    # A custom op may not return a view of a buffer it allocated and then drops; copy only when padded.
    if gathered.shape[0] != num_experts:
        return unshard_rows(gathered, num_experts).clone()
    return gathered


@gather_experts.register_fake
def _(
    shard: torch.Tensor, num_experts: int, group_size: int, group_name: str, layer: int, slot: int, exchange_id: str
) -> torch.Tensor:
    return shard.new_empty((num_experts, *shard.shape[1:]))


@torch.library.impl(_lib, "sort", "CompositeExplicitAutograd")
def _sort(x: torch.Tensor, dim: int, descending: bool, stable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.sort(x, dim=dim, descending=descending, stable=stable)


@torch.library.register_fake(f"{OP_NAMESPACE}::sort")
def _(x: torch.Tensor, dim: int, descending: bool, stable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.long)
