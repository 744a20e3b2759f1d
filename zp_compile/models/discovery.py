"""Find the MoE layers of a Hugging Face transformers model by structure.

transformers 5 stores a layer's routed experts as stacked parameters with a leading experts dimension
(``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]; some families transposed, with biases
[E, ...], or with a separate ``up_proj``). We look for exactly that shape of module rather than for
class names, so a family we never listed works as long as it uses the stacked layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

# A module holding stacked experts must have one of these up projections and this down projection.
UP_PROJ_NAMES = ("gate_up_proj", "up_proj")
DOWN_PROJ_NAME = "down_proj"


class UnsupportedModelError(ValueError):
    """The model has no MoE layer we can shard, or its experts are in a layout we do not recognise."""


@dataclass(frozen=True)
class ExpertLayout:
    """How one experts module stores its weights (descriptive; sharding is always along dim 0)."""

    up_proj: str  # "gate_up_proj" (gate and up fused) or "up_proj"
    transposed: bool | None  # [E, in, out] rather than [E, out, in]; None when shapes cannot tell
    has_bias: bool
    gate_up_interleaved: bool  # fused gate/up stored as [g0, u0, g1, u1, ...] (GPT-OSS) not [g; u]


@dataclass
class MoELayer:
    """One MoE layer: its experts module and what sits beside it."""

    index: int  # execution order among MoE layers, identical on every rank
    path: str  # qualified name of the experts module, e.g. "model.layers.3.mlp.experts"
    module: nn.Module = field(repr=False)
    num_experts: int
    expert_params: tuple[str, ...]  # direct parameters with leading dim E (weights and biases)
    layout: ExpertLayout
    router_path: str | None
    shared_expert_paths: tuple[str, ...]


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "hidden_size", None)


def _stacked_params(module: nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}


def _infer_transposed(module: nn.Module, up: torch.Tensor, hidden: int | None) -> bool | None:
    flag = getattr(module, "is_transposed", None)  # set by transformers' @use_experts_implementation
    if isinstance(flag, bool):
        return flag
    if hidden is None or up.shape[1] == up.shape[2]:
        return None
    return up.shape[1] == hidden  # [E, H, out]: inputs along dim 1


def _layout(module: nn.Module, params: dict[str, torch.Tensor], num_experts: int, hidden: int | None) -> ExpertLayout:
    up_name = next(n for n in UP_PROJ_NAMES if n in params)
    has_bias = any(
        n.endswith("_bias") and p.dim() == 2 and p.shape[0] == num_experts
        for n, p in module.named_parameters(recurse=False)
    )
    return ExpertLayout(
        up_proj=up_name,
        transposed=_infer_transposed(module, params[up_name], hidden),
        has_bias=has_bias,
        gate_up_interleaved=up_name == "gate_up_proj" and getattr(module, "is_concatenated", True) is False,
    )


def _siblings(model: nn.Module, path: str) -> tuple[nn.Module | None, str]:
    parent_path = path.rpartition(".")[0]
    return (model.get_submodule(parent_path) if parent_path else model), parent_path


def _router_path(model: nn.Module, path: str, experts: nn.Module, num_experts: int) -> str | None:
    parent, parent_path = _siblings(model, path)
    for name, child in parent.named_children():
        if child is experts:
            continue
        weight = getattr(child, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == num_experts:
            return f"{parent_path}.{name}" if parent_path else name
    return None


def _shared_paths(model: nn.Module, path: str) -> tuple[str, ...]:
    parent, parent_path = _siblings(model, path)
    prefix = f"{parent_path}." if parent_path else ""
    return tuple(prefix + n for n, c in parent.named_children() if "shared" in n and c is not None)


def _describe_candidates(model: nn.Module) -> str:
    """What MoE-looking structure the model has, for an error message."""
    hints = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and re.search(r"experts$", name):
            hints.append(f"'{name}' is a ModuleList of per-expert modules ({type(mod[0]).__name__ if len(mod) else 'empty'})")
        stacked = _stacked_params(mod)
        if stacked and not any(n in stacked for n in UP_PROJ_NAMES):
            shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in stacked.items())
            hints.append(f"'{name}' ({type(mod).__name__}) has 3-D parameters {shapes} but no gate_up_proj/up_proj")
        if DOWN_PROJ_NAME not in stacked and any(n in stacked for n in UP_PROJ_NAMES):
            hints.append(f"'{name}' ({type(mod).__name__}) has a stacked up projection but no 3-D down_proj")
    return "; ".join(hints[:4])


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE layer of ``model``, in execution (registration) order.

    Raises ``UnsupportedModelError`` naming the model class and what was missing when no module
    holds stacked experts in transformers' layout.
    """
    hidden = _hidden_size(model)
    layers: list[MoELayer] = []
    for path, module in model.named_modules():
        stacked = _stacked_params(module)
        if DOWN_PROJ_NAME not in stacked or not any(n in stacked for n in UP_PROJ_NAMES):
            continue
        leading = {p.shape[0] for p in stacked.values()}
        if len(leading) != 1:
            shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in stacked.items())
            raise UnsupportedModelError(
                f"{type(model).__name__}: experts module '{path}' ({type(module).__name__}) has 3-D "
                f"parameters with different leading (experts) dimensions: {shapes}"
            )
        num_experts = leading.pop()
        declared = getattr(module, "num_experts", num_experts)
        if isinstance(declared, int) and declared != num_experts:
            raise UnsupportedModelError(
                f"{type(model).__name__}: experts module '{path}' declares num_experts={declared} but its "
                f"stacked parameters have {num_experts} rows; an already-sharded model cannot be sharded again"
            )
        expert_params = tuple(
            n for n, p in module.named_parameters(recurse=False) if p.dim() >= 2 and p.shape[0] == num_experts
        )
        layers.append(
            MoELayer(
                index=len(layers),
                path=path,
                module=module,
                num_experts=num_experts,
                expert_params=expert_params,
                layout=_layout(module, stacked, num_experts, hidden),
                router_path=_router_path(model, path, module, num_experts),
                shared_expert_paths=_shared_paths(model, path),
            )
        )
    if not layers:
        found = _describe_candidates(model)
        raise UnsupportedModelError(
            f"{type(model).__name__} has no MoE layer we can shard: no submodule holds stacked expert "
            f"parameters (3-D [num_experts, ...] '{UP_PROJ_NAMES[0]}' or '{UP_PROJ_NAMES[1]}' plus "
            f"'{DOWN_PROJ_NAME}', transformers' layout)" + (f". Found instead: {found}" if found else "")
        )
    return layers
