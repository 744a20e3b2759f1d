"""Packed variable-length attention: one step's sequences as ONE row of tokens, no padding, and one
attention kernel call per layer.

A rank's step runs its sequences' uncached tokens back to back as ``input_ids [1, L]`` (L = the sum of
the rows' new tokens), with every row's position ids continuing its own prefix. The linear layers and
the experts work per token, so only attention needs to know where rows begin and end. Each row attends
over its own key ranges in the layer's keys ``[1, Hkv, P + L, D]`` (the cached past, then the step's new
tokens): first its prefix, which may lie in the past (blocks the rank's cache held before the step) or
in a batch-mate's new tokens (a block an earlier row of the same step computes: in-step prefix sharing),
then its own new tokens, causally.

Why not padding: a padded batch makes every row as wide as the widest suffix and attend over the longest
past, so one 1,088-token miss among 64-token hits costs the rank 17 times the hits' work. Packed, a step
can mix misses and hits at their true cost, and a group's first prompt and its followers can run in the
same step (the followers read the prefix the first one computes).

The kernel is FlexAttention (``torch.nn.attention.flex_attention``), compiled by Inductor (its C++
template on CPU, Triton on GPU), called once per layer over all the step's rows, grouped-query heads
natively (no K/V copy). One exception, measured: on a CPU, full-attention layers without sinks run one
SDPA per row (``_rows_sdpa``, ``CPU_KERNEL`` says why). Its mask is a function of positions, so each layer kind is one more rule:

    query q (row b, position pq) may read key k (position pk) iff
        k is one of row b's keys                       member[b, k]
        and pk <= pq                                   causal
        and pq - pk < W       (sliding-window layers, transformers' rule: kv_idx > q_idx - W)
        and pq // C == pk // C  (chunked layers, Llama 4: attention_chunk_size C)

Every row's keys, in order, are its positions 0..n-1, so a key's position is well defined even when
several rows share it. The block mask (which 128 x 128 tiles hold any allowed pair, which hold only
allowed pairs) is built once per step and layer kind from the rows, not per layer: ``StepMask``.

Attention sinks (GPT-OSS: a learned logit per head that joins every query's softmax and reads no value)
are one more key after the K keys, with value 0, that every query may read and whose score is the
sink logit (a ``score_mod``): exactly transformers' eager softmax over [scores, sink]. (Rescaling the
output by sigmoid(lse - sink) would need the kernel's log-sum-exp, which Inductor's CPU template does
not return.)

The op is ``zp_compile::packed_attention``, opaque to dynamo and Inductor in the model's graph: the
model's compiled graph does not change with the number or lengths of rows, and the kernel inside is its
own compiled function with dynamic sizes (no recompile per step either).

``enable(model)`` registers the implementation as ``zp_packed`` and switches the model to it. Calls
without ``zp_rows`` (padded batches with a 2-D mask) still run transformers' SDPA path unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..compat import no_duck_sizing
from ..devices import to_device
from ..ops import PACKED_ATTENTION

NAME = "zp_packed"
TILE = 128  # FlexAttention's block: the block mask marks 128 x 128 tiles of (queries, keys)
LAYER_KINDS = ("full_attention", "sliding_attention", "chunked_attention")
_FAR = 1 << 30  # a position no query or key has


# ---- one step's mask, shared by every layer of a kind --------------------------------------------------
@dataclass(frozen=True)
class StepMask:
    """Where each key of a packed step stands, and the step's block tables for one layer kind.

    kv_row [K] int32: the row whose new token key k is (B for the past and for a spare token: row B
    reads nothing); kv_pos [K] int32: key k's position in its rows; member [B + 1, K] bool: k is one of
    row b's keys. Query q is the new token of key P + q, so these describe the queries too.
    kv_num_blocks [1, 1, nQ], kv_indices [1, 1, nQ, nK]: tiles with some allowed pairs;
    full_kv_num_blocks, full_kv_indices: tiles with only allowed pairs (no mask evaluated there).
    """

    past: torch.Tensor  # [] int32: P, the keys before the step's new tokens
    kv_row: torch.Tensor
    kv_pos: torch.Tensor
    member: torch.Tensor
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor
    full_kv_indices: torch.Tensor
    prefixed: bool  # some row reads keys other than its own new tokens
    sink_at: torch.Tensor  # [] int32: K, the attention sink's key (when the layer has sinks)


def step_layout(rows: list[list[int]], ranges: list[list[int]], L: int, K: int, spare: int = 0) -> tuple[torch.Tensor, ...]:
    """past, kv_row, kv_pos, member (see ``StepMask``) from the step's rows and key ranges (host lists),
    with ``spare`` keys after the K keys that no row's rule reaches (the attention sink's key)."""
    B, P = len(rows), K - L
    kv_row = np.full(K + spare, B, dtype=np.int32)
    kv_pos = np.zeros(K + spare, dtype=np.int32)
    member = np.zeros((B + 1, K + spare), dtype=np.bool_)
    for b, (q0, q1, r0, r1) in enumerate(rows):
        if q1 == q0:
            continue  # a spare row (the step pads size-1 tensors to 2)
        n = 0
        for a, e in ranges[r0:r1]:
            member[b, a:e] = True
            kv_pos[a:e] = np.arange(n, n + e - a)  # a key several rows share has one position in all
            n += e - a
        kv_row[P + q0 : P + q1] = b  # its own tokens: its last keys, [P + q0, P + q1)
    return tuple(torch.from_numpy(x) for x in (np.array(P, dtype=np.int32), kv_row, kv_pos, member))


def block_tables(past, kv_row, kv_pos, member, L: int, window: int = 0, chunk: int = 0, sink: bool = False) -> tuple[torch.Tensor, ...]:
    """FlexAttention's tables for the mask rule above: kv_num_blocks, kv_indices, full_kv_num_blocks,
    full_kv_indices. A tile (i, j) is needed if some row has a query in query tile i and a key in key tile
    j that the rule could pair (bounds by positions: a superset, the mask decides per pair), and full if
    one row's queries fill tile i, its keys fill tile j, and every pair passes. ``sink``: the last key is
    the attention sink, which every query reads."""
    K, rows = kv_pos.numel(), member.shape[0]
    P = K - int(sink) - L  # from the sizes: reading ``past`` would wait for the device
    q_row, q_pos = kv_row[P : P + L], kv_pos[P : P + L]  # query q is key P + q
    # At least 2 tiles each way (the tables may cover more than the sequences): dynamo specialises a
    # size of 1, and a step of <= 128 tokens would compile the kernel again while serving.
    nQ, nK = max(2, -(-L // TILE)), max(2, -(-K // TILE))
    device = kv_row.device
    # Per (row, query tile): the least and greatest query position and the query count.
    cell = q_row.long() * nQ + torch.arange(L, device=device) // TILE
    qmin = torch.full((rows * nQ,), _FAR, dtype=torch.int32, device=device).scatter_reduce(0, cell, q_pos, "amin").view(rows, nQ, 1)
    qmax = torch.full((rows * nQ,), -_FAR, dtype=torch.int32, device=device).scatter_reduce(0, cell, q_pos, "amax").view(rows, nQ, 1)
    qn = torch.zeros(rows * nQ, dtype=torch.int32, device=device).scatter_add(0, cell, torch.ones_like(q_pos)).view(rows, nQ, 1)
    # Per (row, key tile): the same for the row's keys.
    m = torch.nn.functional.pad(member, (0, nK * TILE - K)).view(rows, nK, TILE)
    p = torch.nn.functional.pad(kv_pos, (0, nK * TILE - K)).view(1, nK, TILE)
    kmin = torch.where(m, p, _FAR).amin(-1).view(rows, 1, nK)
    kmax = torch.where(m, p, -_FAR).amax(-1).view(rows, 1, nK)
    kn = m.sum(-1, dtype=torch.int32).view(rows, 1, nK)
    need = (qn > 0) & (kn > 0) & (kmin <= qmax)  # [rows, nQ, nK]
    full = (qn == TILE) & (kn == TILE) & (kmax <= qmin)
    if window:
        need &= kmax > qmin - window
        full &= qmax - kmin < window
    if chunk:
        need &= kmax // chunk >= qmin // chunk
        full &= kmin // chunk == qmax // chunk
    full_tiles = full.any(0)
    partial = need.any(0) & ~full_tiles
    if sink:  # every query tile with a real query reads the sink's tile (never full: the sink is no member)
        partial[:, (K - 1) // TILE] |= (qn[:-1] > 0).any(0).view(nQ)
    return (*_ordered(partial), *_ordered(full_tiles))


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[nQ, nK] bool -> (num [1, 1, nQ] int32, indices [1, 1, nQ, nK] int32: the set tiles first, in order)."""
    num = dense.sum(-1, dtype=torch.int32)
    indices = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num[None, None], indices[None, None]


