"""The front end's scheduler: block hashes, the per-rank prefix-cache view, routing policies, FLOPs after
reuse, saturation-threshold admission on an injected clock, discard/drain, and the replay. Pure Python:
no model, no ranks, no timing asserts."""

from __future__ import annotations

import hashlib
import math
import random
import struct

import pytest

from zp_compile.costmodel.flops import flops_per_request
from zp_compile.costmodel.spec import ModelSpec
from zp_compile.prefix import BLOCK, PrefixCache, block_hashes, cache_tokens_for_bytes, cacheable_blocks, kv_bytes_per_token
from zp_compile.server.policies import BoundedPrefix, RankView, RoundRobin, cache_aware, least_flops, make_policy
from zp_compile.server.replay import replay
from zp_compile.server.routing import RouterSettings, ThresholdScheduler
from zp_compile.server.scheduler import STEPS_IN_FLIGHT, Sequence

# The planner's hand-counted toy (tests/test_planner.py): 856 active parameters per token, attention
# 2 * heads * (qk + v) = 32 FLOPs per key per layer over 2 layers, lm_head 2 * 8 * 10 = 160.
TOY = ModelSpec("toy", layers=2, hidden=8, vocab=10, heads=2, kv_heads=1, head_dim=4, experts=4, top_k=2,
                expert_ffn=6, moe_layers=(1,), dense_ffn=5)  # fmt: skip


def seq(ids) -> Sequence:
    return Sequence(list(ids))


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def blocks(n_blocks: int, start: int = 100) -> list[int]:
    return list(range(start, start + n_blocks * BLOCK))


def span(n_tokens: int, start: int = 100) -> list[int]:
    """Distinct token ids; the scenarios below use multiples of 16, whole blocks for a BLOCK that divides 16."""
    return list(range(start, start + n_tokens))


assert 16 % BLOCK == 0, "the scenarios below count whole blocks in multiples of 16 tokens"


# ---- block hashing ---------------------------------------------------------------------------------


def test_block_hashes_are_chained_blake2b_of_full_blocks():
    a, b, x = blocks(1, 0), blocks(1, 500), blocks(1, 900)
    ha, hb = block_hashes(a + x), block_hashes(b + x)
    assert len(ha) == 2 and ha[0] != hb[0]
    assert ha[1] != hb[1]  # the same block after a different prefix
    assert block_hashes(a + x) == ha  # deterministic
    first = hashlib.blake2b(struct.pack(f"<{BLOCK}I", *a), digest_size=16).digest()
    assert ha[0] == first  # content-defined (not Python's salted hash): the same in every process
    assert ha[1] == hashlib.blake2b(first + struct.pack(f"<{BLOCK}I", *x), digest_size=16).digest()


def test_partial_last_block_is_not_hashed_and_the_last_token_is_never_cached():
    B = BLOCK
    assert len(block_hashes(list(range(3 * B - 1)))) == 2
    assert len(block_hashes(list(range(3 * B)))) == 3
    assert block_hashes([]) == [] and block_hashes(list(range(B - 1))) == []
    assert [cacheable_blocks(n) for n in (0, 1, B, B + 1, 2 * B, 2 * B + 1, 3 * B, 3 * B + 1)] == [0, 0, 0, 1, 1, 2, 2, 3]
    cache = PrefixCache(1024)
    prompt = blocks(2)  # two whole blocks: both are held after it runs ...
    cache.insert(block_hashes(prompt))
    assert len(cache) == 2
    # ... but the same prompt again reuses one: its last token's logits are the answer.
    assert cache.match(block_hashes(prompt), cacheable_blocks(len(prompt))) == 1
    assert cache.match(block_hashes(prompt + [7]), cacheable_blocks(2 * B + 1)) == 2


# ---- the prefix-cache view ----------------------------------------------------------------------------


