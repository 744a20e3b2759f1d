"""Routing policies side by side through the real server, on the same traces.

    python benchmarks/policies_serve.py --json benchmarks/results-policies-2rank-cpu.json

For each policy (``--policies``), ``zp-compile serve`` is started on the benchmark checkpoint (82M
Qwen3-MoE shape, bf16, Inductor, ``--transport shm``, 2 ranks, each rank's prefix KV cache
``--cache-tokens``), then the traces of ``zp_compile.tools.bench_serve`` are sent to it, each after a short
warm-up: ``shared-prefix`` (groups x prompts sharing a system prompt, shuffled arrivals) and
``random`` (no sharing). Figures per run: req/s, input tok/s, e2e p50/p99, and from the server's
/metrics: prefix hit rate (tokens), mean per-step FLOPs imbalance (max/mean over ranks), share of steps
below T. ``fifo`` is the first-come scheduler without routing or threshold (the server's default).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", nargs="+", default=["fifo", "round_robin", "least_flops", "cache_aware", "zero_prefill"])
    parser.add_argument("--cache-tokens", type=int, default=8192, help="each rank's prefix-cache budget (0: KV-cache-free)")
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--prompts-per-group", type=int, default=16)
    parser.add_argument("--system-prompt-len", type=int, default=1024)
    parser.add_argument("--question-len", type=int, default=64)
    parser.add_argument("--traces", nargs="+", default=["shared-prefix", "random"], choices=["shared-prefix", "random"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="shared-prefix traces: one per seed (prompts and arrival order)")
    parser.add_argument("--random-prompts", type=int, default=256)
    parser.add_argument("--random-len", type=int, default=512)
    parser.add_argument("--request-rate", type=float, default=float("inf"))
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-tokens-per-rank", type=int, default=8192)
    parser.add_argument("--threshold-tokens", type=int, default=4096,
                        help="T for every policy = the FLOPs of this many tokens in 512-token requests (0: measured at start-up)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more zp-compile serve flags")
    parser.add_argument("--json")
    args = parser.parse_args()

    from server_utils import Server
    from throughput import build_checkpoint
    from zp_compile.tools import bench_serve
    from zp_compile.models import tiny_tokenizer

    model = build_checkpoint()
    threshold = []
    if args.threshold_tokens:
        # On this CPU the measured T (gathers through shared memory: ~250 tokens) is far below the batch
        # the matmuls need to run well; every policy gets the same, larger T.
        from transformers import AutoConfig

        from zp_compile.costmodel.flops import flops_per_request
        from zp_compile.costmodel.spec import spec_from_config

        spec = spec_from_config(AutoConfig.from_pretrained(model))
        threshold = ["--threshold-flops", str(args.threshold_tokens / 512 * flops_per_request(spec, 512))]
    tokenizer_dir = Path(tempfile.gettempdir()) / "zp-bench-tokenizer"
    tokenizer = tiny_tokenizer(tokenizer_dir)
    traces = {}
    if "shared-prefix" in args.traces:
        for seed in args.seeds:
            name = "shared-prefix" if len(args.seeds) == 1 else f"shared-prefix/s{seed}"
            traces[name] = bench_serve.shared_prefix_dataset(tokenizer, args.groups, args.prompts_per_group, args.system_prompt_len,
                                                             args.question_len, seed=seed)  # fmt: skip
    if "random" in args.traces:
        traces["random"] = bench_serve.random_dataset(tokenizer, args.random_prompts, args.random_len)
    warm = bench_serve.random_dataset(tokenizer, 8, 200, seed=99)
    rows = []
    for policy in args.policies:
        flags = ["--tokenizer", str(tokenizer_dir), "--labels", " yes", " no", "--transport", "shm", "--dtype", "bfloat16",
                 "--policy", policy, "--cache-tokens", str(args.cache_tokens), "--max-model-len", str(args.max_model_len),
                 "--max-tokens-per-rank", str(args.max_tokens_per_rank), "--max-waiting", "100000", "--log-level", "warning", *threshold, *args.extra]  # fmt: skip
        with Server(model, *flags) as srv:
            measured = srv.client.get("/health").json().get("threshold")
            for name, trace in traces.items():
                asyncio.run(bench_serve.run(srv.url, "/classify", warm))
                r = asyncio.run(bench_serve.run(srv.url, "/classify", trace, request_rate=args.request_rate))
                s = r.server or bench_serve.ServerFigures(0, None, {}, 0, {}, None, None)  # /metrics not scraped: n/a
                row = {"policy": policy, "trace": name, "requests": r.num_requests, "completed": r.completed, "failed": r.failed,
                       "req_per_s": r.request_throughput, "input_tok_per_s": r.input_throughput, "p50_ms": r.latency_ms["p50"],
                       "p99_ms": r.latency_ms["p99"], "prefix_hit_rate": s.prefix_hit_rate, "imbalance": s.mean_imbalance,
                       "below_threshold_share": s.below_threshold_share, "steps": s.steps, "rank_tokens": s.rank_tokens,
                       "threshold_flops": float(threshold[1]) if threshold else measured}  # fmt: skip
                rows.append(row)
                fmt = lambda x, f: "n/a" if x is None else format(x, f)  # noqa: E731
                print(f"{policy:>13s} {name:>13s}: {r.completed}/{r.num_requests} ok, {r.request_throughput:6.2f} req/s, "
                      f"{r.input_throughput:8,.0f} tok/s, p50 {fmt(r.latency_ms['p50'], '.0f')} ms, p99 {fmt(r.latency_ms['p99'], '.0f')} ms, "
                      f"hit rate {fmt(s.prefix_hit_rate, '.3f')}, imbalance {fmt(s.mean_imbalance, '.3f')}, "
                      f"below T {fmt(s.below_threshold_share, '.2f')}, {s.steps} steps", flush=True)  # fmt: skip
    if args.json:
        path = Path(args.json)
        results = json.loads(path.read_text()) if path.exists() else []
        results.append({"settings": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows, "when": time.strftime("%Y-%m-%d %H:%M")})
        path.write_text(json.dumps(results, indent=1, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)))


if __name__ == "__main__":
    main()