class _StepMasks:
    """The masks of the step in progress, one per layer kind, built at its first layer of that kind. The
    step is known by its ``rows`` tensor, the same object for every layer of one forward (a weak
    reference: a later step's tensor is never mistaken for it, even at the same address)."""

    def __init__(self):
        self._rows = None
        self._layouts: dict[int, tuple[torch.Tensor, ...]] = {}  # spare keys -> layout
        self._masks: dict[tuple[int, int, bool], StepMask] = {}

    def get(self, rows: torch.Tensor, ranges: torch.Tensor, L: int, K: int, window: int, chunk: int, sink: bool, device) -> StepMask:
        if self._rows is None or self._rows() is not rows:
            self._rows, self._layouts, self._masks = weakref.ref(rows), {}, {}
        spare = int(sink)
        if spare not in self._layouts:  # one host-to-device copy per step (and layout)
            self._layouts[spare] = tuple(to_device(t, device) for t in step_layout(rows.tolist(), ranges.tolist(), L, K, spare))
        layout = self._layouts[spare]
        if (window, chunk, sink) not in self._masks:
            prefixed = has_prefix(rows)
            tables = block_tables(*layout, L, window, chunk, sink)
            sink_at = layout[0].new_full((), K)  # on the device, from a device tensor: no copy
            self._masks[window, chunk, sink] = StepMask(*layout, *tables, prefixed, sink_at)
        return self._masks[window, chunk, sink]


