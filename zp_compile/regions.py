"""Regional compilation: one compile of the repeated decoder layer, shared by every layer like it.

A 94-layer model traced as one graph costs Inductor (and AOTAutograd) time linear in depth: the
scheduler, the fusion search and the C++ or Triton code generation run 94 times over the same layer.
Here the graph dynamo hands the backend is split at decoder-layer boundaries (``torch.fx.passes.
split_module``, as dynamo's own DDPOptimizer splits graphs into buckets), each piece's names are made
canonical, and pieces that are then identical (same code, same input shapes, strides and dtypes) are
compiled once: the inner backend (AOTAutograd, the AsyncEP passes, Inductor) sees each distinct piece
once, and the FX graph and AOTAutograd caches key them by the same canonical code across starts.

Where the expert gathers go (the one-layer-ahead prefetch survives): an expert-gather marker has only a
graph input (its stored shard) as input, so it can run in any piece. With prefetch depth d, the marker
of gathered MoE layer k is moved into the piece of gathered MoE layer k - d (the first piece for
k < d); it becomes that piece's output and the next layer's input. Inside the piece the AsyncEP passes
issue the gather before the piece's first compute node and wait for it just before the piece returns,
so the transfer of layer k's experts overlaps the whole of decoder layer k - d (its attention and its
experts). The whole-graph compile overlaps a little more: it waits just before layer k's first expert
read, so layer k's attention hides transfer too. Depth 0 keeps each marker in its own layer's piece
(gather, then use).

Invariant (deadlock freedom): the pieces and the marker placement depend only on the graph (module
paths, marker keys), never on timing or rank; every rank runs the pieces in the same
order, and each piece issues its gathers in ascending (layer, slot) order, so the gather order over a
forward is ascending (layer, slot) on every rank, as with one graph. Whether two layers share a compile
(which depends on the sizes seen when tracing) changes what is compiled, never what runs: a piece issues
the same gathers whichever identical layer's compile it runs.

Sharing is exact: a piece's key is its generated code (with every node and attribute renamed in graph
order) plus each input's fake shape, stride, dtype, device, aliasing and alignment; tensors a piece
reads as attributes are keyed by identity, so two pieces holding different constants are never shared.
Size symbols are keyed by role (each layer's past length is a symbol of its own): a piece that runs
another's compile must have had the same sizes when traced, and its symbols are guarded equal to the
other's from then on (a later call where they differ recompiles, as any failed guard does). A marker's
layer number is renumbered within its piece: the passes order by it, and neither lowering (an
all-gather over the group, a copy out of shared memory found by the shard's address) carries it into
the graph.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import sympy
import torch
from torch import fx
from torch._dynamo.utils import counters
from torch.fx.passes.split_module import split_module

from .compat import guard_equal, size_hint
from .passes.predicates import is_expert_gather_marker

log = logging.getLogger(__name__)

# "L['self'].model.layers.12" or "model.layers[12]": a module path ending in a list index.
_INDEXED = re.compile(r"^(?P<list>.+?)(?:\.|\[)(?P<index>\d+)\]?$")

# The alignment Inductor assumes of an input whose offset allows it (torch._inductor.utils.ALIGNMENT).
_ALIGN_BYTES = 16

_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)

InnerCompile = Callable[[fx.GraphModule, list[Any]], Callable[..., Any]]


def _indexed_entries(node: fx.Node) -> list[tuple[str, int]]:
    """(list path, index) of each module on ``node``'s module stack that is an element of a list."""
    found = []
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        match = _INDEXED.match(path)
        if match:
            found.append((match["list"], int(match["index"])))
    return found


def decoder_layers(graph: fx.Graph) -> dict[fx.Node, int]:
    """node -> decoder layer index, for the nodes run inside an element of the graph's decoder-layer
    list: the module list whose elements hold the most nodes (the model's ``layers``; an experts list
    nested in a layer, or a vision tower's layers, hold fewer)."""
    entries = {n: _indexed_entries(n) for n in graph.nodes if n.op not in ("placeholder", "output")}
    counts = Counter(path for found in entries.values() for path in dict.fromkeys(p for p, _ in found))
    if not counts:
        return {}
    layer_list = counts.most_common(1)[0][0]
    return {n: next(i for p, i in found if p == layer_list) for n, found in entries.items() if any(p == layer_list for p, _ in found)}


