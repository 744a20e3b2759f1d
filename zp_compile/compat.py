"""The private torch APIs zp-compile relies on, behind one module.

Each is looked up when first used, not at ``import zp_compile``: a torch release that moved or
dropped one fails the feature that needs it, with a message naming the API and the torch version,
instead of an ImportError for every user. The versions these were written against: torch 2.13.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

TESTED_TORCH = "2.13"


class TorchCompatError(RuntimeError):
    """A private torch API zp-compile needs is missing from the installed torch."""


def _private(module: str, name: str, needed_for: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise TorchCompatError(
            f"{module}.{name} is missing from torch {torch.__version__} (zp-compile was written against torch "
            f"{TESTED_TORCH}); it is needed for {needed_for}: install torch {TESTED_TORCH} or report the version"
        ) from e


def insert_fn_trace_before_node(graph, fn, example_inputs, node, args, erase_after):
    """Inductor's ``bucketing._insert_fn_trace_before_node``: trace ``fn`` as ATen and splice it before
    ``node`` with ``meta["val"]`` set (lowering the expert-gather markers)."""
    f = _private("torch._inductor.fx_passes.bucketing", "_insert_fn_trace_before_node", "lowering expert gathers")
    return f(graph, fn, example_inputs, node, args, erase_after)


_CONTROL_DEPS = "torch._inductor.fx_passes.control_dependencies"


def preserve_node_ordering(graph, deps) -> None:
    """Inductor's ``control_dependencies.preserve_node_ordering``: control edges its scheduler keeps
    (pinning where each gather is issued)."""
    _private(_CONTROL_DEPS, "preserve_node_ordering", "pinning the gather order")(graph, deps)
    _eager_control_deps()


def _eager_control_deps() -> None:
    """Run the ``control_deps`` nodes of a graph that is executed, not lowered by Inductor (the
    ``aot_eager`` backend): torch 2.13 registers the eager kernel (the subgraph, called), torch 2.11
    only the fake one, so there such a graph raises "could not find kernel for control_deps"."""
    from torch._C import DispatchKey

    hop = _private(_CONTROL_DEPS, "control_deps", "pinning the gather order")
    for key in (DispatchKey.CompositeExplicitAutograd, DispatchKey.Autograd):
        if key not in hop.py_kernels:
            hop.py_impl(key)(lambda additional_deps, subgraph, *args, **kwargs: subgraph(*args, **kwargs))


def storage_use_count(storage: torch.UntypedStorage) -> int:
    """References to ``storage`` (``torch._C._storage_Use_Count``, as Inductor's cudagraph trees use it):
    1 means only the caller holds it (the shared-memory transport's output pool)."""
    return _private("torch._C", "_storage_Use_Count", "the shared-memory transport's buffer pool")(storage._cdata)


def fsdp_state(module) -> Any:
    """FSDP2's per-module state (``FSDPModule._get_fsdp_state``), whose hook handles hold its forward
    hooks (undoing transformers' expert-parallel FSDP sharding)."""
    get = getattr(module, "_get_fsdp_state", None)
    if get is None:
        raise TorchCompatError(f"FSDPModule._get_fsdp_state is missing from torch {torch.__version__} (zp-compile was written "
                               f"against torch {TESTED_TORCH}); it is needed to undo transformers' expert-parallel FSDP sharding")  # fmt: skip
    return get()


def no_duck_sizing():
    """A context in which dynamo gives every dynamic size its own symbol (``use_duck_shape=False``):
    sizes that happen to be equal when a function is traced (a step's queries and keys when nothing is
    cached) are not tied together, so the first call where they differ does not recompile."""
    patch = _private("torch.fx.experimental._config", "patch", "compiling the packed attention kernel once for all sizes")
    return patch(use_duck_shape=False)


def size_hint(shape_env, expr) -> int:
    """The value a size symbol had when traced (``ShapeEnv.guarding_hint_or_throw``; ``size_hint``
    before torch 2.12)."""
    hint = getattr(shape_env, "guarding_hint_or_throw", None) or shape_env.size_hint
    return int(hint(expr))


def guard_equal(shape_env, a, b) -> None:
    """Record in dynamo's ``ShapeEnv`` that size symbols ``a`` and ``b`` are equal (``evaluate_expr`` of
    their equality: a guard on the frame, and ``b`` replaced by ``a`` or the reverse). Regional
    compilation ties the symbols of a layer that runs another layer's compile to that layer's."""
    import sympy

    evaluate = getattr(shape_env, "evaluate_expr", None)
    if evaluate is None:
        raise TorchCompatError(f"ShapeEnv.evaluate_expr is missing from torch {torch.__version__} (zp-compile was written "
                               f"against torch {TESTED_TORCH}); it is needed for regional compilation")  # fmt: skip
    if not evaluate(sympy.Eq(a, b)):
        raise AssertionError(f"size symbols {a} and {b} were to be tied but differ")
