"""Recovery without an outage: a rank killed (SIGKILL) or stopped past the heartbeat timeout (SIGSTOP)
mid-step costs no accepted request. The failed step's requests run again on the restarted ranks and get
the answers they would have got; requests that arrive during the restart queue (429 past --max-waiting,
never 503). Real server, real ranks (tests/server_utils.py); nothing here is timed."""

from __future__ import annotations

import signal
import threading

import httpx
import psutil
import pytest

from server_utils import Server, flood, wait_for

pytestmark = pytest.mark.xdist_group("serve")  # one server at a time, on one worker (pyproject.toml)

LABELS = [" yes", " no"]
PROMPTS = [f"recovery prompt {i} " * (1 + i % 5) for i in range(8)]


def probs(responses) -> list[list[float]]:
    out = []
    for r in responses:
        assert not isinstance(r, Exception) and r.status_code == 200, r if isinstance(r, Exception) else r.text
        out.append(r.json()["data"][0]["probs"])
    return out


def close(a: list[list[float]], b: list[list[float]]) -> bool:
    """Equal answers: the same prompts, batched differently (packed rows are independent; 1e-5 of float noise)."""
    return len(a) == len(b) and all(abs(x - y) < 1e-5 for u, v in zip(a, b) for x, y in zip(u, v))


def in_background(srv: Server, bodies, concurrency: int) -> tuple[threading.Thread, dict]:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(r=flood(srv, bodies, concurrency, timeout=300)))
    thread.start()
    return thread, out


def test_a_failed_steps_requests_are_answered_by_the_restarted_ranks(served_checkpoint):
    """SIGKILL mid-step, then SIGSTOP past the heartbeat timeout: each time the step's requests are
    answered 200 by the next generation of ranks, with the answers they got before the fault; during the
    second restart a flood beyond --max-waiting gets 429 at once, what fits queues and gets 200."""
    # --heartbeat-timeout 3: the ranks are stopped for a moment below to hold a step, not long enough to count.
    # Eager: what is tested is the restart, not the compile (each of the three starts would trace again).
    args = ["--backend", "eager", "--labels", *LABELS, "--heartbeat-timeout", "3", "--max-waiting", "24", "--max-items", "8"]
    bodies = [("/classify", {"input": x}) for x in PROMPTS]
    with Server(served_checkpoint, *args) as srv:
        before = probs(flood(srv, bodies, len(bodies)))

        # 1. SIGKILL mid-step: the ranks are held (SIGSTOP) so the step is certainly running when rank 1 dies.
        ranks = srv.ranks()
        for proc in ranks:
            proc.suspend()
        load, out = in_background(srv, bodies, len(bodies))
        try:
            wait_for(lambda: srv.metric("zp_sequences_running") > 0, "a step to be handed to the held ranks")
            ranks[1].kill()
        finally:
            ranks[0].resume()
        load.join(300)
        assert not load.is_alive()
        assert close(probs(out["r"]), before)
        assert srv.metric("zp_worker_failures_total") == 1 and srv.metric("zp_sequences_retried_total") > 0
        _, alive = psutil.wait_procs(ranks, timeout=30)
        assert not alive, "ranks of the failed generation still alive"

        # 2. SIGSTOP past the heartbeat timeout: rank 1 is stopped before the step is sent, so the step
        # cannot finish, and the heartbeat check while waiting on it fails the ranks 3 s later.
        ranks = srv.ranks()
        ranks[1].suspend()
        retried = srv.metric("zp_sequences_retried_total")
        load, out = in_background(srv, bodies, len(bodies))
        # The bodies arrive over a few ms: the first steps in flight take those that came first, the rest
        # queue behind them. Nothing finishes while rank 1 is stopped, so what runs is fixed until the fault.
        wait_for(lambda: srv.metric("zp_sequences_running") + srv.metric("zp_sequences_waiting") == len(bodies), "the bodies to arrive")
        running = srv.metric("zp_sequences_running")
        wait_for(lambda: httpx.get(srv.url + "/health").json()["status"] == "restarting", "the stopped rank to be noticed")
        # During the restart: 8 sequences are queued already; 16 one-input requests fill --max-waiting 24,
        # the other 16 get 429 at once, and none gets 503.
        flooded = flood(srv, [("/classify", {"input": f"during the restart {i}"}) for i in range(32)], 32, timeout=300)
        load.join(300)
        assert not load.is_alive()
        assert close(probs(out["r"]), before)
        assert srv.metric("zp_sequences_retried_total") - retried == running > 0  # the failed steps' sequences, each once
        codes = [r.status_code for r in flooded]
        assert sorted(set(codes)) == [200, 429], codes
        assert codes.count(200) == 16, codes
        assert all(r.json()["error"]["type"] == "rate_limit_error" for r in flooded if r.status_code == 429)
        assert srv.metric("zp_worker_failures_total") == 2
        assert srv.metric("zp_restart_seconds_count") == 2
        health = httpx.get(srv.url + "/health").json()
        # the restart's start-up phases are reported (an eager start has no compile to name in the detail)
        assert health["status"] == "ready" and "launch" in health["detail"], health
        assert {"launch", "load", "compile", "warm-up"} <= health["startup"].keys(), health
