"""Adopt a model loaded with transformers' own expert-parallel plan.

``from_pretrained(path, distributed_config=DistributedConfig(fsdp_size=N, ep_size=N,
ep_implementation="all_to_all"))`` gives a model whose experts modules carry an instance-level
``forward`` that dispatches tokens to the rank owning each expert with all_to_all, whose expert
parameters are ``Shard(0)`` DTensors, and whose dense weights are FSDP2-sharded. AsyncEP moves weights,
not activations: we gather everything back to plain tensors (the caller then re-shards the experts its
own way), drop FSDP2 from every module and remove the all_to_all dispatch, so the experts module runs
its class forward on local tokens again.
"""

from __future__ import annotations

from torch import nn

from ..compat import fsdp_state


def uses_transformers_ep(model: nn.Module) -> bool:
    """True when some experts module still dispatches through transformers' expert-parallel forward."""
    return any(getattr(m, "_is_expert_parallel", False) and "forward" in m.__dict__ for m in model.modules())


def _strip_fsdp(module: nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        return
    state = fsdp_state(module)
    # FSDP2 keeps its pre/post forward hooks' handles on its state (torch 2.13).
    for handle in (state._pre_forward_hook_handle, state._post_forward_hook_handle):
        handle.remove()
    module.__class__ = next(c for c in type(module).__mro__[1:] if not issubclass(c, FSDPModule))


def adopt_transformers_ep(model: nn.Module) -> None:
    """Replace transformers' all_to_all expert dispatch (and its FSDP sharding) by plain full modules.

    Collective: every rank must call it; parameters are gathered in ``named_parameters`` order, which
    is the same on every rank.
    """
    from torch.distributed.tensor import DTensor

    full = {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }
    for module in model.modules():
        _strip_fsdp(module)
    for name, tensor in full.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    for module in model.modules():
        if getattr(module, "_is_expert_parallel", False):
            module.__dict__.pop("forward", None)  # the all_to_all dispatch closure
            module._is_expert_parallel = False
            module._is_hooked = False
            stacked = [p for p in module.parameters(recurse=False) if p.dim() == 3]
            module.num_experts = stacked[0].shape[0]
    if hasattr(model, "_is_fsdp_managed_module"):
        model._is_fsdp_managed_module = False
