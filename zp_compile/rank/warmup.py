"""Make a loaded rank ready to serve: packed steps or padded batches, and the compiles a first request
would otherwise pay for (``prepare``).

Every rank runs the same warm-up batches, so every rank issues the same gathers in the same order.
"""

from __future__ import annotations

import torch

from ..contract import BLOCK, Seq, Wants
from . import packed
from .kv_cache import RankKVCache
from .step import run_step

_TOP1 = Wants(top=1)
_MAX_SWEEP = 1024  # tokens-per-expert counts warmed at most: ~2 s of JIT on the 2-core machine


def _seqs(rows: list[list[int]]) -> list[Seq]:
    return [Seq(r, _TOP1) for r in rows]


def _row(seed: int, n: int, vocab: int) -> list[int]:
    return torch.arange(seed, seed + n).remainder(vocab).tolist()


def prepare(model, device: torch.device, vocab: int, cache_tokens: int, max_tokens: int) -> RankKVCache | None:
    """Packed steps (``packed.enable``) and their warm-up, and the rank's prefix KV cache of
    ``cache_tokens`` (the front end keeps its view with the same budget, zp_compile/prefix.py), returned
    for ``run_step``. A model that cannot run packed (``packed.unsupported``: linear-attention or
    indexer cache layers) gets left-padded batches and None, and cannot keep a cache."""
    if (reason := packed.unsupported(model)) is None:
        packed.enable(model)  # every step runs packed: no padding, prefixes shared within a step
        warm_up_packed(model, device, vocab, max_tokens)
        kv = RankKVCache(cache_tokens)
    elif cache_tokens:
        raise ValueError(f"{reason}: prefix KV reuse cannot serve it; use --cache-tokens 0")
    else:
        warm_up_padded(model, device, vocab, max_tokens)
        kv = None
    if device.type == "cpu":
        warm_up_expert_matmuls(model, max_tokens)
    return kv