def test_lru_evicts_leaves_first_and_a_parent_keeps_its_own_age():
    h0, h1, h2 = block_hashes(blocks(3))
    _, g1 = block_hashes(blocks(1) + blocks(1, 700))
    k0, j0 = block_hashes(blocks(1, 900))[0], block_hashes(blocks(1, 1200))[0]
    cache = PrefixCache(4 * BLOCK)
    assert cache.insert([h0, h1, h2]) == []  # uses: h0 1, h1 2, h2 3
    assert cache.insert([h0, g1]) == []  # h0 4, g1 5: full
    # Least recently used is h1, but h2 depends on it: the LRU leaf h2 goes first.
    assert cache.insert([k0]) == [h2]
    # Now h1 is a leaf, with its own last use (2), older than g1's (5).
    assert cache.insert([j0]) == [h1]
    assert h0 in cache and g1 in cache and k0 in cache and j0 in cache and len(cache) == 4
    assert cache.match([h0, h1, h2]) == 1


def test_a_chain_longer_than_the_budget_keeps_its_head():
    chain = block_hashes(blocks(4))
    cache = PrefixCache(2 * BLOCK)
    assert cache.insert(chain) == []
    assert cache.match(chain) == 2
    empty = PrefixCache(0)
    empty.insert(chain)
    assert len(empty) == 0 and empty.match(chain) == 0


def test_a_step_reuses_blocks_an_earlier_batch_mate_contains():
    """One packed forward: a row reads the keys and values its batch-mates compute (rule 4), even with a
    budget of 0 (nothing kept between steps)."""
    prompt = blocks(3) + [1]
    h = block_hashes(prompt)
    limit = cacheable_blocks(len(prompt))
    for budget in (1024, 0):
        cache = PrefixCache(budget)
        hits, evicted = cache.step([h, block_hashes(blocks(2, start=500) + [2]), h], [limit, 2, limit])
        assert hits == [0, 0, 3] and evicted == []  # the third reuses the first's 3 blocks in the step
        assert cache.step([h], [limit])[0] == ([3] if budget else [0])
    # Only earlier rows: the first row of a batch cannot reuse what a later one computes.
    cache = PrefixCache(1024)
    longer = block_hashes(blocks(3) + blocks(1, start=900) + [3])
    assert cache.step([h, longer], [limit, 4])[0] == [0, 3]
    assert PrefixCache(1024).step([longer, h], [4, limit])[0] == [0, 3]


def test_kv_budget_from_bytes():
    per_token = TOY.layers * 2 * TOY.kv_heads * TOY.head_dim * 2  # K and V, bf16
    assert kv_bytes_per_token(TOY) == per_token == 32
    assert cache_tokens_for_bytes(TOY, 100 * per_token) == 96  # whole blocks only


# ---- policies ---------------------------------------------------------------------------------------


def view(matched=0, flops=10.0, load_flops=0.0, load_tokens=0, tree_tokens=0) -> RankView:
    return RankView(matched, flops, load_flops, load_tokens, tree_tokens)


def test_round_robin_and_least_flops():
    rr = RoundRobin()
    ranks = [view(matched=64), view(), view()]
    assert [rr(ranks, 100) for _ in range(4)] == [0, 1, 2, 0]
    # least_flops is blind to prefixes: the empty rank wins over the one holding the prompt.
    assert least_flops([view(matched=96, flops=1.0, load_flops=5.0), view(load_flops=4.0)], 100) == 1
    assert least_flops([view(load_flops=4.0), view(load_flops=4.0)], 100) == 0


def test_cache_aware_follows_sglang():
    # Balanced: the longest match wins when its match rate (48/100) is over 0.3 ...
    assert cache_aware([view(load_tokens=100), view(matched=48, load_tokens=120)], 100) == 1
    # ... else the smallest tree, whatever the match.
    assert cache_aware([view(matched=16, tree_tokens=500), view(tree_tokens=200)], 100) == 1
    # Imbalanced needs both: difference over 64 tokens AND ratio over 1.5. Then the least loaded.
    assert cache_aware([view(matched=96, load_tokens=200), view(load_tokens=100)], 100) == 1
    assert cache_aware([view(matched=96, load_tokens=160), view(load_tokens=100)], 100) == 0  # ratio 1.6, difference 60
    assert cache_aware([view(matched=96, load_tokens=1400), view(load_tokens=1000)], 100) == 0  # difference 400, ratio 1.4


