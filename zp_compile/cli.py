"""Command line: ``zp-compile <command>``. Each command is a subparser with its own ``run`` function.

``zp-compile plan --model qwen3-235b-a22b --hardware h200-fp8 --gpus 8`` prints memory per GPU, the
saturation threshold T* and predicted throughput of AsyncEP, TP, EP and PP (see zp_compile/planner.py).
"""

from __future__ import annotations

import argparse
import sys

from . import planner

GIB = 1e9  # the planner and the spec sheets count decimal gigabytes


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="memory, saturation threshold and predicted throughput of a deployment",
                       description="Predict memory per GPU, T* and tokens/s + MFU of AsyncEP, TP, EP and PP.")
    d = planner.PlanSettings()
    p.add_argument("--model", required=True, help=f"checkpoint directory (config.json) or one of: {', '.join(planner.MODELS)}")
    p.add_argument("--hardware", required=True, help=f"one of: {', '.join([*planner.HARDWARE, 'cpu'])} (cpu is measured, ~1 s)")
    p.add_argument("--gpus", type=int, default=d.gpus)
    p.add_argument("--tokens", type=int, default=d.tokens_per_gpu, help="tokens per GPU per step (default %(default)s)")
    p.add_argument("--context", type=int, default=d.context, help="tokens per request (default %(default)s)")
    p.add_argument("--link", choices=["nvlink", "pcie"], default=d.link, help="link the collectives use")
    p.add_argument("--link-gbps", type=float, help="override the link's bandwidth, GB/s per direction per GPU")
    p.add_argument("--gamma", type=float, default=d.gamma, help="jitter margin of T* (default %(default)s)")
    p.add_argument("--efficiency", type=float, default=d.efficiency, help="fraction of peak the kernels reach (default %(default)s)")
    p.add_argument("--prefetch", type=int, default=d.prefetch)
    p.add_argument("--no-resident-first-layer", action="store_true", help="shard the first MoE layer too")
    p.add_argument("--no-kv-cache", action="store_true", help="KV-cache-free mode: keep one layer's KV only")
    p.add_argument("--no-offload", action="store_true", help="never move expert shards to host memory")
    p.set_defaults(run=run_plan)


def run_plan(args: argparse.Namespace) -> None:
    model = planner.load_model(args.model)
    cpu = args.hardware == "cpu"
    # CPU ranks share one machine: each gets its share of RAM, and "offloading" to host frees nothing.
    hw = planner.measure_cpu(ranks=args.gpus) if cpu else planner.hardware(args.hardware)
    settings = planner.PlanSettings(
        gpus=args.gpus, tokens_per_gpu=args.tokens, context=args.context, gamma=args.gamma, efficiency=args.efficiency,
        link=args.link, link_bw=args.link_gbps * GIB if args.link_gbps else None, prefetch=args.prefetch,
        resident_first_layer=not args.no_resident_first_layer, kv_cache=not args.no_kv_cache, offload=not (args.no_offload or cpu),
    )
    print(format_plan(planner.plan(model, hw, settings)))


def format_plan(p: planner.Plan) -> str:
    m, hw, s, mem, th = p.model, p.hardware, p.settings, p.memory, p.threshold
    link = (s.link_bw or hw.link_bw(s.link)) / GIB
    gb = lambda x: f"{x / GIB:8.2f} GB"  # noqa: E731
    resident = len(m.moe_layers) - len(planner._sharded_layers(m, s))
    row = lambda label, value: f"  {label:<36s}{value}"  # noqa: E731
    lines = [
        f"{m.name} on {s.gpus} x {hw.name} ({'loopback' if hw.name == 'cpu' else s.link} {link:.3g} GB/s per direction x {s.link_efficiency} achieved), "
        f"{s.tokens_per_gpu:,} tokens per GPU per step, {s.context:,}-token requests",
        f"model: {m.total_params / 1e9:.1f}B parameters, {m.active_params_per_token / 1e9:.1f}B active per token "
        f"(+ lm_head once per request); {len(m.moe_layers)}/{m.layers} MoE layers x {m.experts} experts, top-{m.top_k}; "
        f"expert bank {m.bank_params * hw.weight_bytes / GIB:.2f} GB per layer at {hw.weight_bytes} byte(s)/weight",
        "",
        "memory per GPU (AsyncEP)",
        row("dense weights, replicated", gb(mem.dense)),
        row(f"expert shards ({resident} MoE layer(s) whole)", gb(mem.expert_shards)),
        row("gathered banks in flight", gb(mem.in_flight)),
        row(f"activations ({s.tokens_per_gpu:,} tokens)", gb(mem.activations)),
        row(f"KV for the batch ({m.layers if s.kv_cache else 1} layers)", gb(mem.kv)),
        row("total", f"{gb(mem.total)} of {mem.capacity / GIB:.0f} GB ({mem.usable / GIB:.1f} GB usable)"),
    ]
    if mem.offloaded_layers:
        lines.append(f"  hybrid offload: {mem.offloaded_layers} layers' shards in host memory ({mem.host_per_gpu / GIB:.1f} GB per GPU), "
                     f"copied over PCIe every step")
    if not mem.fits:
        lines.append(f"  DOES NOT FIT: {mem.total / GIB:.1f} GB > {mem.usable / GIB:.1f} GB usable"
                     + (" even with every sharded layer offloaded" if mem.offloaded_layers else ""))
    below = s.tokens_per_gpu < th.tokens
    lines += [
        "",
        f"saturation threshold (gamma {s.gamma})",
        row("t_gather, slowest layer", f"{th.t_gather_s * 1e3:8.2f} ms"),
        row("T* = t_gather * peak * gamma", f"{th.flops_per_layer / 1e12:8.2f} TFLOP per MoE layer per GPU"),
        row("", f"= {th.tokens:,.0f} tokens per GPU at {s.context:,}-token context"),
        row("", f"= {th.flops_per_step / 1e12:,.0f} TFLOP per GPU per step (whole model)"),
        f"  batch of {s.tokens_per_gpu:,} tokens is {'BELOW' if below else 'above'} T*; at efficiency {s.efficiency} "
        f"the gather already hides from {th.hide_tokens:,.0f} tokens",
        "",
        f"{'strategy':9s}{'step ms':>10s}{'tokens/s':>12s}{'MFU':>7s}  detail",
    ]
    for pred in p.predictions.values():
        note = pred.detail + ("" if pred.fits else f"; DOES NOT FIT: weights {pred.weights_per_gpu / GIB:.0f} GB per GPU")
        lines.append(f"{pred.strategy:9s}{pred.step_s * 1e3:10.1f}{pred.tokens_per_s:12,.0f}{pred.mfu:7.1%}  {note}")
    best = p.best_baseline
    lines.append(f"AsyncEP over the best baseline ({best.strategy}): {p.speedup:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="zp-compile", description="zp-compile command line")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_plan(sub)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as e:  # bad names and settings: one line, no traceback
        sys.exit(f"zp-compile {args.command}: error: {e}")


if __name__ == "__main__":
    main()
