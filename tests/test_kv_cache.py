"""Prefix KV reuse on a rank (``zp_compile.server.kv_cache``): cached logits equal uncached ones,
eviction within the budget, the front end's view checked, KV-cache-free mode, and two lockstep ranks
where one hits and the other misses."""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_ranks
from zp_compile.server.kv_cache import CacheViewMismatch, RankKVCache
from zp_compile.server.prefix import BLOCK, block_hashes
from zp_compile.server.worker import batch_inputs, score

CPU = torch.device("cpu")
TOL = 1e-4


def prompt(seed: int, n: int, vocab: int = 256) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def optimized(path, backend: str):
    """A world-of-one optimized model, compiled as the worker compiles it (dynamic shapes)."""
    from transformers import AutoModelForCausalLM

    import zp_compile

    torch._dynamo.reset()
    return zp_compile.optimize(AutoModelForCausalLM.from_pretrained(path).eval(), backend=backend, dynamic=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from zp_compile.models import tiny

    return tiny("qwen3_moe", tmp_path_factory.mktemp("kv-tiny"), layers=2, num_experts=4)  # fp32


@pytest.fixture(scope="module")
def model(checkpoint):
    return optimized(checkpoint, "aot_eager")


def uncached(model, prompts: list[list[int]]) -> torch.Tensor:
    """Today's path (no cache): next-token logits [B, V]."""
    with torch.inference_mode():
        return model(**batch_inputs(prompts, 0), logits_to_keep=1, use_cache=False).logits[:, -1]


def cached(model, kv: RankKVCache, prompts: list[list[int]], front_end: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """One step through the rank's cache: (logits [B, V], tokens each prompt reused)."""
    seqs = [{"ids": p} for p in prompts]
    if front_end is not None:
        for s, c in zip(seqs, front_end):
            s["cached"] = c
    reuse = kv.lookup(seqs)[1]
    with torch.inference_mode():
        return kv.forward(model, seqs, 0, CPU), reuse


def check_invariants(kv: RankKVCache) -> None:
    assert kv.tokens <= kv.budget_tokens
    assert len(kv) == len(kv.blocks)  # KV for exactly the blocks the PrefixCache holds
    assert all(h in kv.blocks for h in kv._kv)


def test_mixed_reuse_batch_matches_uncached_logits(model):
    a, b = prompt(1, 70), prompt(2, 40)
    kv = RankKVCache(1024)
    got, reuse = cached(model, kv, [a, b])  # all misses: the cache fills
    assert reuse == [0, 0]
    assert (got - uncached(model, [a, b])).abs().max() <= TOL
    assert len(kv) == 4 + 2
    batch = [
        a,  # full hit: its 4 full blocks, the last token still computed (70 = 4 * 16 + 6)
        a[:50] + prompt(3, 9),  # partial hit: 3 blocks shared, then diverges
        prompt(4, 23),  # miss
        b[:32],  # 2 blocks held, but only 1 reusable: the last token's block is computed
        b,  # 2 blocks, the longest reuse of a different prefix
    ]
    got, reuse = cached(model, kv, batch)
    assert reuse == [64, 48, 0, 16, 32]
    want = uncached(model, batch)
    assert (got - want).abs().max() <= TOL, (got - want).abs().max(dim=-1).values
    check_invariants(kv)
    # The reused keys and values are really read: spoil one block and the hits change.
    k, v = kv._kv[block_hashes(a)[0]]
    kv._kv[block_hashes(a)[0]] = (k + 1.0, v)
    spoiled, _ = cached(model, kv, [a, prompt(4, 23)])
    assert (spoiled[0] - want[0]).abs().max() > 1e-2 and (spoiled[1] - want[2]).abs().max() <= TOL


def test_eviction_frees_kv_and_recomputes(model):
    kv = RankKVCache(3 * BLOCK)
    a, b, c = prompt(11, 40), prompt(12, 40), prompt(13, 33)  # 2 full blocks each
    cached(model, kv, [a])
    assert len(kv) == 2
    held_a = set(block_hashes(a))
    got, _ = cached(model, kv, [b])  # needs 2 blocks, 1 free: evicts a's leaf block
    check_invariants(kv)
    assert len(kv) == 3 and block_hashes(a)[1] not in kv and block_hashes(a)[0] in kv
    got, reuse = cached(model, kv, [c, a])  # c evicts more; a reuses what is left of it at lookup
    check_invariants(kv)
    assert reuse == [0, 16]
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
    with pytest.raises(CacheViewMismatch, match="the front end counted 16 cached tokens but this rank's prefix cache holds 32"):
        cached(model, kv, [a], front_end=[16])
    off = RankKVCache(0)
    with pytest.raises(CacheViewMismatch, match="counted 32 cached tokens .* holds 0"):
        score(model, [{"ids": a, "cached": 32}], 0, CPU, off)


def test_budget_zero_keeps_nothing_and_runs_the_plain_forward(model, monkeypatch):
    kv = RankKVCache(0)
    a = prompt(41, 40)
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *args, **kw: calls.append(kw) or forward(*args, **kw))
    batch = [{"ids": a, "top": 3}, {"ids": a[:20], "top": 3}]
    plain = score(model, batch, 0, CPU)
    for _ in range(2):
        assert score(model, batch, 0, CPU, kv) == plain  # the same forward, bit for bit
    assert not kv.enabled and len(kv) == 0 and kv.tokens == 0 and len(kv.blocks) == 0
    assert all(kw.get("use_cache") is False and "cache" not in kw for kw in calls)


def test_cached_score_uses_the_cache(model):
    kv = RankKVCache(1024)
    a = prompt(51, 40)
    first = score(model, [{"ids": a, "top": 3}], 0, CPU, kv)
    again = score(model, [{"ids": a, "top": 3, "cached": 32}], 0, CPU, kv)
    assert [t for t, _ in first[0]["top"]] == [t for t, _ in again[0]["top"]]
    assert max(abs(x - y) for (_, x), (_, y) in zip(first[0]["top"], again[0]["top"])) <= TOL


def test_warm_up_compiles_every_cached_graph_serving_needs(checkpoint):
    from torch._dynamo.utils import counters

    from zp_compile.server import kv_cache

    model = optimized(checkpoint, "aot_eager")  # resets dynamo: a fresh count
    counters.clear()
    kv_cache.warm_up(model, CPU, 256)
    compiled = counters["stats"]["unique_graphs"]
    assert compiled == 4  # B = 1 or more, P = 0 or more
    kv = RankKVCache(1024)
    a = prompt(81, 85)
    steps = [[a, a[:40]], [a], [a, prompt(82, 7), prompt(83, 100)], [prompt(84, 16)], [a + prompt(85, 30), a[:17], prompt(86, 2)], [a[:50]] * 2]
    reuse = []
    for batch in steps:
        seqs = [{"ids": p, "top": 1} for p in batch]
        reuse.append(kv.lookup(seqs)[1])
        score(model, seqs, 0, CPU, kv)
    assert reuse == [[0, 0], [80], [80, 0, 0], [0], [80, 16, 0], [48, 48]]
    assert counters["stats"]["unique_graphs"] == compiled  # no recompile while serving


def test_warm_up_compiles_the_largest_step_so_serving_never_recompiles(checkpoint):
    """Inductor guards its stable sort of the MoE routing on tokens x top_k < 32,767: the first step past
    it recompiles. Warm-up with the front end's largest step compiles that graph before serving."""
    from torch._dynamo.utils import counters

    from zp_compile.server.worker import warm_up

    model = optimized(checkpoint, "inductor")  # resets dynamo: tests after this one recompile their graphs
    top_k = model.config.num_experts_per_tok
    max_tokens = -(-32767 // top_k // 256) * 256  # past the guard, in 256-token rows
    counters.clear()
    warm_up(model, CPU, 256)
    small = counters["stats"]["unique_graphs"]
    warm_up(model, CPU, 256, max_tokens)
    compiled = counters["stats"]["unique_graphs"]
    assert compiled == small + 1  # the largest step needed a graph of its own
    rows = max_tokens // 128
    score(model, [{"ids": prompt(90 + i, 128), "top": 1} for i in range(rows)], 0, CPU)  # a full step, other shape
    assert counters["stats"]["unique_graphs"] == compiled  # no recompile while serving


def test_mixed_reuse_batch_under_inductor(checkpoint):
    """The cached graphs (B > 1 with P = 0, then P > 0) compile with Inductor and give the same logits."""
    model = optimized(checkpoint, "inductor")  # resets dynamo: tests after this one recompile their graphs
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
    a = prompt(61, 50)
    if rank == 0:
        steps = [[a, prompt(62, 20)], [a, a[:40] + prompt(63, 5)], [a[:33]], [a, prompt(64, 70)]]
    else:
        steps = [[prompt(100 + i, 30 + 9 * i), prompt(200 + i, 21)] for i in range(4)]
        steps[2] = []  # an empty batch beside rank 0's cached one
    kv = RankKVCache(1024)
    out = {"reuse": [], "max_abs_diff": 0.0}
    with captured_graphs() as graphs:
        model = zp_compile.from_pretrained(path, backend="aot_eager", transport="collective", dynamic=True)
        for prompts in steps:
            seqs = [{"ids": p} for p in prompts]
            if not seqs:
                score(model, [], 0, CPU, kv)
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
    assert r0["reuse"] == [[0, 0], [48, 32], [32], [48, 0]]
    assert all(x == 0 for step in r1["reuse"] for x in step) and r1["reuse"][2] == []
    for r in (r0, r1):
        assert r["max_abs_diff"] <= TOL, r
        # Every compiled graph (cached or not, B = 1 or more, P = 0 or more) gathers every expert bank once.
        assert r["expected_gathers"] > 0 and set(r["gathers_per_graph"]) == {r["expected_gathers"]}, r
