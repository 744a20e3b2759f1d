"""What runs in each lockstep step: the scheduler interface and the simple first-come scheduler.

A ``Sequence`` is one prompt to score (a request may carry many). Each step, the server asks the
scheduler for one batch per rank; all ranks run the step together, so the slowest rank sets its time.
The prefix-aware, FLOPs-based scheduler implements the same ``Scheduler`` protocol.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

from .worker import PAD_MULTIPLE


@dataclass(eq=False)  # identity semantics: two equal prompts are still two sequences
class Sequence:
    ids: list[int]
    readout: dict  # what the rank returns for it: see worker.readouts
    future: asyncio.Future
    flops: float = 0.0
    arrival: float = field(default_factory=time.monotonic)
    started: float | None = None
    # Routing (ThresholdScheduler, server/routing.py): the rank it is queued on or ran on, the prompt
    # tokens that rank's prefix cache supplied, and the prompt's block hashes (server/prefix.py).
    rank: int | None = None
    cached_tokens: int = 0
    block_hashes: list[bytes] | None = field(default=None, repr=False)

    def payload(self) -> dict:
        out = {"ids": self.ids, **self.readout}
        if self.rank is not None:  # routed by the front end's cache view: the rank checks it agrees
            out["cached"] = self.cached_tokens
        return out


def padded_len(n: int) -> int:
    return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


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
    with the fewest padded tokens so far, up to ``max_tokens`` padded tokens (batch x padded length)
    and ``max_seqs`` sequences per rank; it stops at the first sequence that fits nowhere, so no
    sequence is overtaken."""

    def __init__(self, ranks: int, max_tokens: int, max_seqs: int = 256):
        self.ranks, self.max_tokens, self.max_seqs = ranks, max_tokens, max_seqs
        self._queue: dict[Sequence, None] = {}  # insertion-ordered set: O(1) discard

    def add(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            if padded_len(len(s.ids)) > self.max_tokens:
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
        widths = [0] * self.ranks  # padded length of each rank's batch so far
        for s in list(self._queue):
            n = padded_len(len(s.ids))
            cost = lambda r: (len(batches[r]) + 1) * max(widths[r], n)  # noqa: E731 - padded tokens if added
            fits = [r for r in range(self.ranks) if len(batches[r]) < self.max_seqs and cost(r) <= self.max_tokens]
            if not fits:
                break
            r = min(fits, key=lambda r: (len(batches[r]) * widths[r], r))
            batches[r].append(s)
            widths[r] = max(widths[r], n)
            del self._queue[s]
        return batches

    def drain(self) -> list[Sequence]:
        seqs = list(self._queue)
        self._queue.clear()
        return seqs
