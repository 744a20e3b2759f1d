"""Deployment plan: memory per GPU, the predicted saturation threshold T* and predicted throughput of
AsyncEP against tensor (TP), expert (EP) and pipeline (PP) parallelism, for a MoE model on N accelerators.

Pure arithmetic on a ``ModelSpec`` and a ``Hardware`` profile. The model is a roofline with one
efficiency constant, not a simulator: every assumption is written next to the number it produces, and
the CLI prints them. On GPUs the constant is assumed; on a CPU it is measured (``calibrate.time_forward``).

Shape letters: B tokens per GPU per step, c context length, H hidden, I expert width, E experts,
k experts per token, N GPUs, L layers, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .flops import LayerFlops, flops_per_request, layer_flops, threshold_at
from .hardware import Hardware
from .spec import ModelSpec


@dataclass(frozen=True)
class PlanSettings:
    """Deployment and model-of-the-machine settings. One set of constants for every model and GPU.

    efficiency: fraction of peak FLOP/s every strategy's kernels reach (GEMMs, attention, the glue
        between them); the one compute constant. 0.35 is a typical end-to-end MoE prefill figure, assumed
        for the GPU profiles; on a CPU the CLI measures it instead (``time_forward``, ``ForwardTiming.efficiency``).
    link_efficiency: fraction of the link's spec bandwidth a NCCL collective reaches (all-gather,
        all-reduce and all-to-all alike; all-to-all usually does worse, which favours EP).
    ep_imbalance: expert tokens on the busiest rank over the mean, for EP; real routing is skewed
        (uniform routing of 16K tokens would give ~1.02).
    pp_microbatches: micro-batches of B tokens per pipeline step (0: N); the pipeline fills and drains
        once per step, as with a synchronous scheduler.
    prefetch / resident_first_layer: as zp_compile.ZeroPrefillConfig; the paper keeps layer 0 whole.
    kv_cache: keep the batch's KV for every layer (prefix reuse); False: KV-cache-free mode, one layer's.
    offload: move the farthest layers' expert shards to host memory when HBM runs out (hybrid offload).
    memory_utilization: share of HBM the plan may fill (vLLM's default 0.9).
    link_on_compute: the transfers are driven by the compute cores (gloo over TCP between CPU ranks),
        so AsyncEP's gathers add their time to the step instead of hiding behind it; ``link_bw`` is then
        the rate of received bytes per second of the cores' time (what ``benchmarks/transport_bench.py``
        reports as CPU ms per gather). False: a DMA engine or NVLink moves the bytes beside compute.
    """

    gpus: int = 8
    tokens_per_gpu: int = 16384
    context: int = 2048
    gamma: float = 1.2
    efficiency: float = 0.35
    link: str = "nvlink"
    link_bw: float | None = None  # bytes/s, overrides the profile's figure for the chosen link
    link_efficiency: float = 0.8
    ep_imbalance: float = 1.3
    pp_microbatches: int = 0
    prefetch: int = 1
    resident_first_layer: bool = True
    kv_cache: bool = True
    offload: bool = True
    memory_utilization: float = 0.9
    activation_bytes: int = 2  # BF16 activations, KV and collectives' payloads
    link_on_compute: bool = False

    def __post_init__(self) -> None:
        for name in ("gpus", "tokens_per_gpu", "context"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("efficiency", "link_efficiency", "memory_utilization"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.gamma < 1 or self.ep_imbalance < 1 or self.prefetch < 0 or self.pp_microbatches < 0:
            raise ValueError(f"need gamma >= 1 ({self.gamma}), ep_imbalance >= 1 ({self.ep_imbalance}), "
                             f"prefetch >= 0 ({self.prefetch}), pp_microbatches >= 0 ({self.pp_microbatches})")
        if self.link not in ("nvlink", "pcie"):
            raise ValueError(f"link must be 'nvlink' or 'pcie', got {self.link!r}")


# ----------------------------------------------------------------------------------------------------
# Memory


def _shard_rows(m: ModelSpec, n: int) -> int:
    return math.ceil(m.experts / n)  # same rule as zp_compile.sharding.ExpertShard.shard_size


def sharded_layers(m: ModelSpec, s: PlanSettings) -> tuple[int, ...]:
    if s.gpus == 1:
        return ()
    return m.moe_layers[1:] if s.resident_first_layer else m.moe_layers


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU for AsyncEP."""

    dense: float  # replicated: attention, norms, router, shared experts, dense MLPs, embeddings, lm_head
    expert_shards: float  # 1/N of each sharded bank (padded to ceil(E/N) rows), whole resident layer(s)
    in_flight: float  # gathered banks alive at once (prefetch + 1), plus host staging when offloading
    activations: float  # largest block of one layer for B tokens, plus the residual stream
    kv: float
    capacity: float
    usable: float
    offloaded_layers: int = 0  # layers whose shard lives in host memory and crosses PCIe every step
    host_per_gpu: float = 0.0

    @property
    def total(self) -> float:
        return self.dense + self.expert_shards + self.in_flight + self.activations + self.kv

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