def warm_up_expert_matmuls(model, max_tokens: int) -> None:
    """On a CPU, run each kind of experts module once for every tokens-per-expert count that a step of
    up to ``max_tokens`` tokens is likely to give it (1 to twice the mean at ``max_tokens``, at most
    ``_MAX_SWEEP``). Only where a gather is a local copy (shared memory, or a world of one).

    The CPU ``grouped_mm`` is one oneDNN matmul per expert, of M = the tokens routed to it, and oneDNN
    JIT-compiles a kernel for each new M (``rank.worker.ONEDNN_CACHE_CAPACITY`` keeps them). Without
    this, the first ~15 full steps of the 82M benchmark model ran 1.5-2.5x slower than the steady state
    while the cache filled. The compiled graph calls the same op on the same layouts, so the kernels
    made here are the ones it uses; modules of one kind and size share them, so one of each is run.
    Experts that do not run ``grouped_mm`` are left alone."""
    text = model.config.get_text_config()
    if getattr(model.config, "_experts_implementation", None) != "grouped_mm":
        return
    state = model.zero_prefill
    if state.world_size > 1 and state.config.transport != "shm":
        return  # each eager call would all-gather the bank over the group: seconds per call on CPU collectives
    k, hidden = getattr(text, "num_experts_per_tok", None) or 1, text.hidden_size
    weight = model.get_output_embeddings().weight  # the model's dtype and device
    seen = set()
    for layer in state.layers:
        E = layer.num_experts
        if (type(layer.module), E) in seen:
            continue
        seen.add((type(layer.module), E))
        for ids in sweep_routing(E, k, max(1, min(_MAX_SWEEP, 2 * max_tokens * k // E))):
            T = len(ids) // k
            x = torch.randn(T, hidden, dtype=weight.dtype, device=weight.device)  # [T, H]
            with torch.inference_mode():
                layer.module(x, ids.view(T, k).to(weight.device), torch.full((T, k), 1.0 / k, dtype=weight.dtype, device=weight.device))


def sweep_routing(experts: int, k: int, top: int) -> list[torch.Tensor]:
    """Expert ids of ``(token, slot)`` pairs, in whole tokens of ``k`` slots, for calls that together give
    every expert count 1 .. ``top`` at least once: each call gives experts 1 .. E-1 the next E-1 counts
    (capped at ``top``) and expert 0 the few pairs (< k) that make the tokens whole."""
    spread = max(1, experts - 1)
    out = []
    for start in range(1, top + 1, spread):
        counts = torch.arange(start - 1, start - 1 + experts).clamp_(max=top)  # [E]: expert e gets counts[e] pairs
        counts[0] = 0 if experts > 1 else counts[0] + 1
        counts[0] += (-int(counts.sum())) % k  # whole tokens
        out.append(torch.repeat_interleave(torch.arange(experts), counts))
    return out


def largest_step(model, max_tokens: int, vocab: int, spare: int = 0) -> list[list[int]]:
    """The rows of a warm-up step of ``max_tokens`` tokens in all (none under 2 rows, so B > 1 as in the
    serving graph): rows of up to 256 tokens that leave ``spare`` of the model's positions free, the
    last one shorter if 256 does not divide ``max_tokens``."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 256
    width = min(256, (positions - spare) // BLOCK * BLOCK)
    if width <= 0 or max_tokens < 2 * width:
        return []
    lengths = [width] * (max_tokens // width) + ([max_tokens % width] if max_tokens % width else [])
    # Rows that differ from their first block on: a packed step would share identical prefixes.
    return [_row(5 + i, n, vocab) for i, n in enumerate(lengths)]


def warm_up_padded(model, device: torch.device, vocab: int, max_tokens: int = 0) -> None:
    """Compile before serving: batch 1 and batch > 1 are separate graphs (dynamo specialises size 1).

    ``max_tokens``: also run a step of that many tokens (the front end's largest), so that a size guard
    Inductor might put on the token count is met before serving, not inside a request's latency (as its
    guard on the MoE routing's sort once did: ``passes/opaque_sorts.py``)."""
    ids = _row(3, 2 * BLOCK, vocab)
    for rows in ([ids, ids[:-5]], [ids]):
        run_step(model, _seqs(rows), device)
    if rows := largest_step(model, max_tokens, vocab):
        run_step(model, _seqs(rows), device)


def warm_up_packed(model, device: torch.device, vocab: int, max_tokens: int = 0) -> None:
    """Compile the packed path before serving: ONE graph of the model for every step, and the packed
    attention kernel (``packed._compiled_flex``) for rows with and without prefixes, for every layer kind
    of the model. Uses scratch caches, so the serving cache starts empty as the front end's view does.

    The model's first packed step runs eagerly (``RankKVCache.run``: it learns the cache layers' shapes);
    every later one has a past of at least one tile, spare keys included, so no graph is compiled for a
    past of 0 keys (dynamo specialises size 0). Sizes that could be 1 are padded to 2 (``assemble``). The
    model's own sizes in the inputs (the past's heads and head dim, the columns of rows and ranges) are
    compiled as constants (``kv_cache._static``), and duck sizing is off in the forward, so a step's L new
    tokens, P past keys, B rows and R key ranges are free symbols, whatever their values here.

    ``max_tokens``: also run a step of that many new tokens (the front end's largest), so that a size
    guard Inductor might put on the step's length is met before serving, not inside a request's latency
    (its guard on the MoE routing's sort is gone: ``passes/opaque_sorts.py``)."""
    scratch = RankKVCache(16 * BLOCK)
    a, b, c, d, e, f = (_row(3 + 11 * i, 50, vocab) for i in range(6))
    run_step(model, _seqs([a[:48], b[:48]]), device, scratch)  # eager: the cache layers' shapes
    # B 5, R 6 (a[:43] reuses a's first 2 blocks in the step), L 192; caches a's and b's first 2 blocks.
    run_step(model, _seqs([a[:48], a[:43], b[:48], c[:40], d[:45]]), device, scratch)
    # Reused past blocks (a's and b's), B 5, R 8, L 104.
    run_step(model, _seqs([a[:40], b[:45], e, e[:35], f[:30]]), device, scratch)
    # No row reads a prefix (the kernel's cheaper mask): R = B.
    run_step(model, _seqs([a[:46], b[:40], c[:40]]), device, RankKVCache(0))
    if rows := largest_step(model, max_tokens, vocab, spare=64):
        # L = max_tokens + 1; one extra row reads another's first block(s), so R != B, as in serving
        # steps with shared prefixes.
        run_step(model, _seqs(rows + [rows[0][:BLOCK] + [7]]), device, RankKVCache(16 * BLOCK))
