"""A rank's prefix KV cache: reuse the keys and values of a prompt's leading 16-token blocks.

``RankKVCache`` honours the contract in ``server/prefix.py`` the simplest way: it runs the same
``PrefixCache`` on its own batches (rules 2-5) and keeps keys and values for exactly the hashes that
class holds (rule 3's budget then bounds the KV held). Per held block it keeps, for every layer, the
block's 16 keys and values as the model's cache stores them (after RoPE, at the block's absolute
positions: a block is always at the same positions, since its hash covers everything before it).

A step with sequences of different cached lengths runs as ONE forward (``assemble``):

    row b, reusing r_b tokens (whole blocks) of its n_b:   |<------ P ------>|<------- S -------->|
    past keys/values (from the cache), per layer [B, H, P, D]:   pad ... r_b cached
    input_ids (the suffixes, batch_inputs' left padding) [B, S]:            pad ... n_b - r_b new
    attention_mask [B, P + S]:  1 on the r_b cached and the n_b - r_b new tokens, 0 on padding
    position_ids [B, S]:        r_b + index among the row's real new tokens

with P the longest reuse in the batch and S a multiple of 16. transformers builds the causal mask on
the index space [0, P + S) with the queries at P.. (``DynamicCache.get_seq_length`` = P), so left
padding in both regions keeps every real token after its real predecessors.

The model is called with ``cache=`` (transformers 5.24's name; ``past_key_values`` is a deprecated
alias until 5.40), ``use_cache=True`` and ``logits_to_keep=1``.

Lockstep (``transport="collective"``): every compiled graph of the forward gathers every sharded
layer's experts in the same ascending order whatever its inputs; with the cache enabled every non-empty
batch passes a cache object (P = 0 included: an uninitialised ``DynamicCache``), so which graph a rank
runs changes shapes, not the gathers. An empty batch still takes ``optimize``'s empty path. Checked
(torch 2.13, transformers 5.24, Qwen3-MoE, aot_eager and Inductor): the cached forward is one graph
with no graph break; with ``dynamic=True`` it compiles 4 graphs, (B = 1 or > 1) x (P = 0 or > 0),
since dynamo specialises sizes 0 and 1 (guards ``input_ids.size(0)`` and
``cache.layers[0].is_initialized``), and then none for other B, P, S; ``tests/test_kv_cache.py`` runs
2 gloo ranks where one hits and the other misses (or is empty) in the same steps and finds every
graph with the same number of gathers.
"""

from __future__ import annotations

import torch

from .prefix import BLOCK, PrefixCache, block_hashes, cacheable_blocks
from .worker import batch_inputs, largest_step, score


class CacheViewMismatch(RuntimeError):
    """The front end's view of this rank's prefix cache no longer matches the rank's cache."""


