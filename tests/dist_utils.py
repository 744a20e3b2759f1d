"""Run a function on N real CPU processes joined in a gloo process group (no GPU needed)."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import tempfile
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, out_dir: str, fn, args) -> None:
    import torch
    import torch.distributed as dist

    # One thread per rank: ranks share the machine's cores, as they would share a host.
    torch.set_num_threads(1)
    # Code that reads torchrun's environment (transformers' distributed loading) finds the same values.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# Ranks are forked from one server process that imported these once: a fresh interpreter spends ~5 s
# of CPU importing torch and transformers, and the suite starts over a hundred ranks. The server only
# imports (no thread pool, no process group, no compile), so what each rank forks is a clean interpreter
# with its modules loaded; everything else a rank does starts fresh in it, as under "spawn".
multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "transformers",
                                        "transformers.models.auto.modeling_auto", "zp_compile", "zp_compile.optimize",
                                        "workers"])  # fmt: skip


def run_ranks(world_size: int, fn, *args) -> list:
    """``fn(rank, world_size, *args)`` on ``world_size`` processes; returns each rank's (JSON) result."""
    with tempfile.TemporaryDirectory(prefix="zp-ranks-") as tmp:
        init_file = os.path.join(tmp, "init")
        mp.start_processes(
            _entry, args=(world_size, init_file, tmp, fn, args), nprocs=world_size, join=True, start_method="forkserver"
        )
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world_size)]


@contextlib.contextmanager
def fake_world(world_size: int, rank: int = 0):
    """A process group of ``world_size`` whose collectives do nothing: enough to trace and compile."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def captured_graphs():
    """Collect the graphs the AsyncEP passes ran on (after the passes)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from zp_compile import backend as zp_backend

    graphs = []
    original = zp_backend.ZeroPrefillGraphPass.__call__

    def capture(self, graph):
        original(self, graph)
        graphs.append(graph)

    zp_backend.ZeroPrefillGraphPass.__call__ = capture
    # A compile cache hit never runs the passes, and so shows no graph: a warm cache (a second run of the
    # suite, or a graph an earlier test compiled alike) would leave nothing to check.
    try:
        with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
            yield graphs
    finally:
        zp_backend.ZeroPrefillGraphPass.__call__ = original