def expert_weight_bytes(m: ModelSpec, hw: Hardware) -> float:
    """Bytes per routed-expert weight: a quantized checkpoint's own (scales included), else the profile's."""
    return m.expert_weight_bytes or hw.weight_bytes


def linear_weight_bytes(m: ModelSpec, hw: Hardware) -> float:
    """Bytes per weight of the other linear layers (attention, shared experts, dense MLPs), as above."""
    return m.linear_weight_bytes or hw.weight_bytes


def memory_per_gpu(m: ModelSpec, hw: Hardware, s: PlanSettings) -> Memory:
    w, a, B = expert_weight_bytes(m, hw), s.activation_bytes, s.tokens_per_gpu
    H = m.hidden
    # Embeddings, lm_head, norms and the router stay BF16 in FP8 checkpoints; the rest is at hw.weight_bytes.
    unquantised = [H * m.experts + m.experts * m.expert_bias + 2 * H if i in m.moe_layers else 2 * H for i in range(m.layers)]
    quantised = sum(m.dense_params(i) for i in range(m.layers)) - sum(unquantised)
    dense = quantised * linear_weight_bytes(m, hw) + (sum(unquantised) + m.embed_params + H) * 2
    sharded = sharded_layers(m, s)
    bank = m.bank_params * w
    shard = _shard_rows(m, s.gpus) * m.expert_params * w
    experts = len(sharded) * shard + (len(m.moe_layers) - len(sharded)) * bank
    live = s.prefetch + 1 if sharded else 0  # the passes keep at most prefetch + 1 gathered layers alive
    gathered = _shard_rows(m, s.gpus) * s.gpus * m.expert_params * w
    # Activations, a rough peak: [B, H] residual + normed input, and the larger of the attention block
    # (q and output [B, heads*(qk+v)], k and v: [B, 2*kv_heads*qk], or per head for MLA, which expands
    # its latent in prefill) and the MoE block (per (token, expert) pair [B*k, 2I] gate_up + [B*k, I]
    # activated + [B*k, H] out, fp32 router logits [B, E], shared/dense MLP). No allocator slack.
    kv_act = m.heads * (m.head_dim + m.v_dim) if m.kv_lora_rank else m.kv_elems
    attn = B * (m.heads * (m.head_dim + m.v_dim) + kv_act) * a
    moe = B * m.top_k * (3 * m.expert_ffn + H) * a + B * m.experts * 4 + B * 3 * max(m.shared_ffn, m.dense_ffn) * a
    activations = 2 * B * H * a + max(attn, moe)
    kv = B * m.kv_elems * a * (m.layers if s.kv_cache else 1)
    usable = hw.memory_bytes * s.memory_utilization
    mem = Memory(dense, experts, live * gathered, activations, kv, hw.memory_bytes, usable)
    if mem.fits or not (s.offload and sharded):
        return mem
    staging = live * shard  # each offloaded shard lands in HBM before its all-gather
    k = min(len(sharded), math.ceil((mem.total + staging - usable) / shard))
    return replace(mem, expert_shards=experts - k * shard, in_flight=mem.in_flight + staging, offloaded_layers=k, host_per_gpu=k * shard)


# ----------------------------------------------------------------------------------------------------
# Time


def _link_bw(hw: Hardware, s: PlanSettings) -> float:
    # A rate measured on the cores (link_on_compute) is what the transport reaches already.
    return (s.link_bw or hw.link_bw(s.link)) * (1.0 if s.link_on_compute else s.link_efficiency)


def _compute_s(f: LayerFlops, hw: Hardware, s: PlanSettings, expert_scale: float = 1.0) -> float:
    linear = f.dense + f.experts * expert_scale
    return (linear / hw.peak_flops + f.attention / hw.attention_flops) / s.efficiency


