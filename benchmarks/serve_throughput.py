"""Served tokens/s of ``zp-compile serve`` against the offline optimized forward on the same requests.

    python benchmarks/serve_throughput.py --json benchmarks/results-serve-2rank-cpu.json

Both sides: the benchmark checkpoint of ``throughput.py`` (82M Qwen3-MoE shape, bf16), the same ranks
(torchrun, one thread each), the same settings (``--backend``, ``--transport``), the same requests
(``--requests`` prompts of ``--length`` random tokens, one sequence per request, scored against two
label tokens, as ``/classify`` does).

- offline: each rank loads the model as a serving rank does (``zp_compile.rank``), the requests are cut
  into steps by the server's own scheduler (``FifoScheduler``, same token budget), and every rank runs
  its batch of every step; tokens/s = all tokens / wall time of all steps. ``--repeats`` times.
- served: the server is started with the same settings; after start-up (load + compile, not timed),
  a client (aiohttp) sends every request as its own ``POST /classify`` with ``--concurrency`` in flight; tokens/s =
  all tokens / time from the first send to the last answer, ``--repeats`` times on the same server. ``/health`` is polled every
  ``--health-every`` seconds (0.25) meanwhile from a thread of its own; its latencies are reported (it
  must answer while steps run, and a step here takes about 0.4 s, so every step is probed).

The client and the front end share the 2 cores with the ranks: the served figure pays for them.

The ratio is median served over median offline: on a shared 2-core machine one run of either side moves
by 5-10% from the next, more than the difference being measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LABELS = [" yes", " no"]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def requests(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def offline_rank(args) -> None:
    """Under torchrun: every rank runs every step of the scheduler's packing of the requests."""
    import torch
    import torch.distributed as dist

    from zp_compile.contract import RankSettings, Wants
    from zp_compile.rank.step import run_step
    from zp_compile.rank.warmup import prepare
    from zp_compile.rank.worker import configure_process, load
    from zp_compile.server.scheduler import FifoScheduler, Sequence

    configure_process()  # as a serving rank's process is configured
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    settings = RankSettings(model=args.model, ranks=world, backend=args.backend, transport=args.transport, dtype="bfloat16",
                            regional=args.regional_compile)  # fmt: skip
    model = load(settings, torch.device("cpu"))
    vocab = model.get_output_embeddings().weight.shape[0]
    kv = prepare(model, torch.device("cpu"), vocab, 0, args.max_tokens_per_rank)  # as a serving rank does: packed steps
    label_ids = args.label_ids
    scheduler = FifoScheduler(world, args.max_tokens_per_rank)
    scheduler.add([Sequence(ids, Wants(tokens=label_ids)) for ids in requests(args.requests, args.length, vocab)])
    steps = []
    while scheduler.waiting():
        steps.append(scheduler.next_step())
    runs = []
    for _ in range(args.repeats):
        dist.barrier()
        start = time.perf_counter()
        for batches in steps:
            run_step(model, [s.message() for s in batches[rank]], torch.device("cpu"), kv)
        dist.barrier()
        runs.append(time.perf_counter() - start)
    if rank == 0:
        tokens = args.requests * args.length
        seconds = statistics.median(runs)
        Path(args.out).write_text(json.dumps({"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "steps": len(steps),
                                              "tokens_per_s_runs": [tokens / t for t in runs]}))  # fmt: skip
    dist.destroy_process_group()


async def client(url: str, prompts: list[list[int]], concurrency: int, health_every: float) -> dict:
    """``concurrency`` requests in flight through one aiohttp session (the client of vLLM's serving
    benchmark: on this machine it takes half the CPU httpx's AsyncClient took for the same requests, CPU
    the ranks then keep); ``/health`` polled every ``health_every`` seconds from a thread of its own.
    Polled every 50 ms, the probe was 40% of the requests the front end answered and about a third of
    the CPU the front end and the client took from the ranks."""
    import aiohttp
    import httpx

    latencies, codes, health = [], [], []
    done = threading.Event()

    def poll_health():  # own thread and connection: the load's event loop must not delay the probe
        with httpx.Client(base_url=url, timeout=30) as c:
            while not done.is_set():
                t = time.perf_counter()
                r = c.get("/health")
                health.append((time.perf_counter() - t, r.status_code))
                time.sleep(health_every)

    limit = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency + 1)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as c:

        async def one(ids):
            async with limit:
                t = time.perf_counter()
                async with c.post("/classify", json={"input": ids}) as r:
                    await r.read()
                    latencies.append(time.perf_counter() - t)
                    codes.append(r.status)

        poller = threading.Thread(target=poll_health)
        poller.start()
        start = time.perf_counter()
        await asyncio.gather(*(one(ids) for ids in prompts))
        seconds = time.perf_counter() - start
        done.set()
        poller.join()
    return {"seconds": seconds, "latencies": latencies, "codes": codes, "health": health}


