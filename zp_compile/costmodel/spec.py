"""What the cost model knows of a MoE transformer (``ModelSpec``), the built-in published shapes
(``MODELS``) and the mapping from a transformers config (``spec_from_config``).

Shape letters: H hidden, I expert width, E experts, k experts per token, L layers, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path


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
    # A quantized checkpoint's own bytes per weight, scales included (0: the hardware profile's):
    # the routed experts' (bank, shards, gathers) and the other linear layers'.
    quantization: str = ""
    expert_weight_bytes: float = 0.0
    linear_weight_bytes: float = 0.0

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
    """A checkpoint directory (its config.json, read by transformers' AutoConfig) or a built-in name.
    A quantized checkpoint directory also gives its bytes per weight, from the safetensors headers."""
    config = load_config(name_or_dir)
    if config is not None:
        spec = spec_from_config(config, name=Path(name_or_dir).resolve().name)
        if not getattr(config, "quantization_config", None):
            return spec
        from ..models.loading import stored_sizes  # torch and the checkpoint's headers: only for a quantized directory

        path = Path(name_or_dir)
        sizes = stored_sizes(path.parent if path.name == "config.json" else path)
        return replace(spec, quantization=sizes.method, expert_weight_bytes=sizes.expert_bytes_per_weight,
                       linear_weight_bytes=sizes.linear_bytes_per_weight)  # fmt: skip
    key = name_or_dir.lower().rsplit("/", 1)[-1]  # accept Hub ids: Qwen/Qwen3-235B-A22B
    if key not in MODELS:
        raise ValueError(f"{name_or_dir!r} is neither a directory nor a known model; known: {', '.join(MODELS)}")
    return MODELS[key]