def gather_s(m: ModelSpec, hw: Hardware, s: PlanSettings, offloaded: bool = False) -> float:
    """One layer's all-gather: each GPU receives (N-1) shards over its link, (N-1) ring steps of latency.
    An offloaded layer's shard also crosses PCIe from host first; the two links run concurrently on
    different layers, so the slower one sets the pace."""
    if s.gpus == 1:
        return 0.0
    shard = _shard_rows(m, s.gpus) * m.expert_params * expert_weight_bytes(m, hw)
    t = shard * (s.gpus - 1) / _link_bw(hw, s) + (s.gpus - 1) * hw.hop_latency_s
    return max(t, shard / (hw.pcie_bw * s.link_efficiency)) if offloaded else t


def _batch_layers(m: ModelSpec, s: PlanSettings) -> list[LayerFlops]:
    """Per-layer FLOPs of one GPU's batch: B tokens as B/c requests of c tokens (no cached prefix); the
    lm_head of each request is appended as a last pseudo-layer."""
    f = s.tokens_per_gpu / s.context
    head = LayerFlops(2.0 * m.hidden * m.vocab * f, 0.0, 0.0)
    return [layer_flops(m, i, s.context).scaled(f) for i in range(m.layers)] + [head]


@dataclass(frozen=True)
class PredictedThreshold:
    t_gather_s: float  # slowest layer's expert-bank transfer
    flops_per_layer: float  # T* = t_gather * F_peak * gamma, per GPU, for one MoE layer
    tokens: float  # batch size (tokens per GPU) at which the thinnest MoE layer's FLOPs reach T*
    flops_per_step: float  # the same batch's FLOPs through the whole model: what the router compares
    hide_tokens: float  # tokens per GPU above which the performance model hides the gather (at efficiency)


def predict_threshold(m: ModelSpec, hw: Hardware, s: PlanSettings, offloaded_layers: int = 0) -> PredictedThreshold:
    t = gather_s(m, hw, s, offloaded=offloaded_layers > 0)
    T, tokens, per_step = threshold_at(m, t, hw.peak_flops, s.gamma, s.context)
    per_token = [layer_flops(m, i, s.context).scaled(1 / s.context) for i in m.moe_layers]
    fastest = min(_compute_s(f, hw, replace(s, efficiency=1.0)) for f in per_token)  # seconds per token at peak
    return PredictedThreshold(t, T, tokens, per_step, t * s.efficiency / fastest if t else 0.0)


@dataclass(frozen=True)
class Prediction:
    strategy: str
    step_s: float
    tokens_per_step: float  # over all N GPUs
    useful_flops: float  # over all N GPUs
    peak_flops: float  # N * per-GPU peak
    detail: str
    weights_per_gpu: float = 0.0  # baselines: every weight split N ways (activations not counted)
    fits: bool = True

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def mfu(self) -> float:
        return self.useful_flops / (self.step_s * self.peak_flops)


def _all_to_all_peers(m: ModelSpec, n: int) -> float:
    """Expected remote ranks one token is sent to (dispatch deduplicated per rank, as DeepEP does),
    with its k experts drawn uniformly without replacement and E/N experts per rank."""
    per = m.experts / n
    miss = math.prod(max(0.0, (m.experts - per - i) / (m.experts - i)) for i in range(m.top_k))
    return n * (1 - miss) * (n - 1) / n