_STEP = _StepMasks()
# On a CPU, full-attention layers without sinks run one SDPA per row ("rows", ``_rows_sdpa``) unless this
# says "flex". Measured (benchmarks/packed_attention.py, BENCHMARKS.md): Inductor's CPU FlexAttention
# template ran the 82M benchmark model's steps (8/4 heads of 64, rows of 496) at 0.37-0.40x the per-row
# loop, and Qwen3-30B-A3B's attention shape (32/4 heads of 128) at 0.57-0.92x without prefixes and
# 1.18-1.71x with a 1,024-token shared prefix. On a CPU a call costs microseconds, not a launch, and
# reading the rows' bounds costs no device sync, so the per-row loop has none of the GPU's problems.
CPU_KERNEL = "rows"


def has_prefix(rows: torch.Tensor) -> bool:
    """Some row reads keys other than its own new tokens: a row of more than one key range (its own new
    tokens are always its last range). Not ``K > L``: the past may hold keys no row reads (the spare
    keys ``rank/kv_cache.py`` pads it with). ``rows`` is on the host: no device sync."""
    return bool((rows[:, 3] - rows[:, 2] > 1).any())


def _rows_sdpa(query, key, value, rows: torch.Tensor, ranges: torch.Tensor, scale: float) -> torch.Tensor:
    """Full attention, one SDPA per row (the CPU path, see ``CPU_KERNEL``): a row's keys are a view when
    they are one range, else its ranges concatenated; grouped heads native (``enable_gqa``); causal, or
    aligned bottom-right when the row has a prefix (query i sees the m - n prefix keys and own 0..i)."""
    out = query.new_zeros((1, query.shape[2], query.shape[1], value.shape[-1]))  # zeros: a spare token stays finite
    spans = ranges.tolist()  # host tensors: no device sync
    for q0, q1, r0, r1 in rows.tolist():
        if q1 == q0:
            continue  # a spare row (the step pads size-1 tensors to 2)
        parts = spans[r0:r1]
        if len(parts) == 1:
            k, v = key[:, :, parts[0][0] : parts[0][1]], value[:, :, parts[0][0] : parts[0][1]]
        else:
            k = torch.cat([key[:, :, a:b] for a, b in parts], dim=2)  # [1, Hkv, m, D]
            v = torch.cat([value[:, :, a:b] for a, b in parts], dim=2)
        n, m = q1 - q0, k.shape[2]
        q = query[:, :, q0:q1]
        if m == n:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            mask = torch.arange(m, device=q.device)[None, :] <= torch.arange(m - n, m, device=q.device)[:, None]  # [n, m]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[0, q0:q1] = o[0].transpose(0, 1)
    return out


