"""Load a safetensors checkpoint so that no rank ever holds more than its share of the experts.

The model is built on the meta device (accelerate's ``init_empty_weights``), then every tensor is read
from the safetensors file by byte range: dense tensors whole, expert tensors only for this rank's rows.
Checkpoints store experts either stacked (``mlp.experts.gate_up_proj`` [E, ...]: we read rows
``[lo:hi]``) or one tensor per expert (``mlp.experts.3.gate_proj.weight``: we open only the experts in
``[lo, hi)``). The key -> parameter routing is transformers' own (``get_model_conversion_mapping`` and
``rename_source_key``, the calls its ``from_pretrained`` makes), so family-specific renames and fused
gate/up layouts come from one place.

Quantized checkpoints (block-FP8, MXFP4 experts; ``quantized.py``) are routed the same way: each
weight's stored tensors (FP8 values and block scales, MXFP4 blocks and scales) stand for the weight,
and are read for the same rows. A sharded layer's expert shards stay as stored (``keep_stored``, the
default): the forward gathers the stored bytes and decodes after the gather (``rewrite.StoredExperts``).
Everything else (dense FP8 linears, resident expert banks) is decoded to the parameter's dtype at load,
one tensor at a time.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..sharding import ExpertShard
from .discovery import MoELayer, find_moe_layers
from .errors import CheckpointError
from .quantized import Codec, StoredWeight, codec_for, decoded_shapes, stored_weights
from .rewrite import StoredExperts, StoredPiece, gather_spec, install_shards
from .safetensors_index import Entry, checkpoint_index


@dataclass
class Read:
    """One checkpoint tensor feeding (part of) one model parameter."""

    key: str
    expert: int | None  # None: the checkpoint tensor is the whole parameter (stacked if an expert param)
    dim: int | None = None  # fused gate/up: dim of the full [E, ...] parameter the part is concatenated on
    offset: int = 0  # ... and its offset along that dim
    transpose: tuple[int, int] | None = None


@dataclass
class ParamPlan:
    name: str
    shape: tuple[int, ...]
    is_expert: bool
    reads: list[Read] = field(default_factory=list)


def plan_reads(model: nn.Module, shapes: dict[str, tuple[int, ...]], expert_params: set[str]) -> dict[str, ParamPlan]:
    """Route every checkpoint key to the model parameter it fills (mirrors transformers' loader)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        Concatenate,
        MergeModulelist,
        Transpose,
        WeightConverter,
        WeightRenaming,
        apply_renamings,
        dot_natural_key,
        rename_source_key,
    )

    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    converter_of = {p: c for c in converters for p in c.source_patterns}
    meta = model.state_dict()
    plans: dict[str, ParamPlan] = {}
    unexpected = []
    for key in sorted(shapes, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if target not in meta and key in meta:
            target, pattern = key, None
        if target not in meta:
            unexpected.append(key)
            continue
        plan = plans.setdefault(target, ParamPlan(target, tuple(meta[target].shape), target in expert_params))
        if pattern is None:
            plan.reads.append(Read(key, None))
            continue
        converter = converter_of[pattern]
        ops = converter.operations
        if isinstance(ops[0], MergeModulelist) and ops[0].dim == 0 and plan.is_expert:
            found = re.search(pattern.replace("*", r"(\d+)"), apply_renamings(key, renamings))
            if found is None:
                raise CheckpointError(f"cannot read the expert index of checkpoint key {key!r} ({pattern})")
            read = Read(key, int(found.group(1)))
            if len(ops) == 2 and isinstance(ops[1], Concatenate):
                read.dim = ops[1].dim
                read.offset = converter.source_patterns.index(pattern)  # part number; offsets fixed below
            elif len(ops) != 1:
                raise CheckpointError(f"{key}: conversion {ops} is not supported by the sharded loader")
            plan.reads.append(read)
        elif len(ops) == 1 and isinstance(ops[0], Transpose):
            t = ops[0]
            same = t.check_dims and shapes[key] == plan.shape
            plan.reads.append(Read(key, None, transpose=None if same else (t.dim0, t.dim1)))
        else:
            raise CheckpointError(f"{key}: conversion {ops} is not supported by the sharded loader")
    if unexpected:
        raise CheckpointError(f"checkpoint keys that match no parameter of {type(model).__name__}: {unexpected[:8]}")
    for plan in plans.values():
        _fix_part_offsets(plan, shapes)
    return plans


def _fix_part_offsets(plan: ParamPlan, shapes: dict[str, tuple[int, ...]]) -> None:
    """Per-expert reads: check the indices are exactly 0..E-1 and turn part numbers into offsets."""
    per_expert = [r for r in plan.reads if r.expert is not None]
    if not per_expert:
        return
    parts: dict[int, list[int]] = defaultdict(list)
    for r in per_expert:
        parts[r.offset if r.dim is not None else 0].append(r.expert)
    for part, experts in parts.items():
        if sorted(experts) != list(range(plan.shape[0])):
            raise CheckpointError(
                f"{plan.name}: checkpoint holds experts {sorted(experts)} (part {part}) but the model has "
                f"{plan.shape[0]}"
            )
    if per_expert[0].dim is None:
        return
    for e in range(plan.shape[0]):
        offset = 0
        for r in sorted((r for r in per_expert if r.expert == e), key=lambda r: r.offset):
            r.offset, offset = offset, offset + shapes[r.key][r.dim - 1]  # per-expert tensor lacks dim 0


class _Reader:
    """Reads byte ranges of safetensors files straight into tensors (``pread``, no memory map), so a
    rank's resident memory holds what it asked for and nothing else: the rows [lo, hi) of a stacked
    expert tensor are one contiguous byte range. A quantized weight's stored tensors are read for the
    same rows and decoded (``codec``) to the dtype asked for."""

    def __init__(self, entries: dict[str, Entry], codec: Codec | None = None, stored: dict[str, StoredWeight] | None = None) -> None:
        self.entries = entries
        self.codec = codec
        self.stored = stored or {}
        self.log: list[tuple[str, object]] = []  # (checkpoint key, rows read), for tests

    def read(
        self,
        key: str,
        lo: int | None = None,
        hi: int | None = None,
        out: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Rows [lo, hi) (default all) of weight ``key``, into ``out`` when given; a quantized weight
        comes back decoded to ``out``'s dtype, else ``dtype``."""
        weight = self.stored.get(key)
        if weight is None:
            return self._read_stored(key, lo, hi, out)
        parts = {role: self._read_stored(k, lo, hi) for role, k in weight.keys.items()}
        value = self.codec.decode(parts, out.dtype if out is not None else dtype)
        return value if out is None else out.copy_(value)

    def _read_stored(self, key: str, lo: int | None, hi: int | None, out: torch.Tensor | None = None) -> torch.Tensor:
        e = self.entries[key]
        rows = e.shape[0] if e.shape else 1
        lo, hi = (0, rows) if lo is None else (lo, hi)
        row_bytes = (math.prod(e.shape[1:]) if e.shape else 1) * e.dtype.itemsize
        shape = (hi - lo, *e.shape[1:]) if e.shape else ()
        if out is None or out.dtype != e.dtype or not out.is_contiguous():
            dst = torch.empty(shape, dtype=e.dtype)
        else:
            dst = out
        with open(e.file, "rb", buffering=0) as f:
            f.seek(e.offset + lo * row_bytes)
            f.readinto(memoryview(dst.view(-1).view(torch.uint8).numpy()))
        self.log.append((key, "all" if (lo, hi) == (0, rows) else (lo, hi)))
        if dst is not out and out is not None:
            out.copy_(dst)
            return out
        return dst

    def whole(self, plan: ParamPlan, dtype: torch.dtype) -> torch.Tensor:
        (read,) = plan.reads
        return self.read(read.key, dtype=dtype)

    def expert_rows(self, plan: ParamPlan, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out[: hi - lo]`` with rows [lo, hi) of an expert parameter."""
        for r in plan.reads:
            if r.expert is None:
                if r.transpose:
                    out[: hi - lo].copy_(self.read(r.key, lo, hi, dtype=out.dtype).transpose(*r.transpose))
                else:
                    self.read(r.key, lo, hi, out=out[: hi - lo])
            elif lo <= r.expert < hi:
                target = out[r.expert - lo]
                if r.dim is not None:
                    part = self._shape(r.key)[r.dim - 1]
                    target = target.narrow(r.dim - 1, r.offset, part)
                first = len(self.log)
                self.read(r.key, out=target)
                # A per-expert tensor (and its scales) is this expert's row of the bank.
                self.log[first:] = [(key, (r.expert, r.expert + 1)) for key, _ in self.log[first:]]
            # else: another rank's expert, never opened
        return out

    def stored_rows(self, plan: ParamPlan, name: str, dtype: torch.dtype, shard: ExpertShard) -> tuple[StoredExperts, dict[str, torch.Tensor]]:
        """This rank's rows of expert parameter ``plan`` (called ``name`` in its module) as the checkpoint
        stores them, not decoded: slot name -> [S, ...] zero-padded tensor in its checkpoint dtype (FP8
        values, their scales, MXFP4 blocks and scales, a bf16 bias), and how the gathered slots decode
        into the ``dtype`` parameter. A fused projection read from per-expert gate and up weights keeps
        them as two pieces, each with its own block scales."""
        pieces, tensors = [], {}
        groups = _pieces(plan)
        for k, reads in enumerate(groups):
            weight = self.stored.get(reads[0].key)
            roles = list(weight.keys) if weight is not None else [""]
            slots = tuple((role, "_".join(p for p in (name, str(k) if len(groups) > 1 else "", role) if p)) for role in roles)
            for role, slot in slots:
                tensors[slot] = self._stacked_rows(reads, role, shard)
            pieces.append(StoredPiece(slots, self.codec if weight is not None else None, reads[0].transpose))
        bank = StoredExperts(name, dtype, tuple(pieces), groups[0][0].dim or 1)
        decoded = bank.decode({slot: t.to("meta") for slot, t in tensors.items()})  # shapes only
        if decoded.shape[1:] != plan.shape[1:]:
            raise CheckpointError(f"{plan.name}: the stored tensors decode to {list(decoded.shape[1:])} per expert, "
                                  f"the model's parameter is {list(plan.shape[1:])}")  # fmt: skip
        return bank, tensors

    def _stacked_rows(self, reads: list[Read], role: str, shard: ExpertShard) -> torch.Tensor:
        """[S, ...] of stored tensor ``role`` of one piece: this rank's rows of a stacked tensor, or its
        experts' per-expert tensors stacked; zero padding rows."""
        def key_of(read: Read) -> str:
            return self.stored[read.key].keys[role] if role else read.key

        if reads[0].expert is None:
            (read,) = reads
            e = self.entries[key_of(read)]
            out = torch.zeros((shard.shard_size, *e.shape[1:]), dtype=e.dtype)
            self._read_stored(key_of(read), shard.start, shard.stop, out[: shard.num_owned])
            return out
        e = self.entries[key_of(reads[0])]
        out = torch.zeros((shard.shard_size, *e.shape), dtype=e.dtype)
        for read in reads:
            if shard.start <= read.expert < shard.stop:  # else another rank's expert, never opened
                self._read_stored(key_of(read), None, None, out[read.expert - shard.start])
                self.log[-1] = (key_of(read), (read.expert, read.expert + 1))  # this expert's row of the bank
        return out

    def _shape(self, key: str) -> tuple[int, ...]:
        """The shape of weight ``key`` as the model sees it (decoded, for a quantized weight)."""
        weight = self.stored.get(key)
        return weight.shape if weight is not None else self.entries[key].shape


def _pieces(plan: ParamPlan) -> list[list[Read]]:
    """The reads of an expert parameter by stored weight: its one stacked tensor, or its per-expert
    tensors grouped by the part of the parameter they fill (fused gate/up: gate, then up)."""
    if plan.reads[0].expert is None:
        return [plan.reads]
    parts: dict[int, list[Read]] = defaultdict(list)
    for read in plan.reads:
        parts[read.offset if read.dim is not None else 0].append(read)
    return [parts[offset] for offset in sorted(parts)]


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put a checkpoint tensor in place: a persistent buffer stays a buffer, a parameter a parameter."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)


@dataclass
class _Routed:
    """A checkpoint's tensors routed to the parameters of its model, built on the meta device."""

    model: nn.Module
    layers: list[MoELayer]
    entries: dict[str, Entry]
    codec: Codec | None
    stored: dict[str, StoredWeight]  # the quantized weights: decoded name -> stored tensors
    plans: dict[str, ParamPlan]


def _routed(path: Path, dtype: torch.dtype | None) -> _Routed:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} is not a checkpoint directory: no config.json")
    config = AutoConfig.from_pretrained(path)
    codec = codec_for(getattr(config, "quantization_config", None), where=str(path))
    entries = checkpoint_index(path)
    stored = stored_weights(codec, {k: (e.dtype, e.shape) for k, e in entries.items()}) if codec else {}
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or getattr(config, "dtype", None) or torch.float32)
    layers = find_moe_layers(model)
    expert_names = {f"{layer.path}.{p}" for layer in layers for p in layer.expert_params}
    plans = plan_reads(model, decoded_shapes({k: e.shape for k, e in entries.items()}, stored), expert_names)
    return _Routed(model, layers, entries, codec, stored, plans)


@dataclass(frozen=True)
class StoredSizes:
    """Bytes per weight as a quantized checkpoint stores them, scales included."""

    method: str
    expert_bytes_per_weight: float  # every tensor of the routed experts (biases too) over their weights
    linear_bytes_per_weight: float  # the other linear layers: attention, shared experts, dense MLPs


def stored_sizes(path: str | Path) -> StoredSizes | None:
    """What checkpoint ``path`` spends per weight, from its headers (nothing read); None when it is not
    quantized. The quantized linear layers outside the experts are averaged; where none is (MXFP4
    quantizes experts only) they are at the checkpoint's dtype."""
    c = _routed(Path(path), None)
    if c.codec is None:
        return None

    def nbytes(key: str) -> int:
        weight = c.stored.get(key)
        return weight.stored_bytes if weight is not None else math.prod(c.entries[key].shape) * c.entries[key].dtype.itemsize

    experts = [p for p in c.plans.values() if p.is_expert]
    expert_bytes = sum(nbytes(r.key) for p in experts for r in p.reads) / sum(math.prod(p.shape) for p in experts)
    routed_keys = {r.key for p in experts for r in p.reads}
    linear = [w for key, w in c.stored.items() if key not in routed_keys]
    if linear:
        linear_bytes = sum(w.stored_bytes for w in linear) / sum(math.prod(w.shape) for w in linear)
    else:
        linear_bytes = next(iter(c.model.parameters())).dtype.itemsize
    return StoredSizes(c.codec.method, expert_bytes, linear_bytes)


def load_sharded(
    path: str | Path,
    group: torch.distributed.ProcessGroup | None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    resident_first_layer: bool = False,
    keep_stored: bool = True,
    reader_log: list | None = None,
) -> tuple[nn.Module, list[MoELayer]]:
    """Build the model of checkpoint ``path`` with this rank's expert shards only (no full bank ever),
    on ``device`` (default: the CPU). Each tensor is read into host memory and moved to the device as
    it is read: the host never holds more than one tensor of a GPU rank's model.

    ``keep_stored``: a quantized checkpoint's expert shards stay as stored (FP8 values and scales, MXFP4
    blocks and scales, biases in their checkpoint dtype), gathered so and decoded after each gather;
    False decodes them at load to the model's dtype (for comparison).

    Returns the model (eval mode) and its MoE layers."""
    path = Path(path)
    c = _routed(path, dtype)
    model, layers, plans = c.model, c.layers, c.plans
    reader = _Reader(c.entries, c.codec, c.stored)
    if reader_log is not None:
        reader.log = reader_log
    # Each tensor takes the dtype its (meta) parameter was built with: the requested dtype, except
    # where the model keeps a module in fp32 (transformers' _keep_in_fp32_modules).
    dtypes = {name: t.dtype for name, t in model.state_dict().items()}

    device = torch.device(device or "cpu")
    for name, plan in plans.items():
        if not plan.is_expert:
            _set_tensor(model, name, reader.whole(plan, dtypes[name]).to(device=device, dtype=dtypes[name]))

    world_size = group.size() if group is not None else 1
    rank = group.rank() if group is not None else 0
    for layer in layers:
        _load_layer(model, layer, plans, reader, dtypes, group, world_size, rank, resident_first_layer, keep_stored, device)

    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"{path}: no checkpoint tensor for parameters {left[:8]}")
    return model.to(device).eval(), layers  # .to: the buffers built at init (rotary frequencies)


