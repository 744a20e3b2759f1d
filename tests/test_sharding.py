"""Shard arithmetic: every expert owned exactly once, equal-size shards, padding, round trips."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from zp_compile.sharding import ExpertShard, pad_owned_rows, shard_rows, unshard_rows


@given(num_experts=st.integers(1, 300), world_size=st.integers(1, 64))
def test_every_expert_owned_exactly_once(num_experts, world_size):
    shards = [ExpertShard(num_experts, world_size, r) for r in range(world_size)]
    owned = [e for s in shards for e in range(s.start, s.stop)]
    assert owned == list(range(num_experts))
    assert len({s.shard_size for s in shards}) == 1
    assert all(s.num_owned <= s.shard_size for s in shards)
    assert shards[0].gathered_size >= num_experts > shards[0].gathered_size - world_size


@given(num_experts=st.integers(1, 20), world_size=st.integers(1, 25), width=st.integers(1, 4))
def test_gathered_shards_rebuild_the_bank(num_experts, world_size, width):
    full = torch.randn(num_experts, width, 3)
    shards = [shard_rows(full, ExpertShard(num_experts, world_size, r)) for r in range(world_size)]
    assert all(s.is_contiguous() and s.shape == shards[0].shape for s in shards)
    assert torch.equal(unshard_rows(torch.cat(shards), num_experts), full)


def test_one_rank_holds_everything():
    s = ExpertShard(8, 1, 0)
    assert (s.start, s.stop, s.shard_size, s.padding) == (0, 8, 8, 0)


def test_more_ranks_than_experts():
    shards = [ExpertShard(3, 5, r) for r in range(5)]
    assert [s.num_owned for s in shards] == [1, 1, 1, 0, 0]
    assert all(s.shard_size == 1 for s in shards)
    pad = shard_rows(torch.ones(3, 2), shards[4])
    assert pad.shape == (1, 2) and not pad.any()


def test_uneven_split():
    shards = [ExpertShard(10, 4, r) for r in range(4)]
    assert [(s.start, s.stop) for s in shards] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert shards[0].padding == 2


@pytest.mark.parametrize(
    "args, message",
    [((0, 2, 0), "num_experts"), ((4, 0, 0), "world_size"), ((4, 2, 2), "outside world size")],
)
def test_bad_plans_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        ExpertShard(*args)


def test_wrong_row_counts_are_named():
    with pytest.raises(ValueError, match="has 5 rows.*for 4 experts"):
        shard_rows(torch.zeros(5, 2), ExpertShard(4, 2, 0))
    with pytest.raises(ValueError, match="owns 2 experts, got 3"):
        pad_owned_rows(torch.zeros(3, 2), ExpertShard(4, 2, 0))