def test_zero_prefill_takes_the_longest_prefix_within_the_bound():
    policy = BoundedPrefix(bound_flops=100.0)
    # The rank holding 64 tokens wins although it is busier: 50 + 20 <= 0 + 100.
    assert policy([view(load_flops=0.0, flops=90.0), view(matched=64, load_flops=50.0, flops=20.0)], 80) == 1
    # The longer of two matches wins.
    assert policy([view(matched=32, flops=50.0), view(matched=64, flops=20.0), view(flops=90.0)], 80) == 1
    # Over the bound (90 + 20 > 0 + 100): the rank whose load after taking it is least.
    assert policy([view(load_flops=0.0, flops=90.0), view(matched=64, load_flops=90.0, flops=20.0)], 80) == 0
    # ... which counts a shorter match elsewhere: rank 2 (40 + 30) beats the idle rank 0 (0 + 90).
    ranks = [view(flops=90.0), view(matched=64, load_flops=90.0, flops=20.0), view(matched=32, load_flops=40.0, flops=30.0)]
    assert policy(ranks, 80) == 2
    # No match anywhere: least load after taking it.
    assert policy([view(load_flops=30.0), view(load_flops=20.0)], 80) == 1
    assert make_policy("zero_prefill", 50.0, balance_bound=2.0) == BoundedPrefix(100.0)
    with pytest.raises(ValueError, match="unknown routing policy 'fifo'"):
        make_policy("fifo", 1.0)


# ---- FLOPs after reuse ------------------------------------------------------------------------------


