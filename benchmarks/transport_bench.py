"""Gather bandwidth and CPU cost per gather: gloo all-gather, gloo point-to-point, shared memory.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/transport_bench.py [--json out.json]
    python benchmarks/transport_bench.py --nproc 2 [--json out.json]      (spawns the ranks itself)

For each full gathered size (MiB, bf16 rows of 2048 values, N equal shards) every rank gathers the
whole tensor with:

- ``gloo_all_gather``: ``dist.all_gather_into_tensor`` into a preallocated buffer;
- ``gloo_p2p``: ``isend`` of the own shard to / ``irecv`` from every peer into a preallocated buffer;
- ``shm_copy_fresh``: the same copy out of shared memory into a fresh ``torch.empty`` every time (shows
  the page-fault cost of large fresh allocations that the exchange's output pool avoids);
- ``shm_copy``: ``ShmExpertExchange.gather(key)``, what ``zp_compile::shm_gather`` runs: an output from
  the pool, each previous output dropped before the next gather, as in serving;
- ``shm_copy_out``: ``gather(key, out=buf)`` into a buffer kept between gathers;
- ``shm_view``: ``view(key)``, zero-copy (no bytes move; its rate is not a bandwidth).

All ranks start each method together (barrier) and run it concurrently, so shared-memory copies compete
for memory bandwidth as they would in serving. Reported per method: wall ms per gather (slowest rank;
median of ``--repeats`` timed loops), GB/s received per rank (bytes from peers, (N-1)/N of the full
size, 1 GB = 1e9 B), GB/s gathered per rank (the full size) and CPU ms per gather
(``time.process_time``: all threads of the process, gloo's included, kernel time included; mean over
ranks). The ``read_*`` rows multiply the whole gathered tensor by a vector (``[N*S, 2048] @ [2048, 1]``,
bandwidth-bound), reading it from the shared view and from a private copy, to show that computing from
shared memory costs nothing extra.

``THP_MEM_ALLOC_ENABLE=1`` in the environment makes PyTorch back large allocations with huge pages,
which changes ``shm_copy_fresh`` a lot; the header says whether it was set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

ROW = 2048  # bf16 values per row
SIZES_MB = (4, 16, 64, 256)
METHODS = ("gloo_all_gather", "gloo_p2p", "shm_copy_fresh", "shm_copy", "shm_copy_out", "shm_view")


def _iters(method: str, mb: int) -> int:
    """Fixed per (method, size), the same on every rank: a rank-dependent count would deadlock gloo."""
    if method == "gloo_all_gather":  # ~0.2 GB/s here: keep it to a few seconds
        return max(2, 40 // mb)
    if method == "shm_view":
        return 1000
    return max(3, 200 // mb)


def _time(fn, iters: int, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds per call: the median of ``repeats`` timed loops of ``iters`` calls."""
    fn()  # warm-up (first touch of buffers, connection set-up)
    samples = []
    for _ in range(repeats):
        dist.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(iters):
            fn()
        samples.append(((time.perf_counter() - wall) / iters, (time.process_time() - cpu) / iters))
    return sorted(samples)[len(samples) // 2]


def bench(rank: int, world_size: int, sizes_mb: list[int], repeats: int) -> list[dict]:
    from zp_compile.transport import ShmExpertExchange

    # The baseline is the call zp_compile's lowering uses today, deprecated name or not.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    rows = []
    for mb in sizes_mb:
        shard_rows = -(-(mb * 2**20 // (2 * ROW)) // world_size)  # S
        shard = torch.full((shard_rows, ROW), float(rank + 1), dtype=torch.bfloat16)  # [S, ROW]
        shard_bytes = shard.numel() * shard.element_size()
        out = torch.zeros(world_size * shard_rows, ROW, dtype=torch.bfloat16)  # [N*S, ROW]
        parts = out.chunk(world_size)

        def all_gather():
            dist.all_gather_into_tensor(out, shard)

        def p2p():
            reqs = []
            for peer in range(world_size):
                if peer != rank:
                    reqs += [dist.isend(shard, peer), dist.irecv(parts[peer], peer)]
            parts[rank].copy_(shard)
            for r in reqs:
                r.wait()

        exchange = ShmExpertExchange.create(None, {(0, 0): shard})
        kept = torch.zeros_like(out)
        methods = {
            "gloo_all_gather": all_gather,
            "gloo_p2p": p2p,
            "shm_copy_fresh": lambda: torch.empty(out.shape, dtype=out.dtype).copy_(exchange.view((0, 0))),
            "shm_copy": lambda: exchange.gather((0, 0)),
            "shm_copy_out": lambda: exchange.gather((0, 0), out=kept),
            "shm_view": lambda: exchange.view((0, 0)),
        }
        expected = torch.arange(1, world_size + 1, dtype=torch.bfloat16).repeat_interleave(shard_rows)[:, None]
        for name in METHODS:
            out.zero_()
            wall, cpu = _time(methods[name], _iters(name, mb), repeats)
            got = {"gloo_all_gather": out, "gloo_p2p": out, "shm_copy_out": kept}.get(name)
            got = methods[name]() if got is None else got
            if not torch.equal(got[:, :1], expected) or not torch.equal(got[:, -1:], expected):
                raise RuntimeError(f"{name} gathered wrong data at {mb} MiB on rank {rank}")
            rows.append(
                {"mb": mb, "method": name, "iters": _iters(name, mb), "wall_s": wall, "cpu_s": cpu,
                 "received_bytes": (world_size - 1) * shard_bytes, "gathered_bytes": world_size * shard_bytes}
            )
        # Reading the bank: from the shared view vs from a private copy (e.g. a matmul's weight reads).
        private = exchange.view((0, 0)).clone()
        vec = torch.ones(ROW, 1, dtype=torch.bfloat16)  # [ROW, 1]: a matrix-vector product reads every weight once
        for name, src in (("read_shm_view", exchange.view((0, 0))), ("read_private", private)):
            wall, cpu = _time(lambda: src @ vec, max(3, 200 // mb), repeats)
            rows.append({"mb": mb, "method": name, "iters": max(3, 200 // mb), "wall_s": wall, "cpu_s": cpu,
                         "received_bytes": 0, "gathered_bytes": world_size * shard_bytes})
        exchange.close()
        del exchange, private, out, kept
    return rows


def summarize(per_rank: list[list[dict]]) -> list[dict]:
    table = []
    for i, row in enumerate(per_rank[0]):
        wall = max(r[i]["wall_s"] for r in per_rank)
        cpu = sum(r[i]["cpu_s"] for r in per_rank) / len(per_rank)
        table.append(
            {**{k: row[k] for k in ("mb", "method", "iters", "received_bytes", "gathered_bytes")},
             "ms_per_gather": wall * 1e3, "cpu_ms_per_gather": cpu * 1e3,
             "recv_GBps": row["received_bytes"] / wall / 1e9, "gathered_GBps": row["gathered_bytes"] / wall / 1e9}
        )
    return table


def print_table(table: list[dict], header: dict) -> None:
    print(", ".join(f"{k}={v}" for k, v in header.items()))
    print(f"{'MiB':>5} {'method':<16} {'ms/gather':>10} {'recv GB/s':>10} {'gathered GB/s':>14} {'CPU ms/gather':>14}")
    for r in table:
        zero_copy = r["method"] == "shm_view"
        reading = r["method"].startswith("read_")
        recv = "-" if zero_copy or reading else f"{r['recv_GBps']:.2f}"
        gathered = "(no copy)" if zero_copy else f"{r['gathered_GBps']:.2f}" + (" read" if reading else "")
        print(f"{r['mb']:>5} {r['method']:<16} {r['ms_per_gather']:>10.4f} {recv:>10} {gathered:>14} {r['cpu_ms_per_gather']:>14.4f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=list(SIZES_MB))
    parser.add_argument("--repeats", type=int, default=3, help="timed loops per cell; the median is reported")
    parser.add_argument("--nproc", type=int, default=2, help="ranks to spawn when not launched by torchrun")
    args = parser.parse_args()
    header = {
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads_per_rank": None,
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
        "repeats": args.repeats,
    }
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group("gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        header.update(world_size=world_size, threads_per_rank=torch.get_num_threads())
        mine = bench(rank, world_size, args.sizes_mb, args.repeats)
        per_rank = [None] * world_size
        dist.all_gather_object(per_rank, mine)
        dist.barrier()
        dist.destroy_process_group()
        if rank != 0:
            return
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from dist_utils import run_ranks  # sets one thread per rank

        header.update(world_size=args.nproc, threads_per_rank=1)
        per_rank = run_ranks(args.nproc, bench, args.sizes_mb, args.repeats)
    table = summarize(per_rank)
    print_table(table, header)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": table, "per_rank": per_rank}, indent=1))


if __name__ == "__main__":
    main()
