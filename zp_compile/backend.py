"""torch.compile backends that run the AsyncEP passes on the post-grad (ATen) graph.

- ``inductor``: the passes are registered as Inductor's ``post_grad_custom_post_pass`` through a
  ``CustomGraphPass`` whose ``uuid()`` hashes the files the passes import and the prefetch depth, so the FX graph
  cache stays valid and is invalidated when a pass changes. A user's own custom post pass is kept and
  runs first (torch < 2.13 takes a single pass: the two are chained). Inductor's config is patched only
  for the duration of the compile.
- ``aot_eager``: the same passes on AOTAutograd's forward graph, then run eagerly: no C++ compile,
  for fast numerics and graph tests.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from . import imports, passes
from .regions import compile_regions

INNER_BACKENDS = ("inductor", "aot_eager")


class ZeroPrefillGraphPass(CustomGraphPass):
    """The AsyncEP passes as one Inductor custom graph pass."""

    def __init__(self, prefetch: int) -> None:
        self.prefetch = prefetch

    def __call__(self, graph: torch.fx.Graph) -> None:
        passes.run_passes(graph, self.prefetch)

    def uuid(self) -> Any:
        # Every file the passes import, directly or not (ops, sharding, compat...): a change to any of
        # them changes the graphs they write, so it must miss the FX graph cache.
        files = tuple(sorted(str(imports.modules()[m]) for m in imports.closure(passes.__name__)))
        return get_hash_for_files(files, extra=f"prefetch={self.prefetch}")


class ChainedGraphPass(CustomGraphPass):
    """A user's post pass, then ours, as one pass: torch < 2.13 accepts a single custom post pass."""

    def __init__(self, first, second: CustomGraphPass) -> None:
        self.first, self.second = first, second

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.first(graph)
        self.second(graph)

    def uuid(self) -> Any:
        # A plain callable has no uuid: then neither has the chain, and Inductor skips its cache (correct).
        first = self.first.uuid() if isinstance(self.first, CustomGraphPass) else None
        return None if first is None else (first, self.second.uuid())


def with_our_pass(existing, graph_pass: CustomGraphPass):
    """The value for ``post_grad_custom_post_pass`` that keeps a user's pass(es) and runs ours last."""
    if existing is None:
        return graph_pass
    try:  # torch >= 2.13: a list of passes
        from torch._inductor.custom_graph_pass import get_custom_graph_passes
    except ImportError:
        return ChainedGraphPass(existing, graph_pass)
    return [*get_custom_graph_passes(existing), graph_pass]


def zero_prefill_backend(prefetch: int = 1, inner: str = "inductor", regional: bool = False):
    """A torch.compile backend running the AsyncEP passes, then ``inner`` ("inductor" or "aot_eager").

    ``regional``: compile a decoder layer at a time, each distinct layer once (``zp_compile.regions``),
    instead of the whole graph at once."""
    if inner not in INNER_BACKENDS:
        raise ValueError(f"inner backend must be one of {INNER_BACKENDS}, got {inner!r}")
    graph_pass = ZeroPrefillGraphPass(prefetch)

    if inner == "aot_eager":

        def forward_compiler(gm: torch.fx.GraphModule, example_inputs):
            graph_pass(gm.graph)
            gm.recompile()
            return make_boxed_func(gm.forward)

        compile_whole = aot_autograd(fw_compiler=forward_compiler)
    else:

        def compile_whole(gm: torch.fx.GraphModule, example_inputs):
            from torch._inductor import config as inductor_config
            from torch._inductor.compile_fx import compile_fx

            passes_now = with_our_pass(inductor_config.post_grad_custom_post_pass, graph_pass)
            with inductor_config.patch(post_grad_custom_post_pass=passes_now):
                return compile_fx(gm, example_inputs)

    if not regional:
        return compile_whole

    def regional_backend(gm: torch.fx.GraphModule, example_inputs):
        return compile_regions(gm, example_inputs, compile_whole, prefetch)

    return regional_backend