def test_flops_of_new_and_cached_tokens_by_hand():
    clock = Clock()
    settings = RouterSettings(threshold_flops=1.0, max_tokens=256, max_wait_ms=0, cache_tokens=1024)
    sched = ThresholdScheduler(1, TOY, settings, clock)
    prompt = span(32) + [5]  # 33 tokens: the first 32 in whole blocks, all cacheable
    first, again = seq(prompt), seq(prompt)
    sched.add([first])
    assert sched.next_step() == [[first]]
    # 33 new tokens: 2 * 856 * 33 dense + 32 FLOPs per key in 2 layers over 1 + 2 + ... + 33 keys + lm_head.
    assert first.cached_tokens == 0 and first.flops == 2 * 856 * 33 + 64 * (33 * 34 // 2) + 160 == 92560
    sched.add([again])
    assert sched.views(again)[0].matched == 32
    assert sched.next_step() == [[again]]
    # 1 new token after 32 cached ones: it attends to 33 keys.
    assert again.cached_tokens == 32 and again.flops == 2 * 856 + 64 * 33 + 160 == 3984
    assert again.flops == flops_per_request(TOY, new=1, cached=32)
    assert sched.last_step.cached_tokens == [32] and sched.last_step.tokens == [1] and sched.last_step.flops == [3984]


# ---- admission ----------------------------------------------------------------------------------------


def test_light_load_holds_a_lone_request_for_max_wait_then_runs_it():
    clock = Clock()
    T = flops_per_request(TOY, 1000)
    sched = ThresholdScheduler(2, TOY, RouterSettings(T, max_tokens=256, max_wait_ms=50.0), clock)
    assert sched.next_step() == [[], []] and sched.wake_in() is None  # nothing waiting
    s = seq(range(40))
    sched.add([s])
    assert sched.next_step() == [[], []]
    assert sched.wake_in() == pytest.approx(0.050)
    clock.t = 0.049
    assert sched.next_step() == [[], []] and sched.waiting() == 1
    assert sched.wake_in() == pytest.approx(0.001)
    clock.t = 0.050
    batches = sched.next_step()
    assert batches == [[s], []] and sched.waiting() == 0
    assert sched.last_step.below_threshold and sched.wake_in() is None


def test_a_step_under_T_is_held_unless_a_budget_is_full():
    """A burst's first arrivals: running them at once would make a step of one or two sequences while
    the rest of the burst is still arriving; the step is held (max_wait_ms). A rank that refused a
    sequence for its token budget cannot take more: that step runs at once."""
    clock = Clock()
    T = flops_per_request(TOY, 1000)
    sched = ThresholdScheduler(1, TOY, RouterSettings(T, max_tokens=256, max_wait_ms=50.0, cache_tokens=1024), clock)
    prefix = span(64)
    first, second = seq(prefix + [1]), seq(prefix + [2])
    sched.add([first, second])
    assert sched.next_step() == [[]] and sched.wake_in() == pytest.approx(0.050)
    clock.t = 0.050
    assert sched.next_step() == [[first, second]]  # the second reuses the first's blocks in the same step
    assert [first.cached_tokens, second.cached_tokens] == [0, 64]
    wide = [seq(span(144, start=1000 + 200 * i)) for i in range(2)]  # 144 tokens each: one per 256-token step
    clock.t = 1.0
    sched.add(wide)
    assert sched.next_step() == [[wide[0]]] and sched.last_step.below_threshold  # not held: the budget refused one


def test_heavy_load_fills_every_rank_to_T_within_the_budgets():
    rng = random.Random(0)
    clock = Clock()
    T = flops_per_request(TOY, 120)
    settings = RouterSettings(T, max_tokens=1024, max_seqs=16, max_wait_ms=10.0, policy="least_flops")
    sched = ThresholdScheduler(3, TOY, settings, clock)
    lengths = [rng.randrange(200, 250) if rng.random() < 0.1 else rng.randrange(20, 90) for _ in range(300)]
    seqs = [seq(rng.randrange(10) for _ in range(n)) for n in lengths]
    sched.add(seqs)
    ran, below, steps, held = [], 0, 0, 0
    while sched.waiting():
        batches = sched.next_step()
        if not any(batches):
            held += 1
            clock.t += sched.wake_in()
            continue
        steps += 1
        info = sched.last_step
        for r, (b, f) in enumerate(zip(batches, info.flops)):
            assert len(b) <= 16 and sum(len(s.ids) - s.cached_tokens for s in b) == info.tokens[r] <= 1024
            assert f == pytest.approx(sum(s.flops for s in b))
            if b and f - b[-1].flops >= T:  # past T only to top up to a busier rank's level
                assert f <= max(p for i, p in enumerate(info.flops) if i != r)
        assert info.below_threshold == (max(info.flops) < T)
        if sched.waiting():
            assert min(info.flops) >= T  # work left over: every rank was filled to T
        below += info.below_threshold
        ran += [s for b in batches for s in b]
    assert sorted(map(id, ran)) == sorted(map(id, seqs))  # each sequence exactly once
    assert steps > 10 and held <= 1 and below <= 1  # only the tail may wait, and run, under T


def test_fill_queue_runs_a_deep_queue_in_fewer_larger_steps():
    """fill="queue": a rank's step is the larger of T and its share of the waiting work over the steps in
    flight. 300 queued sequences then run in a few large steps (each sequence once, every rank at least
    at the target while work is left); with fill="threshold" each step stops at T."""
    T = flops_per_request(TOY, 120)

    def run(fill: str) -> tuple[int, list[float], float]:  # steps, each step's target, the queued FLOPs
        rng = random.Random(0)
        clock = Clock()
        settings = RouterSettings(T, max_tokens=8192, max_seqs=256, max_wait_ms=10.0, policy="least_flops", fill=fill)
        sched = ThresholdScheduler(3, TOY, settings, clock)
        seqs = [seq(rng.randrange(10) for _ in range(rng.randrange(20, 90))) for _ in range(300)]
        sched.add(seqs)
        total = sched.waiting_flops()
        ran, targets = [], []
        while sched.waiting():
            batches = sched.next_step()
            if not any(batches):
                clock.t += sched.wake_in()
                continue
            targets.append(sched.target)
            if sched.waiting():
                assert min(sched.last_step.flops) >= sched.target >= T
            ran += [s for b in batches for s in b]
        assert sorted(map(id, ran)) == sorted(map(id, seqs))
        return len(targets), targets, total

    steps_at_t, targets_at_t, _ = run("threshold")
    steps, targets, total = run("queue")
    assert set(targets_at_t) == {T}
    assert targets[0] == pytest.approx(total / (3 * STEPS_IN_FLIGHT))  # the first step: a share of everything
    assert steps * 3 < steps_at_t  # 6 steps against 24


def test_fill_queue_under_light_load_gives_the_steps_of_fill_threshold():
    T = flops_per_request(TOY, 1000)
    out = []
    for fill in ("threshold", "queue"):
        sched = ThresholdScheduler(2, TOY, RouterSettings(T, max_tokens=256, max_wait_ms=0.0, fill=fill), Clock())
        seqs = [seq(range(i, i + 40)) for i in range(5)]
        sched.add(seqs)
        out.append([[seqs.index(s) for s in b] for b in sched.next_step()])
        assert sched.target == T  # the waiting work is under T per rank: T
    assert out[0] == out[1]


def test_a_sequence_over_the_token_budget_is_passed_over_for_one_step_not_starved():
    sched = ThresholdScheduler(1, TOY, RouterSettings(1e12, max_tokens=128, max_wait_ms=0.0), Clock())
    a, long, c, d = seq(range(16)), seq(range(200, 320)), seq(range(400, 416)), seq(range(500, 516))
    sched.add([a, long, c, d])
    assert sched.next_step() == [[a, c, d]]  # 16 + 120 tokens would not fit 128: the short ones go on
    assert sched.next_step() == [[long]]  # now the head: it always runs


def test_a_rank_filled_to_T_tops_up_to_the_busiest_ranks_flops():
    """Lockstep: the busiest rank sets the step's time. A rank that reached T with small rows keeps taking
    them while its FLOPs stay within the busiest rank's (which two misses pushed past T)."""
    T = 3 * flops_per_request(TOY, 100)
    settings = RouterSettings(T, max_tokens=4096, max_wait_ms=0.0, cache_tokens=4096, balance_bound=1e9)
    sched = ThresholdScheduler(2, TOY, settings, Clock())
    shared = span(128)
    warm = seq(shared + [9])
    sched.add([warm])
    sched.next_step()
    hits = [seq(shared + [i] * 15) for i in range(40)]  # 15 new tokens after 128 cached
    misses = [seq(span(160, start=1000 + 200 * i) + [5]) for i in range(3)]
    sched.add(hits)
    sched.add(misses)
    h, m = warm.rank, 1 - warm.rank
    assert {s.rank for s in hits} == {h} and {s.rank for s in misses} == {m}
    batches = sched.next_step()
    info = sched.last_step
    row = flops_per_request(TOY, 15, 128)  # one hit's row: packed, no padding
    to_T = math.ceil(T / row)
    assert len(batches[m]) == 2 and info.flops[m] >= T  # the misses' rank crossed T by most of a miss
    assert len(batches[h]) == int(info.flops[m] // row) > to_T  # more hits than T needs: up to that level
    assert info.flops[h] <= info.flops[m] < info.flops[h] + row
    assert batches[h] == hits[: len(batches[h])]  # in arrival order


def test_an_idle_rank_takes_work_its_busy_neighbour_cannot_run_this_step():
    clock = Clock()
    T = flops_per_request(TOY, 100)
    settings = RouterSettings(T, max_tokens=512, max_wait_ms=10.0, cache_tokens=4096)
    sched = ThresholdScheduler(2, TOY, settings, clock)
    sched.policy = lambda views, n_tokens: 0  # every sequence routed to rank 0
    seqs = [seq(span(32, start=100 * i) + [i] * 20) for i in range(12)]  # 52 tokens each, nothing shared
    sched.add(seqs)
    batches = sched.next_step()
    # Rank 0 fills to T in arrival order; rank 1 takes the oldest of the rest (each costs it what it
    # would cost rank 0) to T as well.
    n0 = len(batches[0])
    assert batches[0] == seqs[:n0] and batches[1] == seqs[n0 : n0 + len(batches[1])]
    assert min(sched.last_step.flops) >= T


def test_an_idle_rank_leaves_a_neighbours_hits_where_their_prefix_is():
    """Taking them would make it compute their shared prefix again (here 4x what each costs at home):
    hit rate lost, and its cache filled, for a step that is no shorter (the busy rank sets it)."""
    clock = Clock()
    T = flops_per_request(TOY, 100)
    settings = RouterSettings(T, max_tokens=512, max_wait_ms=10.0, cache_tokens=4096, balance_bound=1e9)
    sched = ThresholdScheduler(2, TOY, settings, clock)
    prefix = span(64)
    seqs = [seq(prefix + [i] * 20) for i in range(12)]
    sched.add(seqs)
    assert {s.rank for s in seqs} == {0}  # every prompt follows the first one's prefix (bound disabled)
    steps = []
    while sched.waiting():
        clock.t += 1.0  # past max_wait_ms: a step under T is not held back
        batches = sched.next_step()
        assert batches[1] == []  # rank 1 never computes the prefix
        steps.append(batches[0])
    assert sum(steps, []) == seqs and len(steps) > 1  # in arrival order, over several steps
    assert steps[0][:2] == seqs[:2]  # the first computes the prefix, the second reuses it in the same step
    assert [s.cached_tokens for s in seqs] == [0] + [64] * 11


def test_a_ranks_hits_run_before_the_misses_queued_ahead_of_them():
    """After its head, a rank takes the sequences that reuse its cached blocks first: each gives a step
    its prompt for a fraction of the compute, and running them before new prefixes are computed keeps
    their prefix from being evicted first. The misses keep their order; the next head runs first."""
    clock = Clock()
    T = flops_per_request(TOY, 257) + 20 * flops_per_request(TOY, 16, 256)
    sched = ThresholdScheduler(1, TOY, RouterSettings(T, max_tokens=4096, max_wait_ms=0.0, cache_tokens=8192), clock)
    prefix = span(256)
    sched.add([seq(prefix + [1])])
    sched.next_step()  # the prefix is cached
    misses = [seq(span(256, start=5000 + 300 * i) + [2]) for i in range(3)]  # 257 new tokens each
    hits = [seq(prefix + [3 + i] * 16) for i in range(30)]  # 16 new tokens each over the cached 256
    sched.add(misses[:2] + hits + misses[2:])
    first = sched.next_step()[0]
    assert first == [misses[0]] + hits[:20]  # the head, then hits up to T: misses[1] waits
    second = sched.next_step()[0]
    assert second[0] == misses[1] and second[1:11] == hits[20:]  # the new head first, then the hits left


def test_a_step_under_T_is_evened_out_across_the_ranks():
    """Work that fits under T on one rank is split so the busiest rank (which sets the lockstep step's
    time) carries as little as possible; a sequence that reuses its prefix where it is stays there when
    moving it would only cost more."""
    clock = Clock()
    settings = RouterSettings(1e12, max_tokens=1024, max_wait_ms=0.0, cache_tokens=4096)
    sched = ThresholdScheduler(2, TOY, settings, clock)
    sched.policy = lambda views, n_tokens: 0  # every sequence routed to rank 0
    seqs = [seq(span(32, start=100 * i) + [i]) for i in range(6)]  # 33 tokens each, nothing shared
    sched.add(seqs)
    batches = sched.next_step()
    assert batches[0] == seqs[:3] and sorted(map(id, batches[1])) == sorted(map(id, seqs[3:]))  # the youngest moved
    assert sched.last_step.flops[0] == pytest.approx(sched.last_step.flops[1])
    # A hit stays where its prefix is: on rank 1 it would compute 64 tokens instead of 1.
    prefix = span(64, start=700)
    sched.add([seq(prefix + [1])])
    sched.next_step()  # rank 0 caches the prefix
    hits = [seq(prefix + [i]) for i in range(2, 4)]
    sched.add(hits)
    assert sched.next_step() == [hits, []]


def test_a_batch_mates_prefix_is_reused_in_the_same_step():
    sched = ThresholdScheduler(1, TOY, RouterSettings(1e12, max_tokens=1024, max_wait_ms=0.0, cache_tokens=1024), Clock())
    shared = span(48)
    a, b, other, c = seq(shared + [1] * 8), seq(shared + [2] * 8), seq(span(48, start=500) + [3]), seq(shared + [4] * 8)
    sched.add([a, b, other, c])
    assert sched.next_step() == [[a, b, other, c]]
    assert [s.cached_tokens for s in (a, b, other, c)] == [0, 48, 0, 48]  # b and c read the blocks of a's first 48 tokens
    F = lambda new, cached: flops_per_request(TOY, new, cached)  # noqa: E731
    assert sched.last_step.flops == [pytest.approx(F(56, 0) + 2 * F(8, 48) + F(49, 0))]


def test_a_packed_step_costs_its_rows_true_flops_whatever_their_shapes():
    """No padding: hits and a miss share a step, and the rank's FLOPs are the rows' own."""
    settings = RouterSettings(1e12, max_tokens=4096, max_wait_ms=0.0, cache_tokens=4096)
    sched = ThresholdScheduler(1, TOY, settings, Clock())
    shared = span(128)
    sched.add([seq(shared + [9])])
    sched.next_step()  # the 128-token prefix is cached now
    hits = [seq(shared + [i] * 15) for i in range(3)]  # 15 new tokens each after 128 cached
    miss = seq(span(128, start=900) + [5])  # 129 new tokens
    sched.add([hits[0], miss, *hits[1:]])
    assert sched.next_step() == [[*hits, miss]]  # the head, the hits, then the miss
    info = sched.last_step
    assert info.flops == [pytest.approx(3 * flops_per_request(TOY, 15, 128) + flops_per_request(TOY, 129))]
    assert info.tokens == [3 * 15 + 129] and info.cached_tokens == [3 * 128]


def test_the_view_matches_a_rank_side_cache_that_follows_the_contract():
    rng = random.Random(1)
    clock = Clock()
    budget = 24 * BLOCK
    settings = RouterSettings(flops_per_request(TOY, 150), max_tokens=512, max_wait_ms=5.0, cache_tokens=budget)
    sched = ThresholdScheduler(2, TOY, settings, clock)
    rank_side = [PrefixCache(budget) for _ in range(2)]  # what each rank would run on its own batches
    prefixes = [[rng.randrange(10) for _ in range(rng.choice((32, 64, 80)))] for _ in range(5)]
    hits = 0
    for _ in range(40):
        sched.add([seq(rng.choice(prefixes) + [rng.randrange(10) for _ in range(rng.randrange(1, 40))]) for _ in range(rng.randrange(6))])
        clock.t += 0.002
        batches = sched.next_step()
        for r, b in enumerate(batches):
            reused, _ = rank_side[r].step([s.block_hashes for s in b], [cacheable_blocks(len(s.ids)) for s in b])
            assert [h * BLOCK for h in reused] == [s.cached_tokens for s in b]
            hits += sum(reused)
    assert hits > 0


def test_discard_and_drain():
    clock = Clock()
    sched = ThresholdScheduler(2, TOY, RouterSettings(flops_per_request(TOY, 1000), max_tokens=256, cache_tokens=1024), clock)
    a, b, c = seq(span(32) + [1]), seq(range(30)), seq(range(40))
    sched.add([a, b, c])
    assert sched.discard([b, seq(range(5))]) == 1 and sched.waiting() == 2
    assert sched.views(seq(span(32) + [2]))[a.rank].matched == 32  # a's blocks count while it is queued
    clock.t = 1.0
    ran = [s for batch in sched.next_step() for s in batch]
    assert sorted(map(id, ran)) == sorted(map(id, [a, c])) and sched.discard([a]) == 0
    d, e = seq(span(32) + [3]), seq(range(50))
    sched.add([d, e])
    assert d.rank == a.rank and sched.views(d)[a.rank].matched == 32  # cached on a's rank
    assert sched.drain() == [d, e] and sched.waiting() == 0
    assert sched.next_step() == [[], []]
    # The ranks restarted empty: so does the view.
    assert all(v.matched == 0 and v.tree_tokens == 0 for v in sched.views(d))


def test_settings_are_checked():
    with pytest.raises(ValueError, match="threshold_flops"):
        RouterSettings(0.0)
    sched = ThresholdScheduler(2, TOY, RouterSettings(1.0, max_tokens=64))
    with pytest.raises(ValueError, match="a 65-token sequence cannot fit a step of 64 tokens"):
        sched.add([seq(range(65))])


# ---- replay -----------------------------------------------------------------------------------------


def test_replay_rewards_prefix_affinity():
    rng = random.Random(2)
    prefixes = [[rng.randrange(10) for _ in range(64)] for _ in range(4)]
    trace = [(0.0, rng.choice(prefixes) + [rng.randrange(10) for _ in range(8)]) for _ in range(64)]
    results = {}
    for policy in ("round_robin", "zero_prefill"):
        settings = RouterSettings(flops_per_request(TOY, 200), max_tokens=512, cache_tokens=2 * 80, policy=policy)
        results[policy] = replay(trace, TOY, 2, settings, flops_per_s=1e6)
    rr, zp = results["round_robin"], results["zero_prefill"]
    assert rr.requests == zp.requests == 64 and rr.prompt_tokens == zp.prompt_tokens == 64 * 72
    assert zp.hit_rate > rr.hit_rate and zp.tokens_per_s > rr.tokens_per_s
    assert 0.0 <= zp.below_threshold <= 1.0 and zp.imbalance >= 1.0
