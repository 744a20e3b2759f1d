"""The front end's handle on the worker ranks: start them, hand each step's batches out, collect results.

Blocking by design: the server calls these from one executor thread, so the asyncio loop (and
``/health``) never waits on a rank. What crosses, and where: ``zp_compile/contract.py``.

Failure detection, so that no step waits forever:
- a rank sends ``Failed`` before it exits on an exception;
- the local torchrun process exits (it kills all ranks when one dies);
- a rank's heartbeat counter stops moving for ``heartbeat_timeout`` seconds (killed or stopped process),
  while starting too once the rank has begun to beat;
- a step takes longer than ``step_timeout`` (a rank stuck in a collective keeps beating).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist
import zmq

from .. import contract
from ..contract import Failed, Keys, Ready, Readout, Seq, Step, StepDone, Stop
from ..startup import PHASES, read_record
from .settings import ServeSettings, rank_settings

log = logging.getLogger("zp_compile.server")

_DUMP_S = 0.5  # how long a rank gets to write its stacks before it is killed
_CHECK_S = 0.25  # liveness checks (torchrun, heartbeats, timeout) while waiting on the ranks


class RankFailure(RuntimeError):
    """A rank died, hung or raised; the step's work is lost and the ranks must be restarted."""


class RankTimeout(RankFailure):
    """A start or a step ran past its timeout (a slow compile: starting again would take as long)."""


