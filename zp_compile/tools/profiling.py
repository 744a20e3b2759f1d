"""How much of the expert-gather time ran while the rank computed, read from a torch.profiler trace.

Gather time is the union of the transfer intervals (gloo runs them on its own threads: ``gloo:*``
events; NCCL on GPU streams); compute time is the time the thread running the model spends inside the
compiled region (Inductor's fused C++ kernels record no events of their own) minus the collective
plumbing (issuing a gather, waiting on it). The overlap fraction
is |gather ∩ compute| / |gather|: 1.0 means every transfer hid behind compute, 0.0 that compute
stalled for all of it. ``wait`` is the time the model thread spent blocked in ``wait_tensor``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

Interval = tuple[float, float]

COLLECTIVE_PLUMBING = ("_c10d_functional::", "c10d::", "zp_compile::")


def union(intervals: Iterable[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def length(intervals: Iterable[Interval]) -> float:
    return sum(end - start for start, end in intervals)


def subtract(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """Merged interval list ``a`` minus merged interval list ``b``."""
    out = []
    for start, end in a:
        for lo, hi in b:
            if hi <= start or lo >= end:
                continue
            if lo > start:
                out.append((start, lo))
            start = max(start, hi)
        if start < end:
            out.append((start, end))
    return out


def intersect(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """Intersection of two merged (sorted, disjoint) interval lists."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


@dataclass(frozen=True)
class Overlap:
    gather_us: float  # union of transfer intervals
    overlapped_us: float  # ... of which the model thread was computing
    wait_us: float  # model thread blocked waiting for a gather
    compute_us: float

    @property
    def fraction(self) -> float:
        return self.overlapped_us / self.gather_us if self.gather_us else 0.0


def overlap_from_events(events) -> Overlap:
    """``events``: ``prof.profiler.function_events`` (name, thread, time_range.start/end in us, cpu_parent)."""
    transfer = [e for e in events if e.name.startswith(("gloo:", "nccl:", "ncclDevKernel"))]
    waited = [e for e in events if e.name.startswith("_c10d_functional::wait_tensor")]
    model_thread = waited[0].thread if waited else None  # the thread that runs the compiled forward
    mine = [e for e in events if e.thread == model_thread]
    span = lambda es: union((e.time_range.start, e.time_range.end) for e in es)  # noqa: E731
    region = span(e for e in mine if e.name.startswith("Torch-Compiled Region")) or span(
        e for e in mine if e.cpu_parent is None
    )
    compute = subtract(region, span(e for e in mine if e.name.startswith(COLLECTIVE_PLUMBING)))
    waits = span(waited)
    gather = span(transfer)
    return Overlap(length(gather), length(intersect(gather, compute)), length(waits), length(compute))
