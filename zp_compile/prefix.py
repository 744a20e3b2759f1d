"""Block hashes of prompts and one rank's prefix cache as a set of blocks with an LRU budget: the
prefix-cache half of the front end <-> rank contract (``zp_compile.contract``), run by both sides.

The front end keeps one ``PrefixCache`` per rank as its view of what that rank's KV cache holds, and
updates it when it schedules a step, so routing never asks a rank. The view is exact only if the rank's
cache follows the same rules. The contract for the rank-side KV cache:

1. Blocks: a prompt's token ids are cut into ``contract.BLOCK`` (16) token blocks from position 0; only full
   blocks are kept. Block i is named by ``block_hashes(ids, hash_salt(wants))[i]``, a chained hash that
   covers blocks 0..i (blake2b, 16 bytes; identical in every process: never Python's salted ``hash``).
   A sequence that asks for prompt logprobs (``Wants.prompt``) hashes its blocks in a namespace of its
   own: such a block also keeps its positions' readouts (which a block cached for the next-token
   readout alone lacks), so the two kinds never stand in for each other.
2. Reuse: a prompt reuses the longest run of its leading blocks that the cache holds, and at most
   ``cacheable_blocks(len(ids)) = (len - 1) // 16`` of them: the last token is always computed, since
   its logits are the answer. ``PrefixCache.match`` is that length in blocks. A row computes
   ``computed_tokens`` tokens: those after its reused prefix, and for prompt logprobs after a reused
   prefix one more, the prefix's last token again (its logits give the first new position's logprob).
3. Budget: ``budget_tokens // BLOCK`` blocks per rank (``cache_tokens_for_bytes`` converts a byte
   budget with the model's KV bytes per token). Both sides use the same number.
4. Step time, per rank, with the rank's batch in the order the scheduler returned it
   (``PrefixCache.step``): first each sequence's reuse is looked up (``PrefixCache.reuse``): the longest
   run of its leading blocks (rule 2's limit) each of which the cache held before the step or an
   earlier sequence of the same batch contains (the step runs as one packed forward, so a row reads the
   keys and values a batch-mate computes: in-step prefix sharing); then, sequence by sequence in batch
   order, its full blocks are walked in order: a block
   the cache holds becomes the most recently used; a missing one is inserted, after evicting least
   recently used *leaves* (blocks none of whose children are held) until the budget has room; the
   block's own parent is never evicted for it, and if no other leaf is left the rest of that prompt's
   blocks are not inserted. Recency is one counter for the whole cache, advanced at every block
   touched or inserted. A budget of 0 holds nothing, but sequences of one step still share.
5. The rank reads the reused KV during the step's forward and applies the inserts and evictions
   after it (``PrefixCache.step`` returns the evicted hashes in eviction order): for one step the rank
   holds up to the budget plus that step's new KV.
6. A restarted rank starts empty; the front end then starts a new view (``server.routing.ThresholdScheduler.drain``).

The simplest way for a rank to honour 2-5 is to run this same class on its own batches and keep KV
for exactly the hashes it holds; a rank can also compare its reuse with the ``cached_tokens`` the
front end computed for each sequence and fail loudly on a mismatch.
"""

from __future__ import annotations

import hashlib
import heapq
import struct
from collections.abc import Container

from .contract import BLOCK, Wants


PROMPT_SALT = b"prompt-logprobs"  # the namespace of blocks that keep their positions' readouts (rule 1)


def hash_salt(wants: Wants) -> bytes:
    """The namespace a sequence's blocks are hashed in (rule 1): its own for prompt logprobs."""
    return PROMPT_SALT if wants.prompt is not None else b""


def block_hashes(ids: list[int], salt: bytes = b"", block: int = BLOCK) -> list[bytes]:
    """Chained 16-byte hashes of the full blocks of ``ids``: hash i covers blocks 0..i (and ``salt``), so
    the same block after different prefixes has different hashes. A partial last block has none."""
    out, prev = [], salt
    for start in range(0, len(ids) - block + 1, block):
        prev = hashlib.blake2b(prev + struct.pack(f"<{block}I", *ids[start : start + block]), digest_size=16).digest()
        out.append(prev)
    return out


def cacheable_blocks(n_tokens: int, block: int = BLOCK) -> int:
    """Blocks a prompt of ``n_tokens`` may reuse: never the last token's (its logits must be computed)."""
    return max(0, n_tokens - 1) // block


def computed_tokens(n_tokens: int, reused: int, wants: Wants) -> int:
    """Tokens a row of ``n_tokens`` computes after reusing ``reused`` (rule 2): for prompt logprobs after a
    reused prefix, the prefix's last token too (its logits are the first new position's distribution)."""
    return n_tokens - reused + (1 if reused and wants.prompt is not None else 0)


def kv_bytes_per_token(spec, dtype_bytes: int = 2) -> int:
    """KV-cache bytes of one token through every layer of a ``costmodel.spec.ModelSpec`` (MLA: its latent)."""
    return spec.layers * spec.kv_elems * dtype_bytes