class Ranks:
    """``settings.nproc`` ranks started by torchrun, locally or (``external_ranks``) by the user on other hosts."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.ranks = settings.nproc
        self.store = dist.TCPStore(settings.worker_host, settings.worker_port, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=30))  # fmt: skip
        self.port = self.store.port
        self._zmq = zmq.Context()
        self.sock = self._zmq.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a rank that is not connected raises, never drops
        self.sock.setsockopt(zmq.LINGER, 0)
        where = f"tcp://{settings.worker_host}"
        data_port = self.sock.bind_to_random_port(where) if not settings.worker_port else self._bind(where, settings.worker_port + 1)
        self.data_address = f"{where}:{data_port}"
        self.generation = -1
        self.sent = self.received = 0  # steps of this generation handed out / answered
        self._early: dict[int, dict[int, StepDone]] = {}  # answers of steps not yet received, by step and rank
        self.proc: subprocess.Popen | None = None
        self.info: list[Ready] = []
        self._beats: dict[int, tuple[int, float]] = {}
        self.startup: dict[str, float] = {}  # the last start's seconds per phase (``startup_phases``)
        self.progress = ""  # while starting: what the ranks are doing, for /health
        self._started = 0.0
        self._aborted = threading.Event()

    def _bind(self, where: str, port: int) -> int:
        self.sock.bind(f"{where}:{port}")
        return port

    @property
    def keys(self) -> Keys:
        return Keys(self.generation)

    @property
    def address(self) -> str:
        return f"{self.settings.worker_host}:{self.port}"

    def worker_command(self) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.ranks}",
                "-m", "zp_compile.rank", "--frontend", self.address]  # fmt: skip

    def start(self) -> list[Ready]:
        """Start a new generation of ranks (or wait for external ones to join) and wait until every rank
        has loaded and compiled the model. Returns each rank's ``Ready``."""
        self.generation += 1
        self.sent = self.received = 0
        self._early, self._beats = {}, {}
        self._started, self.progress = time.monotonic(), "launching"
        self.store.set(self.keys.settings, contract.encode_settings(rank_settings(self.settings, self.data_address)))
        self.store.set(contract.GENERATION_KEY, str(self.generation))  # after settings: a joining rank reads both
        if not self.settings.external_ranks:
            # Own session: the whole torchrun tree can be killed at once if a rank hangs.
            self.proc = subprocess.Popen(self.worker_command(), start_new_session=True)
        ready = self._collect(Ready, time.monotonic() + self.settings.start_timeout, "start", beats=False)
        self.info = [ready[r] for r in range(self.ranks)]
        records = self._records()
        self.startup = startup_phases(time.monotonic() - self._started, [records.get(r, {}) for r in range(self.ranks)])
        self.progress = ""
        log.info("zp-compile: ranks started in %s; compile caches (rank 0): %s", format_phases(self.startup),
                 ", ".join(f"{k} {v}" for k, v in records.get(0, {}).get("cache", {}).items()) or "none")  # fmt: skip
        return self.info

    def _records(self) -> dict[int, dict]:
        """Each rank's start-up record so far (``startup.PhaseClock``), by rank."""
        keys = {r: self.keys.startup(r) for r in range(self.ranks)}
        return {r: read_record(self.store.get(k)) for r, k in keys.items() if self.store.check([k])}

    def _show_progress(self) -> None:
        """``progress``: the phase of the rank furthest behind, and for how long the ranks have been starting."""
        records = self._records()
        behind = min(range(self.ranks), key=lambda r: len(records.get(r, {}).get("seconds", {})))
        record = records.get(behind)
        doing = "launching" if record is None else record["phase"] or "reporting ready"
        self.progress = f"rank {behind} {doing}, {time.monotonic() - self._started:.0f} s since launch"

    def abort(self) -> None:
        """Make a wait on the ranks (a start, a step) give up at its next liveness check: shutting down."""
        self._aborted.set()

    def send(self, batches: list[list[Seq]]) -> int:
        """Hand out one lockstep step: rank r scores ``batches[r]`` (possibly empty). Returns the step's
        number for ``receive``. Steps queue in the ranks' sockets: a rank starts the next one as soon as
        it has answered this one, so a step sent while another runs costs the ranks no wait."""
        n = self.sent
        for r, batch in enumerate(batches):
            self._send(r, Step(n, batch))
        self.sent += 1
        return n

    def receive(self, n: int) -> tuple[list[list[Readout]], list[float]]:
        """Step ``n``'s readouts per rank, and each rank's own seconds for it (its forward and readouts).
        Steps are received in the order they were sent."""
        if n != self.received:
            raise ValueError(f"step {n} received out of order: step {self.received} is next")
        done = self._collect(StepDone, time.monotonic() + self.settings.step_timeout, f"step {n}", step=n)
        self.received += 1
        return [done[r].readouts for r in range(self.ranks)], [done[r].seconds for r in range(self.ranks)]

    def _send(self, rank: int, message) -> None:
        try:
            self.sock.send_multipart([contract.identity(self.generation, rank), contract.encode(message)])
        except zmq.ZMQError as e:  # ROUTER_MANDATORY: the rank's socket is gone
            raise RankFailure(f"rank {rank} is not connected ({e})") from None

    def _collect(self, kind: type, deadline: float, what: str, *, beats: bool = True, step: int | None = None) -> dict:
        """Wait for one ``kind`` message from every rank of this generation (for ``step``), checking
        liveness every ``_CHECK_S``; a rank's ``Failed`` raises at once. A later step's ``StepDone``
        (a fast rank, steps in flight) is kept for its own ``receive``; messages from other generations
        (ranks of before a restart) are dropped."""
        got: dict[int, object] = self._early.pop(step, {}) if step is not None else {}
        ids = {contract.identity(self.generation, r): r for r in range(self.ranks)}
        while len(got) < self.ranks:
            # This thread waits in the socket (no polling loop) until a message or the next check is due.
            if self.sock.poll(_CHECK_S * 1000):
                sender, data = self.sock.recv_multipart()
                if sender not in ids:
                    continue
                msg = contract.decode_from_rank(data)
                if isinstance(msg, Failed):
                    raise RankFailure(msg.message.splitlines()[0])
                if isinstance(msg, StepDone) and step is not None and msg.n != step:
                    self._early.setdefault(msg.n, {})[ids[sender]] = msg
                elif isinstance(msg, kind):
                    got[ids[sender]] = msg
                continue
            self._check_alive(deadline, what, beats)
        return got

    def _check_alive(self, deadline: float, what: str, beats: bool = True) -> None:
        if self._aborted.is_set():
            raise RankFailure(f"shutting down during {what}")
        if self.proc is not None and self.proc.poll() is not None:
            raise RankFailure(f"the ranks exited (torchrun status {self.proc.returncode}) during {what}")
        # Starting, a rank is checked from its first beat on (its heartbeat starts once its process group is
        # up): one stopped while it loads or compiles fails the start now, not at the start timeout.
        self._check_beats(what, begun_only=not beats)
        if not beats:
            self._show_progress()
        if time.monotonic() > deadline:
            limit = self.settings.step_timeout if beats else self.settings.start_timeout
            raise RankTimeout(f"{what} did not finish within {limit:g} s")

    def _check_beats(self, what: str, begun_only: bool = False) -> None:
        now = time.monotonic()
        for r in range(self.ranks):
            count = self.store.add(self.keys.beat(r), 0)
            if begun_only and count == 0:
                continue
            last = self._beats.get(r)
            if last is None or count != last[0]:
                self._beats[r] = (count, now)
            elif now - last[1] > self.settings.heartbeat_timeout:
                raise RankFailure(f"rank {r} stopped responding (no heartbeat for {now - last[1]:.1f} s) during {what}")

    def stop(self, grace: float = 10.0) -> None:
        """Ask every rank to exit after its current step; kill them if they have not within ``grace``."""
        for r in range(self.ranks):
            try:
                self._send(r, Stop())
            except RankFailure:
                pass  # already gone
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
        keys = [self.keys.pid(r) for r in range(self.ranks)]
        ranks = [int(self.store.get(k)) for k in keys if self.store.check([k])]
        # First each rank's Python stacks to the log (rank.worker.main registers the signal with faulthandler):
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


def startup_phases(total: float, records: list[dict]) -> dict[str, float]:
    """Seconds per start-up phase: ``launch`` (torchrun, imports, the process group: the total less the
    slowest rank's own phases), then each of ``startup.PHASES`` as the slowest rank took it, and ``total``
    (the front end's wait, launch to the last ``Ready``)."""
    phases = {p: max((r.get("seconds", {}).get(p, 0.0) for r in records), default=0.0) for p in PHASES}
    own = max((sum(r.get("seconds", {}).values()) for r in records), default=0.0)
    return {"launch": max(0.0, total - own), **phases, "total": total}


def format_phases(phases: dict[str, float]) -> str:
    """``12.3 s (launch 2.0 s, load 1.1 s, ...)``: phases that took no time left out."""
    parts = ", ".join(f"{p} {s:.1f} s" for p, s in phases.items() if p != "total" and s >= 0.05)
    return f"{phases['total']:.1f} s ({parts})"
