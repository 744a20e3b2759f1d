"""What runs in each lockstep step: the scheduler interface and the simple first-come scheduler.

A ``Sequence`` is one prompt to score (a request may carry many). Each step, the server asks the
scheduler for one batch per rank; all ranks run the step together, so the slowest rank sets its time.
The prefix-aware, FLOPs-based scheduler (``routing.ThresholdScheduler``) implements the same protocol.

A step's token budget (``max_tokens``, ``--max-tokens-per-rank``) has one meaning everywhere: the
tokens one rank's forward processes. Ranks run packed steps (no padding: a batch's prompt tokens,
fewer where prefixes are reused); a model that cannot (``Ready.packed`` false) runs left-padded
batches, which process rows x the widest row.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

from ..contract import BLOCK, Seq, Wants

FIFO = "fifo"  # --policy: first come, first served
STEPS_IN_FLIGHT = 2  # the engine's pipeline: one step running on the ranks, the next waiting in their sockets


@dataclass(eq=False)  # identity semantics: two equal prompts are still two sequences
class Sequence:
    ids: list[int]
    wants: Wants = Wants()  # what the rank returns for it
    future: asyncio.Future | None = None  # None: nothing awaits the answer (a replay)
    flops: float = 0.0
    arrival: float = field(default_factory=time.monotonic)
    started: float | None = None
    # Routing (ThresholdScheduler, server/routing.py): the rank it is queued on or ran on, the prompt
    # tokens that rank's prefix cache supplied, and the prompt's block hashes (zp_compile/prefix.py).
    rank: int | None = None
    cached_tokens: int = 0
    block_hashes: list[bytes] | None = field(default=None, repr=False)
    retries: int = 0  # times it was put back in the queue because its step failed (the server allows one)

    def message(self) -> Seq:
        """What its rank receives. Routed by the front end's cache view, it carries the count of reused
        tokens, which the rank checks against its own cache."""
        return Seq(self.ids, self.wants, self.cached_tokens if self.rank is not None else None)


def step_tokens(lengths: list[int], padded: bool) -> int:
    """Tokens a rank's forward processes for a batch of prompts of these lengths (no reuse counted)."""
    if not padded:
        return sum(lengths)
    return len(lengths) * -(-max(lengths, default=0) // BLOCK) * BLOCK


class Scheduler(Protocol):
    def add(self, seqs: list[Sequence]) -> None: ...

    def discard(self, seqs: list[Sequence]) -> int:
        """Forget sequences that have not run yet (their client went away or timed out); how many."""

    def waiting(self) -> int: ...

    def next_step(self) -> list[list[Sequence]]:
        """One batch per rank for the next step (all empty: nothing to run)."""

    def drain(self) -> list[Sequence]:
        """Remove and return everything waiting (the ranks failed)."""


class FifoScheduler:
    """First come, first served. Each step takes sequences in arrival order and gives each to the rank
    with the fewest tokens so far, up to ``max_tokens`` tokens (``step_tokens``: packed, or padded when
    ``padded``) and ``max_seqs`` sequences per rank; it stops at the first sequence that fits nowhere,
    so no sequence is overtaken."""

    def __init__(self, ranks: int, max_tokens: int, max_seqs: int = 256, padded: bool = False):
        self.ranks, self.max_tokens, self.max_seqs, self.padded = ranks, max_tokens, max_seqs, padded
        self._queue: dict[Sequence, None] = {}  # insertion-ordered set: O(1) discard

    def add(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            if step_tokens([len(s.ids)], self.padded) > self.max_tokens:
                raise ValueError(f"a {len(s.ids)}-token sequence cannot fit a step of {self.max_tokens} tokens per rank")
            self._queue[s] = None

    def discard(self, seqs: list[Sequence]) -> int:
        before = len(self._queue)
        for s in seqs:
            self._queue.pop(s, None)
        return before - len(self._queue)

    def waiting(self) -> int:
        return len(self._queue)

    def next_step(self) -> list[list[Sequence]]:
        batches: list[list[Sequence]] = [[] for _ in range(self.ranks)]
        lengths: list[list[int]] = [[] for _ in range(self.ranks)]
        for s in list(self._queue):
            cost = lambda r: step_tokens(lengths[r] + [len(s.ids)], self.padded)  # noqa: E731 - its rank's tokens if added
            fits = [r for r in range(self.ranks) if len(batches[r]) < self.max_seqs and cost(r) <= self.max_tokens]
            if not fits:
                break
            r = min(fits, key=lambda r: (step_tokens(lengths[r], self.padded), r))
            batches[r].append(s)
            lengths[r].append(len(s.ids))
            del self._queue[s]
        return batches

    def drain(self) -> list[Sequence]:
        seqs = list(self._queue)
        self._queue.clear()
        return seqs
