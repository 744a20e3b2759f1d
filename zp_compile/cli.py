"""Command line: ``zp-compile <command>``. Each command is a subparser with its own ``run`` function.

``zp-compile plan --model qwen3-235b-a22b --hardware h200-fp8 --gpus 8`` prints memory per GPU, the
saturation threshold T* and predicted throughput of AsyncEP, TP, EP and PP (see zp_compile/costmodel/).
"""

from __future__ import annotations

import argparse
import os
import sys

from .costmodel import calibrate, hardware, planning, spec
from .costmodel.hardware import GB


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="memory, saturation threshold and predicted throughput of a deployment",
                       description="Predict memory per GPU, T* and tokens/s + MFU of AsyncEP, TP, EP and PP.")
    d = planning.PlanSettings()
    p.add_argument("--model", required=True, help=f"checkpoint directory (config.json) or one of: {', '.join(spec.MODELS)}")
    p.add_argument("--hardware", required=True, help=f"one of: {', '.join([*hardware.HARDWARE, 'cpu'])} (cpu is measured: ~1 s, plus the calibration forward)")
    p.add_argument("--gpus", type=int, default=d.gpus)
    p.add_argument("--tokens", type=int, default=d.tokens_per_gpu, help="tokens per GPU per step (default %(default)s)")
    p.add_argument("--context", type=int, default=d.context, help="tokens per request (default %(default)s)")
    p.add_argument("--link", choices=["nvlink", "pcie"], default=d.link, help="link the collectives use")
    p.add_argument("--link-gbps", type=float, help="override the link's bandwidth, GB/s per direction per GPU")
    p.add_argument("--link-on-cores", action="store_true",
                   help="the transfers run on the compute cores (gloo between CPU ranks): AsyncEP's gathers add to the step instead "
                   "of hiding behind it; give --link-gbps as received GB per second of CPU time (benchmarks/transport_bench.py)")  # fmt: skip
    p.add_argument("--gamma", type=float, default=d.gamma, help="jitter margin of T* (default %(default)s)")
    p.add_argument("--efficiency", type=float, help=f"fraction of peak the kernels reach (default: {d.efficiency} on GPU profiles; "
                   "on cpu, measured by timing the model's first MoE layer on the planned batch)")
    p.add_argument("--backend", choices=["inductor", "eager"], default="inductor",
                   help="how the cpu calibration forward runs: compiled as zp_compile models run (5-15 s) or eager (~1 s)")
    p.add_argument("--prefetch", type=int, default=d.prefetch)
    p.add_argument("--no-resident-first-layer", action="store_true", help="shard the first MoE layer too")
    p.add_argument("--no-kv-cache", action="store_true", help="KV-cache-free mode: keep one layer's KV only")
    p.add_argument("--no-offload", action="store_true", help="never move expert shards to host memory")
    p.set_defaults(run=run_plan)


def run_plan(args: argparse.Namespace) -> None:
    model = spec.load_model(args.model)
    cpu = args.hardware == "cpu"
    # CPU ranks share one machine: each gets its share of RAM and cores, and "offloading" to host frees nothing.
    hw = hardware.measure_cpu(ranks=args.gpus) if cpu else hardware.hardware(args.hardware)
    assumed = planning.PlanSettings().efficiency
    efficiency, timing, note = args.efficiency, None, ""
    if efficiency is None and cpu:
        config = spec.load_config(args.model)
        if config is not None:  # measured: the planner's FLOPs for a real forward over its time
            timing = calibrate.time_forward(config, model, args.tokens, args.context, ranks=args.gpus, backend=args.backend)
            efficiency = timing.efficiency(hw.peak_flops)
        else:
            note = f"efficiency {assumed} assumed: a built-in name has no config.json to build a calibration layer from"
    settings = planning.PlanSettings(
        gpus=args.gpus, tokens_per_gpu=args.tokens, context=args.context, gamma=args.gamma,
        efficiency=assumed if efficiency is None else efficiency,
        link=args.link, link_bw=args.link_gbps * GB if args.link_gbps else None, prefetch=args.prefetch,
        resident_first_layer=not args.no_resident_first_layer, kv_cache=not args.no_kv_cache, offload=not (args.no_offload or cpu),
        link_on_compute=args.link_on_cores,
    )
    print(format_plan(planning.plan(model, hw, settings), timing, note))


