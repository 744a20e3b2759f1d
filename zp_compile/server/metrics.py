"""Prometheus metrics of the front end (``GET /metrics``), in a registry of its own per server."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)


class Metrics:
    def __init__(self, ranks: int):
        self.ranks = ranks
        r = self.registry = CollectorRegistry()
        self.running = Gauge("zp_sequences_running", "sequences in the step now running on the ranks", registry=r)
        self.waiting = Gauge("zp_sequences_waiting", "sequences queued for a later step", registry=r)
        self.requests = Counter("zp_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("zp_prompt_tokens", "prompt tokens accepted for scoring", registry=r)
        self.e2e = Histogram("zp_e2e_request_latency_seconds", "request arrival to answer, answered requests", ["route"], buckets=_LATENCY, registry=r)
        self.queue_time = Histogram("zp_queue_time_seconds", "sequence arrival to the start of its step", buckets=_LATENCY, registry=r)
        self.step_seconds = Histogram("zp_step_seconds", "wall time of one lockstep step", buckets=_LATENCY, registry=r)
        self.steps = Counter("zp_steps", "lockstep steps run", registry=r)
        self.step_tokens = Gauge("zp_step_tokens", "prompt tokens in the last step, per rank", ["rank"], registry=r)
        self.step_flops = Gauge("zp_step_flops", "model FLOPs of the last step, per rank", ["rank"], registry=r)
        self.rank_tokens = Counter("zp_rank_tokens", "prompt tokens scored, per rank", ["rank"], registry=r)
        self.rank_flops = Counter("zp_rank_flops", "model FLOPs run, per rank", ["rank"], registry=r)
        self.rank_busy = Counter("zp_rank_busy_seconds", "each rank's own time in its steps (forward and readouts): "
                                 "against zp_step_seconds, what the round trip to the ranks and the front end add", ["rank"], registry=r)  # fmt: skip
        self.imbalance = Histogram("zp_step_flops_imbalance", "per step: max over ranks of the step's FLOPs / their mean (1 = balanced)",
                                   buckets=(1.0, 1.05, 1.1, 1.25, 1.5, 2, 3, 4, 8, 16), registry=r)  # fmt: skip
        self.below_threshold = Counter("zp_steps_below_threshold", "steps whose busiest rank was under the saturation threshold T", registry=r)
        self.prefix_hits = Counter("zp_prefix_hit_tokens", "prompt tokens served from the ranks' prefix caches", registry=r)
        self.dropped = Counter("zp_sequences_dropped", "queued sequences dropped unrun (client gone or timed out)", registry=r)
        self.worker_failures = Counter("zp_worker_failures", "times the ranks failed (died, hung or raised)", registry=r)
        self.retried = Counter("zp_sequences_retried", "sequences of a failed step queued again for the restarted ranks", registry=r)
        self.restart_seconds = Histogram("zp_restart_seconds", "a failure to the restarted ranks' Ready (ranks that restarted)",
                                         buckets=_LATENCY, registry=r)  # fmt: skip
        self.startup = Gauge("zp_startup_phase_seconds", "the ranks' last start, by phase (launch, load, compile, warm-up, "
                             "threshold, total)", ["phase"], registry=r)  # fmt: skip

    def set_queue(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def record_step(self, tokens: list[int], flops: list[float], busy_seconds: list[float]) -> None:
        self.steps.inc()
        for rank, seconds in enumerate(busy_seconds):
            self.rank_busy.labels(rank).inc(seconds)
        if sum(flops) > 0:
            self.imbalance.observe(max(flops) * len(flops) / sum(flops))
        for rank, (t, f) in enumerate(zip(tokens, flops)):
            self.step_tokens.labels(rank).set(t)
            self.step_flops.labels(rank).set(f)
            self.rank_tokens.labels(rank).inc(t)
            self.rank_flops.labels(rank).inc(f)

    def record_startup(self, phases: dict[str, float]) -> None:
        for phase, seconds in phases.items():
            self.startup.labels(phase).set(seconds)

    def record_admission(self, below_threshold: bool, cached_tokens: int) -> None:
        self.below_threshold.inc(int(below_threshold))
        self.prefix_hits.inc(cached_tokens)

    def count_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        if status == 200:
            self.e2e.labels(route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
