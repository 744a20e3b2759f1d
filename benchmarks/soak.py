"""Soak: a fixed mixed load on ``zp-compile serve`` for N minutes, with faults injected on a schedule.

    python benchmarks/soak.py --minutes 8 --json benchmarks/results-soak-2rank-cpu.json

The server is started here (``tests/server_utils.Server``: real ranks under torchrun) on the default
model unless ``--model``, with ``--serve`` flags (default ``--policy zero_prefill --cache-tokens 4096``).
``--clients`` (64) clients each send one request after another until the end, cycling through
``/classify``, ``/score``, ``/rerank``, ``/v1/completions`` and malformed bodies (bad JSON, wrong types,
unknown fields, empty input). Prompts are token-exact (``zp_compile.tools.bench_serve``'s datasets).

Faults, at seconds after the load starts: ``--kill-at`` SIGKILL rank 1; ``--stop-at`` SIGSTOP rank 1 for
``--stop-for`` seconds (past the server's heartbeat timeout, so the server fails the ranks and kills it);
every ``--disconnect-every`` seconds a client that sends 16 inputs and hangs up 0.1 s later.

Reported per minute of the load: requests by status (by the minute they were answered), p50/p99 of the
200s, the front end's and the ranks' RSS, restarts and their durations. Then the targets: the share of
well-formed requests answered 200, requests lost (no answer) or answered twice (the server counted more
answers than clients got), each recovery (fault to the next 200 after the server noticed it), front-end
RSS growth after the first minute, a native crash in the log, the exit status on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

KINDS = ("/classify", "/score", "/rerank", "/v1/completions", "malformed")
MALFORMED = [b'{"input": ', b'{"input": 5}', b'{"input": "x", "no_such_field": 1}', b'{"input": []}', b'{"query": "q", "documents": "d"}']
CRASH_MARKS = ("Fatal Python error", "Segmentation fault", "core dumped", "SIGSEGV", "SIGABRT", "SIGBUS", "InvalidStateError")
TARGETS = {"ok_share": 0.97, "recovery_s": 30.0, "rss_growth": 0.10}


def bodies(tokenizer, n: int, seed: int) -> dict[str, list[dict]]:
    """``n`` well-formed bodies per route: prompts of 16-200 exact tokens (bench_serve's random dataset)."""
    from zp_compile.tools import bench_serve

    out = {}
    for endpoint in ("/classify", "/score", "/v1/completions"):
        out[endpoint] = [b for b, _ in bench_serve.random_dataset(tokenizer, n, 108, 0.85, seed=seed, endpoint=endpoint)]
    rng, pool = random.Random(seed), bench_serve.word_pool(tokenizer)
    words = lambda k: "".join(rng.choices(pool, k=k))  # noqa: E731
    out["/rerank"] = [{"query": words(rng.randint(4, 24)), "documents": [words(rng.randint(8, 64)) for _ in range(rng.randint(1, 4))]}
                      for _ in range(n)]  # fmt: skip
    return out


class Soak:
    def __init__(self, srv, args, tokenizer):
        self.srv, self.args = srv, args
        self.bodies = bodies(tokenizer, 200, args.seed)
        self.records: list[dict] = []  # one per request: kind, sent, done, status (or the client error)
        self.samples: list[dict] = []  # one per second: RSS, failures, health
        self.faults: list[dict] = []
        self.start = 0.0

    def now(self) -> float:
        return time.monotonic() - self.start

    async def client(self, http: httpx.AsyncClient, i: int, end: float) -> None:
        rng = random.Random(self.args.seed * 1000 + i)
        n = i
        while self.now() < end:
            kind = KINDS[n % len(KINDS)]
            n += 1
            route, body = (kind, {"json": rng.choice(self.bodies[kind])}) if kind != "malformed" else self._malformed(rng)
            sent = self.now()
            try:
                r = await http.post(route, **body)
                status, error = r.status_code, None if r.status_code == 200 else r.text[:200]
            except httpx.HTTPError as e:
                status, error = None, f"{type(e).__name__}: {e}"
            self.records.append({"kind": kind, "route": route, "sent": sent, "done": self.now(), "status": status, "error": error})

    @staticmethod
    def _malformed(rng: random.Random) -> tuple[str, dict]:
        return rng.choice(["/classify", "/rerank"]), {"content": rng.choice(MALFORMED), "headers": {"content-type": "application/json"}}

    async def disconnects(self, end: float) -> None:
        """Every ``--disconnect-every`` s: 16 inputs, then the client hangs up after 0.1 s."""
        async with httpx.AsyncClient(base_url=self.srv.url, timeout=0.1) as http:
            while self.now() + self.args.disconnect_every < end:
                await asyncio.sleep(self.args.disconnect_every)
                sent = self.now()
                try:
                    r = await http.post("/classify", json={"input": [b["input"] for b in self.bodies["/classify"][:16]]})
                    status = r.status_code
                except httpx.HTTPError:
                    status = None
                self.records.append({"kind": "disconnect", "route": "/classify", "sent": sent, "done": self.now(), "status": status, "error": None})

    async def monitor(self, end: float) -> None:
        """Once a second: the front end's and the ranks' RSS, the server's failure and restart counts, /health."""
        from zp_compile.tools.bench_serve import metric_sum, parse_metrics

        front = psutil.Process(self.srv.proc.pid)
        async with httpx.AsyncClient(base_url=self.srv.url, timeout=5) as http:
            while self.now() < end:
                sample = {"t": self.now(), "frontend_rss": front.memory_info().rss, "ranks_rss": 0}
                for p in self.srv.ranks():
                    try:
                        sample["ranks_rss"] += p.memory_info().rss
                    except psutil.Error:
                        pass
                try:
                    m = parse_metrics((await http.get("/metrics")).text)
                    sample.update(failures=metric_sum(m, "zp_worker_failures_total"), restarts=metric_sum(m, "zp_restart_seconds_count"),
                                  restart_s=metric_sum(m, "zp_restart_seconds_sum"))  # fmt: skip
                    sample["health"] = (await http.get("/health")).json()["status"]
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                self.samples.append(sample)
                await asyncio.sleep(1.0)

    async def faults_on_schedule(self) -> None:
        plan = sorted([(t, "SIGKILL") for t in self.args.kill_at] + [(t, "SIGSTOP") for t in self.args.stop_at])
        for at, fault in plan:
            await asyncio.sleep(max(0.0, at - self.now()))
            ranks = self.srv.ranks()
            if len(ranks) < 2:
                self.faults.append({"t": self.now(), "fault": fault, "skipped": "ranks not up"})
                continue
            victim = ranks[1]
            self.faults.append({"t": self.now(), "fault": fault, "pid": victim.pid})
            if fault == "SIGKILL":
                victim.kill()
                continue
            victim.suspend()
            await asyncio.sleep(self.args.stop_for)
            try:
                victim.resume()  # normally killed by the server by now
            except psutil.Error:
                pass

    async def run(self) -> None:
        end = self.args.minutes * 60
        self.start = time.monotonic()
        limits = httpx.Limits(max_connections=self.args.clients, max_keepalive_connections=self.args.clients)
        async with httpx.AsyncClient(base_url=self.srv.url, timeout=self.args.request_timeout, limits=limits) as http:
            await asyncio.gather(*(self.client(http, i, end) for i in range(self.args.clients)), self.disconnects(end), self.monitor(end),
                                 self.faults_on_schedule())  # fmt: skip


def per_minute(soak: Soak) -> list[dict]:
    from zp_compile.tools.bench_serve import latency_stats

    minutes = int(soak.args.minutes + 0.999)
    out = []
    for m in range(minutes):
        done = [r for r in soak.records if m * 60 <= r["done"] < (m + 1) * 60]
        ok = [r["done"] - r["sent"] for r in done if r["status"] == 200]
        samples = [s for s in soak.samples if m * 60 <= s["t"] < (m + 1) * 60]
        before = [s for s in soak.samples if s["t"] < m * 60 and "restarts" in s]
        last = [s for s in samples if "restarts" in s]
        restarts = (last[-1]["restarts"] - (before[-1]["restarts"] if before else 0)) if last else None
        seconds = (last[-1]["restart_s"] - (before[-1]["restart_s"] if before else 0)) if last else None
        stats = latency_stats(ok)
        out.append({
            "minute": m + 1,
            "by_status": dict(sorted(Counter(str(r["status"]) for r in done).items())),
            "p50_ms": stats["p50"], "p99_ms": stats["p99"],
            "frontend_rss_mb": max((s["frontend_rss"] for s in samples), default=0) / 2**20,
            "ranks_rss_mb": max((s["ranks_rss"] for s in samples), default=0) / 2**20,
            "restarts": restarts, "restart_seconds": seconds,
        })  # fmt: skip
    return out


def recoveries(soak: Soak) -> list[dict]:
    """Per fault: when the server noticed it (its failure count rose), and the first 200 answered after that."""
    out = []
    for f in soak.faults:
        if "skipped" in f:
            continue
        known = [s for s in soak.samples if "failures" in s]
        before = max((s["failures"] for s in known if s["t"] <= f["t"]), default=0)
        noticed = next((s["t"] for s in known if s["t"] > f["t"] and s["failures"] > before), None)
        after = min((r["done"] for r in soak.records if r["status"] == 200 and noticed is not None and r["done"] > noticed), default=None)
        out.append({**f, "noticed_s": None if noticed is None else noticed - f["t"], "recovery_s": None if after is None else after - f["t"]})
    return out


def verdict(soak: Soak, minutes: list[dict], recovered: list[dict], server_counts: dict[str, int], exit_status: int | None, log: str) -> dict:
    well = [r for r in soak.records if r["kind"] not in ("malformed", "disconnect")]
    ok = sum(r["status"] == 200 for r in well)
    lost = [r for r in soak.records if r["status"] is None and r["kind"] != "disconnect"]
    client_counts = Counter(r["route"] for r in soak.records)  # every request sent (a hung-up one is the server's 499)
    doubled = {route: n - client_counts.get(route, 0) for route, n in server_counts.items() if n > client_counts.get(route, 0)}
    rss = [m["frontend_rss_mb"] for m in minutes if m["frontend_rss_mb"]]
    growth = (max(rss[1:]) / rss[0] - 1) if len(rss) > 1 else None
    crashes = sorted({mark for mark in CRASH_MARKS if mark in log})
    out = {
        "well_formed": len(well), "ok": ok, "ok_share": ok / len(well) if well else None,
        "lost": len(lost), "lost_examples": [r["error"] for r in lost[:5]],
        "answered_more_than_sent": doubled,
        "recovery_s": [r["recovery_s"] for r in recovered],
        "frontend_rss_growth_after_minute_1": growth,
        "native_crash_marks": crashes, "exit_status_on_sigterm": exit_status,
    }  # fmt: skip
    out["met"] = {
        "ok_share": out["ok_share"] is not None and out["ok_share"] >= TARGETS["ok_share"],
        "none_lost_or_doubled": not lost and not doubled,
        "recovery": bool(recovered) and all(r is not None and r <= TARGETS["recovery_s"] for r in out["recovery_s"]),
        "rss_growth": growth is not None and growth <= TARGETS["rss_growth"],
        "no_native_crash": not crashes and exit_status == 0,
    }  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--model", help="checkpoint directory (default: the built-in default model)")
    parser.add_argument("--kill-at", type=float, nargs="*", default=[120.0], help="seconds into the load: SIGKILL rank 1")
    parser.add_argument("--stop-at", type=float, nargs="*", default=[300.0], help="seconds into the load: SIGSTOP rank 1")
    parser.add_argument("--stop-for", type=float, default=10.0, help="seconds a stopped rank stays stopped (past the heartbeat timeout)")
    parser.add_argument("--disconnect-every", type=float, default=30.0)
    parser.add_argument("--request-timeout", type=float, default=300.0, help="client timeout per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--serve", nargs=argparse.REMAINDER, default=["--policy", "zero_prefill", "--cache-tokens", "4096"],
                        help="zp-compile serve flags (last on the line)")  # fmt: skip
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from server_utils import Server
    from zp_compile.models import default_checkpoint
    from zp_compile.tools.bench_serve import metric_sum, parse_metrics

    model = Path(args.model) if args.model else default_checkpoint()
    labels = [] if "--labels" in args.serve or args.model else ["--labels", " yes", " no"]
    launched = time.monotonic()
    srv = Server(model, *labels, *args.serve, wait=False)
    with srv:
        srv.wait_healthy()
        assert srv.client.post("/classify", json={"input": "ready?"}).status_code == 200
        ready = time.monotonic() - launched  # the command to the first 200
        print(f"soak: ready {ready:.1f} s after launch; {args.clients} clients for {args.minutes:g} min", flush=True)
        before = parse_metrics(srv.client.get("/metrics").text)
        soak = Soak(srv, args, AutoTokenizer.from_pretrained(model))
        asyncio.run(soak.run())
        after = parse_metrics(srv.client.get("/metrics").text)
        routes = {r["route"] for r in soak.records}
        server_counts = {route: round(metric_sum(after, "zp_requests_total", route=route) - metric_sum(before, "zp_requests_total", route=route))
                         for route in routes}  # fmt: skip
        srv.proc.send_signal(signal.SIGTERM)
        try:
            exit_status = srv.proc.wait(120)
        except Exception:  # noqa: BLE001 - reported as no exit status
            exit_status = None
        log = srv.output()
    minutes, recovered = per_minute(soak), recoveries(soak)
    report = {"settings": {**vars(args), "model": str(model)}, "ready_s": ready, "minutes": minutes, "faults": recovered,
              "restart_log": [line for line in log.splitlines() if "restarted in" in line or "ranks started in" in line],
              "targets": TARGETS, "result": verdict(soak, minutes, recovered, server_counts, exit_status, log)}  # fmt: skip
    for m in minutes:
        print(json.dumps(m))
    print(json.dumps({"faults": recovered, **report["result"]}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
