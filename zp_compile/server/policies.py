"""Routing policies: which rank a sequence goes to when it arrives.

A policy sees, per rank, the prompt tokens that rank will be able to reuse and the rank's load in true
FLOPs (``flops_per_request`` of the uncached tokens after the cached ones), queued and running, and
returns a rank. The policies share one signature, ``policy(views: list[RankView], n_tokens) -> rank``:
``RoundRobin``, ``least_flops``, ``cache_aware`` (SGLang's router) and ``BoundedPrefix`` (ours,
``--policy zero_prefill``: longest cached prefix, unless that pushes the ranks' FLOPs more than a bound
apart).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RankView:
    """One rank as a routing policy sees it, for the sequence being routed."""

    matched: int  # leading prompt tokens the rank holds or will hold: its cache view + its queued sequences' blocks
    flops: float  # the sequence's FLOPs there: its tokens after ``matched`` reused ones
    load_flops: float  # FLOPs queued on the rank (estimates) and running there (the last step)
    load_tokens: int  # uncached prompt tokens queued and running there
    tree_tokens: int  # tokens in the cache view plus queued blocks (SGLang's "tree size"; overlaps counted twice)


Policy = Callable[[list[RankView], int], int]  # (one view per rank, prompt tokens) -> rank


class RoundRobin:
    """Rank 0, 1, ..., N-1, 0, ... whatever the state."""

    def __init__(self) -> None:
        self._next = 0

    def __call__(self, ranks: list[RankView], n_tokens: int) -> int:
        r = self._next % len(ranks)
        self._next += 1
        return r


def least_flops(ranks: list[RankView], n_tokens: int) -> int:
    """The rank with the least FLOPs queued and running, blind to prefixes; ties: lowest rank."""
    return min(range(len(ranks)), key=lambda r: (ranks[r].load_flops, r))


def _least_after(ranks: list[RankView]) -> int:
    """The rank whose load would be least after taking the sequence (its FLOPs there, net of what that
    rank reuses); ties: lowest rank."""
    return min(range(len(ranks)), key=lambda r: (ranks[r].load_flops + ranks[r].flops, r))


def cache_aware(ranks: list[RankView], n_tokens: int, *, cache_threshold: float = 0.3, balance_abs: int = 64,
                balance_rel: float = 1.5) -> int:  # fmt: skip
    """SGLang's router policy ``cache_aware`` (sgl-router ``policies/cache_aware.rs``, defaults
    cache_threshold 0.3, balance_abs_threshold 64, balance_rel_threshold 1.5).

    Followed: the system is imbalanced when BOTH max - min load > balance_abs AND max > balance_rel x
    min; then the least-loaded rank. Otherwise the rank with the longest prefix match if its match rate
    (matched / prompt length) exceeds cache_threshold, else the rank with the smallest tree.
    Differs: SGLang's load is the count of requests in flight per worker and its approximate tree is
    over characters, inserted at routing time and trimmed by a periodic eviction thread; here load is
    uncached prompt tokens queued and running (so 64 is "tokens of queued work"), and the tree is this
    scheduler's block view (the exact cache mirror plus the blocks of queued sequences, also inserted
    at routing time).
    """
    loads = [v.load_tokens for v in ranks]
    hi, lo = max(loads), min(loads)
    if hi - lo > balance_abs and hi > balance_rel * lo:
        return loads.index(lo)
    best = max(range(len(ranks)), key=lambda r: (ranks[r].matched, -ranks[r].load_tokens, -r))
    if n_tokens and ranks[best].matched / n_tokens > cache_threshold:
        return best
    return min(range(len(ranks)), key=lambda r: (ranks[r].tree_tokens, r))


@dataclass(frozen=True)
class BoundedPrefix:
    """Ours: the rank holding the sequence's longest prefix (ties: least load after taking it), unless
    its load after taking the sequence would exceed the least-loaded rank's load + ``bound_flops``;
    then, as with no match anywhere, the rank whose load would be least after taking it (which still
    counts a shorter match elsewhere)."""

    bound_flops: float

    def __call__(self, ranks: list[RankView], n_tokens: int) -> int:
        after = [v.load_flops + v.flops for v in ranks]
        best = max(range(len(ranks)), key=lambda r: (ranks[r].matched, -after[r], -r))
        if ranks[best].matched == 0 or after[best] > min(v.load_flops for v in ranks) + self.bound_flops:
            return _least_after(ranks)
        return best


POLICIES = ("round_robin", "least_flops", "cache_aware", "zero_prefill")


def make_policy(name: str, threshold_flops: float, balance_bound: float = 1.0) -> Policy:
    """A policy by name; ``zero_prefill``'s bound is ``balance_bound`` x T."""
    if name == "round_robin":
        return RoundRobin()
    if name == "least_flops":
        return least_flops
    if name == "cache_aware":
        return cache_aware
    if name == "zero_prefill":
        return BoundedPrefix(balance_bound * threshold_flops)
    raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(POLICIES)}")
