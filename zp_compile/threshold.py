"""The saturation threshold, measured at start-up on the machine that serves (the deployment plan's
prediction of it is ``costmodel.planning.predict_threshold``).

T = t_gather * F_peak * gamma (the paper's rule): the FLOPs a rank must spend on one MoE layer for the
gather of the next layer's expert bank to hide behind it. t_gather is the slowest layer's gather timed
through the model's own transport (collective or shared memory), of the tensors as stored (a quantized
checkpoint's values and scales, as the forward gathers them); F_peak is a matmul of the model's
dtype timed on the model's device (``costmodel.hardware.measure_matmul_flops``, which the planner's cpu
profile uses too). Both are timed with the device synchronised around them (``devices.synchronize``: on a
GPU the host clock alone would time the launches). Every rank measures and the ranks agree on the worst
case (max t_gather, min F_peak) with one all-reduce, on the device the group's backend moves (CUDA for
NCCL, the CPU for gloo), so every rank's scheduler sees the same T.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .costmodel.flops import threshold_at
from .costmodel.hardware import measure_matmul_flops
from .costmodel.spec import spec_from_config
from .devices import collective_device, module_device, synchronize
from .models.rewrite import expert_bytes, gather_stored


@dataclass(frozen=True)
class MeasuredThreshold:
    t_gather_s: float  # slowest MoE layer's gather, every expert tensor of the layer, worst rank
    peak_flops: float  # matmul FLOP/s at the model's dtype, slowest rank
    gamma: float
    context: int  # request length the token figures assume
    flops_per_layer: float  # T = t_gather * F_peak * gamma
    tokens: float  # tokens per rank per step at which the thinnest MoE layer reaches T
    flops_per_step: float  # those tokens' FLOPs through the whole model, per rank


def _median_seconds(fn, reps: int, device: torch.device) -> float:
    times = []
    for _ in range(reps + 1):  # the first run warms up (allocations, pools)
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)  # an NCCL all-gather returns once queued: wait for it to land
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure_gather_s(model: nn.Module, reps: int = 3) -> float:
    """Seconds to gather the largest sharded MoE layer, through the model's transport. Collective: call
    it on every rank of the group (layers are gathered in the same order everywhere). A quantized layer
    is gathered as stored (values and scales), not decoded: the bytes a forward moves, and no compute."""
    layers = model.zero_prefill.sharded_layers
    if not layers:
        return 0.0
    largest = max(layers, key=lambda layer: expert_bytes([layer]))

    def gather() -> None:
        gather_stored(largest.module)  # the eager gathers of the stored tensors: all-gather or shared-memory copy

    if model.zero_prefill.group is not None:
        dist.barrier(model.zero_prefill.group)
    with torch.inference_mode():
        return _median_seconds(gather, reps, module_device(model))


def measure_threshold(model: nn.Module, *, gamma: float = 1.2, context: int = 2048, reps: int = 3) -> MeasuredThreshold:
    """Measure T for an optimized ``model`` (collective over its group: call on every rank)."""
    if not hasattr(model, "zero_prefill"):
        raise ValueError(f"{type(model).__name__} is not optimized: call zp_compile.optimize or from_pretrained first")
    if gamma <= 0 or context <= 0:
        raise ValueError(f"gamma and context must be positive, got gamma={gamma}, context={context}")
    t_gather = measure_gather_s(model, reps)
    device = module_device(model)
    peak = measure_matmul_flops(model.dtype, seconds=0.3, device=device)
    group = model.zero_prefill.group
    if group is not None:
        worst = torch.tensor([t_gather, -peak], dtype=torch.float64, device=collective_device(group, device))
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)  # every rank gets the same T
        t_gather, peak = worst[0].item(), -worst[1].item()
    spec = spec_from_config(model.config)
    T, tokens, per_step = threshold_at(spec, t_gather, peak, gamma, context)
    return MeasuredThreshold(t_gather, peak, gamma, context, T, tokens, per_step)
