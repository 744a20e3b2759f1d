"""Quantized checkpoints in their published layouts: block-FP8 weights and MXFP4 experts.

A *codec* turns the tensors a checkpoint stores for one weight into that weight in a compute dtype,
and back (the factory writes tiny checkpoints with ``encode``):

- ``BlockFp8`` (``quant_method: "fp8"``, Qwen3-30B-A3B-FP8, Qwen3-235B-A22B-FP8, DeepSeek-V3):
  ``W`` [..., R, C] ``float8_e4m3fn`` plus ``W_scale_inv`` [..., ceil(R/128), ceil(C/128)] (fp32, one per
  128 x 128 block, edge blocks partial); ``W = fp8 * scale_inv``. Linear layers and experts (per-expert
  keys ``mlp.experts.3.gate_proj.weight`` + ``.weight_scale_inv``, or stacked ``gate_up_proj`` +
  ``gate_up_proj_scale_inv``); embeddings, norms, routers and ``lm_head`` stay in the model dtype.
- ``Mxfp4`` (``quant_method: "mxfp4"``, gpt-oss-20b/120b): experts only, stacked.
  ``P_blocks`` [E, out, in/32, 16] uint8 (two e2m1 values a byte, the even element in the low nibble)
  and ``P_scales`` [E, out, in/32] uint8 (e8m0: ``2 ** (byte - 127)`` per 32 values); the decoded
  weight is [E, in, out], the layout of transformers' ``GptOssExperts``.

Decoding computes what transformers' own code does (``finegrained_fp8._dequantize_fp8_weight`` in fp32
then one rounding to the compute dtype, which is what its ``Fp8Dequantize`` load op computes;
``mxfp4.convert_moe_packed_tensors``), bit for bit (tested), so a rank's weights are identical to what
transformers loads from the same checkpoint. It is written in plain torch ops, with no table and no
Python loop over data, because it runs inside the compiled forward: a sharded layer gathers its stored
tensors and decodes them after the wait (``rewrite.StoredExperts``), and Inductor fuses the decoding
into one kernel. Every codec decodes any leading rows on their own: the same ``decode`` serves a
shard at load, a resident bank, and a gathered bank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Protocol

import torch

from .errors import CheckpointError

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


@dataclass(frozen=True)
class StoredWeight:
    """One model-side weight as the checkpoint stores it."""

    keys: dict[str, str]  # role -> checkpoint key, e.g. {"weight": ..., "scale": ..._scale_inv}
    shape: tuple[int, ...]  # the decoded weight's shape
    stored_bytes: int  # what the checkpoint spends on it, scales included


class Codec(Protocol):
    method: str  # quantization_config["quant_method"]

    def weight_name(self, key: str, dtype: torch.dtype) -> str | None:
        """The weight that checkpoint tensor ``key`` is the main part of, or None."""

    def keys(self, name: str) -> dict[str, str]:
        """role -> checkpoint key of every stored tensor of weight ``name``."""

    def decoded_shape(self, name: str, stored: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> tuple[int, ...]:
        """The decoded shape, from the stored (dtype, shape) of each role; raises on a mismatch."""

    def decode(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The weight in ``dtype`` from its stored tensors (any leading rows: a shard decodes alone)."""

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """role -> stored tensor, the published layout of ``weight`` (decoded layout)."""