class RankKVCache:
    """Per-block keys and values for the hashes a ``PrefixCache`` of ``budget_tokens`` holds.

    ``budget_tokens`` 0 is the KV-cache-free mode: nothing is looked up or kept, and the worker runs its
    plain forward (``use_cache=False``).
    """

    def __init__(self, budget_tokens: int):
        self.blocks = PrefixCache(budget_tokens)
        self._kv: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}  # hash -> keys [L, H, 16, Dk], values [L, H, 16, Dv]
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

    def __len__(self) -> int:
        return len(self._kv)

    def __contains__(self, h: bytes) -> bool:
        return h in self._kv

    def clear(self) -> None:
        self.blocks.clear()
        self._kv.clear()

    # ---- one step ------------------------------------------------------------------------------------
    def lookup(self, seqs: list[dict]) -> tuple[list[list[bytes]], list[int]]:
        """Each sequence's block hashes and reused tokens (rule 2, on the cache as it is before the step),
        checked against the front end's ``cached`` count where the payload carries one."""
        if not self.enabled:
            hashes, reuse = [[] for _ in seqs], [0] * len(seqs)
        else:
            hashes = [block_hashes(s["ids"]) for s in seqs]
            reuse = [self.blocks.match(h, cacheable_blocks(len(s["ids"]))) * BLOCK for h, s in zip(hashes, seqs)]
        for i, (s, r) in enumerate(zip(seqs, reuse)):
            if s.get("cached") is not None and s["cached"] != r:
                raise CacheViewMismatch(
                    f"sequence {i} of this step ({len(s['ids'])} tokens): the front end counted {s['cached']} cached "
                    f"tokens but this rank's prefix cache holds {r} of its leading tokens (budget {self.budget_tokens} "
                    f"tokens, {self.tokens} held). The front end's view diverged from the rank: both must follow "
                    "the contract in zp_compile/server/prefix.py with the same budget and batch order"
                )
        return hashes, reuse

    def forward(self, model, seqs: list[dict], pad_id: int, device: torch.device) -> torch.Tensor:
        """One step's non-empty batch with prefix reuse: next-token logits [B, V]. Inserts and evicts after
        the forward (rule 5): the reused blocks' KV is read before anything is freed, and a forward that
        raises leaves the cache as it was. Lookup, assembly and commit are host code outside the compiled
        region, with no host-device sync (on a GPU the copies are only enqueued)."""
        hashes, reuse = self.lookup(seqs)
        inputs = self.assemble(model, seqs, hashes, reuse, pad_id, device)
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        self.commit(seqs, hashes, reuse, out.cache)
        return out.logits[:, -1]  # [B, V]

    def assemble(self, model, seqs: list[dict], hashes: list[list[bytes]], reuse: list[int], pad_id: int,
                 device: torch.device) -> dict:  # fmt: skip
        """The model's keyword arguments for a batch whose rows reuse ``reuse`` tokens (see the module
        docstring): suffixes as ``input_ids``, the cached prefixes in a ``DynamicCache``."""
        from transformers.cache_utils import DynamicCache

        self._check_model(model)
        new = batch_inputs([s["ids"][r:] for s, r in zip(seqs, reuse)], pad_id)  # [B, S] each
        P = max(reuse)
        reuse_B1 = torch.tensor(reuse, dtype=torch.long)[:, None]
        past_mask = (torch.arange(P) >= P - reuse_B1).long()  # [B, P]: each row's cached tokens, left-padded
        mask = torch.cat([past_mask, new["attention_mask"]], dim=-1)  # [B, P + S]
        positions = new["position_ids"] + reuse_B1  # [B, S]: the suffix continues its prefix
        cache = DynamicCache(config=model.config)
        if P:
            # Past keys/values per layer, left-padded to P with zeros (masked out): [B, H, P, D]. Built one
            # layer at a time so that only one layer's staging copy exists beside the cache.
            k0, v0 = next(iter(self._kv.values()))  # [L, H, 16, Dk], [L, H, 16, Dv]
            held = [[self._kv[h] for h in chain[: r // BLOCK]] for chain, r in zip(hashes, reuse)]
            for layer in range(k0.shape[0]):
                past_k = k0.new_zeros((len(seqs), k0.shape[1], P, k0.shape[3]))
                past_v = v0.new_zeros((len(seqs), v0.shape[1], P, v0.shape[3]))
                for b, (blocks, r) in enumerate(zip(held, reuse)):
                    if r:
                        past_k[b, :, P - r :] = torch.cat([k[layer] for k, _ in blocks], dim=-2)  # [H, r, Dk]
                        past_v[b, :, P - r :] = torch.cat([v[layer] for _, v in blocks], dim=-2)
                cache.update(past_k, past_v, layer)
        # P = 0: an empty cache object all the same (see the module docstring on lockstep).
        return {
            "input_ids": new["input_ids"].to(device),
            "attention_mask": mask.to(device),
            "position_ids": positions.to(device),
            "cache": cache,
        }

    def commit(self, seqs: list[dict], hashes: list[list[bytes]], reuse: list[int], cache) -> None:
        """After the forward: ``PrefixCache.step`` (rule 4), free evicted blocks' KV, keep the KV of blocks
        it inserted, copied out of the forward's cache ``[B, H, P + S, D]`` per layer."""
        limits = [cacheable_blocks(len(s["ids"])) for s in seqs]
        hits, evicted = self.blocks.step(hashes, limits)
        if [h * BLOCK for h in hits] != reuse:
            raise RuntimeError(f"prefix cache changed during the step: reuse {reuse} at lookup, {[h * BLOCK for h in hits]} at commit")
        for h in evicted:
            if h not in self.blocks:  # an evicted block re-inserted later in the same step keeps its KV
                self._kv.pop(h, None)
        layers = cache.layers
        width = layers[0].keys.shape[-2]  # P + S
        for b, (chain, r, s) in enumerate(zip(hashes, reuse, seqs)):
            for i, h in enumerate(chain):
                if h in self._kv or h not in self.blocks:
                    continue
                # Not held before the step, so no row reused it: it is in this row's new tokens, which end
                # the row. Row b's block i starts at width - n_b + 16 i.
                assert i * BLOCK >= r, "a block reused in this step was not held"
                start = width - len(s["ids"]) + i * BLOCK
                keys = torch.stack([layer.keys[b, :, start : start + BLOCK] for layer in layers])  # [L, H, 16, Dk], a copy
                values = torch.stack([layer.values[b, :, start : start + BLOCK] for layer in layers])
                self._kv[h] = (keys, values)

    def _check_model(self, model) -> None:
        """Prefix reuse here needs full-attention cache layers (a sliding-window layer drops old keys)."""
        if self._checked is type(model):
            return
        from transformers.cache_utils import DynamicCache, DynamicLayer

        kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
        if kinds != {DynamicLayer.__name__}:
            raise ValueError(
                f"prefix KV reuse needs full-attention cache layers, but {type(model).__name__}'s cache has "
                f"{sorted(kinds)}; serve it with cache_tokens=0 (KV-cache-free)"
            )
        self._checked = type(model)


def warm_up(model, device: torch.device, vocab: int, max_tokens: int = 0) -> None:
    """Compile the cached path's graphs before serving: batch 1 and > 1, with P = 0 and P > 0 (dynamo
    specialises sizes 0 and 1), and with ``max_tokens`` new tokens (``worker.warm_up``). Uses a scratch
    cache, so the serving cache starts empty as the front end's view does. Every rank runs the same
    batches: the same gathers in the same order."""
    ids = torch.arange(3, 3 + 3 * BLOCK).remainder(vocab).tolist()
    other = torch.arange(7, 7 + 3 * BLOCK).remainder(vocab).tolist()
    scratch = RankKVCache(8 * BLOCK)
    # (B, P, S): (2, 0, 48), (1, 0, 48), (1, 32, 16), (2, 32, 16). P != S: dynamo gives equal sizes one
    # symbol (duck sizing), and a graph traced with P == S would be recompiled for the first P != S.
    for rows in ([ids, ids[:-5]], [other], [ids[:40]], [ids, other]):
        score(model, [{"ids": r, "top": 1} for r in rows], 0, device, scratch)
    if rows := largest_step(model, max_tokens, vocab, spare=32):  # P = 0, then P = 32: the first step cached r[:32]
        score(model, [{"ids": r, "top": 1} for r in rows], 0, device, scratch)
        score(model, [{"ids": r[:32] + r, "top": 1} for r in rows], 0, device, scratch)