def format_plan(p: planning.Plan, timing: calibrate.ForwardTiming | None = None, note: str = "") -> str:
    m, hw, s, mem, th = p.model, p.hardware, p.settings, p.memory, p.threshold
    link = (s.link_bw or hw.link_bw(s.link)) / GB
    gb = lambda x: f"{x / GB:8.2f} GB"  # noqa: E731
    resident = len(m.moe_layers) - len(planning.sharded_layers(m, s))
    row = lambda label, value: f"  {label:<36s}{value}"  # noqa: E731
    lines = [
        f"{m.name} on {s.gpus} x {hw.name} ({'loopback' if hw.name == 'cpu' else s.link} {link:.3g} GB/s per direction x {s.link_efficiency} achieved), "
        f"{s.tokens_per_gpu:,} tokens per GPU per step, {s.context:,}-token requests",
        f"model: {m.total_params / 1e9:.1f}B parameters, {m.active_params_per_token / 1e9:.1f}B active per token "
        f"(+ lm_head once per request); {len(m.moe_layers)}/{m.layers} MoE layers x {m.experts} experts, top-{m.top_k}; "
        f"expert bank {m.bank_params * planning.expert_weight_bytes(m, hw) / GB:.2f} GB per layer at "
        f"{planning.expert_weight_bytes(m, hw):.5g} byte(s)/weight"
        + (f" ({m.quantization} checkpoint, scales included; other linear layers {m.linear_weight_bytes:.5g})" if m.quantization else ""),
    ]
    if timing is not None:
        lines.append(
            f"compute calibrated: layers 0-{timing.layers - 1} on {timing.requests} x {timing.context} tokens ({timing.backend}, "
            f"{timing.threads} thread(s) per rank): {timing.flops / 1e9:.1f} GFLOP counted in {timing.seconds * 1e3:.1f} ms "
            f"= {timing.achieved_flops / 1e9:.1f} GFLOP/s, efficiency {s.efficiency:.3f} of the {hw.peak_flops / 1e9:.0f} GFLOP/s matmul peak")
    elif note:
        lines.append(note)
    lines += [
        "",
        "memory per GPU (AsyncEP)",
        row("dense weights, replicated", gb(mem.dense)),
        row(f"expert shards ({resident} MoE layer(s) whole)", gb(mem.expert_shards)),
        row("gathered banks in flight", gb(mem.in_flight)),
        row(f"activations ({s.tokens_per_gpu:,} tokens)", gb(mem.activations)),
        row(f"KV for the batch ({m.layers if s.kv_cache else 1} layers)", gb(mem.kv)),
        row("total", f"{gb(mem.total)} of {mem.capacity / GB:.0f} GB ({mem.usable / GB:.1f} GB usable)"),
    ]
    if mem.offloaded_layers:
        lines.append(f"  hybrid offload: {mem.offloaded_layers} layers' shards in host memory ({mem.host_per_gpu / GB:.1f} GB per GPU), "
                     f"copied over PCIe every step")
    if not mem.fits:
        lines.append(f"  DOES NOT FIT: {mem.total / GB:.1f} GB > {mem.usable / GB:.1f} GB usable"
                     + (" even with every sharded layer offloaded" if mem.offloaded_layers else ""))
    below = s.tokens_per_gpu < th.tokens
    lines += [
        "",
        f"saturation threshold (gamma {s.gamma})",
        row("t_gather, slowest layer", f"{th.t_gather_s * 1e3:8.2f} ms"),
        row("T* = t_gather * peak * gamma", f"{th.flops_per_layer / 1e12:8.2f} TFLOP per MoE layer per GPU"),
        row("", f"= {th.tokens:,.0f} tokens per GPU at {s.context:,}-token context"),
        row("", f"= {th.flops_per_step / 1e12:,.0f} TFLOP per GPU per step (whole model)"),
        f"  batch of {s.tokens_per_gpu:,} tokens is {'BELOW' if below else 'above'} T*; at efficiency {s.efficiency:.3g} "
        f"the gather already hides from {th.hide_tokens:,.0f} tokens",
        "",
        f"{'strategy':9s}{'step ms':>10s}{'tokens/s':>12s}{'MFU':>7s}  detail",
    ]
    for pred in p.predictions.values():
        note = pred.detail + ("" if pred.fits else f"; DOES NOT FIT: weights {pred.weights_per_gpu / GB:.0f} GB per GPU")
        lines.append(f"{pred.strategy:9s}{pred.step_s * 1e3:10.1f}{pred.tokens_per_s:12,.0f}{pred.mfu:7.1%}  {note}")
    best = p.best_baseline
    lines.append(f"AsyncEP over the best baseline ({best.strategy}): {p.speedup:.2f}x")
    return "\n".join(lines)


