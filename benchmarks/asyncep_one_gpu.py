"""AsyncEP's overlap cost measured on ONE device: the sharded graph of a world of N, its gathers replaced
by device-to-device copies of the bytes the other N - 1 ranks would send.

    python benchmarks/asyncep_one_gpu.py --device cuda              # Qwen3-30B-A3B-shaped stack, N = 8
    python benchmarks/asyncep_one_gpu.py --device cpu --tiny        # the same code path on CPU

``zp_compile.optimize`` runs on torch's fake process group of ``--world`` ranks (one process; it gives
the collectives their shapes and group name). The graph is exactly a rank's: experts sharded 1/N, each
layer's bank all-gathered one layer ahead (``_c10d_functional.all_gather_into_tensor``), a
``wait_tensor`` before use. ``simulated_gathers()`` replaces those two ops' kernels for the block: the
all-gather copies (N - 1)/N of its output from a scratch buffer on a side stream of its own, so the copy
competes with compute for HBM bandwidth and SMs as a real NVLink gather's receive does, and the wait
makes the compute stream wait for that copy's event (no host sync). ``copy=False`` runs the same graph
with the all-gather only allocating its output: the compute alone. The ratio of the two step times is
the cost of the overlap; AsyncEP's target is <= 1.05 at T*.

The logits are not the model's (the other ranks' rows are scratch): this measures time, not numerics.
A copy within one GPU runs at about 4.3 TB/s (read + write) on an H200, a real gather at NVLink's
~450 GB/s per direction: the copy is the HBM and SM contention of a gather, not its latency; the gather's
latency is what T* hides (``zp_compile.measure_threshold`` and the planner).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.distributed as dist


class SimulatedGathers:
    """Kernels for ``_c10d_functional.all_gather_into_tensor`` and ``wait_tensor`` on CPU and CUDA."""

    def __init__(self):
        self.copy = True
        self.copied_bytes = 0
        self._scratch: dict[tuple, torch.Tensor] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._pending: dict[int, object] = {}  # output's data_ptr -> the side stream's event

    def all_gather(self, input: torch.Tensor, group_size: int, group_name: str) -> torch.Tensor:
        shape = (input.shape[0] * group_size, *input.shape[1:])
        if not self.copy:
            # No device work at all: a zero tensor kept per shape (uninitialised memory could hold
            # denormals or NaNs, which slow a CPU's matmuls and would bias the comparison).
            key = ("idle", input.device, input.dtype, *shape)
            if key not in self._scratch:
                self._scratch[key] = torch.zeros(shape, dtype=input.dtype, device=input.device)
            return self._scratch[key]
        out = input.new_empty(shape)
        others = out.shape[0] - input.shape[0]  # rows the other ranks would send
        key = (out.device, out.dtype, others, *out.shape[1:])
        if key not in self._scratch:
            self._scratch[key] = torch.zeros((others, *out.shape[1:]), dtype=out.dtype, device=out.device)
        self.copied_bytes += self._scratch[key].nbytes
        if out.device.type != "cuda":
            out[: input.shape[0]].copy_(input)
            out[input.shape[0] :].copy_(self._scratch[key])
            return out
        side = self._streams.setdefault(out.device, torch.cuda.Stream(out.device))
        side.wait_stream(torch.cuda.current_stream(out.device))  # the input is ready
        with torch.cuda.stream(side):
            out[: input.shape[0]].copy_(input)
            out[input.shape[0] :].copy_(self._scratch[key])
            event = torch.cuda.Event()
            event.record(side)
        out.record_stream(side)
        input.record_stream(side)
        self._pending[out.data_ptr()] = event
        return out

    def wait(self, tensor: torch.Tensor) -> torch.Tensor:
        event = self._pending.pop(tensor.data_ptr(), None)
        if event is not None:
            torch.cuda.current_stream(tensor.device).wait_event(event)
        return tensor


@contextlib.contextmanager
def simulated_gathers():
    """The functional all-gather and wait as ``SimulatedGathers`` kernels for the block."""
    import warnings

    sim = SimulatedGathers()
    lib = torch.library.Library("_c10d_functional", "IMPL")  # noqa: TOR901 - destroyed on exit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel": the point here
        for key in ("CPU", "CUDA"):
            lib.impl("all_gather_into_tensor", sim.all_gather, key)
            lib.impl("wait_tensor", sim.wait, key)
    try:
        yield sim
    finally:
        lib._destroy()


def init(world: int) -> None:
    """Start the default group as rank 0 of torch's fake process group of ``world`` ranks."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


def step_times(model, ids: torch.Tensor, iters: int, device: torch.device) -> list[float]:
    from zp_compile.devices import synchronize

    times = []
    for _ in range(iters):
        synchronize(device)
        t = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1)
        synchronize(device)
        times.append(time.perf_counter() - t)
    return times


def measure(model, ids: torch.Tensor, iters: int, device: torch.device) -> dict:
    """An optimized model on the fake group: step time with the gathers' copies and without,
    interleaved (copy, no copy, copy, ...) so that clocks and thermals drift alike for both."""
    with torch.inference_mode(), simulated_gathers() as sim:
        for copy in (True, False):  # warm-up and compile (the graph is the same for both)
            sim.copy = copy
            model(input_ids=ids, logits_to_keep=1)
        with_copy, without = [], []
        copied = sim.copied_bytes
        for _ in range(iters):
            sim.copy = True
            with_copy += step_times(model, ids, 1, device)
            sim.copy = False
            without += step_times(model, ids, 1, device)
        per_step = (sim.copied_bytes - copied) / iters
    a, b = statistics.median(with_copy), statistics.median(without)
    return {"step_s_with_copies": a, "step_s_without": b, "overlap_cost": a / b, "copied_bytes_per_step": per_step,
            "times_with_copies_s": with_copy, "times_without_s": without}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seqs", type=int, default=4)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    from gpu_check import build_config, build_model

    import zp_compile

    device = torch.device(args.device)
    init(args.world)
    config = build_config(argparse.Namespace(tiny=args.tiny, layers=args.layers))
    model = build_model(config, device)
    zp_compile.optimize(model, backend="inductor")
    ids = torch.randint(3, config.vocab_size, (args.seqs, 32 if args.tiny else args.context), device=device)
    r = measure(model, ids, args.iters, device)
    print(f"world {args.world} on one {device}: {len(model.zero_prefill.sharded_layers)} sharded layers; step {r['step_s_with_copies'] * 1e3:.1f} ms "
          f"with the gathers' copies, {r['step_s_without'] * 1e3:.1f} ms without: overlap cost {r['overlap_cost']:.3f}")  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