def _load_layer(model, layer: MoELayer, plans, reader, dtypes, group, world_size, rank, resident_first_layer, keep_stored, device):
    names = [f"{layer.path}.{p}" for p in layer.expert_params]
    missing = [n for n in names if n not in plans]
    if missing:
        raise CheckpointError(f"no checkpoint tensor for expert parameters {missing}")
    whole = world_size == 1 or (resident_first_layer and layer.index == 0)
    plan = ExpertShard(layer.num_experts, 1 if whole else world_size, 0 if whole else rank)
    if not whole and keep_stored and reader.codec is not None:
        banks, shards = [], {}
        for short, name in zip(layer.expert_params, names):
            bank, stored = reader.stored_rows(plans[name], short, dtypes[name], plan)
            banks.append(bank)
            shards.update({slot: t.to(device) for slot, t in stored.items()})
        install_shards(layer, shards, gather_spec(layer, group, tuple(banks)))
        return
    # [shard_size, ...] zero-padded; the owned rows are read into it directly (no full bank, no copy).
    shards = {
        short: reader.expert_rows(
            plans[name], plan.start, plan.stop, torch.zeros((plan.shard_size, *plans[name].shape[1:]), dtype=dtypes[name])
        ).to(device)
        for short, name in zip(layer.expert_params, names)
    }
    if whole:
        for name, short in zip(names, layer.expert_params):
            _set_tensor(model, name, shards[short])
    else:
        install_shards(layer, shards, gather_spec(layer, group))