def predict(m: ModelSpec, hw: Hardware, s: PlanSettings, offloaded_layers: int = 0) -> dict[str, Prediction]:
    """Step time, tokens/s and MFU of each strategy with B tokens per GPU per step (N*B per step in all)."""
    N, B, a = s.gpus, s.tokens_per_gpu, s.activation_bytes
    layers = _batch_layers(m, s)
    useful = N * B * flops_per_request(m, s.context) / s.context
    bw, hop = _link_bw(hw, s), (N - 1) * hw.hop_latency_s if N > 1 else 0.0
    compute = [_compute_s(f, hw, s) for f in layers]
    mk = lambda name, t, detail, tokens=N * B: Prediction(name, t, tokens, useful * tokens / (N * B), N * hw.peak_flops, detail)  # noqa: E731

    # AsyncEP: a MoE layer's gather runs during the compute since the previous MoE layer started
    # (prefetch 1; deeper prefetch is treated as 1); whatever it does not cover is exposed, so a
    # link-bound step tends to the sum of the gathers. The gather is assumed to take no SMs from compute,
    # unless link_on_compute: then it hides behind nothing. A non-resident first MoE layer's gather has
    # nothing before it in the step (each forward is its own graph). prefetch 0: every gather exposed.
    sharded, exposed, prev = set(sharded_layers(m, s)), 0.0, None
    offloaded = set(sorted(sharded)[len(sharded) - offloaded_layers:]) if offloaded_layers else set()
    for i in m.moe_layers:
        if i in sharded:
            window = sum(compute[prev:i]) if prev is not None and s.prefetch > 0 and not s.link_on_compute else 0.0
            exposed += max(0.0, gather_s(m, hw, s, i in offloaded) - window)
        prev = i
    t = sum(compute) + exposed
    preds = {"AsyncEP": mk("AsyncEP", t, f"gather exposed {exposed / t:.0%} of the step" + (f"; {offloaded_layers} layers' shards streamed from host" if offloaded_layers else ""))}

    # TP over all N: 1/N of every matmul, 2 ring all-reduces of the [N*B, H] activations per layer.
    all_reduce = 2 * (N - 1) / N * N * B * m.hidden * a / bw + 2 * hop
    t = sum(compute) + 2 * m.layers * all_reduce
    preds["TP"] = mk("TP", t, f"all-reduces {2 * m.layers * all_reduce / t:.0%} of the step")

    # EP with data-parallel attention: the busiest rank's experts take ep_imbalance x the mean; per MoE
    # layer a dispatch and a combine all-to-all of [B, H] rows to the remote ranks hit. Dispatch moves
    # activations at the GEMM's input dtype (FP8 models quantise before sending, as DeepEP does), combine
    # returns BF16 partial sums.
    a2a = _all_to_all_peers(m, N) * B * m.hidden * (hw.weight_bytes + a) / bw + 2 * hop
    imbalance = s.ep_imbalance if N > 1 else 1.0
    t = sum(_compute_s(f, hw, s, imbalance) for f in layers) + len(m.moe_layers) * a2a
    preds["EP"] = mk("EP", t, f"all-to-alls {len(m.moe_layers) * a2a / t:.0%} of the step, imbalance {imbalance}")

    # PP: N contiguous stages (sizes differ by at most one layer), micro-batches of B tokens, one fill
    # and drain per step; each stage boundary sends [B, H] activations point to point.
    mb = s.pp_microbatches or N
    q, r = divmod(len(layers), N)
    bounds = [k * q + min(k, r) for k in range(N + 1)]
    stage = max(sum(compute[bounds[k] : bounds[k + 1]]) for k in range(N)) + (B * m.hidden * a / bw if N > 1 else 0.0)
    t = (mb + N - 1) * stage
    preds["PP"] = mk("PP", t, f"bubble {(N - 1) / (mb + N - 1):.0%}, {mb} micro-batches", tokens=mb * B)
    # Baselines hold 1/N of every weight; AsyncEP's memory is checked in detail by memory_per_gpu.
    usable = hw.memory_bytes * s.memory_utilization
    banks = len(m.moe_layers) * m.bank_params
    w = (banks * expert_weight_bytes(m, hw) + (m.total_params - m.embed_params - banks) * linear_weight_bytes(m, hw) + m.embed_params * 2) / N
    for k in ("TP", "EP", "PP"):
        preds[k] = replace(preds[k], weights_per_gpu=w, fits=w <= usable)
    return preds


# ----------------------------------------------------------------------------------------------------
# Plan


@dataclass(frozen=True)
class Plan:
    model: ModelSpec
    hardware: Hardware
    settings: PlanSettings
    memory: Memory
    threshold: PredictedThreshold
    predictions: dict[str, Prediction] = field(repr=False)

    @property
    def best_baseline(self) -> Prediction:
        return max((p for k, p in self.predictions.items() if k != "AsyncEP"), key=lambda p: p.tokens_per_s)

    @property
    def speedup(self) -> float:
        return self.predictions["AsyncEP"].tokens_per_s / self.best_baseline.tokens_per_s


def plan(m: ModelSpec, hw: Hardware, s: PlanSettings | None = None) -> Plan:
    s = s or PlanSettings()
    mem = memory_per_gpu(m, hw, s)
    return Plan(m, hw, s, mem, predict_threshold(m, hw, s, mem.offloaded_layers), predict(m, hw, s, mem.offloaded_layers))