@dataclass(frozen=True)
class BlockFp8:
    """``float8_e4m3fn`` weights with one inverse scale per ``block`` (rows, cols) tile."""

    block: tuple[int, int] = (128, 128)
    method = "fp8"

    def weight_name(self, key: str, dtype: torch.dtype) -> str | None:
        return key if dtype == torch.float8_e4m3fn else None

    def keys(self, name: str) -> dict[str, str]:
        # transformers' naming (Fp8Quantize): "x.weight" -> "x.weight_scale_inv", "x.gate_up_proj" -> "..._scale_inv"
        scale = name.removesuffix(".weight") + ".weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"
        return {"weight": name, "scale": scale}

    def _scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        *lead, rows, cols = shape
        return (*lead, math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1]))

    def decoded_shape(self, name, stored):
        (_, shape), (scale_dtype, scale) = stored["weight"], stored["scale"]
        if len(shape) < 2 or tuple(scale) != self._scale_shape(shape) or not scale_dtype.is_floating_point:
            raise CheckpointError(
                f"{name}: an FP8 weight {list(shape)} with {list(self.block)} blocks needs a float scale "
                f"{list(self._scale_shape(shape)) if len(shape) >= 2 else '[..., rows, cols]'}; the checkpoint has "
                f"{scale_dtype} {list(scale)}"
            )
        return tuple(shape)

    def decode(self, parts, dtype):
        # Plain torch ops, so that a compiled graph traces it after the gather and Inductor fuses it
        # into one kernel. The numerics of transformers' ``_dequantize_fp8_weight`` in fp32 (and of its
        # Fp8Dequantize at load, which cannot read edge blocks): each value times its block's scale in
        # fp32, then one rounding to ``dtype``. Edge tiles are zero-padded to whole blocks and cropped.
        weight, scale = parts["weight"], parts["scale"]  # [..., R, C] fp8, [..., R/bm, C/bn]
        (bm, bn), (rows, cols) = self.block, weight.shape[-2:]
        padded = torch.nn.functional.pad(weight.to(torch.float32), (0, -cols % bn, 0, -rows % bm))
        tiles = padded.unflatten(-1, (-1, bn)).unflatten(-3, (-1, bm))  # [..., R/bm, bm, C/bn, bn]
        decoded = tiles * scale.to(torch.float32)[..., :, None, :, None]
        return decoded.flatten(-2).flatten(-3, -2)[..., :rows, :cols].to(dtype)

    def encode(self, weight):
        # transformers' Fp8Quantize arithmetic (448 / amax per tile, inverse stored), with edge tiles
        # zero-padded as published checkpoints pad them; it passes non-dividing shapes through unquantized.
        (bm, bn), (rows, cols) = self.block, weight.shape[-2:]
        padded = torch.nn.functional.pad(weight.to(torch.float32), (0, -cols % bn, 0, -rows % bm))
        tiles = padded.unflatten(-1, (-1, bn)).unflatten(-3, (-1, bm))  # [..., R/bm, bm, C/bn, bn]
        amax = tiles.abs().amax(dim=(-3, -1))  # [..., R/bm, C/bn]
        scales = torch.where(amax > 0, FP8_MAX / torch.where(amax > 0, amax, 1.0), 1.0)
        quantized = (tiles * scales[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        quantized = quantized.flatten(-2).flatten(-3, -2)[..., :rows, :cols].contiguous()
        return {"weight": quantized, "scale": (1.0 / scales).to(torch.float32)}


# e2m1 magnitudes, their code = index; the sign is bit 3 (transformers' FP4_VALUES order).
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_MX_GROUP = 32  # values per e8m0 scale
_E8M0_BIAS = 127


def _e2m1_value(code: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The value of each 4-bit e2m1 code (transformers' ``FP4_VALUES[code]``), computed rather than looked
    up so that a traced graph holds no table: sign bit 3, exponent bits 2-1, mantissa bit 0; exponent 0
    is subnormal (0 or 0.5), else ``(2 + m) * 2 ** (e - 2)``. Every value is exact in any float dtype."""
    exponent, mantissa = ((code >> 1) & 3).to(torch.int32), (code & 1).to(dtype)
    magnitude = torch.where(exponent == 0, mantissa * 0.5, torch.ldexp(mantissa + 2, exponent - 2).to(dtype))
    return torch.where((code & 8) != 0, -magnitude, magnitude)


@dataclass(frozen=True)
class Mxfp4:
    """MXFP4 stacked experts as gpt-oss ships them (``*_blocks`` + ``*_scales``)."""

    method = "mxfp4"

    def weight_name(self, key: str, dtype: torch.dtype) -> str | None:
        return key.removesuffix("_blocks") if key.endswith("_blocks") else None

    def keys(self, name: str) -> dict[str, str]:
        return {"blocks": name + "_blocks", "scales": name + "_scales"}

    def decoded_shape(self, name, stored):
        (blocks_dtype, blocks), (scales_dtype, scales) = stored["blocks"], stored["scales"]
        if len(blocks) != 4 or tuple(blocks[:-1]) != tuple(scales) or (blocks_dtype, scales_dtype) != (torch.uint8, torch.uint8):
            raise CheckpointError(
                f"{name}: MXFP4 experts are stored as uint8 blocks [E, out, in/32, 16] and uint8 scales "
                f"[E, out, in/32]; the checkpoint has {blocks_dtype} {list(blocks)} and {scales_dtype} {list(scales)}"
            )
        experts, out, groups, per_group = blocks
        return (experts, groups * per_group * 2, out)

    def decode(self, parts, dtype):
        # Plain torch ops (a compiled graph traces it after the gather), computing what transformers'
        # ``convert_moe_packed_tensors`` does: its FP4_VALUES table entry of each nibble in ``dtype``,
        # ldexp by the group's exponent, the even input in the low nibble, then [E, out, in] -> [E, in, out].
        blocks, scales = parts["blocks"], parts["scales"]  # [E, out, G, 16] uint8, [E, out, G] uint8
        codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2)  # [E, out, G, 32], input order
        values = _e2m1_value(codes, dtype)
        values = torch.ldexp(values, (scales.to(torch.int32) - _E8M0_BIAS)[..., None]).to(dtype)
        return values.flatten(-2).transpose(1, 2).contiguous()  # [E, in, out]

    def encode(self, weight):
        # weight [E, in, out] -> groups of 32 along `in` of the [E, out, in] matrix
        experts, size_in, out = weight.shape
        if size_in % _MX_GROUP:
            raise ValueError(f"MXFP4 needs the input size to be a multiple of {_MX_GROUP}; got {size_in}")
        groups = weight.transpose(1, 2).to(torch.float32).reshape(experts, out, size_in // _MX_GROUP, _MX_GROUP).contiguous()
        amax = groups.abs().amax(-1)  # [E, out, G]
        # The smallest power of two that brings the group within e2m1's largest magnitude, 6.
        exponent = torch.ceil(torch.log2(amax.clamp(min=2.0**-126) / _E2M1[-1])).clamp(-_E8M0_BIAS, _E8M0_BIAS)
        scaled = groups / torch.exp2(exponent)[..., None]
        magnitudes = torch.tensor(_E2M1)
        code = torch.bucketize(scaled.abs(), (magnitudes[1:] + magnitudes[:-1]) / 2)  # nearest magnitude
        code = (code | (scaled < 0).to(torch.int64) << 3).to(torch.uint8)  # [E, out, G, 32]
        blocks = code[..., 0::2] | code[..., 1::2] << 4  # even element in the low nibble
        return {"blocks": blocks.contiguous(), "scales": (exponent + _E8M0_BIAS).to(torch.uint8)}


SUPPORTED = "fp8 (block-wise float8_e4m3fn, dynamic activation scales) and mxfp4 (experts)"


def codec_for(quantization_config: Mapping | None, where: str = "checkpoint") -> Codec | None:
    """The codec of a config.json's ``quantization_config`` (None when not quantized); raises
    ``CheckpointError`` naming the method or field we do not read."""
    if not quantization_config:
        return None
    qc = dict(quantization_config)
    method = qc.get("quant_method")
    if method == "mxfp4":
        return Mxfp4()
    if method != "fp8":
        raise CheckpointError(f"{where}: quantization method {method!r} is not supported; supported: {SUPPORTED}")
    fields = {
        "fmt": (qc.get("fmt") or "e4m3", "e4m3"),
        "activation_scheme": (qc.get("activation_scheme") or "dynamic", "dynamic"),
        "scale_fmt": (qc.get("scale_fmt") or "float", "float"),
    }
    bad = {k: v for k, (v, want) in fields.items() if v != want}
    block = qc.get("weight_block_size")
    if bad or not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(
            f"{where}: fp8 checkpoints are read with fmt e4m3, dynamic activations, float scales and a "
            f"weight_block_size [rows, cols]; this one has {bad or {}} weight_block_size={block!r}"
        )
    return BlockFp8(tuple(block))


def stored_weights(codec: Codec, entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> dict[str, StoredWeight]:
    """Every quantized weight of a checkpoint: name -> its stored tensors, from the (dtype, shape) of
    each checkpoint key (headers only, nothing read)."""
    found: dict[str, StoredWeight] = {}
    for key, (dtype, _) in entries.items():
        name = codec.weight_name(key, dtype)
        if name is None:
            continue
        keys = codec.keys(name)
        missing = [k for k in keys.values() if k not in entries]
        if missing:
            raise CheckpointError(f"{name}: the checkpoint stores it {codec.method}-quantized but lacks {missing}")
        stored = {role: entries[k] for role, k in keys.items()}
        shape = codec.decoded_shape(name, stored)
        nbytes = sum(math.prod(s) * d.itemsize for d, s in stored.values())
        found[name] = StoredWeight(keys, shape, nbytes)
    return found


def decoded_shapes(shapes: Mapping[str, tuple[int, ...]], stored: Mapping[str, StoredWeight]) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensors as the model sees them: each quantized weight's parts replaced by the
    weight (decoded shape), every other key unchanged."""
    parts = {k for w in stored.values() for k in w.keys.values()}
    return {**{k: s for k, s in shapes.items() if k not in parts}, **{n: w.shape for n, w in stored.items()}}
