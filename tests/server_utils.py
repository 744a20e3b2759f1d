"""Start ``zp-compile serve`` as a real subprocess (real ranks under torchrun) and talk to it over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

STARTUP_S = 300  # loading + compiling on 2 busy cores


def free_port(consecutive: int = 1) -> int:
    """A port free now, with the ``consecutive - 1`` ports after it (``--worker-port`` P takes P and P + 1)."""
    while True:
        with contextlib.ExitStack() as held:
            first = held.enter_context(socket.socket())
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                for k in range(1, consecutive):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port + k))
            except (OSError, OverflowError):  # taken, or past 65535
                continue
            return port


class Server:
    """``with Server(model, "--backend", "eager") as srv: srv.client.post(...)``."""

    def __init__(self, model: Path, *args: str, api_key: str | None = None, wait: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["--model", str(model), "--port", str(self.port), *args]
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if api_key:
            self.args += ["--api-key", api_key]
        self.wait = wait
        self.log = tempfile.NamedTemporaryFile("w+", prefix="zp-serve-", suffix=".log", delete=False)

    def __enter__(self) -> Server:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "zp_compile.cli", "serve", *self.args], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.client = httpx.Client(base_url=self.url, headers=self.headers, timeout=120)
        if self.wait:
            self.wait_healthy()
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill_tree()
        self.kill_tree()  # stray ranks, whatever happened
        self.log.close()

    def wait_healthy(self, timeout: float = STARTUP_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not healthy within {timeout} s:\n{self.output()[-4000:]}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def ranks(self) -> list[psutil.Process]:
        """The worker rank processes (not torchrun's agent), in rank order."""
        procs = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmd = child.cmdline()
            except psutil.Error:
                continue
            if "zp_compile.rank" in cmd and "torch.distributed.run" not in cmd:
                procs.append(child)
        return procs

    def kill_tree(self) -> None:
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True) + [psutil.Process(self.proc.pid)]
        except psutil.Error:
            return
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include ``labels``."""
        from zp_compile.tools.bench_serve import metric_sum, parse_metrics

        return metric_sum(parse_metrics(self.client.get("/metrics").text), name, **labels)


def flood(srv: Server, bodies: list[tuple[str, dict]], concurrency: int, timeout: float = 120) -> list[httpx.Response | Exception]:
    """POST every ``(route, body)`` with ``concurrency`` clients at once; each one's response or client error, in order."""

    async def run():
        limit = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=srv.url, headers=srv.headers, timeout=timeout, limits=httpx.Limits(max_connections=concurrency)) as client:

            async def one(route, body):
                async with limit:
                    try:
                        return await client.post(route, json=body)
                    except httpx.HTTPError as e:
                        return e

            return await asyncio.gather(*(one(route, body) for route, body in bodies))

    return asyncio.run(run())


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout} s waiting for {what}")
        time.sleep(0.01)
