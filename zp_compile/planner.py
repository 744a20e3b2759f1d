"""Deployment planner: memory per GPU, the saturation threshold T* and predicted throughput of AsyncEP
against tensor (TP), expert (EP) and pipeline (PP) parallelism, for a MoE model on N accelerators.

Pure arithmetic on a model description (``ModelSpec``) and a hardware profile (``Hardware``); nothing
here touches torch except the CPU measurements (``measure_cpu``, ``time_forward``). The model is a roofline
with one efficiency constant, not a simulator: every assumption is written next to the number it produces,
and the CLI prints them. On GPUs the constant is assumed; on a CPU it is measured (``time_forward``).

Shape letters: B tokens per GPU per step, c context length, H hidden, I expert width, E experts,
k experts per token, N GPUs, L layers, V vocabulary.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

GB = 1e9  # spec sheets use decimal gigabytes

# ----------------------------------------------------------------------------------------------------
# Hardware


@dataclass(frozen=True)
class Hardware:
    """One accelerator. Bandwidths are bytes/s in ONE direction (spec sheets quote both directions)."""

    name: str
    peak_flops: float  # dense tensor-core FLOP/s at the weight dtype (no 2:4 sparsity)
    attention_flops: float  # FLOP/s of attention's score/value matmuls: BF16 even for FP8 weights
    weight_bytes: int  # bytes per quantisable weight (attention, MLP, experts): 2 BF16, 1 FP8
    memory_bytes: float  # HBM capacity
    memory_bw: float  # HBM bandwidth; reported only: at prefill batch sizes weight reads take <1/10 of compute
    nvlink_bw: float  # GPU-to-GPU link per GPU
    pcie_bw: float  # host link (x16), used for hybrid offload and for --link pcie
    hop_latency_s: float = 5e-6  # per ring step of a collective

    def link_bw(self, link: str) -> float:
        if link not in ("nvlink", "pcie"):
            raise ValueError(f"link must be 'nvlink' or 'pcie', got {link!r}")
        return self.nvlink_bw if link == "nvlink" else self.pcie_bw


def _gpu(name, peak, attn, wbytes, mem_gb, mem_tbs, nvlink_gbs, pcie_gbs) -> Hardware:
    return Hardware(name, peak * 1e12, attn * 1e12, wbytes, mem_gb * GB, mem_tbs * 1e12, nvlink_gbs * GB, pcie_gbs * GB)


# NVIDIA data sheets, SXM parts, dense figures (the sheets' headline TFLOPS assume 2:4 sparsity; halved here).
# A100 80GB SXM: BF16 312 TFLOPS, HBM2e 2,039 GB/s, NVLink 3 600 GB/s bidirectional, PCIe Gen4 x16 64 GB/s
#   bidirectional. No FP8 tensor cores, hence no a100-fp8.
# H100 80GB SXM5: BF16 989 / FP8 1,979 TFLOPS, HBM3 3.35 TB/s, NVLink 4 900 GB/s, PCIe Gen5 128 GB/s.
# H200 141GB SXM: H100's compute and links, HBM3e 141 GB at 4.8 TB/s.
# Attention stays BF16 in FP8 deployments (vLLM's default FP8 path quantises the linear layers only).
HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in (
        _gpu("a100-bf16", 312, 312, 2, 80, 2.039, 300, 32),
        _gpu("h100-bf16", 989, 989, 2, 80, 3.35, 450, 64),
        _gpu("h100-fp8", 1979, 989, 1, 80, 3.35, 450, 64),
        _gpu("h200-bf16", 989, 989, 2, 141, 4.8, 450, 64),
        _gpu("h200-fp8", 1979, 989, 1, 141, 4.8, 450, 64),
    )
}


def cpu_hardware(matmul_flops: float, copy_bw: float, memory_bytes: float | None = None, ranks: int = 1) -> Hardware:
    """A CPU "device" from measured numbers (see ``measure_cpu``), one of ``ranks`` sharing the machine's RAM.
    BF16 weights (these CPUs have AMX). The link is the memory-copy bandwidth, an upper bound: the project's NOTES.md
    measured gloo's all_gather between two local ranks at 0.17-0.27 GB/s (override: --link-gbps)."""
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware("cpu", matmul_flops, matmul_flops, 2, memory_bytes / ranks, copy_bw, copy_bw, copy_bw, hop_latency_s=50e-6)


