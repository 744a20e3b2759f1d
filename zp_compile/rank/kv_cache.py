"""A rank's prefix KV cache: reuse the keys and values of a prompt's leading blocks (``BLOCK`` tokens each).

``RankKVCache`` honours the contract in ``zp_compile/prefix.py`` the simplest way: it runs the same
``PrefixCache`` on its own batches (rules 2-5) and keeps keys and values for exactly the hashes that
class holds (rule 3's budget then bounds the KV held). Per held block it keeps, for every layer, the
block's ``BLOCK`` keys and values as the model's cache stores them (after RoPE, at the block's absolute
positions: a block is always at the same positions, since its hash covers everything before it).

A step runs as ONE packed forward (``assemble``; the kernel is ``rank/packed.py``):

    input_ids [1, L]:     row 0's new tokens | row 1's new tokens | ...      (L = their sum; no padding)
    position_ids [1, L]:  r_b, r_b + 1, ..., n_b - 1 for row b, reusing r_b of its n_b tokens
    past keys/values, per layer [1, Hkv, P, D]: every cached block some row reuses, each ONCE
    zp_rows [B, 4], zp_ranges [R, 2]: row b's keys as ranges of [past | new tokens] (P + L keys): its
        prefix blocks, each in the past or in the new tokens of the earlier row that computes it (in-step
        prefix sharing), then its own new tokens
    logits_to_keep [B]:   the index of every row's last token

Twenty rows that share a 1,024-token cached prefix thus bring one copy of it into the step (the kernel
still reads it once per row), and a group's first prompt and its followers can run in the same step. Tensors that would be size 1 are padded to 2 (a
spare row, range and logits index; a spare pad token when L = 1): dynamo specialises sizes 0 and 1, and
each specialisation is another graph to compile while serving.

The model is called with ``cache=`` (transformers 5.24's name; ``past_key_values`` is a deprecated
alias until 5.40) and ``use_cache=True``.

One graph for every step: the model's first packed step runs eagerly and records the cache layers'
key and value shapes; from then on every step's past holds at least one tile (128 keys): the reused
blocks, then spare zero keys that no row reads, up to a multiple of 128 (so the step's new tokens start
on a tile of the kernel's block mask). Without them a step with nothing cached would pass an
uninitialised cache, and dynamo would compile a second graph for it (``cache.layers[0].is_initialized``,
and a past of size 0). With ``dynamic=True`` the packed forward then compiles once, for every L, P, B.

Lockstep (``transport="collective"``): every compiled graph of the forward gathers every sharded
layer's experts in the same ascending order whatever its inputs, and so does the eager first step (every
rank runs the same warm-up, ``rank/warmup.py``). An empty batch still takes ``optimize``'s empty path.
``tests/test_kv_cache.py`` runs 2 gloo ranks where one hits and the other misses (or is empty) in the
same steps and finds every graph with the same number of gathers.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from ..compat import no_duck_sizing
from ..contract import BLOCK, Seq
from ..prefix import PrefixCache, block_hashes, cacheable_blocks, computed_tokens, hash_salt
from .packed import NAME, TILE, eagerly, full_cache, no_mask, unsupported
from .readouts import PromptTable


class CacheViewMismatch(RuntimeError):
    """The front end's view of this rank's prefix cache no longer matches the rank's cache."""


