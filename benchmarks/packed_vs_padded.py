"""One serving step's forward, padded against packed, in the same two ranks (shm), alternating.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/packed_vs_padded.py [--rows 8] [--length 496] [--reps 3]

Each rank loads the 82M benchmark checkpoint (bf16, Inductor) as a serving rank does, warms up both
paths, then runs the same ``--steps`` steps of ``--rows`` random prompts of ``--length`` tokens (no shared
prefixes) ``--reps`` times per path: left-padded batches (``worker.score`` without a cache, the path of
models that cannot run packed) and packed steps (``worker.prepare``'s, every serving step since packed
attention). Prints tokens/s per repetition, both ranks together.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=496)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from throughput import build_checkpoint
    from zp_compile.contract import RankSettings, Seq, Wants
    from zp_compile.rank.step import run_step
    from zp_compile.rank.warmup import prepare, warm_up_padded
    from zp_compile.rank.worker import load

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    settings = RankSettings(model=str(build_checkpoint()), ranks=world, dtype="bfloat16", transport="shm")
    model = load(settings, cpu)
    vocab = model.get_output_embeddings().weight.shape[0]
    step_tokens = args.rows * args.length
    # Packed attention first: switching a model's attention implementation recompiles the graphs traced
    # before (their guards read it). A padded batch then runs transformers' SDPA path through it.
    kv = prepare(model, cpu, vocab, 0, step_tokens)  # the packed path's graphs; nothing kept between steps
    warm_up_padded(model, cpu, vocab, step_tokens)  # the padded path's graphs
    g = torch.Generator().manual_seed(rank)
    steps = [[torch.randint(3, vocab, (args.length,), generator=g).tolist() for _ in range(args.rows)] for _ in range(args.steps)]
    figures: dict[str, list[float]] = {"padded": [], "packed": []}
    for _ in range(args.reps):
        for name, cache in (("padded", None), ("packed", kv)):
            dist.barrier()
            start = time.perf_counter()
            for rows in steps:
                run_step(model, [Seq(r, Wants(tokens=[1, 2])) for r in rows], cpu, cache)
            dist.barrier()
            figures[name].append(args.steps * step_tokens * world / (time.perf_counter() - start))
    if rank == 0:
        for name, values in figures.items():
            print(f"{name}: " + " / ".join(f"{v:,.0f}" for v in values) + " tok/s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
