"""Prefix KV reuse on a rank (``zp_compile.rank.kv_cache``): cached logits equal uncached ones,
eviction within the budget, the front end's view checked, KV-cache-free mode, and two lockstep ranks
where one hits and the other misses."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_utils import run_ranks
from zp_compile.contract import Seq, Wants
from zp_compile.prefix import BLOCK, PrefixCache, block_hashes, cacheable_blocks
from zp_compile.rank import packed, warmup
from zp_compile.rank.kv_cache import CacheViewMismatch, RankKVCache
from zp_compile.rank.step import batch_inputs, run_step

CPU = torch.device("cpu")
TOL = 1e-4


def seq(ids: list[int], top: int = 0, cached: int | None = None) -> Seq:
    return Seq(ids, Wants(top=top), cached)


def prompt(seed: int, n: int, vocab: int = 256) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def optimized(path, backend: str, regional: bool = False):
    """A world-of-one optimized model, compiled as the worker compiles it (dynamic shapes; the worker
    also compiles a decoder layer at a time, ``regional``)."""
    from transformers import AutoModelForCausalLM

    import zp_compile

    torch._dynamo.reset()
    model = zp_compile.optimize(AutoModelForCausalLM.from_pretrained(path).eval(), backend=backend, dynamic=True, regional=regional)
    packed.enable(model)  # as the worker does
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from zp_compile.models import tiny

    # fp32; head dim 64 equals the warm-up's past (64 tokens): a graph that gave both one symbol would
    # recompile for every other past (kv_cache._static).
    return tiny("qwen3_moe", tmp_path_factory.mktemp("kv-tiny"), layers=2, num_experts=4, head_dim=64)


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory):
    """4 layers: the two middle ones run one compile when compiled a decoder layer at a time."""
    from zp_compile.models import tiny

    return tiny("qwen3_moe", tmp_path_factory.mktemp("kv-deep"), layers=4, num_experts=4, head_dim=64)


@pytest.fixture(scope="module")
def model(checkpoint):
    return optimized(checkpoint, "aot_eager")


def every_position(model, ids: list[int]) -> torch.Tensor:
    """Log-probabilities after every position of one prompt, uncached [n, V]."""
    with torch.inference_mode():
        return torch.log_softmax(model(**batch_inputs([ids]), use_cache=False).logits[0, -len(ids) :].float(), -1)


def uncached(model, prompts: list[list[int]]) -> torch.Tensor:
    """Today's path (no cache): next-token logits [B, V]."""
    with torch.inference_mode():
        return model(**batch_inputs(prompts), logits_to_keep=1, use_cache=False).logits[:, -1]