def cache_tokens_for_bytes(spec, budget_bytes: float, dtype_bytes: int = 2) -> int:
    """The token budget (whole blocks) that ``budget_bytes`` of KV cache holds for ``spec``."""
    per_block = kv_bytes_per_token(spec, dtype_bytes) * BLOCK
    return int(budget_bytes // per_block) * BLOCK


class PrefixCache:
    """The blocks one rank holds, with leaf-first LRU eviction under a budget of ``budget_tokens``.

    Every held block's parent is held (blocks are inserted parent first and only leaves are evicted),
    so a held hash implies its whole prefix is held.
    """

    def __init__(self, budget_tokens: int, block: int = BLOCK):
        if budget_tokens < 0:
            raise ValueError(f"prefix cache budget must be >= 0 tokens, got {budget_tokens}")
        self.block = block
        self.capacity = budget_tokens // block  # blocks
        self._parent: dict[bytes, bytes | None] = {}
        self._children: dict[bytes, int] = {}  # held children per held block
        self._tick: dict[bytes, int] = {}  # last use, on the cache's one counter
        self._leaves: list[tuple[int, bytes]] = []  # heap of (tick, hash); stale entries skipped on pop
        self._clock = 0

    def __len__(self) -> int:
        return len(self._tick)

    def __contains__(self, h: bytes) -> bool:
        return h in self._tick

    @property
    def tokens(self) -> int:
        return len(self._tick) * self.block

    def match(self, hashes: list[bytes], limit: int | None = None, also: Container[bytes] = ()) -> int:
        """Leading blocks of ``hashes`` (at most ``limit``) each held now or in ``also`` (blocks that will be
        there: a batch's earlier rows, queued sequences), in blocks. Changes nothing."""
        n = 0
        for h in hashes[: len(hashes) if limit is None else limit]:
            if h not in self._tick and h not in also:
                break
            n += 1
        return n

    def reuse(self, batch: list[list[bytes]], limits: list[int]) -> list[int]:
        """Rule 4's lookup for one rank's batch, in blocks per sequence: leading blocks (at most
        ``limits[i]``) each held now or contained in an earlier sequence of ``batch``. Changes nothing."""
        hits: list[int] = []
        present: set[bytes] = set()
        for hashes, limit in zip(batch, limits):
            hits.append(self.match(hashes, limit, present))
            present.update(hashes)
        return hits

    def step(self, batch: list[list[bytes]], limits: list[int]) -> tuple[list[int], list[bytes]]:
        """Rule 4 of the module docstring for one rank's batch: each sequence's reused blocks
        (``reuse``), then every sequence's blocks inserted in batch order. Returns (reused blocks per
        sequence, evicted hashes in eviction order)."""
        hits = self.reuse(batch, limits)
        evicted: list[bytes] = []
        for hashes in batch:
            evicted += self.insert(hashes)
        return hits, evicted

    def insert(self, hashes: list[bytes]) -> list[bytes]:
        """Walk one prompt's chain: touch held blocks, insert missing ones (evicting LRU leaves). Returns
        the evicted hashes."""
        evicted: list[bytes] = []
        parent = None
        for h in hashes:
            if h not in self._tick:
                while len(self._tick) >= self.capacity:
                    victim = self._pop_lru_leaf(keep=parent)
                    if victim is None:
                        return evicted  # nothing evictable but this chain: keep its head, drop the rest
                    self._evict(victim)
                    evicted.append(victim)
                self._parent[h] = parent
                self._children[h] = 0
                if parent is not None:
                    self._children[parent] += 1
            self._touch(h)
            parent = h
        return evicted

    def clear(self) -> None:
        self.__init__(self.capacity * self.block, self.block)

    def _touch(self, h: bytes) -> None:
        self._clock += 1
        self._tick[h] = self._clock
        if self._children[h] == 0:
            heapq.heappush(self._leaves, (self._clock, h))
        if len(self._leaves) > 4 * len(self._tick) + 64:  # stale entries pile up under repeated touches
            self._leaves = [(t, h) for h, t in self._tick.items() if self._children[h] == 0]
            heapq.heapify(self._leaves)

    def _pop_lru_leaf(self, keep: bytes | None) -> bytes | None:
        kept = None
        while self._leaves:
            tick, h = heapq.heappop(self._leaves)
            if self._tick.get(h) != tick or self._children[h]:
                continue  # stale: touched again since, evicted, or no longer a leaf
            if h == keep:
                kept = (tick, h)
                continue
            if kept:
                heapq.heappush(self._leaves, kept)
            return h
        if kept:
            heapq.heappush(self._leaves, kept)
        return None

    def _evict(self, h: bytes) -> None:
        parent = self._parent.pop(h)
        del self._tick[h], self._children[h]
        if parent is not None:
            self._children[parent] -= 1
            if self._children[parent] == 0:  # a leaf again, at its own last use: not the newest
                heapq.heappush(self._leaves, (self._tick[parent], parent))
