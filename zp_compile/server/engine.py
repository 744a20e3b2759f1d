"""The front end's engine: one asyncio loop owns all state (``ServerState``).

Request handlers tokenize, validate and queue ``Sequence``s, then wait for their futures; the step loop
takes one batch per rank from the scheduler, sends and receives steps on a dedicated thread
(``Ranks.send`` and ``Ranks.receive`` block), and resolves the futures. Nothing a rank does can block the loop, so ``/health`` answers
while a step runs.

Every request gets exactly one answer: its result, or an error with a status. A rank failure costs no
accepted work: the failed steps' sequences go back to the front of the queue and run on the restarted
ranks (once: a sequence whose step fails twice is answered 503), and requests keep queueing while the
ranks restart (429 past ``max_waiting``), for at most ``restart_wait``, after which what is queued is
answered 503 (as everything is with ``on_worker_failure="exit"``). A drain (SIGTERM) lets queued work
finish and refuses new work with 503; a disconnected client's queued sequences are dropped;
``request_timeout`` bounds every wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import Request

from ..contract import Readout, Wants
from ..costmodel.flops import flops_per_request
from ..costmodel.spec import spec_from_config
from ..threshold import MeasuredThreshold
from .errors import ApiError
from .inputs import InputChecks
from .metrics import Metrics
from .ranks import RankFailure, Ranks, RankTimeout, format_phases
from .routing import StepInfo, ThresholdScheduler
from .scheduler import STEPS_IN_FLIGHT, FifoScheduler, Scheduler, Sequence
from .settings import ServeSettings, router_settings

log = logging.getLogger("zp_compile.server")

MAX_RETRIES = 1  # times a sequence whose step failed runs again on restarted ranks; then it is answered 503
# Restarts in a row whose ranks failed before answering one step (a step that always times out, a rank that
# dies on every start) beyond which the server exits instead of restarting again.
MAX_BARREN_RESTARTS = 2


@dataclass
class _InFlight:
    batches: list[list[Sequence]]  # per rank
    sent: float  # monotonic seconds
    admission: StepInfo | None  # the threshold scheduler's record of the step
    n: int = -1  # the step's number, once Ranks.send has returned it


class ServerState:
    """The front end's mutable state; lives on ``app.state.zp``."""

    def __init__(self, settings: ServeSettings, ranks: Ranks, tokenizer, config):
        self.settings, self.ranks, self.tokenizer = settings, ranks, tokenizer
        self.spec = spec_from_config(config, settings.model_name)
        text = config.get_text_config()
        self.max_model_len = settings.max_model_len or text.max_position_embeddings
        self.inputs = InputChecks(tokenizer, text.vocab_size, self.max_model_len, settings.max_items, settings.model_name, settings.labels)
        n = settings.nproc
        self.scheduler: Scheduler = FifoScheduler(n, settings.max_tokens_per_rank, settings.max_seqs_per_rank)
        self.threshold: MeasuredThreshold | None = None  # what the ranks measured at start-up
        self.metrics = Metrics(n)
        self.status = "starting"  # -> ready -> (restarting -> ready | unhealthy, exiting) ; draining
        self.detail = "loading and compiling the model on every rank"
        self.queueing = False  # requests queue while not ready: the ranks are restarting, within restart_wait
        self.startup: dict[str, float] = {}  # the last start's seconds per phase (ranks.startup_phases)
        self._restarts = 0  # restarts begun
        self._barren = 0  # failed generations in a row that answered no step
        self.draining = False
        self.exit_code = 0
        self.exit_requested = False  # the uvicorn server polls it (serve.DrainingServer.on_tick)
        self.inflight = 0  # requests being answered
        self.steps_in_flight: deque[_InFlight] = deque()  # steps sent to the ranks and not yet answered, oldest first
        self._last_answer = 0.0
        self.work = asyncio.Event()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="zp-ranks")  # the one thread that talks to ranks

    # ---- life cycle -------------------------------------------------------------------------------
    @property
    def detail(self) -> str:
        """What ``/health`` says besides the status; while the ranks start, what they are doing."""
        if self.status in ("starting", "restarting") and self.ranks.progress:
            return f"{self._detail} ({self.ranks.progress})"
        return self._detail

    @detail.setter
    def detail(self, text: str) -> None:
        self._detail = text

    async def start_ranks(self) -> None:
        """Start a generation of ranks; then serve what queued meanwhile. Ranks that fail to start exit
        the server (status 1), except during a restart where one died or hung (not a timeout: a compile
        that slow would be as slow again), which starts the next generation, ``MAX_BARREN_RESTARTS`` at most."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                info = await loop.run_in_executor(self.executor, self.ranks.start)
                break
            except RankFailure as e:
                await loop.run_in_executor(self.executor, self.ranks.kill)
                self._barren += 1
                again = self.status == "restarting" and not (isinstance(e, RankTimeout) or self.draining or self._barren > MAX_BARREN_RESTARTS)
                log.error("zp-compile: the ranks failed to start: %s%s", e, "; starting them again" if again else "")
                if again:
                    continue
                self.queueing = False
                self._answer(self.scheduler.drain(), f"the ranks failed to restart: {e}")
                self.status, self.detail = "unhealthy", f"ranks failed to start: {e}"
                self.request_exit(1)
                return
        self.threshold = info[0].threshold
        # A fresh scheduler for every generation: the ranks' caches start empty, and so do its views
        # (prefix.py); it takes over what queued during a restart, the failed steps' sequences first.
        scheduler = self.new_scheduler(info[0].packed)
        scheduler.add(self.scheduler.drain())
        self.scheduler = scheduler
        self.startup = self.ranks.startup
        self.metrics.record_startup(self.startup)
        self.status, self.detail, self.queueing = "ready", f"{len(info)} ranks ready in {format_phases(self.startup)}", False
        self.metrics.set_queue(self.running(), self.scheduler.waiting())
        log.info("zp-compile: %d ranks ready (generation %d, %s transport); serving %s", len(info), self.ranks.generation,
                 info[0].transport, self.settings.model_name)  # fmt: skip

    def new_scheduler(self, packed: bool) -> Scheduler:
        """The step scheduler for ranks that run packed steps (or left-padded batches)."""
        s = self.settings
        if not s.routed:
            return FifoScheduler(s.nproc, s.max_tokens_per_rank, s.max_seqs_per_rank, padded=not packed)
        T = s.threshold_flops or self.threshold.flops_per_step
        log.info("zp-compile: %s routing, steps filled to T = %.3g FLOPs per rank", s.policy, T)
        return ThresholdScheduler(s.nproc, self.spec, router_settings(s, T))

    def _wake_later(self) -> None:
        """A threshold scheduler held the step back for more work: ask again when its wait runs out."""
        wait = getattr(self.scheduler, "wake_in", lambda: None)()
        if wait is not None:
            asyncio.get_running_loop().call_later(wait, self.work.set)

    async def step_loop(self) -> None:
        """Keep up to ``STEPS_IN_FLIGHT`` steps in flight: the next step is scheduled and sent while one
        runs, so it waits in the ranks' sockets and a rank starts it the moment it has answered the
        last one (no round trip through the front end between steps). Steps are answered in order."""
        loop = asyncio.get_running_loop()
        while True:
            if not self.steps_in_flight:
                await self.work.wait()
                self.work.clear()
                if self.status != "ready":
                    continue
            if len(self.steps_in_flight) < STEPS_IN_FLIGHT and self.status == "ready":
                batches = self.scheduler.next_step()
                if any(batches):
                    try:
                        await self._send(loop, batches)
                    except RankFailure as e:
                        await self.fail(e)
                    continue  # and fill the pipeline further if there is more
                self._wake_later()  # held back for more work: ask again when the hold runs out
                if not self.steps_in_flight:
                    continue
            try:
                await self._receive(loop)
            except RankFailure as e:
                await self.fail(e)

    async def _send(self, loop, batches: list[list[Sequence]]) -> None:
        now = time.monotonic()
        for s in (s for b in batches for s in b):
            s.started = now
            self.metrics.queue_time.observe(now - s.arrival)
        payload = [[s.message() for s in b] for b in batches]
        # In flight before it is sent: a send that fails leaves its sequences where fail() answers them.
        # The threshold scheduler's view of the step it made (None under fifo), read before it makes the next.
        step = _InFlight(batches, now, getattr(self.scheduler, "last_step", None))
        self.steps_in_flight.append(step)
        step.n = await loop.run_in_executor(self.executor, self.ranks.send, payload)
        self.metrics.set_queue(self.running(), self.scheduler.waiting())

    async def _receive(self, loop) -> None:
        step = self.steps_in_flight[0]
        results, seconds = await loop.run_in_executor(self.executor, self.ranks.receive, step.n)
        self.steps_in_flight.popleft()
        now = time.monotonic()
        # The step's own share of the wall clock: from its send, or from the previous step's answer if it
        # queued behind that one in the ranks.
        self.metrics.step_seconds.observe(now - max(step.sent, self._last_answer))
        self._last_answer = now
        for batch, outs in zip(step.batches, results):
            for s, out in zip(batch, outs):
                if not s.future.done():
                    s.future.set_result(out)
        self.metrics.record_step([sum(len(s.ids) for s in b) for b in step.batches], [sum(s.flops for s in b) for b in step.batches],
                                 seconds)  # fmt: skip
        if step.admission is not None:
            self.metrics.record_admission(step.admission.below_threshold, sum(step.admission.cached_tokens))
        self.metrics.set_queue(self.running(), self.scheduler.waiting())

    def running(self) -> int:
        """Sequences in the steps in flight."""
        return sum(len(b) for step in self.steps_in_flight for b in step.batches)

    async def fail(self, error: RankFailure) -> None:
        """A rank failed. Restarting: the failed steps' sequences (those still awaited) go back to the front
        of the queue unless they already ran once on failed ranks, requests keep queueing, and the ranks
        restart. Otherwise (``on_worker_failure="exit"``, draining, or too many barren restarts) everything
        in flight and queued is answered 503 and the server exits 1."""
        log.error("zp-compile: worker failure: %s", error)
        self.metrics.worker_failures.inc()
        failed = [s for step in self.steps_in_flight for b in step.batches for s in b if not s.future.done()]
        self.steps_in_flight.clear()
        self._barren = 0 if self.ranks.received else self._barren + 1
        loop = asyncio.get_running_loop()
        if self.settings.on_worker_failure != "restart" or self.draining or self._barren > MAX_BARREN_RESTARTS:
            why = "" if self._barren <= MAX_BARREN_RESTARTS else f" ({self._barren} generations in a row failed before answering a step)"
            self.status, self.detail = "unhealthy", f"worker failure: {error}{why}"
            self._answer(failed + self.scheduler.drain(), f"a worker rank failed: {error}")
            await loop.run_in_executor(self.executor, self.ranks.kill)
            self.request_exit(1)
            return
        again = [s for s in failed if s.retries < MAX_RETRIES]
        self._answer([s for s in failed if s.retries >= MAX_RETRIES], f"a worker rank failed while running it, a second time: {error}")
        for s in again:
            s.retries += 1
        self.metrics.retried.inc(len(again))
        self.scheduler.add(again + self.scheduler.drain())  # ahead of what waits; drain empties the prefix views
        self.status, self.detail, self.queueing = "restarting", f"restarting the ranks after: {error}", True
        self.metrics.set_queue(0, self.scheduler.waiting())
        self._restarts += 1
        loop.call_later(self.settings.restart_wait, self._restart_overdue, self._restarts)
        began = time.monotonic()
        await loop.run_in_executor(self.executor, self.ranks.kill)
        await self.start_ranks()
        if self.status == "ready":
            self.metrics.restart_seconds.observe(time.monotonic() - began)
            log.info("zp-compile: restarted in %.1f s; %d sequences queued, %d of them from the failed steps", time.monotonic() - began,
                     self.scheduler.waiting(), len(again))  # fmt: skip
        self.work.set()

    def _restart_overdue(self, restart: int) -> None:
        """``restart_wait`` after restart number ``restart`` began: if the ranks are still not back, answer
        what is queued with 503 and refuse new work until they are."""
        if self.status != "restarting" or restart != self._restarts:
            return
        message = f"the ranks did not restart within --restart-wait {self.settings.restart_wait:g} s"
        log.error("zp-compile: %s: answering %d queued sequences with 503", message, self.scheduler.waiting())
        self.queueing = False
        self._answer(self.scheduler.drain(), message)

    def _answer(self, seqs: list[Sequence], message: str) -> None:
        """503 to each of ``seqs`` still awaited."""
        for s in seqs:
            if not s.future.done():
                s.future.set_exception(ApiError(503, message, "service_unavailable"))
        self.metrics.set_queue(self.running(), self.scheduler.waiting())

    async def shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        self.ranks.abort()  # a start (or step) still waited on by the ranks' thread gives up, so the kill below runs
        if self.status == "ready":
            await loop.run_in_executor(self.executor, self.ranks.stop)
        else:
            await loop.run_in_executor(self.executor, self.ranks.kill)
        self.executor.shutdown(wait=False)

    def begin_drain(self) -> None:
        """SIGTERM: refuse new work (503), let what was accepted finish, then exit."""
        self.draining = True
        self.detail = "draining: finishing accepted requests, refusing new ones"

    def request_exit(self, code: int) -> None:
        self.exit_code = code
        self.exit_requested = True

    # ---- requests -------------------------------------------------------------------------------
    async def submit(self, request: Request, seqs: list[Sequence]) -> list[Readout]:
        if self.draining:
            raise ApiError(503, "the server is shutting down", "service_unavailable")
        if self.status != "ready" and not self.queueing:
            raise ApiError(503, f"the server is not ready: {self.detail}", "service_unavailable")
        if self.scheduler.waiting() + len(seqs) > self.settings.max_waiting:
            raise ApiError(429, f"the queue is full ({self.settings.max_waiting} sequences waiting); retry later", "rate_limit_error")
        self.scheduler.add(seqs)
        self.metrics.set_queue(self.running(), self.scheduler.waiting())
        self.work.set()
        self.inflight += 1
        gathered = asyncio.gather(*(s.future for s in seqs))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({gathered, gone}, timeout=self.settings.request_timeout, return_when=asyncio.FIRST_COMPLETED)
            if gathered in done:
                return gathered.result()
            self.metrics.dropped.inc(self.scheduler.discard(seqs))  # nobody will read the answer: do not compute it
            self.metrics.set_queue(self.running(), self.scheduler.waiting())
            gathered.cancel()
            if gone in done:
                raise ApiError(499, "the client disconnected", "client_closed")
            raise ApiError(504, f"no answer within the request timeout ({self.settings.request_timeout:g} s)", "timeout")
        finally:
            gone.cancel()
            self.inflight -= 1

    def sequences(self, ids: list[list[int]], wants: Wants) -> list[Sequence]:
        loop = asyncio.get_running_loop()
        self.metrics.prompt_tokens.inc(sum(len(x) for x in ids))
        return [Sequence(x, wants, loop.create_future(), flops_per_request(self.spec, len(x))) for x in ids]


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