# ---- the kernel -------------------------------------------------------------------------------------------
def _flex_packed(query, key, value, past, kv_row, kv_pos, member, kv_num, kv_idx, full_num, full_idx, sink_at, sinks, window: int,
                 chunk: int, scale: float, prefixed: bool):  # fmt: skip
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    # Query q's own key is key P + q (its row's new tokens come last in the keys), so the mask reads only
    # key-indexed tables: Inductor's CPU template (torch 2.13) bounds-checks a buffer indexed by q
    # against its query tile instead of the buffer's length, and fails on any query-indexed table. P
    # comes as a 0-d tensor ``past``: the template takes tensors into the mask, not size expressions.

    def mask_mod(b, h, q, k):
        own = q + past
        if prefixed:
            d = kv_pos[own] - kv_pos[k]
            allowed = member[kv_row[own], k] & (d >= 0)
        else:  # no row reads a prefix: its keys are its own tokens, consecutive (a third cheaper on CPU)
            d = own - k
            allowed = (kv_row[k] == kv_row[own]) & (d >= 0)
        if window:
            allowed = allowed & (d < window)
        if chunk:
            allowed = allowed & (kv_pos[own] // chunk == kv_pos[k] // chunk)
        if sinks is not None:
            allowed = allowed | (k == sink_at)
        return allowed

    score_mod = None
    if sinks is not None:  # key and value come with the sink's key (zeros) at index K: see packed_attention

        def score_mod(score, b, h, q, k):
            return torch.where(k == sink_at, sinks[h].to(score.dtype), score)

    block_mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=TILE, mask_mod=mask_mod,
                                          seq_lengths=(query.shape[2], key.shape[2]), compute_q_blocks=False)  # fmt: skip
    return flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale,
                          enable_gqa=query.shape[1] != key.shape[1])  # fmt: skip


@functools.cache
def _compiled_flex():
    # One compiled kernel for every step: sizes (tokens, keys, rows, tiles) are dynamic.
    return torch.compile(_flex_packed, dynamic=True, fullgraph=True)