def assign_pieces(graph: fx.Graph, prefetch: int) -> dict[fx.Node, int] | None:
    """node -> piece (0, 1, ... in graph order), or None when the graph has fewer than two layers.

    Piece j holds decoder layer j's nodes; the nodes before the first layer join piece 0 and those
    after the last layer the last piece. A node outside every layer (a size, a getitem) runs in the
    latest piece among its inputs'. Expert-gather markers move ``prefetch`` gathered layers ahead."""
    layer_of = decoder_layers(graph)
    layers = sorted(set(layer_of.values()))
    if len(layers) < 2:
        return None
    piece_of_layer = {layer: j for j, layer in enumerate(layers)}
    piece: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node in layer_of:
            piece[node] = piece_of_layer[layer_of[node]]
        else:  # before the first layer: 0; after it, the latest piece it reads from
            piece[node] = max((piece[i] for i in node.all_input_nodes if i in piece), default=0)
    if prefetch:
        # A marker reads its stored shard straight from a graph input, so it can run in any piece; one
        # that reads a computed value stays where it is (moving it would make pieces depend both ways).
        markers = [n for n in graph.nodes if is_expert_gather_marker(n) and n in layer_of]
        gathered = sorted({layer_of[n] for n in markers})  # gathered MoE layers, in layer order
        for node in markers:
            if not all(i.op == "placeholder" for i in node.all_input_nodes):
                continue
            k = gathered.index(layer_of[node])
            piece[node] = piece_of_layer[gathered[k - prefetch]] if k >= prefetch else 0
    return piece


def _canonical(piece: fx.GraphModule) -> tuple[fx.GraphModule, bool]:
    """``piece`` with its nodes named by position (``a0``... inputs, ``n0``... the rest) and the
    attributes it reads named ``attr0``...: identical layers then have identical code. Its output is a
    tuple, as AOTAutograd wants; True when ``split_module`` gave it a single value (torch < 2.12 has no
    ``tuple_return``)."""
    graph, root = fx.Graph(), torch.nn.Module()
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[str, str] = {}
    for i, node in enumerate(piece.graph.nodes):
        args = fx.map_arg(node.args, env.__getitem__)
        kwargs = fx.map_arg(node.kwargs, env.__getitem__)
        if node.op == "placeholder":
            new = graph.placeholder(f"a{i}")
        elif node.op == "output":
            single = not isinstance(args[0], tuple | list)
            new = graph.output((args[0],) if single else tuple(args[0]))
        elif node.op in ("get_attr", "call_module"):
            if node.target not in attrs:
                attrs[node.target] = f"attr{len(attrs)}"
                setattr(root, attrs[node.target], _attr(piece, node.target))
            new = graph.create_node(node.op, attrs[node.target], args, kwargs, name=f"n{i}")
        else:
            new = graph.create_node(node.op, node.target, args, kwargs, name=f"n{i}")
        new.meta = node.meta.copy()
        env[node] = new
    return fx.GraphModule(root, graph), single


def _attr(module: torch.nn.Module, qualname: str) -> Any:
    """What a ``get_attr`` or ``call_module`` target names (a submodule, a tensor) in ``module``."""
    for name in qualname.split("."):
        module = getattr(module, name)
    return module


def _renumber_markers(piece: fx.GraphModule) -> None:
    """A marker's layer becomes its rank among the piece's gathered layers: its order is all the passes
    read, and the lowered gather does not carry it."""
    markers = [n for n in piece.graph.nodes if is_expert_gather_marker(n)]
    rank = {layer: i for i, layer in enumerate(sorted({n.args[4] for n in markers}))}
    for node in markers:
        node.args = (*node.args[:4], rank[node.args[4]], *node.args[5:])


def _expr(value: Any) -> Any:
    """A size, stride or offset as an expression (a SymInt's sympy expression, an int as is)."""
    return value.node.expr if isinstance(value, _SYMBOLIC) else value


def _value_key(value: Any, storages: dict, symbols: dict) -> tuple:
    """One input's fake metadata, its size symbols named by first appearance (``symbols``: symbol ->
    its stand-in): layer 3's past length and layer 4's are distinct symbols of the same role."""

    def named(x: Any) -> str:
        expr = _expr(x)
        if not hasattr(expr, "free_symbols"):
            return str(expr)
        for sym in sorted(expr.free_symbols, key=str):
            symbols.setdefault(sym, sympy.Symbol(f"_{len(symbols)}", integer=True))
        return str(expr.xreplace(symbols))

    if isinstance(value, torch.Tensor):
        # Which earlier input shares this one's storage: AOTAutograd compiles for the aliasing it saw.
        storage = torch.multiprocessing.reductions.StorageWeakRef(value.untyped_storage())
        alias = storages.setdefault(storage, len(storages))
        # The offset itself is not compiled in, only whether the data is aligned (Inductor's alignment
        # assumption): expert shards are views at different offsets of one shared-memory segment.
        offset = value.storage_offset()
        offset = named(offset) if isinstance(offset, torch.SymInt) else offset * value.element_size() % _ALIGN_BYTES == 0
        return ("tensor", tuple(map(named, value.shape)), tuple(map(named, value.stride())), offset, value.dtype, value.device,
                value.requires_grad, alias)  # fmt: skip
    if isinstance(value, _SYMBOLIC):
        return ("symbol", named(value))
    return ("value", type(value).__name__, repr(value))