def _add_serve(sub) -> None:
    from .contract import BLOCK, TRANSPORTS
    from .optimize import BACKENDS
    from .server.routing import FILLS
    from .server.settings import DTYPES, ON_WORKER_FAILURE, SCHEDULING, ServeSettings

    d = ServeSettings(model="", model_name="")
    p = sub.add_parser("serve", help="HTTP scoring server over N ranks running the optimized model",
                       description="Serve /classify, /score, /rerank and prefill-only /v1/completions from N lockstep ranks. "
                       "With no --model: a tiny built-in MoE checkpoint with a local tokenizer, on 2 CPU ranks.")  # fmt: skip
    # Every flag's dest is a ServeSettings field, and every default is that field's.
    p.add_argument("--model", help="checkpoint directory (safetensors + config.json + tokenizer); default: the built-in tiny model")
    p.add_argument("--tokenizer", help="tokenizer directory, if not in --model")
    p.add_argument("--served-model-name", dest="model_name", help="the name clients use (default: the directory name)")
    p.add_argument("--nproc", type=int, default=d.nproc, help="number of ranks (default %(default)s)")
    p.add_argument("--host", default=d.host, help="HTTP bind address (default %(default)s)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--labels", nargs="+", help="label strings for /classify and default /score labels, one token each "
                   "(default for the built-in model: ' yes' ' no')")  # fmt: skip
    p.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's")
    p.add_argument("--backend", default=d.backend, choices=BACKENDS)
    p.add_argument("--transport", default=d.transport, choices=TRANSPORTS,
                   help="how ranks gather expert weights: shm (shared memory; ranks on one host, fastest on CPU) or "
                   "collective (all-gathers: NCCL, gloo); auto (default): shm when every rank is a CPU process on one host")  # fmt: skip
    p.add_argument("--device", default=d.device,
                   help="where each rank runs: cuda (rank i on cuda:LOCAL_RANK, NCCL between ranks; an error if CUDA does not "
                   "work), cpu (gloo), or auto (default): cuda when it works, else cpu")  # fmt: skip
    p.add_argument("--prefetch", type=int, default=d.prefetch)
    p.add_argument("--regional-compile", action=argparse.BooleanOptionalAction, default=d.regional_compile,
                   help="compile a decoder layer at a time, each distinct layer once: start-up no longer grows with depth "
                   "(default: on; --no-regional-compile compiles the whole model as one graph)")  # fmt: skip
    p.add_argument("--threads-per-rank", type=int, help="CPU threads per rank (default: cores / ranks)")
    p.add_argument("--max-model-len", type=int, help="longest input in tokens (default: the config's max_position_embeddings)")
    p.add_argument("--max-tokens-per-rank", type=int, default=d.max_tokens_per_rank,
                   help="tokens one rank's forward processes per step (packed steps: the tokens it computes) (default %(default)s)")
    p.add_argument("--max-seqs-per-rank", type=int, default=d.max_seqs_per_rank)
    p.add_argument("--max-waiting", type=int, default=d.max_waiting, help="queued sequences before 429 (default %(default)s)")
    p.add_argument("--max-items", type=int, default=d.max_items, help="inputs/items/documents per request (default %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="larger bodies get 413 (default %(default)s)")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout, help="seconds (default %(default)s)")
    p.add_argument("--step-timeout", type=float, default=d.step_timeout, help="a step slower than this fails the ranks (default %(default)s s)")
    p.add_argument("--heartbeat-timeout", type=float, default=d.heartbeat_timeout,
                   help="a rank whose heartbeat stands still this long has failed (default %(default)s s)")  # fmt: skip
    p.add_argument("--start-timeout", type=float, default=d.start_timeout, help="seconds for the ranks to load and compile (default %(default)s)")
    p.add_argument("--on-worker-failure", choices=ON_WORKER_FAILURE, default=d.on_worker_failure,
                   help="restart: the failed steps' requests run again on new ranks, requests keep queueing meanwhile; "
                   "exit: answer everything 503 and exit 1 (default %(default)s)")  # fmt: skip
    p.add_argument("--restart-wait", type=float, default=d.restart_wait,
                   help="seconds requests queue while the ranks restart; past it, what is queued gets 503 (default %(default)s)")  # fmt: skip
    p.add_argument("--policy", default=d.policy, choices=SCHEDULING,
                   help="fifo: first come, first served, a step as soon as work waits; the others route each sequence to a "
                   "rank and fill every step to the saturation threshold T (default %(default)s)")  # fmt: skip
    p.add_argument("--threshold-flops", type=float, help="T, FLOPs per rank per step (default: measured by the ranks at start-up)")
    p.add_argument("--cache-tokens", type=int, default=d.cache_tokens,
                   help=f"each rank's prefix KV cache, in tokens ({BLOCK}-token blocks, LRU); 0: KV-cache-free (default %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help="longest a step waits to fill up to T (default %(default)s)")
    p.add_argument("--fill", choices=FILLS, default=d.fill,
                   help="with a routing policy, what each rank's step is filled to: threshold: T (the lowest latency); queue: the "
                   "larger of T and the rank's share of the waiting work, so a deep queue runs in fewer, larger steps "
                   "(throughput) (default %(default)s)")  # fmt: skip
    p.add_argument("--api-key", default=os.environ.get("ZP_API_KEY"), help="require 'Authorization: Bearer KEY' on all but /health (env ZP_API_KEY)")
    p.add_argument("--external-ranks", action="store_true",
                   help="do not start ranks: wait for --nproc ranks started by torchrun (any hosts) to join on --worker-port")  # fmt: skip
    p.add_argument("--worker-host", default=d.worker_host, help="address ranks use to reach this front end (default %(default)s)")
    p.add_argument("--worker-port", type=int, default=d.worker_port,
                   help="port of the front end's rank store; the data socket takes the next port (default: any free ports)")  # fmt: skip
    p.add_argument("--log-level", default=d.log_level)
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import dataclasses
    import logging
    from pathlib import Path

    from .server.ranks import Ranks
    from .server.serve import run
    from .server.settings import ServeSettings

    logging.basicConfig(level=args.log_level.upper(), format="%(message)s")
    if args.model is None:
        from .models import default_checkpoint

        args.model = str(default_checkpoint())
        args.labels = args.labels or [" yes", " no"]
    model = Path(args.model)
    if not (model / "config.json").exists():
        raise ValueError(f"--model {args.model}: no config.json there")
    args.model, args.model_name, args.labels = str(model.resolve()), args.model_name or model.name, args.labels or []
    settings = ServeSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeSettings)})
    if not settings.external_ranks:  # ranks on this host: a device they cannot use fails here, before they start
        from .devices import resolve_device

        logging.getLogger("zp_compile.server").info("zp-compile: ranks on %s (--device %s)", resolve_device(settings.device).type, settings.device)
    ranks = Ranks(settings)
    if settings.external_ranks:
        print(f"zp-compile serve: waiting for {settings.nproc} ranks; on each host run\n"
              f"  torchrun --nnodes NODES --nproc_per_node RANKS_PER_NODE --rdzv-backend c10d --rdzv-endpoint HOST0:29500 "
              f"-m zp_compile.rank --frontend {ranks.address}", flush=True)  # fmt: skip
    return run(settings, ranks)


