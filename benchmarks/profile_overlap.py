"""One profiled AsyncEP forward per rank: a Chrome trace and the share of gather time overlapped.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/profile_overlap.py --out traces/

Open ``traces/rank0.json`` in chrome://tracing or https://ui.perfetto.dev. The thread running the model
shows the compiled forward's operators; ``_c10d_functional::all_gather_into_tensor`` marks where a
layer's gather is issued (one layer ahead) and ``_c10d_functional::wait_tensor`` where the model blocks
for it. On CPU gloo moves the bytes on its own threads (``gloo:all_gather``); on GPUs (``--device cuda``
or auto, NCCL) the trace holds the device timeline, and NCCL's kernels on their stream are read against
the compute kernels. The overlap fraction printed is |gather ∩ compute| / |gather|
(``zp_compile.tools.profiling``); ``wait`` is the time compute stalled for a gather.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import zp_compile
from zp_compile.devices import process_group_backend, resolve_device, synchronize
from zp_compile.tools.profiling import overlap_from_events

from throughput import checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("traces"))
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--device", default="auto", help="cuda (rank i on cuda:LOCAL_RANK), cpu, or auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(process_group_backend(device))
    if device.type == "cpu":
        torch.set_num_threads(1)
    rank = dist.get_rank()
    model = zp_compile.from_pretrained(checkpoint(rank), dtype=torch.bfloat16, device=device, prefetch=args.prefetch)
    ids = torch.randint(3, model.config.vocab_size, (args.tokens // args.context, args.context), device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        model(input_ids=ids)  # compile
        model(input_ids=ids)
        synchronize(device)
        dist.barrier()
        with profile(activities=activities) as prof:
            model(input_ids=ids)
            synchronize(device)
    args.out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(args.out / f"rank{rank}.json"))
    o = overlap_from_events(prof.profiler.function_events)
    row = {"rank": rank, "gather_ms": o.gather_us / 1e3, "overlapped_ms": o.overlapped_us / 1e3,
           "overlap_fraction": o.fraction, "wait_ms": o.wait_us / 1e3, "compute_ms": o.compute_us / 1e3}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if rank == 0:
        for r in rows:
            print(f"rank {r['rank']}: gather {r['gather_ms']:.1f} ms, overlapped with compute {r['overlapped_ms']:.1f} ms "
                  f"({100 * r['overlap_fraction']:.0f}%), model blocked in wait {r['wait_ms']:.1f} ms, compute {r['compute_ms']:.1f} ms")
        (args.out / "overlap.json").write_text(json.dumps(rows, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