def piece_key(piece: fx.GraphModule, example_inputs: list[Any]) -> tuple[tuple, list]:
    """What a compile of ``piece`` depends on (its code, its attributes, its inputs' fake metadata with
    their size symbols named by role), and those symbols in order (to tie a sharing piece's to them)."""
    attrs = []
    for target in dict.fromkeys(n.target for n in piece.graph.nodes if n.op in ("get_attr", "call_module")):
        value = _attr(piece, target)
        if isinstance(value, fx.GraphModule):  # a subgraph (a mask or score function): its code
            attrs.append((target, tuple(m.code for _, m in value.named_modules() if isinstance(m, fx.GraphModule))))
        else:  # a tensor or another object: shared only with itself
            attrs.append((target, id(value)))
    storages: dict = {}
    symbols: dict = {}
    inputs = tuple(_value_key(v, storages, symbols) for v in example_inputs)
    return (piece.code, tuple(attrs), inputs), list(symbols)


def _shareable(mine: list, theirs: list, example_inputs: list[Any]) -> bool:
    """Whether a piece whose key matches a compiled one's may run that compile: each of its size symbols
    then stands for the compiled piece's, so they must be equal now, and are guarded equal from now on
    (the compile may have assumed anything of its own symbols; a later call where they differ recompiles
    the frame, as any guard does)."""
    if mine == theirs:
        return True
    shape_env = torch._guards.detect_fake_mode(example_inputs).shape_env
    if any(size_hint(shape_env, a) != size_hint(shape_env, b) for a, b in zip(mine, theirs)):
        return False
    for a, b in zip(mine, theirs):
        if a != b:
            guard_equal(shape_env, a, b)
    return True


class _Compiled(torch.nn.Module):
    """A compiled piece where ``split_module`` put the piece's module."""

    def __init__(self, fn: Callable[..., Any], single: bool) -> None:
        super().__init__()
        self.fn, self.single = fn, single

    def forward(self, *args: Any) -> Any:
        # Called as dynamo calls a backend's result: unboxed. (AOTAutograd's forward copies its inner
        # function's ``_boxed_call`` flag while taking ``*args``, so the flag cannot be trusted here.)
        out = self.fn(*args)
        return out[0] if self.single else out


def compile_regions(gm: fx.GraphModule, example_inputs: list[Any], inner: InnerCompile, prefetch: int) -> Callable[..., Any]:
    """Compile ``gm`` a decoder layer at a time with ``inner`` (a torch.compile backend), once per
    distinct piece. A graph with fewer than two decoder layers goes to ``inner`` whole."""
    pieces = assign_pieces(gm.graph, prefetch)
    if pieces is None:
        return inner(gm, example_inputs)
    split = split_module(gm, None, pieces.__getitem__, keep_original_order=True)
    compiled: dict[tuple, list[tuple[_Compiled, list]]] = {}  # key -> (compile, its size symbols)
    names = [n.target for n in split.graph.nodes if n.op == "call_module"]
    for name in names:
        piece, single = _canonical(split.get_submodule(name))
        _renumber_markers(piece)
        piece.recompile()
        inputs = [n.meta["example_value"] for n in piece.graph.nodes if n.op == "placeholder"]
        key, symbols = piece_key(piece, inputs)
        key = (*key, single)
        candidates = compiled.setdefault(key, [])
        shared = next((fn for fn, theirs in candidates if _shareable(symbols, theirs, inputs)), None)
        if shared is None:
            shared = _Compiled(inner(piece, inputs), single)
            candidates.append((shared, symbols))
        setattr(split, name, shared)
    distinct = sum(map(len, compiled.values()))
    counters["zp_compile"]["regional_pieces"] += len(names)
    counters["zp_compile"]["regional_compiles"] += distinct
    log.info("zp_compile: %d decoder-layer pieces, %d compiled", len(names), distinct)
    split.recompile()
    return split
