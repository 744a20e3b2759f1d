"""FLOPs of one request through a ``ModelSpec``: per layer (attention over cached and new keys, the
router, the routed and shared experts) and per request. The server's routing and admission count load
with these, and the deployment plan predicts time with them.

Shape letters: c cached (reused) tokens, n new tokens, H hidden, k experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import ModelSpec


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


def threshold_at(m: ModelSpec, t_gather: float, peak_flops: float, gamma: float, context: int) -> tuple[float, float, float]:
    """T* = t_gather * F_peak * gamma FLOPs per GPU for one MoE layer; the tokens per GPU at which the
    thinnest MoE layer's FLOPs reach it (requests of ``context`` tokens); those tokens' FLOPs through the
    whole model (what the router compares with ``flops_per_request``)."""
    thinnest = min(layer_flops(m, i, context).total / context for i in m.moe_layers)
    T = t_gather * peak_flops * gamma
    tokens = T / thinnest
    return T, tokens, tokens * flops_per_request(m, context) / context
