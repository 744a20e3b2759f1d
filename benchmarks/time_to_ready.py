"""Time to ready: from the ``zp-compile serve`` command to its first 200, cold and with a warm compile cache.

    python benchmarks/time_to_ready.py --starts 3 --json benchmarks/results-startup-2rank-cpu.json [-- serve flags]

Each run starts the server as a user would (a new process, the default model unless ``--model`` is
among the serve flags), polls ``POST /v1/completions`` (one token; any model, no ``--labels`` needed)
until it answers 200, reads ``/health``'s start-up
phases (the slowest rank's load, compile, warm-up, threshold; launch; total) and stops it with SIGTERM.
The first start uses a new, empty ``TORCHINDUCTOR_CACHE_DIR`` (cold); the later ones the same
directory (warm). The compile caches' hits and misses are rank 0's, from the server's log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def start_once(flags: list[str], cache_dir: str, timeout: float) -> dict:
    from server_utils import free_port

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    log = tempfile.NamedTemporaryFile("w+", prefix="zp-ttr-", suffix=".log", delete=False)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "zp_compile.cli", "serve", "--port", str(port), *flags], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {Path(log.name).read_text()[-3000:]}")
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"no 200 within {timeout} s: {Path(log.name).read_text()[-3000:]}")
            try:
                if httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hello", "max_tokens": 1}, timeout=30).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        seconds = time.monotonic() - started
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    caches = re.search(r"compile caches \(rank 0\): (.*)", Path(log.name).read_text())
    return {"first_200_s": seconds, "startup": health.get("startup"), "caches": caches.group(1).strip() if caches else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=3, help="the first cold, the rest warm")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json")
    parser.add_argument("flags", nargs="*", help="zp-compile serve flags (after --)")
    args = parser.parse_args()
    cache_dir = tempfile.mkdtemp(prefix="zp-ttr-cache-")
    runs = []
    for i in range(args.starts):
        r = start_once(args.flags, cache_dir, args.timeout)
        r["cache"] = "cold" if i == 0 else "warm"
        runs.append(r)
        phases = ", ".join(f"{k} {v:.1f}" for k, v in (r["startup"] or {}).items())
        print(f"start {i + 1} ({r['cache']}): first 200 after {r['first_200_s']:.1f} s; phases (s): {phases}; caches: {r['caches']}", flush=True)
    if args.json:
        out = Path(args.json)
        results = json.loads(out.read_text()) if out.exists() else []
        results.append({"flags": args.flags, "runs": runs, "when": time.strftime("%Y-%m-%d %H:%M")})
        out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