def served(args, prompts: list[list[int]], concurrency: int) -> dict:
    import httpx

    sys.path.insert(0, str(HERE.parent / "tests"))
    from server_utils import Server

    flags = ["--tokenizer", args.tokenizer, "--labels", *LABELS, "--nproc", str(args.nproc), "--backend", args.backend,
             "--transport", args.transport, "--dtype", "bfloat16", "--max-tokens-per-rank", str(args.max_tokens_per_rank),
             "--regional-compile" if args.regional_compile else "--no-regional-compile", "--max-waiting", str(max(4096, len(prompts))), "--log-level", "warning"]  # fmt: skip
    with Server(Path(args.model), *flags) as srv:
        asyncio.run(client(srv.url, prompts[: 2 * args.nproc], 2 * args.nproc, args.health_every))  # first requests: warm caches
        runs = []
        for _ in range(args.repeats):
            steps = srv.metric("zp_steps_total")
            runs.append(asyncio.run(client(srv.url, prompts, concurrency, args.health_every)))
            runs[-1]["server_steps"] = srv.metric("zp_steps_total") - steps
        result = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]  # the median run
        result["seconds_runs"] = [r["seconds"] for r in runs]
        result["server_steps"] = [r["server_steps"] for r in runs]
        result["health_after"] = httpx.get(srv.url + "/health").status_code
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--length", type=int, default=496, help="tokens per request (the model's limit is 512)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--transport", default="shm", choices=["shm", "collective"])
    parser.add_argument("--max-tokens-per-rank", type=int, default=4096)
    parser.add_argument("--regional-compile", action=argparse.BooleanOptionalAction, default=True,
                        help="both sides compile a decoder layer at a time (serve's default) or the whole model")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[64, 8], help="served runs (none: offline only)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side; the median is reported")
    parser.add_argument("--health-every", type=float, default=0.25, help="seconds between /health probes during the run")
    parser.add_argument("--json", help="append the results to this file")
    parser.add_argument("--offline-rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--label-ids", type=int, nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.offline_rank:
        return offline_rank(args)

    from transformers import AutoConfig

    from throughput import build_checkpoint
    from zp_compile.models import tiny_tokenizer
    from zp_compile.server.inputs import label_token_ids

    args.model = str(build_checkpoint())
    args.tokenizer = str(Path(tempfile.gettempdir()) / "zp-bench-tokenizer")
    tokenizer = tiny_tokenizer(args.tokenizer)
    args.label_ids = label_token_ids(tokenizer, LABELS)
    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    prompts = requests(args.requests, args.length, vocab)

    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", __file__, "--offline-rank",
               "--model", args.model, "--backend", args.backend, "--transport", args.transport, "--requests", str(args.requests),
               "--length", str(args.length), "--max-tokens-per-rank", str(args.max_tokens_per_rank), "--out", out.name, "--repeats", str(args.repeats),
               "--regional-compile" if args.regional_compile else "--no-regional-compile",
               "--label-ids", *map(str, args.label_ids)]  # fmt: skip
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        offline = json.loads(Path(out.name).read_text())
    tokens = args.requests * args.length
    print(f"{tokens:,} tokens in {args.requests} requests of {args.length}; {args.nproc} ranks, {args.backend}, transport {args.transport}, "
          f"{'regional' if args.regional_compile else 'whole-graph'} compile, "
          f"{args.max_tokens_per_rank} tokens per rank per step")  # fmt: skip
    spread = ", ".join(f"{x:,.0f}" for x in offline["tokens_per_s_runs"])
    print(f"offline optimized forward: {offline['tokens_per_s']:,.0f} tok/s median ({spread}; {offline['steps']} steps, {offline['seconds']:.2f} s)")
    rows = []
    for concurrency in args.concurrency:
        r = served(args, prompts, concurrency)
        ok = r["codes"].count(200)
        health = [t for t, code in r["health"]]
        row = {
            "concurrency": concurrency, "tokens_per_s": tokens / r["seconds"], "ratio_to_offline": tokens / r["seconds"] / offline["tokens_per_s"],
            "requests_ok": ok, "requests": len(r["codes"]), "p50_s": percentile(r["latencies"], 50), "p99_s": percentile(r["latencies"], 99),
            "req_per_s": len(r["codes"]) / r["seconds"], "health_polls": len(health), "health_p50_ms": 1e3 * percentile(health, 50),
            "health_max_ms": 1e3 * max(health), "health_non_200": sum(1 for _, c in r["health"] if c != 200), "server_steps": r["server_steps"],
            "tokens_per_s_runs": [tokens / t for t in r["seconds_runs"]],
        }  # fmt: skip
        rows.append(row)
        spread = ", ".join(f"{x:,.0f}" for x in row["tokens_per_s_runs"])
        print(f"served, concurrency {concurrency:3d}: {row['tokens_per_s']:,.0f} tok/s median ({spread}) = {row['ratio_to_offline']:.3f}x offline; "
              f"{ok}/{len(r['codes'])} answered 200; {row['req_per_s']:.1f} req/s; latency p50 {row['p50_s']:.2f} s, p99 {row['p99_s']:.2f} s; "
              f"/health during the run: {len(health)} polls, p50 {row['health_p50_ms']:.1f} ms, max {row['health_max_ms']:.1f} ms")  # fmt: skip
    if args.json:
        path = Path(args.json)
        results = json.loads(path.read_text()) if path.exists() else []
        results.append({"settings": {k: v for k, v in vars(args).items() if k in ("requests", "length", "nproc", "backend", "transport", "max_tokens_per_rank", "health_every", "repeats", "regional_compile")},
                        "offline": offline, "served": rows, "when": time.strftime("%Y-%m-%d %H:%M")})  # fmt: skip
        path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