class RankKVCache:
    """Per-block keys and values for the hashes a ``PrefixCache`` of ``budget_tokens`` holds.

    ``budget_tokens`` 0 is the KV-cache-free mode: nothing is kept between steps; a step still runs
    packed, and its rows still read prefixes that earlier rows of the same step compute.
    """

    def __init__(self, budget_tokens: int):
        self.blocks = PrefixCache(budget_tokens)
        self._kv: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}  # hash -> keys [L, H, 16, Dk], values [L, H, 16, Dv]
        self._tables: dict[bytes, PromptTable] = {}  # prompt-logprob blocks -> their positions' readouts (host)
        self._checked: type | None = None  # the model class whose cache layers were checked

    @property
    def enabled(self) -> bool:
        return self.blocks.capacity > 0

    @property
    def budget_tokens(self) -> int:
        return self.blocks.capacity * BLOCK

    @property
    def tokens(self) -> int:
        """Tokens whose keys and values are held now (whole blocks)."""
        return len(self._kv) * BLOCK

    @property
    def kv_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self._kv.values())

    @property
    def table_bytes(self) -> int:
        """Host bytes of the prompt tables kept (``PROMPT_TOP`` ids and logprobs and one token logprob per
        position: 164 bytes per cached token of a prompt-logprob block)."""
        return sum(t.nbytes for t in self._tables.values())

    def __len__(self) -> int:
        return len(self._kv)

    def __contains__(self, h: bytes) -> bool:
        return h in self._kv

    def clear(self) -> None:
        self.blocks.clear()
        self._kv.clear()
        self._tables.clear()

    # ---- one step ------------------------------------------------------------------------------------
    def lookup(self, seqs: list[Seq]) -> tuple[list[list[bytes]], list[int]]:
        """Each sequence's block hashes and reused tokens (rule 4's lookup: the cache before the step, and
        earlier rows of the step), checked against the front end's ``cached`` count where the payload
        carries one."""
        hashes = [block_hashes(s.ids, hash_salt(s.wants)) for s in seqs]
        reuse = [h * BLOCK for h in self.blocks.reuse(hashes, [cacheable_blocks(len(s.ids)) for s in seqs])]
        for i, (s, r) in enumerate(zip(seqs, reuse)):
            if s.cached is not None and s.cached != r:
                raise CacheViewMismatch(
                    f"sequence {i} of this step ({len(s.ids)} tokens): the front end counted {s.cached} cached "
                    f"tokens but this rank reuses {r} of its leading tokens (budget {self.budget_tokens} "
                    f"tokens, {self.tokens} held). The front end's view diverged from the rank: both must follow "
                    "the contract in zp_compile/prefix.py with the same budget and batch order"
                )
        return hashes, reuse

    def forward(self, model, seqs: list[Seq], pad_id: int, device: torch.device) -> torch.Tensor:
        """One step's non-empty batch, packed, with prefix reuse: next-token logits [B, V] (``run``, with
        no prompt readouts to keep)."""
        logits, spans, finish = self.run(model, seqs, pad_id, device)
        finish([None] * len(seqs))
        return logits[[e - 1 for _, e in spans]]

    def run(self, model, seqs: list[Seq], pad_id: int, device: torch.device):
        """One step's non-empty batch, packed, with prefix reuse. Returns the logits ``[K, V]`` at the
        kept positions, each row's span ``(a, e)`` of them (its computed positions' distributions when it
        asks for prompt logprobs, else its last), and ``finish(tables)``: given each row's ``PromptTable``
        of its computed positions (``readouts.readouts``), it returns their full tables (positions 1..n-1:
        reused blocks' from the cache or a batch-mate, then the computed ones) and commits the step.

        The commit inserts and evicts after the forward (rule 5): the reused blocks' KV is read before
        anything is freed, and a forward that raises leaves the cache as it was. Lookup, assembly and
        commit are host code outside the compiled region; the step's inputs (token ids, positions, the
        reused KV) are copied to the device once per step."""
        hashes, reuse = self.lookup(seqs)
        inputs, computed, spans = self.assemble(model, seqs, hashes, reuse, pad_id, device)
        # Sizes equal when the warm-up traces (the kept logits and the rows, when no row asks for prompt
        # logprobs) must not be tied together: the first step where they differ would recompile.
        learn = model not in _PAST_LAYOUT
        # The model's first packed step runs eagerly: its cache gives the layers' key and value shapes,
        # which every later step's spare past keys need (``assemble``), with no graph compiled for a past
        # of 0 keys.
        with no_duck_sizing(), (eagerly() if learn else contextlib.nullcontext()):
            out = model(**inputs, use_cache=True)
        if learn:
            _PAST_LAYOUT[model] = [(layer.keys.shape[1], layer.keys.shape[3], layer.values.shape[3], layer.keys.dtype)
                                   for layer in out.cache.layers]  # fmt: skip

        def finish(tables: list[PromptTable | None]) -> list[PromptTable | None]:
            made = self._made_tables(seqs, hashes, reuse, tables)
            full = []
            for s, chain, r, t in zip(seqs, hashes, reuse, tables):
                if t is None:
                    full.append(None)
                    continue
                blocks = []
                for h in chain[: r // BLOCK]:
                    if (b := made.get(h, self._tables.get(h))) is None:
                        raise RuntimeError("a reused prompt-logprob block has no readouts kept: the prefix cache lost them")
                    blocks.append(b)
                full.append(PromptTable.cat(blocks + [t]))
            self.commit(seqs, hashes, reuse, computed, out.cache, made)
            return full

        return out.logits[0], spans, finish

    @staticmethod
    def _made_tables(seqs: list[Seq], hashes: list[list[bytes]], reuse: list[int], tables: list[PromptTable | None]) -> dict[bytes, PromptTable]:
        """The prompt tables of the blocks this step computes (rows with prompt logprobs): a block's 16
        positions (block 0's from position 1), cut from the first row that computes it."""
        made: dict[bytes, PromptTable] = {}
        for chain, r, t in zip(hashes, reuse, tables):
            if t is None:
                continue
            for i in range(r // BLOCK, len(chain)):
                if chain[i] not in made:
                    made[chain[i]] = t.part(max(1, i * BLOCK), (i + 1) * BLOCK)
        return made

    def assemble(self, model, seqs: list[Seq], hashes: list[list[bytes]], reuse: list[int], pad_id: int,
                 device: torch.device) -> tuple[dict, dict[bytes, int], list[tuple[int, int]]]:  # fmt: skip
        """The model's keyword arguments for the packed step (see the module docstring), where the keys
        of each block the step computes start (hash -> index in the layer's P + L keys), and each row's
        span of the kept logits."""
        self._check_model(model)
        past: dict[bytes, int] = {}  # cached block -> its start in the past [0, P)
        computed: dict[bytes, int] = {}  # block computed this step -> its start among the new tokens [0, L)
        ids: list[int] = []
        positions: list[int] = []
        rows: list[list[int]] = []
        spans: list[tuple[bool, int, int]] = []  # (in the new tokens?, start, end), before P is known
        keep: list[int] = []  # logits kept: every computed position of a prompt-logprob row, else the last
        kept: list[tuple[int, int]] = []  # each row's span of ``keep``
        for s, chain, r in zip(seqs, hashes, reuse):
            q0 = len(ids)
            first = len(spans)
            # Prompt logprobs after a reused prefix: compute its last token again (``lead``), whose logits
            # are the first new position's distribution. The row reads its own copy of that key, not the
            # cached one (the prefix's last range ends one key short), so its keys are still its
            # positions 0..n-1, once each.
            lead = computed_tokens(len(s.ids), r, s.wants) - (len(s.ids) - r)
            for h in chain[: r // BLOCK]:
                new = h in computed
                start = computed[h] if new else past.setdefault(h, BLOCK * len(past))
                if len(spans) > first and spans[-1][0] == new and spans[-1][2] == start:
                    spans[-1] = (new, spans[-1][1], start + BLOCK)  # contiguous with the previous block
                else:
                    spans.append((new, start, start + BLOCK))
            if lead:
                new, start, end = spans[-1]
                spans[-1] = (new, start, end - lead)
            ids += s.ids[r - lead :]
            positions += range(r - lead, len(s.ids))
            spans.append((True, q0, len(ids)))  # its own new tokens, last
            for i in range(r // BLOCK, len(chain)):  # the full blocks it computes, in its new tokens
                computed.setdefault(chain[i], q0 + lead + i * BLOCK - r)
            rows.append([q0, len(ids), first, len(spans)])
            kept.append((len(keep), len(keep) + (len(ids) - q0 if s.wants.prompt is not None else 1)))
            keep += range(q0, len(ids)) if s.wants.prompt is not None else [len(ids) - 1]
        held = BLOCK * len(past)  # keys of the reused blocks, at the start of the past
        layout = _PAST_LAYOUT.get(model)
        P = held if layout is None else max(TILE, -(-held // TILE) * TILE)  # the past, with its spare keys
        if len(ids) == 1:
            ids, positions = ids + [pad_id], positions + [0]  # a spare token no row reads (L > 1, see above)
        if len(rows) == 1:
            rows.append([0, 0, len(spans), len(spans)])  # a spare empty row
        if len(keep) == 1:
            keep.append(keep[0])
        ranges = [[start + (P if new else 0), end + (P if new else 0)] for new, start, end in spans]
        if len(ranges) == 1:
            ranges.append([0, 0])
        cache = full_cache(model.config)  # sliding and chunked layers keep every key too: the kernel masks them
        if P:
            # Past keys/values per layer [1, Hkv, P, D]: the reused blocks, each once, in order of first
            # use, then the spare keys (zeros, read by no row) up to P.
            blocks = [self._kv[h] for h in past]  # insertion order = offset order
            spare = [] if layout is None else _spare_keys(layout, P - held, device)
            for layer in range(len(spare) or blocks[0][0].shape[0]):
                keys = [torch.cat([k[layer] for k, _ in blocks], dim=-2)[None].to(device)] if blocks else []
                values = [torch.cat([v[layer] for _, v in blocks], dim=-2)[None].to(device)] if blocks else []
                if spare:
                    keys, values = keys + [spare[layer][0]], values + [spare[layer][1]]
                cache.update(torch.cat(keys, dim=-2), torch.cat(values, dim=-2), layer)
                for t in (cache.layers[layer].keys, cache.layers[layer].values):
                    _static(t, 1, 3)  # heads and head dim: model constants, not sizes that vary with the step
        # P = 0 (the model's first step only): an empty cache object all the same (lockstep, see above).
        rows_t, ranges_t = torch.tensor(rows, dtype=torch.long), torch.tensor(ranges, dtype=torch.long)
        _static(rows_t, 1)
        _static(ranges_t, 1)
        inputs = {
            "input_ids": torch.tensor([ids], dtype=torch.long, device=device),
            "position_ids": torch.tensor([positions], dtype=torch.long, device=device),
            "attention_mask": no_mask(device),
            "cache": cache,
            "logits_to_keep": torch.tensor(keep, dtype=torch.long, device=device),
            "zp_rows": rows_t,  # host tensors: the kernel loops over them
            "zp_ranges": ranges_t,
        }
        return inputs, {h: P + start for h, start in computed.items()}, kept

    def commit(self, seqs: list[Seq], hashes: list[list[bytes]], reuse: list[int], computed: dict[bytes, int], cache,
               tables: dict[bytes, PromptTable] | None = None) -> None:  # fmt: skip
        """After the forward: copy out the KV of the blocks the step computed (``computed``: where their
        keys start in the forward's cache ``[1, Hkv, P + L, D]``), then ``PrefixCache.step`` (rule 4), and
        keep the KV of exactly the blocks it holds, with the prompt tables of those that have one
        (``tables``: prompt-logprob blocks). Copying first: a copy that fails (memory) leaves the block
        set and the KV as they were."""
        new = {}
        fresh = [(h, at) for h, at in computed.items() if h not in self._kv] if self.enabled else []
        if fresh:
            # One gather per layer for all the step's new blocks, then one copy per block (its own storage:
            # a block evicted later frees its memory, not a view's share of the step's).
            index = torch.tensor([at + i for _, at in fresh for i in range(BLOCK)], device=cache.layers[0].keys.device)
            keys = torch.stack([layer.keys[0].index_select(1, index) for layer in cache.layers])  # [L, Hkv, n * 16, Dk]
            values = torch.stack([layer.values[0].index_select(1, index) for layer in cache.layers])
            for i, (h, _) in enumerate(fresh):
                block = slice(i * BLOCK, (i + 1) * BLOCK)
                new[h] = (keys[:, :, block].clone(), values[:, :, block].clone())  # [L, Hkv, 16, D]
        limits = [cacheable_blocks(len(s.ids)) for s in seqs]
        hits, evicted = self.blocks.step(hashes, limits)
        if [h * BLOCK for h in hits] != reuse:
            raise RuntimeError(f"prefix cache changed during the step: reuse {reuse} at lookup, {[h * BLOCK for h in hits]} at commit")
        for h in evicted:
            if h not in self.blocks:  # an evicted block re-inserted later in the same step keeps its KV
                self._kv.pop(h, None)
                self._tables.pop(h, None)
        self._kv.update((h, kv) for h, kv in new.items() if h in self.blocks)
        self._tables.update((h, t) for h, t in (tables or {}).items() if h in self.blocks and h not in self._tables)

    def _check_model(self, model) -> None:
        """A packed step needs the packed attention (``packed.enable``; any other implementation would
        attend across rows) and a model that supports it (``packed.unsupported``)."""
        if model.config._attn_implementation != NAME:
            raise ValueError(
                f"{type(model).__name__} runs attention {model.config._attn_implementation!r}, but a packed step needs "
                f"{NAME!r}: call zp_compile.rank.packed.enable(model) before its first forward"
            )
        if self._checked is not type(model):
            if reason := unsupported(model):
                raise ValueError(reason)
            self._checked = type(model)


# model -> per cache layer (kv heads, key dim, value dim, dtype), from its first packed step (``run``).
_PAST_LAYOUT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _spare_keys(layout: list[tuple[int, int, int, torch.dtype]], n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per cache layer, ``n`` spare keys and values (zeros [1, Hkv, n, D]; one pair per distinct shape)."""
    made: dict = {}
    for heads, dk, dv, dtype in layout:
        if (heads, dk, dv, dtype) not in made:
            made[heads, dk, dv, dtype] = (torch.zeros((1, heads, n, dk), dtype=dtype, device=device),
                                          torch.zeros((1, heads, n, dv), dtype=dtype, device=device))  # fmt: skip
    return [made[shape] for shape in layout]


def _static(t: torch.Tensor, *dims: int) -> None:
    """Compile ``t``'s ``dims`` as constants. The model compiles with ``dynamic=True``, and dynamo gives
    sizes equal at trace time one symbol (duck sizing): a past of 64 tokens traced beside a head dim of
    64 would pin the past to 64 tokens, and every other past would recompile while serving."""
    for d in dims:
        torch._dynamo.mark_static(t, d)