def cached(model, kv: RankKVCache, prompts: list[list[int]], front_end: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """One step through the rank's cache: (logits [B, V], tokens each prompt reused)."""
    seqs = [seq(p, cached=None if front_end is None else front_end[i]) for i, p in enumerate(prompts)]
    reuse = kv.lookup(seqs)[1]
    with torch.inference_mode():
        return kv.forward(model, seqs, 0, CPU), reuse


def check_invariants(kv: RankKVCache) -> None:
    assert kv.tokens <= kv.budget_tokens
    assert len(kv) == len(kv.blocks)  # KV for exactly the blocks the PrefixCache holds
    assert all(h in kv.blocks for h in kv._kv)


def test_mixed_reuse_batch_matches_uncached_logits(model):
    B, part = BLOCK, BLOCK // 2  # a partial block: part tokens
    a, b = prompt(1, 4 * B + part), prompt(2, 2 * B + part)
    kv = RankKVCache(1024)
    got, reuse = cached(model, kv, [a, b])  # all misses: the cache fills
    assert reuse == [0, 0]
    assert (got - uncached(model, [a, b])).abs().max() <= TOL
    assert len(kv) == 4 + 2
    batch = [
        a,  # full hit: its 4 full blocks, the last token still computed
        a[: 3 * B + 2] + prompt(3, 9),  # partial hit: 3 blocks shared, then diverges
        prompt(4, 23),  # miss
        b[: 2 * B],  # 2 blocks held, but only 1 reusable: the last token's block is computed
        b,  # 2 blocks, the longest reuse of a different prefix
    ]
    got, reuse = cached(model, kv, batch)
    assert reuse == [4 * B, 3 * B, 0, B, 2 * B]
    want = uncached(model, batch)
    assert (got - want).abs().max() <= TOL, (got - want).abs().max(dim=-1).values
    check_invariants(kv)
    # The reused keys and values are really read: spoil one block and the hits change.
    k, v = kv._kv[block_hashes(a)[0]]
    kv._kv[block_hashes(a)[0]] = (k + 1.0, v)
    spoiled, _ = cached(model, kv, [a, prompt(4, 23)])
    assert (spoiled[0] - want[0]).abs().max() > 1e-2 and (spoiled[1] - want[2]).abs().max() <= TOL


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_packed_steps_match_uncached_logits_whatever_the_mix(model, data):
    """Steps of prompts built from a few shared prefixes (a hit, a batch-mate's prefix, a partial block,
    a duplicate, a 1-token prompt), under a budget that keeps all, some or none of it: every row's
    logits equal the unbatched, uncached model's, and the rank's reuse equals the front end's rule
    (``PrefixCache.reuse`` on a mirror of the cache)."""
    budget = data.draw(st.sampled_from([0, 4 * BLOCK, 1024]), label="budget")
    kv, mirror = RankKVCache(budget), PrefixCache(budget)
    heads = [prompt(900 + i, 48) for i in range(3)]
    piece = st.tuples(st.integers(0, 2), st.integers(0, 48), st.integers(1, 20), st.integers(0, 10**6))
    for _ in range(data.draw(st.integers(1, 3), label="steps")):
        rows = [heads[h][:n] + prompt(seed, k) for h, n, k, seed in data.draw(st.lists(piece, min_size=1, max_size=5), label="rows")]
        if data.draw(st.booleans(), label="duplicate"):
            rows.append(rows[0])
        hashes = [block_hashes(r) for r in rows]
        limits = [cacheable_blocks(len(r)) for r in rows]
        expected = [h * BLOCK for h in mirror.step(hashes, limits)[0]]
        got, reuse = cached(model, kv, rows, front_end=expected)  # the rank checks the front end's counts
        assert reuse == expected
        for row, r in enumerate(rows):
            assert (got[row] - uncached(model, [r])[0]).abs().max() <= TOL
        check_invariants(kv)


def test_eviction_frees_kv_and_recomputes(model):
    kv = RankKVCache(3 * BLOCK)
    a, b, c = prompt(11, 2 * BLOCK + BLOCK // 2), prompt(12, 2 * BLOCK + BLOCK // 2), prompt(13, 2 * BLOCK + 1)  # 2 full blocks each
    cached(model, kv, [a])
    assert len(kv) == 2
    held_a = set(block_hashes(a))
    got, _ = cached(model, kv, [b])  # needs 2 blocks, 1 free: evicts a's leaf block
    check_invariants(kv)
    assert len(kv) == 3 and block_hashes(a)[1] not in kv and block_hashes(a)[0] in kv
    got, reuse = cached(model, kv, [c, a])  # c evicts more; a reuses what is left of it at lookup
    check_invariants(kv)
    assert reuse == [0, BLOCK]
    assert (got - uncached(model, [c, a])).abs().max() <= TOL
    for seed in range(20, 26):  # churn: the budget is never exceeded, KV follows the block set
        cached(model, kv, [prompt(seed, 17 + 7 * seed % 40), b])
        check_invariants(kv)
    assert not held_a & set(kv._kv)  # a's blocks were all evicted by now
    got, reuse = cached(model, kv, [a])  # recomputed from scratch, same logits
    assert reuse == [0]
    assert (got - uncached(model, [a])).abs().max() <= TOL
    assert kv.kv_bytes == len(kv) * 2 * 2 * next(iter(kv._kv.values()))[0][0].nbytes  # [L=2] x (k, v)


def test_front_end_disagreeing_with_the_rank_is_an_error(model):
    kv = RankKVCache(1024)
    a = prompt(31, 40)
    cached(model, kv, [a], front_end=[0])
    cached(model, kv, [a], front_end=[32])  # agrees: the front end's view is exact
    with pytest.raises(CacheViewMismatch, match="the front end counted 16 cached tokens but this rank reuses 32"):
        cached(model, kv, [a], front_end=[16])
    off = RankKVCache(0)
    with pytest.raises(CacheViewMismatch, match="counted 32 cached tokens but this rank reuses 0"):
        run_step(model, [seq(a, cached=32)], CPU, off)


def test_budget_zero_keeps_nothing_between_steps_but_shares_within_one(model):
    """KV-cache-free: nothing is kept, yet a row still reads the prefix a batch-mate computes."""
    kv = RankKVCache(0)
    a = prompt(41, 40)
    batch = [seq(a, top=3), seq(a[:20], top=3)]
    for _ in range(2):
        got, reuse = cached(model, kv, [a, a[:20]])
        assert reuse == [0, 16]  # a[:20] reads a's first block in the step, every time
        assert (got - uncached(model, [a, a[:20]])).abs().max() <= TOL
        assert not kv.enabled and len(kv) == 0 and kv.tokens == 0 and len(kv.blocks) == 0
    assert [r.next[0] for r in run_step(model, batch, CPU, kv)] == [r.next[0] for r in run_step(model, batch, CPU)]


def test_a_packed_step_needs_the_packed_attention(checkpoint):
    """Any other attention would mix the rows of the one packed sequence: refused, not wrong logits."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    with pytest.raises(ValueError, match="packed.enable"):
        cached(plain, RankKVCache(1024), [prompt(42, 30)])


def test_cached_score_uses_the_cache(model):
    kv = RankKVCache(1024)
    a = prompt(51, 40)
    first = run_step(model, [seq(a, top=3)], CPU, kv)
    again = run_step(model, [seq(a, top=3, cached=32)], CPU, kv)
    assert [t for t, _ in first[0].top] == [t for t, _ in again[0].top]
    assert max(abs(x - y) for (_, x), (_, y) in zip(first[0].top, again[0].top)) <= TOL


@pytest.mark.parametrize("cpu_kernel", ["rows", "flex"])
def test_warm_up_compiles_every_cached_graph_serving_needs(checkpoint, monkeypatch, cpu_kernel):
    """With FlexAttention (what a GPU runs; forced here) the warm-up also compiles its kernel for rows
    with and without prefixes, and serving steps of any size (one short row: one tile) add none;
    every step's answers equal the uncached model's."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(packed, "CPU_KERNEL", cpu_kernel)
    model = optimized(checkpoint, "aot_eager")  # resets dynamo: a fresh count
    a = prompt(81, 85)
    steps = [[a, a[:40]], [a], [a, prompt(82, 7), prompt(83, 100)], [prompt(84, 16)], [a + prompt(85, 30), a[:17], prompt(86, 2)],
             [a[:50]] * 2, [prompt(87, 1)], [a[:17]]]  # fmt: skip
    # FlexAttention: each row's greedy token's logprob against the uncached model's (padded batches: graphs
    # of their own, compiled before the count). The per-row kernel's logits: the tests above.
    wants = [torch.log_softmax(uncached(model, b).float(), -1).max(-1).values.tolist() if cpu_kernel == "flex" else None for b in steps]
    counters.clear()
    warmup.warm_up_packed(model, CPU, 256)
    compiled = counters["stats"]["unique_graphs"]
    # The model: one graph (its first packed step runs eagerly, every later one has a past; sizes that
    # could be 1 are padded to 2); FlexAttention: rows with or without prefixes (on a CPU, full
    # attention runs SDPA per row: no kernel to compile).
    assert compiled == 1 + (2 if cpu_kernel == "flex" else 0)
    kv = RankKVCache(1024)
    reuse = []
    for batch, want in zip(steps, wants):
        seqs = [seq(p, top=1) for p in batch]
        reuse.append(kv.lookup(seqs)[1])
        got = run_step(model, seqs, CPU, kv)
        if want is not None:
            assert [g.next[1] for g in got] == pytest.approx(want, abs=TOL)
    assert reuse == [[0, 32], [80], [80, 0, 0], [0], [80, 16, 0], [48, 48], [0], [16]]
    # Prompt logprobs: more logits kept per row, a recomputed lead token after a reused prefix (the
    # kernel reads that row's keys with its prefix's last range one short); still no new graph.
    echo = [[a, a[:40]], [a + prompt(88, 5), a[:33]], [prompt(89, 1)]]
    expected = [[every_position(model, p) for p in batch] for batch in echo] if cpu_kernel == "flex" else None
    counters.clear()
    for i, batch in enumerate(echo):
        seqs = [Seq(p, Wants(top=1, prompt=2)) for p in batch]
        reuse.append(kv.lookup(seqs)[1])
        got = run_step(model, seqs, CPU, kv)
        for g, p, lp in zip(got, batch, expected[i] if expected else [None] * len(batch)):
            if lp is not None:
                assert g.prompt_logprobs == pytest.approx(lp[torch.arange(len(p) - 1), torch.tensor(p[1:], dtype=torch.long)].tolist(), abs=TOL)
    assert reuse[-3:] == [[0, 32], [80, 32], [0]]
    assert counters["stats"].get("unique_graphs", 0) == 0  # no recompile while serving


def test_one_graph_serves_steps_on_both_sides_of_inductors_sort_guard(deep_checkpoint):
    """Inductor guards its lowering of ``aten.sort`` (the MoE routing's tokens x top_k) below 32,767. The
    routing sorts of a dynamic length skip that lowering (``passes/opaque_sorts.py``), so the one graph
    a small warm-up compiles also serves steps past 32,767 routed pairs, with and without a past.
    Compiled as serving ranks compile (a decoder layer at a time): the layers' past lengths, tied equal
    when one layer runs another's compile, recompile nothing either."""
    from torch._dynamo.utils import counters

    model = optimized(deep_checkpoint, "inductor", regional=True)  # resets dynamo: tests after this one recompile their graphs
    top_k = model.config.num_experts_per_tok
    max_tokens = -(-32767 // top_k // 256) * 256  # past the guard, in 256-token rows
    counters.clear()
    warmup.warm_up_packed(model, CPU, 256)
    assert counters["stats"]["unique_graphs"] == 1
    kv = RankKVCache(2 * max_tokens)
    rows = [prompt(90 + i, 128) for i in range(max_tokens // 128)]
    run_step(model, [seq(r, top=1) for r in rows], CPU, kv)  # a full step
    again = [seq(r[:64] + prompt(300 + i, 64), top=1) for i, r in enumerate(rows)]
    assert kv.lookup(again)[1] == [64] * len(rows)
    run_step(model, again, CPU, kv)  # each reusing 64 tokens: a past of 64 x rows keys
    assert counters["stats"]["unique_graphs"] == 1  # no recompile while serving
    assert (counters["zp_compile"]["regional_pieces"], counters["zp_compile"]["regional_compiles"]) == (4, 3)


def test_mixed_reuse_batch_under_inductor(deep_checkpoint):
    """The cached graphs (B > 1 with P = 0, then P > 0) compile with Inductor, as serving ranks compile
    them (a decoder layer at a time), and give the same logits."""
    model = optimized(deep_checkpoint, "inductor", regional=True)  # resets dynamo: tests after this one recompile their graphs
    a, b = prompt(71, 70), prompt(72, 40)
    kv = RankKVCache(1024)
    got, _ = cached(model, kv, [a, b])
    assert (got - uncached(model, [a, b])).abs().max() <= TOL
    batch = [a, a[:50] + prompt(73, 9), prompt(74, 23), b]
    got, reuse = cached(model, kv, batch)
    assert reuse == [64, 48, 0, 32]
    assert (got - uncached(model, batch)).abs().max() <= TOL


# ---- two lockstep ranks ------------------------------------------------------------------------------

def _hits_on_one_rank(rank: int, world_size: int, path: str) -> dict:
    """Rank 0 reuses prefixes; rank 1 never does (and once has nothing), in the same steps."""
    from transformers import AutoModelForCausalLM

    import zp_compile

    from dist_utils import captured_graphs
    from graph_checks import gathers

    torch._dynamo.reset()
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    B = BLOCK
    a = prompt(61, 3 * B + 2)
    if rank == 0:
        steps = [[a, prompt(62, 20)], [a, a[: 2 * B + B // 2] + prompt(63, 5)], [a[: 2 * B + 1]], [a, prompt(64, 70)]]
    else:
        steps = [[prompt(100 + i, 30 + 9 * i), prompt(200 + i, 21)] for i in range(4)]
        steps[2] = []  # an empty batch beside rank 0's cached one
    kv = RankKVCache(1024)
    out = {"reuse": [], "max_abs_diff": 0.0}
    with captured_graphs() as graphs:
        model = zp_compile.from_pretrained(path, backend="aot_eager", transport="collective", dynamic=True)
        packed.enable(model)
        for prompts in steps:
            seqs = [seq(p) for p in prompts]
            if not seqs:
                run_step(model, [], CPU, kv)
                out["reuse"].append([])
                continue
            out["reuse"].append(kv.lookup(seqs)[1])
            with torch.inference_mode():
                got = kv.forward(model, seqs, 0, CPU)
                for row, p in enumerate(prompts):  # the unmodified model, one unpadded prompt at a time
                    want = ref(input_ids=torch.tensor([p])).logits[0, -1]
                    out["max_abs_diff"] = max(out["max_abs_diff"], (got[row] - want).abs().max().item())
    out["gathers_per_graph"] = [len(gathers(g)) for g in graphs]
    out["expected_gathers"] = sum(len(layer.expert_params) for layer in model.zero_prefill.sharded_layers)
    return out


def test_two_ranks_one_hitting_one_missing_stay_in_lockstep(checkpoints):
    path = str(checkpoints("qwen3_moe", layers=3))
    r0, r1 = run_ranks(2, _hits_on_one_rank, path)
    B = BLOCK
    assert r0["reuse"] == [[0, 0], [3 * B, 2 * B], [2 * B], [3 * B, 0]]
    assert all(x == 0 for step in r1["reuse"] for x in step) and r1["reuse"][2] == []
    for r in (r0, r1):
        assert r["max_abs_diff"] <= TOL, r
        # Every compiled graph (P = 0 or more) gathers every expert bank once.
        assert r["expected_gathers"] > 0 and set(r["gathers_per_graph"]) == {r["expected_gathers"]}, r


@pytest.mark.parametrize("experts,k,top", [(32, 4, 1024), (6, 2, 100), (8, 1, 7), (3, 5, 1)])
def test_expert_matmul_warm_up_sweeps_every_count(experts, k, top):
    from zp_compile.rank.warmup import sweep_routing

    seen = set()
    for ids in sweep_routing(experts, k, top):
        assert len(ids) % k == 0  # whole tokens
        seen.update(torch.bincount(ids, minlength=experts).tolist())
    assert set(range(1, top + 1)) <= seen


def test_prompt_logprobs_with_prefix_reuse_equal_the_uncached_model(model):
    """Prompt logprobs (``Wants.prompt``) at every position equal the uncached padded forward's, whether
    a position's readout was computed in the step, kept with a cached block from an earlier step, or
    read from a batch-mate's block in the same step; with a cache and KV-cache-free. A block cached for
    next-token readouts is never reused by a prompt-logprob row (its own hash namespace), and the kept
    readouts cost 164 bytes per cached token."""

    def check(out, ids, k):
        lp = every_position(model, ids)
        want = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert len(out.prompt_logprobs) == len(ids) - 1
        assert (torch.tensor(out.prompt_logprobs) - want).abs().max() < TOL
        top = lp[:-1].topk(k, -1) if k else None
        if k:
            assert [[t for t, _ in row] for row in out.prompt_top] == top.indices.tolist()
            assert (torch.tensor([[v for _, v in row] for row in out.prompt_top]) - top.values).abs().max() < TOL
        assert abs(out.next[1] - lp[-1].max().item()) < TOL

    B = BLOCK
    shared = prompt(1, 2 * B + B // 2)  # 2 whole blocks and a part
    a, b, d = shared + prompt(2, 25), shared + prompt(3, 20), shared + prompt(5, 7)
    c = b[: 3 * B + B // 2] + prompt(4, 9)  # shares b's third block, which b computes in the same step
    for budget in (4096, 0):
        kv = RankKVCache(budget)
        check(run_step(model, [Seq(a, Wants(prompt=5))], CPU, kv)[0], a, 5)
        second = [Seq(b, Wants(prompt=3)), Seq(c, Wants(prompt=2)), Seq(d, Wants(top=2)), Seq(d, Wants(prompt=0))]
        _, reuse = kv.lookup(second)
        # d's plain row reuses nothing of the prompt-logprob blocks; with no budget the rows share in the step
        assert reuse == ([2 * B, 3 * B, 0, 2 * B] if budget else [0, 3 * B, 0, 2 * B])
        outs = run_step(model, second, CPU, kv)
        check(outs[0], b, 3), check(outs[1], c, 2), check(outs[3], d, 0)
        assert outs[2].next == outs[3].next and outs[2].prompt_logprobs == []
        if budget:
            prompt_rows = [s.ids for s in second if s.wants.prompt is not None] + [a]
            prompt_blocks = len({h for ids in prompt_rows for h in block_hashes(ids, b"prompt-logprobs")})
            assert kv.table_bytes == 164 * BLOCK * prompt_blocks - 164  # block 0 keeps positions 1..BLOCK-1


def test_prompt_logprobs_of_padded_batches(model):
    """Models that run left-padded batches (no packed kernel) read prompt logprobs from every position's
    logits: the same values as each prompt alone, whatever the padding its batch gave it."""
    rows = [prompt(6, 37), prompt(7, 5), prompt(8, 1)]
    outs = run_step(model, [Seq(r, Wants(top=1, prompt=3)) for r in rows] + [seq(rows[0], top=1)], CPU)
    for out, ids in zip(outs, rows):
        lp = every_position(model, ids)
        assert out.prompt_logprobs == pytest.approx(lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:], dtype=torch.long)].tolist(), abs=TOL)
        assert [[t for t, _ in row] for row in out.prompt_top] == lp[:-1].topk(3, -1).indices.tolist()
    assert outs[3].prompt_logprobs == [] and outs[3].next == outs[0].next
