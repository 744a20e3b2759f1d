"""How much of the expert-gather time ran while the rank computed, read from a torch.profiler trace.

The overlap fraction is |gather ∩ compute| / |gather|: 1.0 means every transfer hid behind compute,
0.0 that compute stalled for all of it. Where gathers and compute are depends on the device:

- GPU (``overlap_from_device_events``, a trace with ``ProfilerActivity.CUDA``): gather time is the union
  of the collective's kernels (NCCL's ``ncclDevKernel_*`` on its own stream; or whatever kernels
  ``is_transfer`` names, such as the device-to-device copies that stand in for a gather on one GPU), and
  compute time the union of every other kernel, on the device's own timeline. ``wait`` is the device
  time in which only transfers ran (compute stalled for them).
- CPU (``overlap_from_host_events``): gloo runs transfers on its own threads (``gloo:*`` events);
  compute time is the time the thread running the model spends inside the compiled region (Inductor's
  fused C++ kernels record no events of their own) minus the collective plumbing (issuing a gather,
  waiting on it). ``wait`` is the time the model thread spent blocked in ``wait_tensor``.

``overlap_from_events`` picks the GPU reading when the trace holds device kernels.
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


def is_collective_kernel(name: str) -> bool:
    return name.startswith(("ncclDevKernel", "ncclKernel"))


def _device_kernels(events) -> list:
    return [e for e in events if str(getattr(e, "device_type", "")).endswith(("CUDA", "PrivateUse1", "XPU"))]


def overlap_from_events(events) -> Overlap:
    """``events``: ``prof.profiler.function_events``. Device kernels in the trace: the GPU reading."""
    if _device_kernels(events):
        return overlap_from_device_events(events)
    return overlap_from_host_events(events)


def overlap_from_device_events(events, is_transfer=is_collective_kernel) -> Overlap:
    """The device's kernels: ``is_transfer(name)`` ones move expert weights, the others compute."""
    kernels = _device_kernels(events)
    span = lambda es: union((e.time_range.start, e.time_range.end) for e in es)  # noqa: E731
    gather = span(e for e in kernels if is_transfer(e.name))
    compute = span(e for e in kernels if not is_transfer(e.name))
    stalled = subtract(gather, compute)
    return Overlap(length(gather), length(intersect(gather, compute)), length(stalled), length(compute))


def overlap_from_host_events(events) -> Overlap:
    """``events``: host events (name, thread, time_range.start/end in us, cpu_parent) of a CPU run."""
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
