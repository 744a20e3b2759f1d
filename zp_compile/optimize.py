"""``optimize(model)``: shard a transformers MoE model's experts over a process group and compile it
with the AsyncEP passes. Every rank then runs the whole model on its own requests."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .backend import INNER_BACKENDS, zero_prefill_backend
from .devices import collective_device, module_device, process_group_backend, resolve_device
from .models.discovery import MoELayer, find_moe_layers
from .models.rewrite import SHARD_SUFFIX, expert_bytes, gather_stored, is_sharded, shard_layer, use_shared_memory
from .models.transformers_ep import adopt_transformers_ep, uses_transformers_ep

log = logging.getLogger(__name__)

BACKENDS = (*INNER_BACKENDS, "eager")
TRANSPORTS = ("collective", "shm")


@dataclass(frozen=True)
class ZeroPrefillConfig:
    """Settings of ``optimize``.

    prefetch: how many MoE layers ahead expert gathers are issued (0 = gather, then use).
    resident_first_layer: keep the first MoE layer's experts whole on every rank, as the paper does:
        its gather would have nothing to hide behind.
    backend: "inductor" (default), "aot_eager" (passes, then eager ATen: fast to compile) or "eager"
        (no compile: each read of an expert bank is a blocking gather).
    dynamic: passed to torch.compile (None: specialise first, then generalise on a new shape).
    transport: "collective" (all-gather over the process group: NCCL on GPUs, gloo on CPU) or "shm"
        (ranks on one host: shards in POSIX shared memory, set up once; a gather is a memcpy from it,
        with no collective at run time. See ``zp_compile.transport``).
    regional: compile a decoder layer at a time, once per distinct layer (``zp_compile.regions``):
        compile time no longer grows with depth. Each layer's expert gathers are issued at the start
        of the layer ``prefetch`` gathered layers before it and waited for at its end.
    """

    prefetch: int = 1
    resident_first_layer: bool = False
    backend: str = "inductor"
    dynamic: bool | None = None
    transport: str = "collective"
    regional: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.prefetch, int) or isinstance(self.prefetch, bool) or self.prefetch < 0:
            raise ValueError(f"prefetch must be an int >= 0 (0 = gather then use), got {self.prefetch!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")


PRESETS = {
    "default": ZeroPrefillConfig(),
    "paper": ZeroPrefillConfig(prefetch=1, resident_first_layer=True),
    "debug": ZeroPrefillConfig(backend="aot_eager"),
}


@dataclass
class ZeroPrefillState:
    """What ``optimize`` did to a model, kept on it as ``model.zero_prefill``."""

    config: ZeroPrefillConfig
    group: Any
    world_size: int
    rank: int
    layers: list[MoELayer] = field(repr=False)
    expert_bytes: int  # expert weights this rank holds after sharding
    exchange: Any = None  # the shared-memory exchange when transport="shm"

    @property
    def sharded_layers(self) -> list[MoELayer]:
        return [layer for layer in self.layers if is_sharded(layer.module)]


def _default_group(group):
    if group is not None:
        return group
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def _use_traceable_experts(model: nn.Module) -> None:
    """transformers' ``eager`` experts path loops over ``nonzero()`` hits: a graph break per layer and a
    data-dependent number of expert-weight reads, which would give ranks different gather sequences."""
    config = getattr(model, "config", None)
    if getattr(config, "_experts_implementation", None) == "eager" and getattr(
        model, "_can_set_experts_implementation", lambda: False
    )():
        log.warning("switching experts implementation from 'eager' to 'grouped_mm' (same math, traceable)")
        model.set_experts_implementation("grouped_mm")


def _check_prefill_only(model: nn.Module, args: tuple, kwargs: dict) -> None:
    if model.training:
        raise RuntimeError(
            f"{type(model).__name__} is in training mode; zp_compile models are prefill-only: call model.eval()"
        )
    if torch.is_grad_enabled():
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        if any(t.requires_grad for t in tensors) or any(p.requires_grad for p in model.parameters()):
            raise RuntimeError(
                "gradients requested: zp_compile models are prefill-only; run the forward under "
                "torch.inference_mode() or torch.no_grad(), with no parameter or input requiring grad"
            )


def _num_tokens(args: tuple, kwargs: dict) -> int | None:
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0] * kwargs[key].shape[1]
    if args and isinstance(args[0], torch.Tensor):
        return args[0].shape[0] * args[0].shape[1]
    return None


def participate_without_tokens(state: ZeroPrefillState) -> None:
    """Take part in one forward's gathers with nothing to compute (a rank with an empty batch).

    Issues the same gathers, in the same ascending (layer, slot) order, as a compiled forward, so the
    other ranks do not wait forever; the stored tensors as they are (nothing reads a decoded bank).
    """
    for layer in state.sharded_layers:
        gather_stored(layer.module)


def _empty_output(model: nn.Module, args: tuple, kwargs: dict):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs["inputs_embeds"]
    vocab = model.get_output_embeddings().weight.shape[0]
    logits = torch.empty((*ids.shape[:2], vocab), dtype=model.dtype, device=ids.device)
    return CausalLMOutputWithPast(logits=logits)


def _refuse_generate(*args, **kwargs):
    raise RuntimeError(
        "generate() is not supported: zp_compile serves prefill only (one forward, read the logits); "
        "call the model directly and use .logits"
    )


def optimize(
    model: nn.Module,
    group: dist.ProcessGroup | None = None,
    *,
    prefetch: int = 1,
    resident_first_layer: bool = False,
    backend: str = "inductor",
    dynamic: bool | None = None,
    transport: str = "collective",
    regional: bool = False,
    config: ZeroPrefillConfig | None = None,
) -> nn.Module:
    """Shard ``model``'s experts over ``group`` (default: the world, or a world of one without an
    initialised process group), compile its forward with the AsyncEP passes, and return it.

    The model keeps its class and is called as before; each rank passes its own batch. All ranks must
    call every forward together (each forward is a sequence of collectives).
    """
    config = _settings(config, prefetch, resident_first_layer, backend, dynamic, transport, regional)
    if hasattr(model, "zero_prefill"):
        raise RuntimeError(f"{type(model).__name__} is already optimized by zp_compile")
    if uses_transformers_ep(model):
        adopt_transformers_ep(model)  # collective: drops the all_to_all dispatch and FSDP sharding
    layers = find_moe_layers(model)
    group = _default_group(group)
    if group is not None and group.size() > 1:
        for layer in layers:
            if not (config.resident_first_layer and layer.index == 0):
                shard_layer(layer, group)
    return _compile(model, group, config, layers)


def _settings(config: ZeroPrefillConfig | None, *keywords) -> ZeroPrefillConfig:
    from_keywords = ZeroPrefillConfig(*keywords)
    if config is None:
        return from_keywords
    if from_keywords != ZeroPrefillConfig():
        raise ValueError(f"pass settings either as config= or as keywords, not both (config={config}, keywords={from_keywords})")
    return config


def _compile(model: nn.Module, group, config: ZeroPrefillConfig, layers: list[MoELayer]) -> nn.Module:
    """Wrap the forward of a model whose experts are already sharded: checks, empty batches, compile."""
    _use_traceable_experts(model)
    world_size = group.size() if group is not None else 1
    rank = group.rank() if group is not None else 0
    exchange = None
    device = module_device(model)
    if config.transport == "shm" and device.type != "cpu":
        raise ValueError(f"transport='shm' gathers expert shards through host shared memory, but this model is on {device}: "
                         "use transport='collective' (NCCL between GPUs)")  # fmt: skip
    if config.transport == "collective" and world_size > 1 and collective_device(group, device).type != device.type:
        raise ValueError(f"the process group's backend ({dist.get_backend(group)}) gathers tensors on "
                         f"{collective_device(group, device).type}, but this model is on {device}: start the group with "
                         f"backend {process_group_backend(device)!r} (zp_compile.devices.process_group_backend)")  # fmt: skip
    if config.transport == "shm" and world_size > 1:
        exchange = use_shared_memory(layers, group)  # collective, once
    state = ZeroPrefillState(config, group, world_size, rank, layers, expert_bytes(layers), exchange)
    model.zero_prefill = state
    forward = model.forward
    compiled = (
        forward
        if config.backend == "eager"
        else torch.compile(forward, backend=zero_prefill_backend(config.prefetch, config.backend, config.regional), dynamic=config.dynamic)
    )

    def zero_prefill_forward(*args, **kwargs):
        _check_prefill_only(model, args, kwargs)
        if _num_tokens(args, kwargs) == 0:
            if state.exchange is None:  # shared memory needs no one's participation
                participate_without_tokens(state)
            return _empty_output(model, args, kwargs)
        # The model's float attributes (norm epsilons, attention scales) are constants. Under
        # dynamic=True dynamo would make each a symbol, specialise those an op takes as a float, and then
        # trace the whole model again ("restarting analysis"): twice the tracing of every compile, ~3-5 s
        # per start on the 2-core machine even with a warm compile cache.
        with torch._dynamo.config.patch(specialize_float=True):
            return compiled(*args, **kwargs)

    model.forward = zero_prefill_forward
    model.generate = _refuse_generate
    log.info(
        "zp_compile: rank %d/%d, %d MoE layers (%d sharded), %.1f MB of experts on this rank",
        rank,
        world_size,
        len(layers),
        len(state.sharded_layers),
        state.expert_bytes / 1e6,
    )
    return model


def from_pretrained(
    path,
    group: dist.ProcessGroup | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    prefetch: int = 1,
    resident_first_layer: bool = False,
    backend: str = "inductor",
    dynamic: bool | None = None,
    transport: str = "collective",
    regional: bool = False,
    config: ZeroPrefillConfig | None = None,
) -> nn.Module:
    """Load a safetensors checkpoint directory with only this rank's expert shards, then ``optimize``.

    No rank ever holds more than its share of any expert bank (resident first layer excepted).
    ``device``: where the model goes; default ``cuda:LOCAL_RANK`` when CUDA works (one GPU per rank,
    as torchrun numbers them), else the CPU. Asking for CUDA that does not work raises ``ValueError``.
    """
    from .models.loading import load_sharded

    config = _settings(config, prefetch, resident_first_layer, backend, dynamic, transport, regional)
    device = resolve_device(device)
    group = _default_group(group)
    model, layers = load_sharded(path, group, dtype=dtype, device=device, resident_first_layer=config.resident_first_layer)
    return _compile(model, group, config, layers)


__all__ = ["optimize", "from_pretrained", "ZeroPrefillConfig", "PRESETS", "SHARD_SUFFIX"]