def _add_bench_serve(sub) -> None:
    p = sub.add_parser("bench-serve", help="load generator for a running zp-compile serve (vllm bench serve's flags)",
                       description="Send prompts of exact token lengths to a running server (Poisson arrivals) and report "
                       "throughput, latency and the server's /metrics deltas (steps, FLOPs imbalance, tokens per rank).")  # fmt: skip
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    p.add_argument("--endpoint", default="/classify", choices=["/classify", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank", "/v1/completions"],
                   help="random, shared-prefix and mix build bodies for /classify, /score and /v1/completions; custom's are sent as given")  # fmt: skip
    p.add_argument("--api-key", default=os.environ.get("ZP_API_KEY"), help="sent as 'Authorization: Bearer KEY' (env ZP_API_KEY)")
    p.add_argument("--model", help="model name sent in the bodies (default: the id GET /v1/models gives)")
    p.add_argument("--tokenizer", help="the server's tokenizer directory, to build prompts of exact token lengths "
                   "(default: the built-in default checkpoint's, when the server serves it)")  # fmt: skip
    p.add_argument("--dataset-name", default="random", choices=["random", "shared-prefix", "mix", "custom"],
                   help="random: random words; shared-prefix: groups sharing a system prompt (sglang's generated-shared-prefix); "
                   "mix: the paper-like mix of zp_compile/tools/workloads.py, clipped to the server's max_model_len; "
                   "custom: the request bodies of --dataset-path, one JSON object per line")  # fmt: skip
    p.add_argument("--dataset-path", help="custom: a JSON-lines file of request bodies for --endpoint")
    p.add_argument("--num-prompts", type=int, default=1000, help="random and mix (default %(default)s); shared-prefix sends groups x prompts per group")
    p.add_argument("--random-input-len", type=int, default=1024, help="tokens per prompt, special tokens included (default %(default)s)")
    p.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in [len * (1 - r), len * (1 + r)] (default %(default)s)")
    p.add_argument("--gsp-num-groups", type=int, default=64)
    p.add_argument("--gsp-prompts-per-group", type=int, default=16)
    p.add_argument("--gsp-system-prompt-len", type=int, default=2048, help="shared prefix tokens, special tokens included (default %(default)s)")
    p.add_argument("--gsp-question-len", type=int, default=128)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson arrivals; inf: all at once (default)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps: 1 Poisson, < 1 burstier (default %(default)s)")
    p.add_argument("--max-concurrency", type=int, help="requests in flight at most (default: no limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=3600.0, help="client timeout per request, seconds (default %(default)s)")
    p.add_argument("--save-result", action="store_true", help="write the report and every request's outcome as JSON")
    p.add_argument("--result-dir", help="directory of the JSON (default: the current one)")
    p.add_argument("--result-filename", help="default: zp-{dataset}-{rate}qps-concurrency{c}-{date}.json")
    p.set_defaults(run=run_bench_serve)


def run_bench_serve(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses
    import json
    import math
    from datetime import datetime
    from pathlib import Path

    import httpx
    from transformers import AutoTokenizer

    from .tools import bench_serve as bench

    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        r = httpx.get(base + "/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach {base}/v1/models: {e}") from None
    if r.status_code != 200:
        raise ValueError(f"GET {base}/v1/models answered {r.status_code}: {r.text[:200]}")
    card = r.json()["data"][0]
    model, max_model_len = args.model or card["id"], card["max_model_len"]
    tokenizer_dir = args.tokenizer
    if tokenizer_dir is None:
        from .models import default_checkpoint

        tokenizer_dir = default_checkpoint()
        if card["id"] != tokenizer_dir.name:
            raise ValueError(f"the server serves {card['id']!r}, not the built-in default checkpoint: pass --tokenizer DIR "
                             "(the server's tokenizer) so that prompts have exact token lengths")  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    kw = {"seed": args.seed, "endpoint": args.endpoint, "model": model}
    if args.dataset_name == "random":
        requests = bench.random_dataset(tokenizer, args.num_prompts, args.random_input_len, args.random_range_ratio, **kw)
    elif args.dataset_name == "shared-prefix":
        requests = bench.shared_prefix_dataset(tokenizer, args.gsp_num_groups, args.gsp_prompts_per_group,
                                               args.gsp_system_prompt_len, args.gsp_question_len, **kw)  # fmt: skip
    elif args.dataset_name == "mix":
        requests = bench.mix_dataset(tokenizer, args.num_prompts, max_model_len, **kw)
    else:
        if not args.dataset_path:
            raise ValueError("--dataset-name custom needs --dataset-path FILE (one JSON request body per line)")
        requests = bench.custom_dataset(tokenizer, args.dataset_path, model=model)
    if args.dataset_name != "custom" and args.endpoint not in bench.ENDPOINTS:
        raise ValueError(f"{args.dataset_name} builds bodies for {', '.join(bench.ENDPOINTS)}, not {args.endpoint}: use --dataset-name custom")
    longest = max((n for _, n in requests), default=0)
    if longest > max_model_len and args.dataset_name != "custom":  # custom bodies go as given (a batched body sums its prompts)
        flags = "--random-input-len, --random-range-ratio" if args.dataset_name == "random" else "--gsp-system-prompt-len + --gsp-question-len"
        raise ValueError(f"{args.dataset_name} prompts reach {longest} tokens; the server's max_model_len is {max_model_len}: lower {flags}")
    concurrency = args.max_concurrency or "no limit"
    print(f"bench-serve: {len(requests)} {args.dataset_name} prompts ({sum(n for _, n in requests):,} tokens) to {base}{args.endpoint}, "
          f"request rate {args.request_rate:g}/s (burstiness {args.burstiness:g}), max concurrency {concurrency}", flush=True)  # fmt: skip
    result = asyncio.run(bench.run(base, args.endpoint, requests, request_rate=args.request_rate, burstiness=args.burstiness,
                                   max_concurrency=args.max_concurrency, seed=args.seed, api_key=args.api_key,
                                   timeout=args.request_timeout))  # fmt: skip
    print(bench.format_result(result))
    if args.save_result:
        now = datetime.now()
        rate = "inf" if math.isinf(args.request_rate) else args.request_rate  # JSON has no infinity
        name = args.result_filename or f"zp-{args.dataset_name}-{rate}qps-concurrency{args.max_concurrency}-{now:%Y%m%d-%H%M%S}.json"
        path = Path(args.result_dir or ".") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        settings = {"date": now.isoformat(timespec="seconds"), "base_url": base, "model_id": model, "tokenizer_id": str(tokenizer_dir),
                    "dataset_name": args.dataset_name, "request_rate": rate, "burstiness": args.burstiness,
                    "max_concurrency": args.max_concurrency, "seed": args.seed}  # fmt: skip
        path.write_text(json.dumps({**settings, **dataclasses.asdict(result)}, indent=2))
        print(f"bench-serve: result written to {path}")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="zp-compile", description="zp-compile command line")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_plan(sub)
    _add_serve(sub)
    _add_bench_serve(sub)
    args = parser.parse_args(argv)
    try:
        code = args.run(args)
    except ValueError as e:  # bad names and settings: one line, no traceback
        sys.exit(f"zp-compile {args.command}: error: {e}")
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
