"""The front end's threshold scheduler: per-rank queues filled by a routing policy (``policies.py``),
and admission of each step by the saturation threshold T (the paper's front end).

- Routing, when a sequence arrives: the policy picks its rank from each rank's ``RankView`` (the prompt
  tokens the rank will reuse, its load in FLOPs).
- Admission, each step (``ThresholdScheduler.next_step``): every rank takes its queued sequences in
  order until its step's FLOPs reach T, within its token and sequence budgets; a rank still under T
  then takes the oldest sequences other ranks cannot run this step; while even the busiest rank is
  under T and no rank's budget is full, the step is held back, for at most ``max_wait_ms`` after the
  oldest waiting sequence arrived. A rank runs its step packed (``zp_compile/rank/packed.py``): no
  padding, and a sequence reuses the blocks its rank cached before the step and those an earlier
  sequence of its batch contains, so a step costs the rank exactly its sequences' FLOPs.
- The front end's view of every rank's prefix cache (``prefix.PrefixCache``) is updated when a step is
  scheduled; the contract the rank-side cache must follow for the view to be exact is in
  ``zp_compile/prefix.py``.
- ``replay.py`` runs the same scheduler on a trace under a cost model (no model, no server).

Every decision depends only on the arrival order, the injected clock and the step results the
scheduler itself produced, so a replay is deterministic.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice

from ..contract import BLOCK
from ..costmodel.flops import flops_per_request
from ..costmodel.spec import ModelSpec
from ..prefix import PrefixCache, block_hashes, cacheable_blocks, computed_tokens, hash_salt
from .policies import POLICIES, RankView, make_policy
from .scheduler import STEPS_IN_FLIGHT, Sequence

FILLS = ("threshold", "queue")  # --fill


@dataclass(frozen=True)
class RouterSettings:
    """threshold_flops: T, FLOPs per rank per step (``zp_compile.measure_threshold(...).flops_per_step``).
    max_tokens / max_seqs: per rank per step; the tokens counted are the ones the rank computes (each
        sequence's tokens after its reused prefix; a packed step has no padding).
    max_wait_ms: longest a step is held back waiting for more work while every rank is under T.
    cache_tokens: each rank's prefix-cache budget in tokens (``prefix.cache_tokens_for_bytes`` from
        bytes); 0: nothing kept between steps (KV-cache-free ranks; a step's sequences still share).
    policy / balance_bound: the routing policy; zero_prefill's bound in units of T.
    fill: what a rank's step is filled to. "threshold": T (the shortest steps that hide the gathers: the
        lowest latency). "queue": the larger of T and the rank's share of all the work waiting, split over
        the ``STEPS_IN_FLIGHT`` steps the engine keeps in flight: under a deep queue, fewer and larger
        steps (the highest throughput); under light load the same steps as "threshold"."""

    threshold_flops: float
    max_tokens: int = 8192
    max_seqs: int = 256
    max_wait_ms: float = 50.0
    cache_tokens: int = 0
    policy: str = "zero_prefill"
    balance_bound: float = 1.0
    fill: str = "threshold"

    def __post_init__(self) -> None:
        if not self.threshold_flops > 0:
            raise ValueError(f"threshold_flops must be > 0, got {self.threshold_flops}")
        if self.max_tokens < BLOCK or self.max_seqs < 1:
            raise ValueError(f"need max_tokens >= {BLOCK} and max_seqs >= 1; got {self.max_tokens} and {self.max_seqs}")
        if self.max_wait_ms < 0 or self.cache_tokens < 0 or self.balance_bound < 0:
            raise ValueError(f"max_wait_ms ({self.max_wait_ms}), cache_tokens ({self.cache_tokens}) and "
                             f"balance_bound ({self.balance_bound}) must be >= 0")  # fmt: skip
        if self.policy not in POLICIES:
            raise ValueError(f"unknown routing policy {self.policy!r}; known: {', '.join(POLICIES)}")
        if self.fill not in FILLS:
            raise ValueError(f"unknown fill {self.fill!r}; known: {', '.join(FILLS)}")


@dataclass(frozen=True)
class StepInfo:
    """What ``next_step`` returned, per rank (for the server's metrics)."""

    flops: list[float]  # the step's FLOPs, reuse subtracted: what the rank computes (packed: no padding)
    tokens: list[int]  # uncached prompt tokens computed
    cached_tokens: list[int]  # prompt tokens reused: from the rank's prefix cache or a batch-mate (zp_prefix_hit_tokens_total)
    below_threshold: bool  # even the busiest rank is under T: the gathers are not hidden (zp_steps_below_threshold_total)


# Balancing, evening out and topping up move a sequence to another rank only if it costs that rank at
# most twice what it costs where it was routed: a 64-token hit moved as a 1,088-token miss takes 17x
# the compute, evicts cached blocks there, and shortens no step (in a 16 x 16 shared-prefix burst such
# moves computed 5 prefixes a second time).
_MAX_MOVE_COST = 2.0
_EPS_S = 1e-9  # clock slack: a replay's "now + wake_in()" may land one rounding short of the deadline


class _Fill:
    """One rank's batch being assembled for the next step."""

    def __init__(self, sched: ThresholdScheduler, rank: int):
        self.sched, self.rank, self.cache = sched, rank, sched._caches[rank]
        self.batch: list[Sequence] = []
        self.hits: list[int] = []  # reused blocks per sequence
        self.present: set[bytes] = set()  # blocks of the batch's sequences: later rows reuse them in the step
        self.tokens = 0
        self.flops = 0.0
        self.seq_flops: list[float] = []  # each sequence's FLOPs here, reuse subtracted
        self.refused = False  # a sequence did not fit the token budget (step 3 then runs the step at once)

    @property
    def full(self) -> bool:
        """At the step's target (T, or more under ``fill="queue"``), the sequence budget or the token budget."""
        s = self.sched.settings
        return self.flops >= self.sched.target or len(self.batch) >= s.max_seqs or self.tokens >= s.max_tokens

    def reuse(self, s: Sequence) -> int:
        """Blocks ``s`` would reuse as the next row of this batch (``PrefixCache.reuse``: the rank's cache
        before the step, or blocks of earlier rows)."""
        return self.cache.match(s.block_hashes, cacheable_blocks(len(s.ids)), self.present)

    def cost(self, s: Sequence) -> float:
        """``s``'s FLOPs as the next row of this batch."""
        return self.sched._work(s, self.reuse(s) * BLOCK)[1]

    def take(self, s: Sequence, cap: float | None = None) -> bool:
        """Add ``s`` if the rank is under T and it fits the budgets; whether it was added. ``cap``: instead
        of stopping at T, only while the batch's FLOPs stay within ``cap``."""
        if (cap is None and self.full) or len(self.batch) >= self.sched.settings.max_seqs:
            return False
        hit = self.reuse(s)
        new, flops = self.sched._work(s, hit * BLOCK)
        if self.tokens + new > self.sched.settings.max_tokens:
            self.refused = True
            return False
        if cap is not None and self.flops + flops > cap:
            return False
        self.batch.append(s)
        self.hits.append(hit)
        self.present.update(s.block_hashes)
        self.tokens += new
        self.flops += flops
        self.seq_flops.append(flops)
        return True

    def take_all(self, seqs: list[Sequence], cap: float | None = None) -> list[Sequence]:
        """Take ``seqs`` in order (``take``, with ``cap``); the ones passed over, in order."""
        rest = []
        for i, s in enumerate(seqs):
            if cap is None and self.full:
                return rest + seqs[i:]
            if not self.take(s, cap):
                rest.append(s)
        return rest

    def without(self, s: Sequence) -> _Fill | None:
        """This batch less ``s``, the rest taken again in order; None if one of them would then be passed
        over (rows that reused ``s``'s blocks in the step now compute them)."""
        out = _Fill(self.sched, self.rank)
        return out if all(out.take(x) for x in self.batch if x is not s) else None


class ThresholdScheduler:
    """The ``Scheduler`` protocol (drop-in for FifoScheduler) with per-rank queues, a routing policy, the
    front end's prefix-cache views and admission by the saturation threshold.

    Each ``next_step``:
    1. Every rank takes its own queue in arrival order until its FLOPs reach the step's target (T; with
       ``fill="queue"`` the larger of T and the rank's share of the waiting work) or a budget
       (sequences, tokens computed). A sequence that would push the rank over its token budget is passed
       over for this step and later ones may still fit; the head of every queue always runs, so a
       passed-over sequence runs at the latest once all older ones have: it can be overtaken, never
       starved. A step runs packed, so a sequence costs its true FLOPs whatever it is batched with, and
       a sequence whose prefix an earlier row of the batch contains reuses it in the same step (a
       group's first prompt and its followers run together; ``server/packed.py``).
    2. Balancing: each rank still under the target, lowest FLOPs first, takes the oldest sequences left
       over on other ranks (those their own rank could not run this step), skipping any that do not
       fit, until it reaches the target. A moved sequence reuses what its new rank holds (often
       nothing): balancing only takes work its own rank would have left for a later step, so it never
       delays that rank. Moves here and in 4 and 5 skip a sequence that would cost its new rank more
       than twice what it costs where it was routed (``_MAX_MOVE_COST``): a hit is not turned into a
       miss that computes its shared prefix again, which costs hit rate and cache space for little time.
    3. Hold: if the busiest rank is under T, no rank is full by (or refused a sequence for) its token or
       sequence budget and the oldest waiting sequence has waited less than max_wait_ms, every batch is
       returned empty and ``wake_in`` says when to ask again. At the start of a burst the first arrival
       would otherwise run alone while the rest of the burst is still arriving.
    4. Evening out: while moving one of the busiest rank's youngest sequences to the least-loaded rank
       lowers the step's largest FLOPs (counting what it reuses where it lands, and what its batch-mates
       lose if they reused its blocks), it is moved. This trims the steps whose work fits under T on one
       rank (light load, the tail of a burst), where 2 would move nothing.
    5. Topping up: the busiest rank sets the step's time, so every other rank takes more work (its own
       passed-over sequences, then other ranks' oldest) while its FLOPs stay within the busiest rank's.
       Filling to T stops at the first sequence that crosses it, and ranks cross it by different amounts.
    6. Then the step is committed: the prefix-cache views are updated per rank in batch order,
       each sequence gets ``rank``, ``cached_tokens`` and its true ``flops``, and ``last_step`` describes
       the step. Its FLOPs count as the ranks' running load (what routing sees) until the next call.
       The server asks for the next step while this one runs (two steps in flight, ``engine.py``): the
       ranks run steps in the order they were made, so the views stay exact; only the running load
       routing sees is the newest step's, not both.

    ``clock`` gives seconds (default time.monotonic); inject one to make tests and replays deterministic.
    """

    def __init__(self, ranks: int, spec: ModelSpec, settings: RouterSettings, clock: Callable[[], float] = time.monotonic):
        if ranks < 1:
            raise ValueError(f"need at least one rank, got {ranks}")
        self.ranks, self.spec, self.settings, self.clock = ranks, spec, settings, clock
        self.policy = make_policy(settings.policy, settings.threshold_flops, settings.balance_bound)
        self._caches = [PrefixCache(settings.cache_tokens) for _ in range(ranks)]
        self._queues: list[dict[Sequence, None]] = [{} for _ in range(ranks)]  # insertion-ordered sets
        self._pending: list[Counter] = [Counter() for _ in range(ranks)]  # block hashes of queued sequences
        self._since: dict[Sequence, float] = {}  # every queued sequence -> when it was added (clock)
        self._estimate: dict[Sequence, tuple[float, int]] = {}  # (FLOPs, uncached tokens) at routing
        self._queued_flops = [0.0] * ranks
        self._queued_tokens = [0] * ranks
        self._running_flops = [0.0] * ranks
        self._running_tokens = [0] * ranks
        self._held_until: float | None = None
        self.last_step: StepInfo | None = None
        self.target = settings.threshold_flops  # what each rank's step is filled to (``next_step``)

    def _work(self, s: Sequence, reused: int) -> tuple[int, float]:
        """The tokens ``s`` computes after reusing ``reused`` (``prefix.computed_tokens``) and their FLOPs:
        prompt logprobs read the lm_head at every computed position, not only the last."""
        new = computed_tokens(len(s.ids), reused, s.wants)
        return new, flops_per_request(self.spec, new, len(s.ids) - new, logits=new if s.wants.prompt is not None else 1)

    # ---- the Scheduler protocol ---------------------------------------------------------------------
    def add(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            if len(s.ids) > self.settings.max_tokens:
                raise ValueError(f"a {len(s.ids)}-token sequence cannot fit a step of {self.settings.max_tokens} tokens per rank")
        now = self.clock()
        for s in seqs:
            views = self.views(s)
            r = self.policy(views, len(s.ids))
            if not 0 <= r < self.ranks:
                raise RuntimeError(f"routing policy {self.settings.policy} chose rank {r} of {self.ranks}")
            s.rank = r
            self._queues[r][s] = None
            self._since[s] = now
            estimate = (views[r].flops, self._work(s, views[r].matched)[0])
            self._estimate[s] = estimate
            self._queued_flops[r] += estimate[0]
            self._queued_tokens[r] += estimate[1]
            self._pending[r].update(s.block_hashes)

    def discard(self, seqs: list[Sequence]) -> int:
        n = 0
        for s in seqs:
            if s in self._since:
                self._dequeue(s)
                n += 1
        return n

    def waiting(self) -> int:
        return len(self._since)

    def waiting_flops(self) -> float:
        """The FLOPs of every queued sequence, as estimated when it was routed."""
        return sum(self._queued_flops)

    def next_step(self) -> list[list[Sequence]]:
        now = self.clock()
        R, T = self.ranks, self.settings.threshold_flops
        self._running_flops, self._running_tokens = [0.0] * R, [0] * R  # the previous step has finished
        self._held_until, self.last_step = None, None
        if not self._since:
            return [[] for _ in range(R)]
        self.target = T
        if self.settings.fill == "queue":  # the waiting work's FLOPs (estimated at routing), shared out
            self.target = max(T, self.waiting_flops() / (R * STEPS_IN_FLIGHT))
        fills, left = [], []
        for r in range(R):
            fills.append(_Fill(self, r))
            left.append(fills[r].take_all(self._hits_first(fills[r])))
        for fill in sorted(fills, key=lambda f: (f.flops, f.rank)):
            if fill.full:
                continue
            others = sorted((s for r in range(R) if r != fill.rank for s in left[r]), key=self._since.__getitem__)
            for s in others:
                if fill.full:
                    break
                if self._cheap_on(s, fill) and fill.take(s):
                    left[s.rank].remove(s)
        oldest = min(self._since[next(iter(q))] for q in self._queues if q)  # queues are in arrival order
        if max(f.flops for f in fills) < T and not any(f.full or f.refused for f in fills) and now - oldest < self.settings.max_wait_ms / 1e3 - _EPS_S:
            self._held_until = oldest + self.settings.max_wait_ms / 1e3
            return [[] for _ in range(R)]
        self._even_out(fills)
        self._top_up(fills, left)
        return self._commit(fills)

    def _hits_first(self, fill: _Fill) -> list[Sequence]:
        """Rank ``fill.rank``'s queue in the order step 1 takes it: the head, then the sequences that
        reuse blocks the rank's cache holds (in arrival order), then the rest (in arrival order)."""
        queue = list(self._queues[fill.rank])
        hits = [s for s in queue[1:] if fill.reuse(s)]
        taken = set(hits)
        return queue[:1] + hits + [s for s in queue[1:] if s not in taken]

    def _cheap_on(self, s: Sequence, fill: _Fill) -> bool:
        """Whether ``s`` costs ``fill``'s rank at most twice what it was to cost on its own rank (the
        estimate at routing, which counts the blocks queued there)."""
        return fill.cost(s) <= _MAX_MOVE_COST * self._estimate[s][0]

    def _top_up(self, fills: list[_Fill], left: list[list[Sequence]], scan: int = 512) -> None:
        """Step 5 of ``ThresholdScheduler``: the busiest rank sets the step's time, so every other rank
        takes more work while its FLOPs stay within the busiest rank's: its own passed-over sequences
        first, then the oldest of other ranks' (at most ``scan`` of each)."""
        level = max(f.flops for f in fills)
        taken: set[Sequence] = set()
        for fill in sorted(fills, key=lambda f: (f.flops, f.rank)):
            if fill.flops >= level:
                continue  # the busiest rank: any row would raise the level
            others = sorted((s for r in range(self.ranks) if r != fill.rank for s in left[r]), key=self._since.__getitem__)
            for seqs, own in ((left[fill.rank], True), (others, False)):
                candidates = list(islice((s for s in seqs if s not in taken and (own or self._cheap_on(s, fill))), scan))
                taken.update(set(candidates) - set(fill.take_all(candidates, cap=level)))

    def _even_out(self, fills: list[_Fill], candidates: int = 16) -> None:
        """Step 4 of ``ThresholdScheduler``: while moving one of the busiest rank's ``candidates``
        youngest sequences to the least-loaded rank lowers the step's largest FLOPs (counting what the
        sequence reuses where it lands, and its batch-mates' FLOPs once it is gone), and costs the least
        loaded rank at most twice what it saves the busiest, move it. Lockstep: the busiest rank sets
        every rank's step time."""
        for _ in range(sum(len(f.batch) for f in fills)):
            busiest = max(fills, key=lambda f: (f.flops, -f.rank))
            least = min(fills, key=lambda f: (f.flops, f.rank))
            for s in busiest.batch[::-1][:candidates]:
                there = least.cost(s)
                if least.flops + there >= busiest.flops:
                    continue
                rest = busiest.without(s)
                # What the move saves the busiest rank: s's own FLOPs, less what batch-mates that
                # reused its blocks in the step now compute themselves.
                if rest is None or there > _MAX_MOVE_COST * (busiest.flops - rest.flops):
                    continue
                if least.take(s):
                    fills[busiest.rank] = rest
                    break
            else:
                return

    def drain(self) -> list[Sequence]:
        """Everything waiting, removed. The ranks failed: their caches are gone, so the views restart empty."""
        seqs = sorted(self._since, key=self._since.__getitem__)
        for s in seqs:
            self._dequeue(s)
        for cache in self._caches:
            cache.clear()
        self._running_flops, self._running_tokens = [0.0] * self.ranks, [0] * self.ranks
        self._held_until = None
        return seqs

    # ---- beyond the protocol ------------------------------------------------------------------------
    def wake_in(self) -> float | None:
        """Seconds until the step just held back must run (its oldest sequence reaches max_wait_ms); None
        when the last ``next_step`` did not hold. The server should ask ``next_step`` again by then even
        if no request arrives."""
        if self._held_until is None or not self._since:
            return None
        return max(0.0, self._held_until - self.clock())

    def views(self, s: Sequence) -> list[RankView]:
        """What the policy sees for ``s`` (setting its ``block_hashes``): per rank, reuse counted over the
        cache view and the blocks of sequences queued there (they will be cached once they run)."""
        if s.block_hashes is None:
            s.block_hashes = block_hashes(s.ids, hash_salt(s.wants))
        limit = cacheable_blocks(len(s.ids))
        out = []
        for r in range(self.ranks):
            cache, pending = self._caches[r], self._pending[r]
            # A rank without a cache keeps nothing between steps: nothing to follow there.
            matched = cache.match(s.block_hashes, limit, pending) * BLOCK if cache.capacity else 0
            out.append(RankView(matched, self._work(s, matched)[1], self._queued_flops[r] + self._running_flops[r],
                                self._queued_tokens[r] + self._running_tokens[r], cache.tokens + BLOCK * len(pending)))  # fmt: skip
        return out

    def _dequeue(self, s: Sequence) -> None:
        r = s.rank
        del self._queues[r][s], self._since[s]
        flops, tokens = self._estimate.pop(s)
        self._queued_flops[r] -= flops
        self._queued_tokens[r] -= tokens
        if not self._queues[r]:
            self._queued_flops[r], self._queued_tokens[r] = 0.0, 0  # no float drift left behind
        pending = self._pending[r]
        for h in s.block_hashes:
            pending[h] -= 1
            if not pending[h]:
                del pending[h]

    def _commit(self, fills: list[_Fill]) -> list[list[Sequence]]:
        cached = []
        for fill in fills:
            for s in fill.batch:
                self._dequeue(s)
            hits, _ = self._caches[fill.rank].step([s.block_hashes for s in fill.batch], [cacheable_blocks(len(s.ids)) for s in fill.batch])
            assert hits == fill.hits, "the cache view changed between the fill and the commit"
            for s, hit, flops in zip(fill.batch, hits, fill.seq_flops):  # the fill counted each one's FLOPs
                s.rank, s.cached_tokens, s.flops = fill.rank, hit * BLOCK, flops
            cached.append(sum(s.cached_tokens for s in fill.batch))
        self._running_flops = [f.flops for f in fills]
        self._running_tokens = [f.tokens for f in fills]
        below = max(self._running_flops) < self.settings.threshold_flops
        self.last_step = StepInfo(list(self._running_flops), list(self._running_tokens), cached, below)
        return [f.batch for f in fills]
