"""CPU calibration: the efficiency a real forward reaches, measured instead of assumed."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .flops import layer_flops
from .hardware import _torch_threads, rank_threads
from .spec import ModelSpec


def calibration_layers(m: ModelSpec) -> int:
    """Decoder layers the calibration forward runs: 0 through the first MoE layer (dense layers first
    where the model has them, as DeepSeek-V3's first 3)."""
    return m.moe_layers[0] + 1


def forward_flops(m: ModelSpec, layers: int, requests: int, context: int) -> float:
    """The planner's count for ``requests`` requests of ``context`` new tokens through decoder layers
    0 .. layers-1 (``layer_flops``; no embedding lookup, no final norm, no lm_head)."""
    return requests * sum(layer_flops(m, i, context).total for i in range(layers))


@dataclass(frozen=True)
class ForwardTiming:
    """One timed forward of the model's first ``layers`` decoder layers (random weights, the model's own
    shapes) on ``requests`` requests of ``context`` tokens, on one rank's threads."""

    layers: int
    requests: int
    context: int
    flops: float  # forward_flops of that batch: what the performance model charges for it
    seconds: float  # measured wall time of one forward (mean over the timed repetitions)
    backend: str
    threads: int

    @property
    def achieved_flops(self) -> float:
        """FLOP/s the planner's count reaches in a real forward: counted FLOPs / measured time."""
        return self.flops / self.seconds

    def efficiency(self, peak_flops: float) -> float:
        """``achieved_flops`` as a fraction of the matmul peak, the performance model's one compute constant:
        with it every layer's predicted time is its counted FLOPs / ``achieved_flops``. Capped at 1, which
        only a disturbed peak measurement would reach."""
        return min(1.0, self.achieved_flops / peak_flops)


def time_forward(config, m: ModelSpec, tokens: int, context: int, *, ranks: int = 1, backend: str = "inductor",
                 seconds: float = 1.0, dtype=None) -> ForwardTiming:
    """Time a forward of ``config``'s first decoder layers through its first MoE layer (``calibration_layers``)
    with random ``dtype`` (default bf16) weights on the plan's batch: ``tokens // context`` requests of
    ``context`` tokens (at least one), under inference_mode, on one rank's threads (``rank_threads``).

    ``backend``: "inductor" compiles the layers with torch.compile as zp_compile.from_pretrained and the
    benchmarks do (Inductor's compile, 5-15 s on 2 cores, precedes the timing and is not timed); "eager" runs
    them uncompiled (about 1.3x slower per FLOP on this project's 2-core CPU at 4,096 tokens). One warm-up
    forward, then forwards for about ``seconds`` (at least one). Routing on random weights is near uniform,
    as in the benchmarks; a trained router's skew is not reproduced.
    """
    import copy

    import torch
    from transformers import AutoModel

    if backend not in ("inductor", "eager"):
        raise ValueError(f"backend must be 'inductor' or 'eager', got {backend!r}")
    layers, requests = calibration_layers(m), max(1, tokens // context)
    config = copy.deepcopy(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    text.num_hidden_layers = layers
    threads, share = rank_threads(ranks)
    with torch.random.fork_rng(devices=[]), _torch_threads(threads):
        torch.manual_seed(0)
        body = AutoModel.from_config(text, dtype=dtype or torch.bfloat16).eval()  # no lm_head: not counted
        run = torch.compile(body) if backend == "inductor" else body
        ids = torch.randint(0, text.vocab_size, (requests, context))  # [R, c]
        with torch.inference_mode():
            run(input_ids=ids)  # warm-up: compiles, allocates, picks kernels
            n, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds or n == 0:
                run(input_ids=ids)
                n += 1
    # Below one thread per rank the ranks time-share a core: a forward takes 1/share as long.
    return ForwardTiming(layers, requests, context, forward_flops(m, layers, requests, context), elapsed / n / share, backend, threads)