@contextlib.contextmanager
def eagerly():
    """Run compiled code eagerly, FlexAttention included (a small step that must not compile: its warning
    that the eager kernel materialises the scores is beside the point)."""
    with torch.compiler.set_stance("force_eager"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


# The op's schema is declared in zp_compile/ops.py with the project's other custom ops.
@torch.library.impl(PACKED_ATTENTION, "CompositeExplicitAutograd")
def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor, ranges: torch.Tensor,
                     scale: float, window: int = 0, chunk: int = 0, sinks: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """query [1, H, L, D]; key, value [1, Hkv, K, D] (K = P + L); rows [B, 4] int64 on the host: (query
    start, query end, first range, end of ranges) per row; ranges [R, 2] int64 on the host: key index
    ranges [start, end). A row's ranges, in order, are its keys: its prefix, then its own new tokens.
    ``window`` / ``chunk``: the layer's sliding window or attention chunk (0: none); ``sinks`` [H]: the
    layer's attention-sink logits. Returns [1, L, H, Dv] (transformers' attention output layout)."""
    L, K = query.shape[2], key.shape[2]
    if query.device.type == "cpu" and CPU_KERNEL == "rows" and not (window or chunk or sinks is not None):
        return _rows_sdpa(query, key, value, rows, ranges, scale)
    m = _STEP.get(rows, ranges, L, K, window, chunk, sinks is not None, query.device)
    if sinks is not None:
        # The sink as one more key: its score is the layer's sink logit (not scaled), its value is 0, so
        # it only adds e^sink to every query's softmax denominator, as transformers' eager GPT-OSS does.
        # Padded here, outside the compiled kernel: Inductor's CPU template miscompiles a padded size.
        key, value = torch.nn.functional.pad(key, (0, 0, 0, 1)), torch.nn.functional.pad(value, (0, 0, 0, 1))
        torch._dynamo.mark_static(sinks, 0)  # the head count: a model constant (the CPU template miscompiles it symbolic)
    with no_duck_sizing():  # traced once with L = K (nothing cached), it must not be tied to L = K
        out = _compiled_flex()(query, key, value, m.past, m.kv_row, m.kv_pos, m.member, m.kv_num_blocks, m.kv_indices,
                               m.full_kv_num_blocks, m.full_kv_indices, m.sink_at, sinks, window, chunk, scale, m.prefixed)  # fmt: skip
    return out.transpose(1, 2).contiguous()  # transformers reshapes it to [1, L, H * Dv] next: no copy there


@torch.library.register_fake(PACKED_ATTENTION)
def _(query, key, value, rows, ranges, scale, window=0, chunk=0, sinks=None):
    return query.new_empty((1, query.shape[2], query.shape[1], value.shape[-1]))


# ---- the model side ---------------------------------------------------------------------------------------
RULE = "_zp_rule"  # (window, chunk) of an attention module, set by ``enable``


def layer_rules(config) -> list[tuple[int, int]]:
    """(window, chunk) of every layer, by index: its config's layer type (transformers'
    ``get_layer_types_and_kwargs``, as the cache layers are built), 0 for what it does not have."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, kwargs = get_layer_types_and_kwargs(config.get_text_config())
    rules = []
    for kind, layer_kwargs in zip(types, kwargs):
        size = layer_kwargs.get("sliding_window", 0)
        rules.append((size, 0) if kind == "sliding_attention" else (0, size) if kind == "chunked_attention" else (0, 0))
    return rules


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature. With ``zp_rows`` / ``zp_ranges`` (a packed step) the
    packed kernel; without, transformers' SDPA path (a padded batch, its 4-D mask built as for sdpa)."""
    rows = kwargs.pop("zp_rows", None)
    ranges = kwargs.pop("zp_ranges", None)
    if rows is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError(f"packed attention does not support softcap ({type(module).__name__}); serve this model with padded batches")
    # Read from the module, set once by ``enable``: deriving it here would make dynamo trace transformers'
    # walk over every layer's type in every layer (quadratic in depth: half the trace of a 12-layer model).
    window, chunk = getattr(module, RULE)
    if kwargs.get("sliding_window"):
        window = kwargs["sliding_window"]  # the module's own word wins (GPT-OSS passes it)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.ops.zp_compile.packed_attention(query, key, value, rows, ranges, float(scale), int(window or 0), int(chunk or 0), kwargs.get("s_aux"))
    return out, None


def unsupported(model) -> str | None:
    """Why ``model`` cannot run packed steps, or None. Every layer must be one the mask rule covers:
    full, sliding-window or chunked attention with a plain key/value cache (not linear attention, not
    an indexer cache, not layers that share another layer's cache)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

    types, _ = get_layer_types_and_kwargs(model.config.get_text_config())
    if other := sorted(set(types) - set(LAYER_KINDS)):
        return f"{type(model).__name__} has {other} layers; packed steps cover {', '.join(LAYER_KINDS)}"
    kinds = {type(layer) for layer in DynamicCache(config=model.config).layers}
    if other := sorted(k.__name__ for k in kinds - {DynamicLayer, DynamicSlidingWindowLayer}):
        return f"{type(model).__name__}'s cache has {other} layers; packed steps need plain key/value cache layers"
    return None


def full_cache(config):
    """The packed step's cache: every layer keeps all its keys (``DynamicLayer``), sliding and chunked
    ones too. Their rule is the kernel's mask; a sliding cache layer would drop the keys other rows of
    the step still read, and the keys the prefix cache copies out after the step."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache(config=config)
    cache.layers = [DynamicLayer() for _ in cache.layers]
    return cache


def enable(model) -> None:
    """Register ``zp_packed`` (attention and, for padded calls, sdpa's mask), give each layer's attention
    its mask rule (``layer_rules``) and switch ``model`` to it. Call before the model's first forward:
    the compiled graph reads the implementation when traced."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    rules = layer_rules(model.config)
    for module in model.modules():  # the attention modules (and any other module that knows its layer)
        if isinstance(getattr(module, "layer_idx", None), int) and 0 <= module.layer_idx < len(rules):
            setattr(module, RULE, rules[module.layer_idx])
    model.set_attn_implementation(NAME)


# A packed call passes this as the 2-D mask's stand-in: transformers returns a 4-D mask as is instead of
# building a [1, 1, L, P + L] one that the packed kernel would never read.
def no_mask(device: torch.device) -> torch.Tensor:
    return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