def _rate(fn, work: float, budget: float) -> float:
    """``work`` units per second of ``fn``, run repeatedly for about ``budget`` seconds after a warm-up."""
    fn()  # warm-up: the first call allocates and picks kernels
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget or n == 0:
        fn()
        n += 1
    return work * n / elapsed


def measure_matmul_flops(dtype=None, seconds: float = 0.5) -> float:
    """FLOP/s of a 1024^3 matmul of ``dtype`` (default bf16) on this CPU, timed for about ``seconds``."""
    import torch

    a = torch.randn(1024, 1024, dtype=dtype or torch.bfloat16)
    return _rate(lambda: a @ a, 2 * 1024**3, seconds)


def rank_threads(ranks: int) -> tuple[int, float]:
    """Threads one of ``ranks`` CPU ranks gets out of this process's torch threads (torch's default: one
    per physical core; OMP_NUM_THREADS overrides), and the share of a thread's rate it keeps: below one
    thread per rank, ranks time-share a core (2 ranks on 1 thread: 0.5)."""
    import torch

    total = torch.get_num_threads()
    return max(1, total // ranks), min(1.0, total / ranks)


@contextmanager
def _torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` for the block and restored after (a process-wide setting)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def measure_cpu(seconds: float = 1.0, ranks: int = 1) -> Hardware:
    """Time a BF16 matmul and a 16 MB tensor copy on this machine, about ``seconds`` in all (< 5 s). The
    matmul runs on one rank's threads (``rank_threads``): ranks on one CPU split its cores, as they split its RAM."""
    import torch

    threads, share = rank_threads(ranks)
    src, dst = torch.empty(2**24, dtype=torch.uint8), torch.empty(2**24, dtype=torch.uint8)
    with _torch_threads(threads):
        flops = measure_matmul_flops(torch.bfloat16, seconds / 2) * share
    copy = _rate(lambda: dst.copy_(src), 2**24, seconds / 2)
    return cpu_hardware(flops, copy, ranks=ranks)


def hardware(name: str) -> Hardware:
    """A built-in profile by name; ``cpu`` is measured now."""
    if name == "cpu":
        return measure_cpu()
    if name not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join([*HARDWARE, 'cpu'])}")
    return HARDWARE[name]


# ----------------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class ModelSpec:
    """What the planner needs of a MoE transformer. All MLPs are gated (SwiGLU: 3 matrices)."""

    name: str
    layers: int
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int  # query/key width per head (MLA: nope + rope)
    experts: int
    top_k: int
    expert_ffn: int  # I
    moe_layers: tuple[int, ...]
    dense_ffn: int = 0  # MLP width of the non-MoE layers
    shared_ffn: int = 0  # total width of the shared expert(s) of each MoE layer
    v_head_dim: int = 0  # 0: head_dim
    q_lora_rank: int = 0  # MLA (DeepSeek): > 0 when the query goes through a low-rank bottleneck
    kv_lora_rank: int = 0  # MLA when > 0
    rope_head_dim: int = 0  # MLA: the part of head_dim carried uncompressed in the KV cache
    window: int = 0  # sliding-window / chunked attention span of the layers in window_layers
    window_layers: tuple[int, ...] = ()
    expert_bias: bool = False  # GPT-OSS: biases on experts and router
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if not self.moe_layers or self.experts < 1 or self.top_k < 1:
            raise ValueError(f"{self.name}: no MoE layer (experts {self.experts}, top-k {self.top_k}, MoE layers {self.moe_layers})")
        if self.top_k > self.experts:
            raise ValueError(f"{self.name}: top-k {self.top_k} exceeds {self.experts} experts")

    @property
    def v_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def attn_params(self) -> int:
        H, h = self.hidden, self.heads
        out = h * self.v_dim * H
        if not self.kv_lora_rank:
            return H * h * self.head_dim + 2 * H * self.kv_heads * self.head_dim + out
        q = H * self.q_lora_rank + self.q_lora_rank * h * self.head_dim if self.q_lora_rank else H * h * self.head_dim
        kv_a = H * (self.kv_lora_rank + self.rope_head_dim)
        kv_b = self.kv_lora_rank * h * (self.head_dim - self.rope_head_dim + self.v_dim)
        return q + kv_a + kv_b + out

    @property
    def expert_params(self) -> int:
        """One routed expert, biases included: what a bank row costs in memory and on the link."""
        return 3 * self.hidden * self.expert_ffn + (2 * self.expert_ffn + self.hidden) * self.expert_bias

    @property
    def bank_params(self) -> int:
        return self.experts * self.expert_params

    def dense_params(self, layer: int) -> int:
        """Replicated weights of one layer: attention, 2 norms, and the router + shared experts or the MLP."""
        H = self.hidden
        if layer in self.moe_layers:
            ffn = H * self.experts + self.experts * self.expert_bias + 3 * H * self.shared_ffn
        else:
            ffn = 3 * H * self.dense_ffn
        return self.attn_params + 2 * H + ffn

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tie_embeddings else 2)

    @property
    def total_params(self) -> int:
        per_layer = sum(self.dense_params(i) for i in range(self.layers))
        return per_layer + len(self.moe_layers) * self.bank_params + self.embed_params + self.hidden

    @property
    def active_params_per_token(self) -> int:
        """Weights each token multiplies through: no embedding lookup, no lm_head (see flops_per_request)."""
        routed = 3 * self.hidden * self.expert_ffn * self.top_k
        return sum(self.dense_params(i) + routed * (i in self.moe_layers) for i in range(self.layers))

    @property
    def kv_elems(self) -> int:
        """KV-cache elements per token per layer (MLA caches the compressed latent + rope key)."""
        return self.kv_lora_rank + self.rope_head_dim if self.kv_lora_rank else 2 * self.kv_heads * self.head_dim


def _mk(name, layers, hidden, vocab, heads, kv_heads, head_dim, experts, top_k, expert_ffn, first_moe=0, **kw):
    return ModelSpec(name, layers, hidden, vocab, heads, kv_heads, head_dim, experts, top_k, expert_ffn, tuple(range(first_moe, layers)), **kw)


# Published config.json values; tests check each against transformers' own config classes.
MODELS: dict[str, ModelSpec] = {
    m.name.lower(): m
    for m in (
        _mk("Qwen3-235B-A22B", 94, 4096, 151936, 64, 4, 128, 128, 8, 1536),
        _mk("Qwen3-30B-A3B", 48, 2048, 151936, 32, 4, 128, 128, 8, 768),
        _mk("Mixtral-8x7B", 32, 4096, 32000, 32, 8, 128, 8, 2, 14336),
        _mk("DeepSeek-V3", 61, 7168, 129280, 128, 128, 192, 256, 8, 2048, first_moe=3, dense_ffn=18432,
            shared_ffn=2048, v_head_dim=128, q_lora_rank=1536, kv_lora_rank=512, rope_head_dim=64),
    )
}


def _first(config, *names, default=None):
    for n in names:
        value = getattr(config, n, None)
        if value is not None:
            return value
    return default


def spec_from_config(config, name: str | None = None) -> ModelSpec:
    """Map a transformers config (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss, granitemoe,
    phimoe, glm4_moe, llama4 / llama4_text, ...) onto a ModelSpec. Field names differ per family."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    kind = f"{type(config).__name__} (model_type {getattr(config, 'model_type', '?')!r})"
    L, H = c.num_hidden_layers, c.hidden_size
    experts = _first(c, "num_experts", "num_local_experts", "n_routed_experts", default=0)
    if not experts:
        raise ValueError(f"{kind} has no MoE layer: none of num_experts / num_local_experts / n_routed_experts is set")
    if getattr(c, "moe_layers", None) is not None:  # llama4: derived from interleave_moe_layer_step
        moe = tuple(c.moe_layers)
    elif getattr(c, "first_k_dense_replace", None) is not None:  # deepseek_v3, glm4_moe
        moe = tuple(range(c.first_k_dense_replace, L))
    else:  # qwen2_moe / qwen3_moe: mlp_only_layers and decoder_sparse_step; others: every layer
        step, dense = getattr(c, "decoder_sparse_step", 1) or 1, set(getattr(c, "mlp_only_layers", None) or ())
        moe = tuple(i for i in range(L) if i not in dense and (i + 1) % step == 0)
    if not moe:
        raise ValueError(f"{kind} has no MoE layer: {experts} experts but every one of its {L} layers is dense")
    moe_width = getattr(c, "moe_intermediate_size", None)
    if c.model_type.startswith("llama4"):  # experts and the shared expert use intermediate_size
        expert_ffn, dense_ffn, shared = c.intermediate_size, c.intermediate_size_mlp, c.intermediate_size
    elif moe_width:
        expert_ffn, dense_ffn = moe_width, c.intermediate_size
        shared = _first(c, "shared_expert_intermediate_size", default=(getattr(c, "n_shared_experts", 0) or 0) * moe_width)
    else:
        expert_ffn, dense_ffn, shared = c.intermediate_size, 0, 0
    heads = c.num_attention_heads
    kv_lora = getattr(c, "kv_lora_rank", 0) or 0
    rope = c.qk_rope_head_dim if kv_lora else 0
    head_dim = c.qk_nope_head_dim + rope if kv_lora else (getattr(c, "head_dim", None) or H // heads)
    kinds = getattr(c, "layer_types", None)
    if kinds:
        windowed = tuple(i for i, t in enumerate(kinds) if t in ("sliding_attention", "chunked_attention"))
    elif getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True):
        windowed = tuple(range(L))
    else:
        windowed = ()
    window = _first(c, "sliding_window", "attention_chunk_size", default=0) if windowed else 0
    return ModelSpec(
        name or getattr(c, "_name_or_path", "") or c.model_type, L, H, c.vocab_size, heads,
        getattr(c, "num_key_value_heads", None) or heads, head_dim, experts, c.num_experts_per_tok, expert_ffn, moe,
        dense_ffn=dense_ffn if len(moe) < L else 0, shared_ffn=shared, v_head_dim=getattr(c, "v_head_dim", 0) if kv_lora else 0,
        q_lora_rank=(getattr(c, "q_lora_rank", 0) or 0) if kv_lora else 0, kv_lora_rank=kv_lora, rope_head_dim=rope,
        window=window or 0, window_layers=windowed if window else (), expert_bias=c.model_type == "gpt_oss",
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
    )


def load_config(name_or_dir: str):
    """The transformers config of a checkpoint directory (or of its config.json); None for anything else,
    such as a built-in name."""
    path = Path(name_or_dir)
    if not (path.is_dir() or path.name == "config.json"):
        return None
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path.parent if path.name == "config.json" else path)


def load_model(name_or_dir: str) -> ModelSpec:
    """A checkpoint directory (its config.json, read by transformers' AutoConfig) or a built-in name."""
    config = load_config(name_or_dir)
    if config is not None:
        return spec_from_config(config, name=Path(name_or_dir).resolve().name)
    key = name_or_dir.lower().rsplit("/", 1)[-1]  # accept Hub ids: Qwen/Qwen3-235B-A22B
    if key not in MODELS:
        raise ValueError(f"{name_or_dir!r} is neither a directory nor a known model; known: {', '.join(MODELS)}")
    return MODELS[key]


# ----------------------------------------------------------------------------------------------------
# FLOPs


@dataclass(frozen=True)
class LayerFlops:
    dense: float  # replicated linear layers: attention projections, router, shared experts, dense MLP
    experts: float  # routed experts
    attention: float  # score (QK^T) and value (PV) matmuls

    @property
    def total(self) -> float:
        return self.dense + self.experts + self.attention

    def scaled(self, f: float) -> LayerFlops:
        return LayerFlops(self.dense * f, self.experts * f, self.attention * f)


def _keys(cached: int, new: int, window: int) -> int:
    """Sum over the new tokens (positions cached+1 .. cached+new, 1-based) of the keys each attends to,
    causal, at most ``window`` each (0: unbounded). Chunked attention is counted as a window (upper bound)."""
    a, b = cached + 1, cached + new
    tri = lambda lo, hi: (lo + hi) * (hi - lo + 1) // 2 if hi >= lo else 0  # noqa: E731 - sum lo..hi
    if not window or b <= window:
        return tri(a, b)
    if a > window:
        return new * window
    return tri(a, window) + (b - window) * window


def layer_flops(m: ModelSpec, layer: int, new: int, cached: int = 0) -> LayerFlops:
    """FLOPs of one layer for ``new`` uncached tokens of a request that follow ``cached`` cached ones."""
    routed = 2 * new * m.top_k * 3 * m.hidden * m.expert_ffn if layer in m.moe_layers else 0
    keys = _keys(cached, new, m.window if layer in m.window_layers else 0)
    return LayerFlops(2 * new * m.dense_params(layer), routed, 2 * m.heads * (m.head_dim + m.v_dim) * keys)


def flops_per_request(m: ModelSpec, new: int, cached: int = 0, logits: int = 1) -> float:
    """FLOPs of a prefill of ``new`` tokens after ``cached`` reused ones: 2 * active params per token * new
    + attention scores/values over each new token's causal context + the lm_head at ``logits`` positions
    (prefill-only serving reads one position). Norms, softmax and activations are not counted."""
    if new <= 0:
        return 0.0
    body = 2.0 * m.active_params_per_token * new
    attention = sum(layer_flops(m, i, new, cached).attention for i in range(m.layers))
    return body + attention + 2.0 * m.hidden * m.vocab * min(logits, new)


# ----------------------------------------------------------------------------------------------------
# CPU calibration: the efficiency a real forward reaches, measured instead of assumed


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


# ----------------------------------------------------------------------------------------------------
# Settings


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


def _sharded_layers(m: ModelSpec, s: PlanSettings) -> tuple[int, ...]:
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


def memory_per_gpu(m: ModelSpec, hw: Hardware, s: PlanSettings) -> Memory:
    w, a, B = hw.weight_bytes, s.activation_bytes, s.tokens_per_gpu
    H = m.hidden
    # Embeddings, lm_head, norms and the router stay BF16 in FP8 checkpoints; the rest is at hw.weight_bytes.
    unquantised = [H * m.experts + m.experts * m.expert_bias + 2 * H if i in m.moe_layers else 2 * H for i in range(m.layers)]
    quantised = sum(m.dense_params(i) for i in range(m.layers)) - sum(unquantised)
    dense = quantised * w + (sum(unquantised) + m.embed_params + H) * 2
    sharded = _sharded_layers(m, s)
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
    shard = _shard_rows(m, s.gpus) * m.expert_params * hw.weight_bytes
    t = shard * (s.gpus - 1) / _link_bw(hw, s) + (s.gpus - 1) * hw.hop_latency_s
    return max(t, shard / (hw.pcie_bw * s.link_efficiency)) if offloaded else t


def _batch_layers(m: ModelSpec, s: PlanSettings) -> list[LayerFlops]:
    """Per-layer FLOPs of one GPU's batch: B tokens as B/c requests of c tokens (no cached prefix); the
    lm_head of each request is appended as a last pseudo-layer."""
    f = s.tokens_per_gpu / s.context
    head = LayerFlops(2.0 * m.hidden * m.vocab * f, 0.0, 0.0)
    return [layer_flops(m, i, s.context).scaled(f) for i in range(m.layers)] + [head]


@dataclass(frozen=True)
class Threshold:
    t_gather_s: float  # slowest layer's expert-bank transfer
    flops_per_layer: float  # T* = t_gather * F_peak * gamma, per GPU, for one MoE layer
    tokens: float  # batch size (tokens per GPU) at which the thinnest MoE layer's FLOPs reach T*
    flops_per_step: float  # the same batch's FLOPs through the whole model: what the router compares
    hide_tokens: float  # tokens per GPU above which the performance model hides the gather (at efficiency)


def threshold_at(m: ModelSpec, t_gather: float, peak_flops: float, gamma: float, context: int) -> tuple[float, float, float]:
    """T* = t_gather * F_peak * gamma FLOPs per GPU for one MoE layer; the tokens per GPU at which the
    thinnest MoE layer's FLOPs reach it (requests of ``context`` tokens); those tokens' FLOPs through the
    whole model (what the router compares with ``flops_per_request``)."""
    thinnest = min(layer_flops(m, i, context).total / context for i in m.moe_layers)
    T = t_gather * peak_flops * gamma
    tokens = T / thinnest
    return T, tokens, tokens * flops_per_request(m, context) / context


def saturation_threshold(m: ModelSpec, hw: Hardware, s: PlanSettings, offloaded_layers: int = 0) -> Threshold:
    t = gather_s(m, hw, s, offloaded=offloaded_layers > 0)
    T, tokens, per_step = threshold_at(m, t, hw.peak_flops, s.gamma, s.context)
    per_token = [layer_flops(m, i, s.context).scaled(1 / s.context) for i in m.moe_layers]
    fastest = min(_compute_s(f, hw, replace(s, efficiency=1.0)) for f in per_token)  # seconds per token at peak
    return Threshold(t, T, tokens, per_step, t * s.efficiency / fastest if t else 0.0)


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
    sharded, exposed, prev = set(_sharded_layers(m, s)), 0.0, None
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
    w = (m.total_params - m.embed_params) * hw.weight_bytes / N + m.embed_params * 2 / N
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
    threshold: Threshold
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
    return Plan(m, hw, s, mem, saturation_threshold(m, hw, s, mem.offloaded_layers), predict(m, hw, s, mem.offloaded_layers))
