"""Routing policies under saturation-threshold admission, replayed on a cost model (no model, no server).

    python benchmarks/replay_policies.py [--ranks 2,4] [--cache-tokens 8192] [--threshold-tokens 4096]

A quick comparison only: the figures to report come from the real server. The cost model
(``zp_compile.server.routing.replay``): a step takes max over ranks of its FLOPs (packed: what the rank computes) / F, and at least the
exposed expert gather t = T / (gamma F) (T = t_gather F gamma, the paper's rule, so a step under T is
gather-bound); ``--no-gather-floor`` drops that floor (compute only).

Model: the project's 82M benchmark shape (Qwen3-MoE, hidden 512, 6 layers, 32 experts top-4, expert width
256, 8 heads of 64, 4 KV heads, vocabulary 4096: benchmarks/throughput.py), as a planner ModelSpec.
T: the FLOPs of ``--threshold-tokens`` uncached tokens per rank per step, as prompts of 1,024 tokens.
F: ``--flops-per-s`` per rank (default 50 GFLOP/s, about what the compiled 82M forward reaches on one
core of this project's CPU: docs/platform.md's 3,567 tok/s on 2 ranks x ~29 MFLOP per token).

Traces (token ids random; shared prefixes share exact ids):
- shared: 16 groups x 32 prompts, a 1,024-token prefix per group + a 64-token question, shuffled;
- random: 512 prompts of 1,088 random tokens (``zp_compile.tools.workloads.random_prompts``), no sharing.
Arrivals: ``burst`` (all at t=0: capacity), ``spread`` (a burst as a server receives it: one request
every ``--spread-ms``, in trace order) and ``poisson`` at ``--load`` x the rate the ranks could sustain
with ideal reuse (each group's prefix computed once, gathers hidden): latency at a given rate.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zp_compile.costmodel.flops import flops_per_request  # noqa: E402
from zp_compile.costmodel.spec import ModelSpec  # noqa: E402
from zp_compile.prefix import PrefixCache, block_hashes, cacheable_blocks  # noqa: E402
from zp_compile.server.policies import POLICIES  # noqa: E402
from zp_compile.server.replay import replay  # noqa: E402
from zp_compile.server.routing import RouterSettings  # noqa: E402
from zp_compile.tools.workloads import random_prompts  # noqa: E402

SPEC = ModelSpec("qwen3-moe-82m", layers=6, hidden=512, vocab=4096, heads=8, kv_heads=4, head_dim=64, experts=32,
                 top_k=4, expert_ffn=256, moe_layers=tuple(range(6)))  # fmt: skip
GAMMA = 1.2


def shared_prefix_trace(groups: int = 16, per_group: int = 32, prefix: int = 1024, question: int = 64, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(3, SPEC.vocab) for _ in range(n)]  # noqa: E731
    prompts = [p + ids(question) for p in (ids(prefix) for _ in range(groups)) for _ in range(per_group)]
    rng.shuffle(prompts)
    return prompts


def ideal(prompts: list[list[int]]) -> tuple[float, float]:
    """(hit rate, mean FLOPs per prompt) with one unbounded cache that every prompt reuses."""
    cache, hit, flops = PrefixCache(1 << 62), 0, 0.0
    for ids in prompts:
        h = block_hashes(ids)
        cached = cache.match(h, cacheable_blocks(len(ids))) * 16
        cache.insert(h)
        hit += cached
        flops += flops_per_request(SPEC, len(ids) - cached, cached)
    return hit / sum(map(len, prompts)), flops / len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--cache-tokens", type=int, default=8192, help="prefix-cache budget per rank")
    ap.add_argument("--threshold-tokens", type=int, default=4096)
    ap.add_argument("--flops-per-s", type=float, default=50e9)
    ap.add_argument("--max-tokens", type=int, default=8192, help="tokens computed per rank per step")
    ap.add_argument("--max-wait-ms", type=float, default=50.0)
    ap.add_argument("--load", type=float, default=0.5, help="poisson arrivals: share of the ideal sustainable rate")
    ap.add_argument("--no-gather-floor", action="store_true")
    ap.add_argument("--spread-ms", type=float, default=1.0, help="spread arrivals: ms between two requests")
    args = ap.parse_args()

    T = args.threshold_tokens / 1024 * flops_per_request(SPEC, 1024)
    F = args.flops_per_s
    floor = 0.0 if args.no_gather_floor else T / (GAMMA * F)
    traces = {"shared": shared_prefix_trace(), "random": [r.token_ids for r in random_prompts(512, 1088, vocab=SPEC.vocab)]}
    print(f"model {SPEC.name}; T = {T / 1e9:.1f} GFLOP per rank per step ({args.threshold_tokens} tokens); F = {F / 1e9:g} GFLOP/s per rank; "
          f"step >= {floor:.2f} s; cache {args.cache_tokens} tokens per rank; max {args.max_tokens} tokens per rank; "
          f"max wait {args.max_wait_ms:g} ms")  # fmt: skip
    head = "| trace | ranks | arrivals | policy | tok/s | hit rate | FLOPs max/mean | steps < T | steps | mean latency s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    started = time.perf_counter()
    for name, prompts in traces.items():
        hit_ideal, flops_ideal = ideal(prompts)
        print(f"<!-- {name}: {len(prompts)} prompts, {sum(map(len, prompts))} tokens, ideal hit rate {hit_ideal:.3f} -->")
        for ranks in map(int, args.ranks.split(",")):
            rate = args.load * ranks * F / flops_ideal  # requests/s
            rng = random.Random(1)
            poisson, t = [], 0.0
            for _ in prompts:
                t += rng.expovariate(rate)
                poisson.append(t)
            spread = [i * args.spread_ms / 1e3 for i in range(len(prompts))]
            for arrivals, times in (("burst", [0.0] * len(prompts)), (f"spread {args.spread_ms:g} ms", spread),
                                    (f"poisson {rate:.1f}/s", poisson)):  # fmt: skip
                for policy in POLICIES:
                    settings = RouterSettings(T, max_tokens=args.max_tokens, max_wait_ms=args.max_wait_ms,
                                              cache_tokens=args.cache_tokens, policy=policy)  # fmt: skip
                    r = replay(list(zip(times, prompts)), SPEC, ranks, settings, F, gather_s=floor)
                    print(f"| {name} | {ranks} | {arrivals} | {policy} | {r.tokens_per_s:,.0f} | {r.hit_rate:.3f} | {r.imbalance:.2f} | "
                          f"{r.below_threshold:.0%} | {r.steps} | {r.mean_latency_s:.1f} |")  # fmt: skip
    print(f"<!-- {time.perf_counter() - started:.1f} s -->")


if __name__ == "__main__":
    main()
