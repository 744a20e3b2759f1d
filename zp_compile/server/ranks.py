"""The front end's handle on the worker ranks: start them, hand each step's batches out, collect results.

Blocking by design: the server calls these from one executor thread, so the asyncio loop (and
``/health``) never waits on a rank. Protocol and keys: ``zp_compile/server/worker.py``.

Failure detection, so that no step waits forever:
- a rank writes ``error/{rank}`` before it exits on an exception;
- the local torchrun process exits (it kills all ranks when one dies);
- a rank's heartbeat counter stops moving for ``heartbeat_timeout`` seconds (killed or stopped process);
- a step takes longer than ``step_timeout`` (a rank stuck in a collective keeps beating).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch.distributed as dist

_POLL_S = 0.002  # result polling: a non-blocking store check every 2 ms costs ~0.1 ms of one core
_DUMP_S = 0.5  # how long a rank gets to write its stacks before it is killed
_CHECK_S = 0.25  # liveness checks (errors, torchrun, heartbeats, timeout) during a step


class RankFailure(RuntimeError):
    """A rank died, hung or raised; the step's work is lost and the ranks must be restarted."""


@dataclass(frozen=True)
class RankSettings:
    """What every rank loads (written to the store as JSON; read by ``worker.serve``)."""

    model: str
    ranks: int
    backend: str = "inductor"
    prefetch: int = 1
    transport: str = "auto"  # worker.resolve_transport
    dtype: str | None = None
    threads: int | None = None
    measure_threshold: bool = False  # ranks measure T at start-up (threshold.saturation_threshold)
    cache_tokens: int = 0  # each rank's prefix KV cache budget (server/kv_cache.py); 0: KV-cache-free
    max_tokens: int = 0  # the largest step the front end sends a rank (tokens, ServeSettings.max_tokens_per_rank): compiled at warm-up


class Ranks:
    """N ranks started by torchrun, locally (``external=False``) or by the user on other hosts."""

    def __init__(
        self,
        settings: RankSettings,
        *,
        external: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        start_timeout: float = 600.0,
        step_timeout: float = 120.0,
        heartbeat_timeout: float = 5.0,
    ):
        self.settings = settings
        self.external = external
        self.host = host
        self.start_timeout = start_timeout
        self.step_timeout = step_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
        self.port = self.store.port
        self.generation = -1
        self.step = 0
        self.last_seconds: list[float] = []  # each rank's own seconds in the last step (run)
        self.proc: subprocess.Popen | None = None
        self.info: list[dict] = []
        self._beats: dict[int, tuple[int, float]] = {}

    @property
    def prefix(self) -> str:
        return f"g{self.generation}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def worker_command(self) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.settings.ranks}",
                "-m", "zp_compile.server.worker", "--frontend", self.address]  # fmt: skip

    def start(self) -> list[dict]:
        """Start a new generation of ranks (or wait for external ones to join) and wait until every rank
        has loaded and compiled the model. Returns each rank's facts (vocab, expert bytes, device)."""
        self.generation += 1
        self.step = 0
        self._beats = {}
        self.store.set(f"{self.prefix}/settings", json.dumps(asdict(self.settings)))
        self.store.set("generation", str(self.generation))  # after settings: a joining rank reads both
        if not self.external:
            # Own session: the whole torchrun tree can be killed at once if a rank hangs.
            self.proc = subprocess.Popen(self.worker_command(), start_new_session=True)
        keys = [f"{self.prefix}/ready/{r}" for r in range(self.settings.ranks)]
        deadline = time.monotonic() + self.start_timeout
        while not self.store.check(keys):
            self._check_alive(deadline, "start", beats=False)
            time.sleep(0.05)
        self.info = [json.loads(self.store.get(k)) for k in keys]
        return self.info

    def run(self, batches: list[list[dict]]) -> list[list[dict]]:
        """One lockstep step: rank r scores ``batches[r]`` (possibly empty); returns each rank's readouts.
        ``last_seconds``: then each rank's own time for the step (its forward and readouts)."""
        n, ranks = self.step, range(self.settings.ranks)
        for r in ranks:
            self.store.set(f"{self.prefix}/step/{n}/{r}", json.dumps({"seqs": batches[r]}))
        keys = [f"{self.prefix}/result/{n}/{r}" for r in ranks]
        deadline = time.monotonic() + self.step_timeout
        checked = time.monotonic()
        while not self.store.check(keys):
            if time.monotonic() - checked > _CHECK_S:
                self._check_alive(deadline, f"step {n}")
                checked = time.monotonic()
            time.sleep(_POLL_S)
        self.step += 1
        out, self.last_seconds = [], []
        for r, key in zip(ranks, keys):
            reply = json.loads(self.store.get(key))
            out.append(reply["results"])
            self.last_seconds.append(reply["seconds"])
            self.store.delete_key(key)
            self.store.delete_key(f"{self.prefix}/step/{n}/{r}")
        return out

    def _check_alive(self, deadline: float, what: str, beats: bool = True) -> None:
        for r in range(self.settings.ranks):
            key = f"{self.prefix}/error/{r}"
            if self.store.check([key]):
                raise RankFailure(self.store.get(key).decode().splitlines()[0])
        if self.proc is not None and self.proc.poll() is not None:
            raise RankFailure(f"the ranks exited (torchrun status {self.proc.returncode}) during {what}")
        if beats:
            self._check_beats(what)
        if time.monotonic() > deadline:
            limit = self.step_timeout if beats else self.start_timeout
            raise RankFailure(f"{what} did not finish within {limit:g} s")

    def _check_beats(self, what: str) -> None:
        now = time.monotonic()
        for r in range(self.settings.ranks):
            count = self.store.add(f"{self.prefix}/beat/{r}", 0)
            last = self._beats.get(r)
            if last is None or count != last[0]:
                self._beats[r] = (count, now)
            elif now - last[1] > self.heartbeat_timeout:
                raise RankFailure(f"rank {r} stopped responding (no heartbeat for {now - last[1]:.1f} s) during {what}")

    def stop(self, grace: float = 10.0) -> None:
        """Ask every rank to exit after its current step; kill them if they have not within ``grace``."""
        for r in range(self.settings.ranks):
            self.store.set(f"{self.prefix}/step/{self.step}/{r}", json.dumps({"stop": True}))
        if self.proc is not None:
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """Kill the local ranks and their torchrun (external ranks are their own launcher's business).

        The ranks by pid as well as torchrun's process group: torchrun starts its workers in sessions of
        their own, and a stopped (hung) rank never acts on the SIGTERM torchrun would send it.
        """
        if self.proc is None:
            return
        keys = [f"{self.prefix}/pid/{r}" for r in range(self.settings.ranks)]
        ranks = [int(self.store.get(k)) for k in keys if self.store.check([k])]
        # First each rank's Python stacks to the log (worker.main registers the signal with faulthandler):
        # where a hung rank waited is the one clue a timeout leaves. A stopped rank dumps nothing.
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGUSR1)
            except (ProcessLookupError, PermissionError):
                pass
        if ranks:
            time.sleep(_DUMP_S)
        for pid in [self.proc.pid] + ranks:
            try:
                os.killpg(pid, signal.SIGKILL) if pid == self.proc.pid else os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait()
