"""Packed variable-length attention: one step's sequences as ONE row of tokens, no padding.

A rank's step runs its sequences' uncached tokens back to back as ``input_ids [1, L]`` (L = the sum of
the rows' new tokens), with every row's position ids continuing its own prefix. The linear layers and
the experts work per token, so only attention needs to know where rows begin and end. Each row attends
over its own key ranges in the layer's keys ``[1, Hkv, P + L, D]`` (the cached past, then the step's new
tokens): first its prefix, which may lie in the past (blocks the rank's cache held before the step) or
in a batch-mate's new tokens (a block an earlier row of the same step computes: in-step prefix sharing),
then its own new tokens, causally.

Why not padding: a padded batch makes every row as wide as the widest suffix and attend over the longest
past, so one 1,088-token miss among 64-token hits costs the rank 17 times the hits' work. Packed, a step
can mix misses and hits at their true cost, and a group's first prompt and its followers can run in the
same step (the followers read the prefix the first one computes).

The kernel is ``zp_compile::packed_attention``, a custom op: dynamo and Inductor see one opaque call per layer
(its loop over rows depends on the rows' boundaries, host data), so the compiled graph does not
change with the number or lengths of rows. It runs ``scaled_dot_product_attention`` per row; on a GPU a
varlen kernel (FlashAttention's ``cu_seqlens``) would do the same in one launch.

``enable(model)`` registers the implementation as ``zp_packed`` and switches the model to it. Calls
without ``zp_rows`` (padded batches with a 2-D mask) still run transformers' SDPA path unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import PACKED_ATTENTION

NAME = "zp_packed"


# The op's schema is declared in zp_compile/ops.py with the project's other custom ops.
@torch.library.impl(PACKED_ATTENTION, "CompositeExplicitAutograd")
def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor, ranges: torch.Tensor,
                     scale: float) -> torch.Tensor:  # fmt: skip
    """query [1, H, L, D]; key, value [1, Hkv, K, D] (K = P + L); rows [B, 4] int64 on the host: (query
    start, query end, first range, end of ranges) per row; ranges [R, 2] int64 on the host: key index
    ranges [start, end). A row's ranges, in order, are its keys: its prefix, then its own new tokens (the
    last n = query end - query start keys), and query i of the row sees all keys up to its own.
    Returns [1, L, H, Dv] (transformers' attention output layout)."""
    H, L, Hkv = query.shape[1], query.shape[2], key.shape[1]
    out = query.new_zeros((1, L, H, value.shape[-1]))  # zeros: a spare token no row covers stays finite
    spans = ranges.tolist()
    for q0, q1, r0, r1 in rows.tolist():
        if q1 == q0:
            continue  # a spare row (the step pads size-1 tensors to 2)
        parts = spans[r0:r1]
        if len(parts) == 1:
            k, v = key[:, :, parts[0][0] : parts[0][1]], value[:, :, parts[0][0] : parts[0][1]]  # views, no copy
        else:
            k = torch.cat([key[:, :, a:b] for a, b in parts], dim=2)  # [1, Hkv, m, D]
            v = torch.cat([value[:, :, a:b] for a, b in parts], dim=2)
        n, m = q1 - q0, k.shape[2]
        if Hkv != H:
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        q = query[:, :, q0:q1]  # [1, H, n, D]
        if m == n:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:  # causal, aligned bottom-right: query i sees the m - n prefix keys and own keys 0..i
            mask = torch.arange(m, device=q.device)[None, :] <= torch.arange(m - n, m, device=q.device)[:, None]  # [n, m]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out[0, q0:q1] = o[0].transpose(0, 1)
    return out


@torch.library.register_fake(PACKED_ATTENTION)
def _(query, key, value, rows, ranges, scale):
    return query.new_empty((1, query.shape[2], query.shape[1], value.shape[-1]))


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature. With ``zp_rows`` / ``zp_ranges`` (a packed step) the
    packed kernel; without, transformers' SDPA path (a padded batch, its 4-D mask built as for sdpa)."""
    rows = kwargs.pop("zp_rows", None)
    ranges = kwargs.pop("zp_ranges", None)
    if rows is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"packed attention does not support {name} ({type(module).__name__}); serve this model with padded batches")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return torch.ops.zp_compile.packed_attention(query, key, value, rows, ranges, float(scale)), None


def unsupported(model) -> str | None:
    """Why ``model`` cannot run packed steps, or None. Each row's keys are its prefix and its own tokens,
    all of them: a sliding-window layer (which drops old keys) or attention sinks would need more."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    if kinds != {DynamicLayer.__name__}:
        return f"{type(model).__name__}'s cache has {sorted(kinds)} layers; packed steps need full attention everywhere"
    return None


def enable(model) -> None:
    """Register ``zp_packed`` (attention and, for padded calls, sdpa's mask) and switch ``model`` to it.
    Call before the model's first forward: the compiled graph reads the implementation when traced."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)


# A packed call passes this as the 2-D mask's stand-in: transformers returns a 4-D mask as is instead of
# building a [1, 1, L, P + L] one that the packed kernel would never read.
def no_mask(device: torch.device) -> torch.Tensor:
    return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
