"""A safetensors checkpoint's tensors from its headers alone: every key's file, dtype, shape and byte
offset, so that the sharded loader can read any tensor (or any rows of one) by byte range."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError


def checkpoint_index(path: Path) -> dict[str, Entry]:
    """Every tensor of a safetensors checkpoint directory (one file or an index), from headers only."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    else:
        raise CheckpointError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    entries: dict[str, Entry] = {}
    for file in files:
        entries.update(_read_header(file))
    return entries


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor's data in the file


def _read_header(file: Path) -> dict[str, Entry]:
    """The safetensors header: 8-byte little-endian length, JSON {key: {dtype, shape, data_offsets}}."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    entries = {}
    for key, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{file}: tensor {key!r} has dtype {info['dtype']}, which the loader does not read")
        entries[key] = Entry(file, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + info["data_offsets"][0])
    return entries
