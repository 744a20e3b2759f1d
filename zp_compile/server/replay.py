"""Replay: the front end's scheduler over a trace under a cost model (no model, no server).

Every decision of ``ThresholdScheduler`` depends only on the arrival order, the injected clock and the
step results it produced itself, so a replay is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..costmodel.spec import ModelSpec
from .routing import RouterSettings, ThresholdScheduler
from .scheduler import Sequence


@dataclass(frozen=True)
class ReplayResult:
    requests: int
    prompt_tokens: int
    seconds: float  # first arrival to the end of the last step
    steps: int
    hit_rate: float  # prompt tokens served from a prefix cache / all prompt tokens
    imbalance: float  # mean over steps of max / mean of the ranks' FLOPs (1 = balanced)
    below_threshold: float  # share of steps whose busiest rank was under T
    mean_latency_s: float  # arrival to the end of its step

    @property
    def tokens_per_s(self) -> float:
        return self.prompt_tokens / self.seconds if self.seconds else 0.0


def replay(trace: list[tuple[float, list[int]]], spec: ModelSpec, ranks: int, settings: RouterSettings,
           flops_per_s: float, gather_s: float = 0.0) -> ReplayResult:  # fmt: skip
    """Run ``ThresholdScheduler`` over ``trace`` ((arrival seconds, token ids), any order) with a step
    time of max over ranks of the step's FLOPs (packed: what the ranks compute) / ``flops_per_s``, and
    at least ``gather_s`` (the exposed expert gather of a step under T; 0: compute only). No model, no
    server."""
    if flops_per_s <= 0:
        raise ValueError(f"flops_per_s must be > 0, got {flops_per_s}")
    trace = sorted(trace, key=lambda x: x[0])
    now = trace[0][0] if trace else 0.0
    start = now
    sched = ThresholdScheduler(ranks, spec, settings, clock=lambda: now)
    arrival: dict[Sequence, float] = {}
    i, steps, tokens, hit, imbalance, below, latency = 0, 0, 0, 0, 0.0, 0, 0.0
    while True:
        while i < len(trace) and trace[i][0] <= now:
            s = Sequence(list(trace[i][1]))  # no future: nothing awaits a replayed answer
            arrival[s] = trace[i][0]
            sched.add([s])
            i += 1
        batches = sched.next_step()
        if any(batches):
            info = sched.last_step
            now += max(max(info.flops) / flops_per_s, gather_s)
            steps += 1
            below += info.below_threshold
            imbalance += max(info.flops) * ranks / sum(info.flops) if sum(info.flops) else 1.0
            for s in (s for b in batches for s in b):
                tokens += len(s.ids)
                hit += s.cached_tokens
                latency += now - arrival.pop(s)
            continue
        wake = sched.wake_in()
        nxt = [t for t in (now + wake if wake is not None else None, trace[i][0] if i < len(trace) else None) if t is not None]
        if not nxt:
            break
        now = max(now, min(nxt))
    if sched.waiting():
        raise RuntimeError(f"replay ended with {sched.waiting()} sequences still queued")
    n = len(trace)
    return ReplayResult(n, tokens, now - start, steps, hit / tokens if tokens else 0.0, imbalance / steps if steps else 1.0,
                        below / steps if steps else 0.0, latency / n if n else 0.0)  # fmt: skip
