"""A rank's start-up: where its time goes, and the compile work a start can skip.

- ``PhaseClock`` times the phases of a rank's start (``PHASES``: load, compile, warm-up, threshold) and
  publishes them, as they happen, under ``contract.Keys.startup`` in the rendezvous store; the front end reads them
  while it waits for ``Ready`` (``/health`` says what the ranks are doing) and logs them once all are up.
- ``cache_counters``: torch's compile caches as this process used them (FX graph cache and AOTAutograd
  cache hits and misses), so that a start with a warm cache can be seen to hit it.

Both sides import this module; neither imports the other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import contextmanager


PHASES = ("load", "compile", "warm-up", "threshold")


def compile_seconds() -> float:
    """Seconds this process has spent compiling frames so far (Dynamo's trace and the backend's
    compile, cache lookups included), as Dynamo counts them."""
    from torch._dynamo.utils import calculate_time_spent

    return calculate_time_spent().get("entire_frame_compile", 0.0)


def cache_counters() -> dict[str, int]:
    """Hits and misses of the FX graph cache (Inductor's compiled graphs) and the AOTAutograd cache
    (the traced joint graph) in this process."""
    from torch._dynamo.utils import counters

    fx, aot = counters["inductor"], counters["aot_autograd"]
    return {"fx_hit": fx["fxgraph_cache_hit"], "fx_miss": fx["fxgraph_cache_miss"], "fx_bypass": fx["fxgraph_cache_bypass"],
            "aot_hit": aot["autograd_cache_hit"], "aot_miss": aot["autograd_cache_miss"], "aot_bypass": aot["autograd_cache_bypass"]}  # fmt: skip


class PhaseClock:
    """A rank's start-up phases, published through ``publish(json_text)`` at each change: the phase now
    running (None when none is) and the seconds of those done."""

    def __init__(self, publish: Callable[[str], None]):
        self.publish = publish
        self.seconds: dict[str, float] = {}
        self.current: str | None = None
        self.extra: dict = {}

    @contextmanager
    def phase(self, name: str):
        self.current = name
        self._publish()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
            self.current = None
            self._publish()

    @contextmanager
    def warm_up(self):
        """The warm-up phase, its compiling counted apart: torch.compile compiles lazily, at the first
        call of each graph, so the warm-up's calls are where the compile happens."""
        before = compile_seconds()
        with self.phase("warm-up"):
            yield
        compiled = compile_seconds() - before
        self.seconds["compile"] = self.seconds.get("compile", 0.0) + compiled
        self.seconds["warm-up"] -= compiled
        self.extra["cache"] = cache_counters()
        self._publish()

    def _publish(self) -> None:
        self.publish(json.dumps({"phase": self.current, "seconds": self.seconds, **self.extra}))


def read_record(text: bytes | str) -> dict:
    return json.loads(text)
