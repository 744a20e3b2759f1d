"""Expert-dimension shard arithmetic.

Every rank holds the same number of expert rows, ``shard_size = ceil(E / N)``, so that one
``all_gather_into_tensor`` of equal-sized shards rebuilds ``[N * shard_size, ...]`` and a narrow to
``E`` rows gives back the full bank. Rank ``r`` owns experts ``[r * shard_size, (r + 1) * shard_size)``
clipped to ``E``; the rest of its shard is zero padding. With more ranks than experts the high ranks
own no expert at all and hold one padding row each (the gather still needs a buffer from them).

This is pure arithmetic with no process group, so it can be unit-tested for any world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertShard:
    """Which expert rows one rank holds, out of ``num_experts`` split over ``world_size`` ranks."""

    num_experts: int
    world_size: int
    rank: int

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")

    @property
    def shard_size(self) -> int:
        """Rows every rank holds, padding included."""
        return math.ceil(self.num_experts / self.world_size)

    @property
    def start(self) -> int:
        """First expert this rank owns (may equal ``stop`` when it owns none)."""
        return min(self.rank * self.shard_size, self.num_experts)

    @property
    def stop(self) -> int:
        return min((self.rank + 1) * self.shard_size, self.num_experts)

    @property
    def num_owned(self) -> int:
        return self.stop - self.start

    @property
    def gathered_size(self) -> int:
        """Rows of the gathered buffer before the narrow back to ``num_experts``."""
        return self.shard_size * self.world_size

    @property
    def padding(self) -> int:
        return self.gathered_size - self.num_experts


def shard_rows(full: torch.Tensor, shard: ExpertShard) -> torch.Tensor:
    """This rank's ``[shard_size, ...]`` slice of a full ``[E, ...]`` expert tensor, zero-padded.

    Returns a fresh contiguous tensor, so the caller can drop ``full`` and free its memory.
    """
    if full.shape[0] != shard.num_experts:
        raise ValueError(
            f"expert tensor has {full.shape[0]} rows in dim 0 but the shard plan is for "
            f"{shard.num_experts} experts"
        )
    return pad_owned_rows(full[shard.start : shard.stop], shard)


def pad_owned_rows(owned: torch.Tensor, shard: ExpertShard) -> torch.Tensor:
    """This rank's owned rows ``[num_owned, ...]`` -> its zero-padded ``[shard_size, ...]`` shard."""
    if owned.shape[0] != shard.num_owned:
        raise ValueError(f"rank {shard.rank} owns {shard.num_owned} experts, got {owned.shape[0]} rows")
    out = owned.new_zeros((shard.shard_size, *owned.shape[1:]))
    out[: shard.num_owned].copy_(owned)
    return out


def unshard_rows(gathered: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Drop the padding rows of a gathered ``[N * shard_size, ...]`` buffer: ``[E, ...]``."""
    return gathered.narrow(0, 0, num_experts)
