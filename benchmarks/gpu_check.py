"""One-GPU check: tokens/s and MFU of zp_compile's compiled per-rank forward against transformers' eager
forward and stock torch.compile, on a Qwen3-30B-A3B-shaped stack of layers with random bf16 weights, at
batch sizes around T*; before it the numerics phase, after it AsyncEP on one GPU and packed attention
(``gpu_phases.py``; ``--phases`` picks).

    bash benchmarks/gpu_check.sh                       # on the GPU machine: checks/installs deps, then this
    python benchmarks/gpu_check.py --device cpu --tiny # the same code path on CPU, tiny config (< 60 s)

The model: Qwen3-30B-A3B's published config (hidden 2048, 128 experts top-8, expert width 768, 32 query /
4 KV heads of 128, vocab 151,936) cut to ``--layers`` of its 48 layers (default 4), built directly on the
device from a transformers ``Qwen3MoeConfig`` with random weights (std 0.02, as the real initializer): no
checkpoint. The full vocabulary is kept; every forward passes ``logits_to_keep=1`` (prefill-only serving
reads one position), so the lm_head costs one position per sequence, as ``costmodel.flops.flops_per_request``
counts it.

What is compared, on the same model object and the same token ids:
- eager: transformers' own forward (experts implementation ``grouped_mm``, sdpa attention, bf16);
- compiled: ``zp_compile.optimize(model, backend="inductor")`` then the same call. One GPU is a world of
  one: no expert is sharded and the graph has no gathers (AsyncEP's all-gathers need >= 2 ranks; NCCL
  refuses two ranks on one GPU), so this measures the compute side of a rank: what AsyncEP approaches
  once the gathers hide. The compiled graph is the one every rank runs, less the gathers.

Batch sizes: T* is the planner's saturation threshold for the full Qwen3-30B-A3B on 8 x H200 (bf16, NVLink)
in tokens per GPU per step; the sweep is ``--fractions`` of it (default 1/4, 1/2, 1, 2), as whole sequences
of ``--context`` tokens (default 2048). The sequence length is fixed and only the batch dimension varies,
marked dynamic, so Inductor compiles once for every size (``--static`` compiles once per size instead).

Useful FLOPs per step are ``costmodel.flops.flops_per_request`` of this stack's config (2 x active parameters per
token + causal attention scores/values + lm_head at one position) times the sequences; MFU divides them by
the step time and the H200's dense bf16 peak, 989 TFLOP/s (the CPU dry run: a measured matmul rate).

Timing: CUDA events around each forward (host clock after a synchronize on CPU), median of ``--iters``;
the first call of each size (and the compile) is a warm-up, left out. A budget (``--budget-s`` from the
start of gpu_check.sh, or of this process) skips sizes that would overrun it, and a watchdog prints what
was measured and exits if a compile or a step overruns it anyway.

Output: a table on stdout and JSON in $OUT/gpu_check.json when OUT is set, else ./gpu_check.json
(``--json`` overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

# What zp_compile needs beyond torch (pyproject.toml). torch itself is never installed by this check: the
# GPU machine's CUDA build is used as it is (zp_compile.backend also runs on torch < 2.13).
REQUIREMENTS = ("transformers>=5.24,<6", "accelerate>=1.10", "safetensors>=0.6")

H200_BF16_PEAK = 989e12  # dense, no 2:4 sparsity: zp_compile.costmodel.hardware.HARDWARE["h200-bf16"]
REFERENCE_MODEL = "qwen3-30b-a3b"  # zp_compile.costmodel.spec.MODELS key
GIB = 2**30


# ----------------------------------------------------------------------------------------------------
# Dependencies (no torch import: gpu_check.sh asks this before anything is installed)


def missing_requirements() -> list[str]:
    """Requirements in REQUIREMENTS that the running interpreter does not satisfy, as 'spec (found X)'."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    missing = []
    for spec in REQUIREMENTS:
        req = Requirement(spec)
        try:
            found = version(req.name)
        except PackageNotFoundError:
            missing.append(f"{spec} (not installed)")
            continue
        if not req.specifier.contains(found, prereleases=True):
            missing.append(f"{spec} (found {found})")
    return missing


def count_pass_runs() -> list[int]:
    """Count the post-grad graphs zp_compile's passes run on (zp_compile.backend calls
    ``passes.run_passes`` through the module): evidence that the compiled path is zp_compile's. An FX graph cache hit (a warm TORCHINDUCTOR_CACHE_DIR) skips the passes: 0 is then expected."""
    from zp_compile import passes

    runs, run_passes = [0], passes.run_passes

    def counted(graph, prefetch):
        runs[0] += 1
        return run_passes(graph, prefetch)

    passes.run_passes = counted
    return runs


# ----------------------------------------------------------------------------------------------------
# Model, sizes, FLOPs


def build_config(args):
    from zp_compile.models import tiny_config

    if args.tiny:
        return tiny_config("qwen3_moe", layers=2, use_cache=False)
    # Qwen3-30B-A3B's config.json, with fewer layers. intermediate_size is the dense MLP width, unused
    # here: every layer is MoE (decoder_sparse_step 1, no mlp_only_layers).
    return tiny_config(
        "qwen3_moe", layers=args.layers, hidden=2048, num_experts=128, top_k=8, expert_size=768, vocab=151936,
        heads=32, kv_heads=4, head_dim=128, intermediate_size=6144, max_position_embeddings=40960,
        rms_norm_eps=1e-6, norm_topk_prob=True, initializer_range=0.02, use_cache=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )


def check_shape(config, layers: int) -> None:
    """The stack is Qwen3-30B-A3B but for its depth (costmodel.spec.MODELS holds the published config)."""
    from dataclasses import replace

    from zp_compile.costmodel import spec

    got = spec.spec_from_config(config, name="stack")
    want = replace(spec.MODELS[REFERENCE_MODEL], name="stack", layers=layers, moe_layers=tuple(range(layers)))
    if got != want:
        raise AssertionError(f"stack is not Qwen3-30B-A3B-shaped:\n  built  {got}\n  wanted {want}")


def build_model(config, device):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # random init straight on the device: no host copy of the weights
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to(device).eval()  # no-op unless from_config ignored the device context
    if getattr(model.config, "_experts_implementation", None) != "grouped_mm":
        model.set_experts_implementation("grouped_mm")
    return model


def threshold():
    """T* of the full Qwen3-30B-A3B on 8 x H200 bf16 over NVLink, 2048-token requests (planner defaults)."""
    from zp_compile.costmodel import hardware, planning, spec

    m, hw = spec.MODELS[REFERENCE_MODEL], hardware.HARDWARE["h200-bf16"]
    return planning.predict_threshold(m, hw, planning.PlanSettings(gpus=8, context=2048))


def batch_sizes(tstar_tokens: float, fractions: list[float], context: int, max_tokens: int) -> list[tuple[float, int]]:
    """(fraction, sequences) for each fraction of T*, whole sequences, at least 1, at most max_tokens."""
    out, seen = [], set()
    for f in fractions:
        seqs = max(1, round(f * tstar_tokens / context))
        if seqs * context > max_tokens:
            seqs = max(1, max_tokens // context)
        if seqs not in seen:
            seen.add(seqs)
            out.append((f, seqs))
    return out


def matmul_rate(device) -> float:
    """FLOP/s of a square bf16 matmul on this device (the package's own measurement: 8192 on a GPU,
    1024 on a CPU, the device synchronised around the clock)."""
    import torch

    from zp_compile.costmodel.hardware import measure_matmul_flops

    return measure_matmul_flops(torch.bfloat16, seconds=0.5, device=device)


# ----------------------------------------------------------------------------------------------------
# Timing


def sync(device) -> None:
    from zp_compile.devices import synchronize

    synchronize(device)


def time_forward(fn, iters: int, device) -> list[float]:
    """Seconds of each of ``iters`` calls: CUDA events on a GPU, host clock on a CPU."""
    import torch

    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


class Budget:
    """Wall-clock budget from the start of gpu_check.sh (ZP_GPU_CHECK_START) or of this process."""

    def __init__(self, seconds: float) -> None:
        self.start = float(os.environ.get("ZP_GPU_CHECK_START") or time.time())
        self.deadline = self.start + seconds

    def elapsed(self) -> float:
        return time.time() - self.start

    def left(self) -> float:
        return self.deadline - time.time()


# ----------------------------------------------------------------------------------------------------
# Report


def fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def table(report: dict) -> str:
    rows = sorted(report["rows"], key=lambda r: r["tokens"])
    gather_ms = report["threshold"]["t_gather_ms_8xh200"]
    head = (f"{'x T*':>5} {'tokens/step':>11} {'seqs':>4} {'eager tok/s':>12} {'stock tok/s':>12} {'compiled tok/s':>14} {'speedup':>7} "
            f"{'eager MFU':>9} {'comp MFU':>8} {'eager GiB':>9} {'comp GiB':>8} {'ms/layer':>8} {'layer/gather':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        e, c, st = r.get("eager") or {}, r.get("compiled") or {}, r.get("stock_compile") or {}
        ms_layer = c["step_s"] * 1e3 / report["model"]["layers"] if c else None
        lines.append(
            f"{r['fraction']:>5.2f} {r['tokens']:>11,} {r['seqs']:>4} {fmt(e.get('tokens_per_s'), ',.0f'):>12} "
            f"{fmt(st.get('tokens_per_s'), ',.0f'):>12} "
            f"{fmt(c.get('tokens_per_s'), ',.0f'):>14} "
            f"{fmt(c['tokens_per_s'] / e['tokens_per_s'] if c and e else None, '.2f'):>7} "
            f"{fmt(e.get('mfu'), '.1%'):>9} {fmt(c.get('mfu'), '.1%'):>8} "
            f"{fmt(e.get('peak_gib'), '.1f'):>9} {fmt(c.get('peak_gib'), '.1f'):>8} "
            f"{fmt(ms_layer, '.2f'):>8} {fmt(ms_layer / gather_ms if ms_layer and gather_ms else None, '.2f'):>12}"
        )
    for s in report["skipped"]:
        lines.append(f"skipped: {s}")
    for name, phase in report.get("phases", {}).items():
        if "error" in phase or "skipped" in phase:
            lines.append(f"phase {name}: {phase.get('error') or 'skipped: ' + phase['skipped']}")
        elif name == "asyncep":
            lines.append(f"phase asyncep: world {phase['world']} on one device, {phase['seqs']} x {phase['context']} tokens: overlap cost "
                         f"{phase['overlap_cost']:.3f} ({phase['step_s_with_copies'] * 1e3:.1f} / {phase['step_s_without'] * 1e3:.1f} ms)")
        elif name == "numerics":
            worst = max(v["max_abs_vs_unmodified"] for k, v in phase.items() if isinstance(v, dict))
            lines.append(f"phase numerics: max |optimized - unmodified| over {len(phase) - 1} cases {worst:.3g}")
        elif name == "packed":
            lines += [f"phase packed: {c['rows']} rows, prefix {c['prefix']}: flex {c['flex_ms']:.2f} ms, loop {c['loop_ms']:.2f} ms, "
                      f"padded {c['padded_sdpa_ms']:.2f} ms" for c in phase["cases"]]  # fmt: skip
        elif name == "ranks":
            lines += [f"phase ranks: {phase['world']} {phase['device']} ranks, {r['strategy']}, {r['tokens_per_rank']} tokens/rank: "
                      f"{r['tok_s']:,.0f} tok/s" for r in phase["rows"]]  # fmt: skip
    return "\n".join(lines)


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def finish(report: dict, path: Path) -> None:
    report["elapsed_s"] = round(time.time() - report["_start"], 1)
    out = {k: v for k, v in report.items() if not k.startswith("_")}
    print("\n" + table(out), flush=True)
    if report.get("summary"):
        print(f"\n{report['summary']}", flush=True)
    write_report(out, path)
    print(f"wrote {path} (elapsed {report['elapsed_s']} s since start)", flush=True)


# ----------------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny qwen3_moe config (dry run): 2 layers, hidden 64, 8 experts")
    p.add_argument("--layers", type=int, default=4, help="layers of Qwen3-30B-A3B's 48 (default %(default)s)")
    p.add_argument("--context", type=int, help="tokens per sequence (default 2048; --tiny: 32)")
    p.add_argument("--tstar", type=float, help="T* in tokens per GPU per step (default: the planner's; --tiny: 256)")
    p.add_argument("--fractions", default="1,0.5,2", help="fractions of T* to run, in this order (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=65536, help="cap on tokens per step (default %(default)s)")
    p.add_argument("--iters", type=int, default=10, help="timed forwards per size and path (default %(default)s)")
    p.add_argument("--budget-s", type=float, default=440.0,
                   help="seconds from the start of gpu_check.sh (ZP_GPU_CHECK_START) after which nothing new starts "
                        "and a watchdog reports and exits (default %(default)s)")
    p.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager"])
    p.add_argument("--reserve-s", type=float, default=150.0,
                   help="seconds of the budget kept from the sweep for the phases after it (AsyncEP, packed attention)")
    p.add_argument("--phases", default="numerics,sweep,asyncep,packed,ranks", help="which parts to run (default %(default)s)")
    p.add_argument("--static", action="store_true", help="compile once per size (dynamic=False) instead of a dynamic batch dim")
    p.add_argument("--json", type=Path, help="default: $OUT/gpu_check.json if OUT is set, else ./gpu_check.json")
    p.add_argument("--check-deps", action="store_true", help="print unmet requirements, one a line, and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check_deps:
        print("\n".join(missing_requirements()))
        return 0
    budget = Budget(args.budget_s)
    # The working tree's zp_compile, also when this file is run directly (python benchmarks/gpu_check.py)
    # and on a machine where the package is not installed (gpu_check.sh sets PYTHONPATH the same way).
    root = Path(__file__).resolve().parents[1]
    if (root / "zp_compile" / "__init__.py").exists() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    for unmet in missing_requirements():
        print(f"warning: unmet requirement {unmet} (gpu_check.sh installs it from .whl/)", flush=True)
    out_dir = os.environ.get("OUT")
    json_path = args.json or (Path(out_dir) / "gpu_check.json" if out_dir else Path("gpu_check.json"))

    import warnings

    # transformers' grouped_mm check calls an lru_cache'd version test inside the traced forward: harmless noise.
    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*", category=UserWarning)
    import torch
    import transformers

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"no CUDA device visible to torch {torch.__version__} (use --device cpu --tiny for a dry run)")
    import zp_compile
    from zp_compile.costmodel import flops, spec

    context = args.context or (32 if args.tiny else 2048)
    th = threshold()
    tstar = args.tstar or (256.0 if args.tiny else th.tokens)
    sizes = batch_sizes(tstar, [float(f) for f in args.fractions.split(",")], context, args.max_tokens)

    config = build_config(args)
    if not args.tiny:
        check_shape(config, args.layers)
    spec = spec.spec_from_config(config, name="stack")
    flops_per_seq = flops.flops_per_request(spec, context)  # lm_head at one position: logits_to_keep=1

    env = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }
    report: dict = {
        "_start": budget.start, "env": env, "timed_out": False, "skipped": [], "rows": [], "summary": "",
        "model": {"name": f"Qwen3-30B-A3B-shaped, {spec.layers} of 48 layers" if not args.tiny else "tiny qwen3_moe",
                  "layers": spec.layers, "hidden": spec.hidden, "experts": spec.experts, "top_k": spec.top_k,
                  "expert_ffn": spec.expert_ffn, "heads": spec.heads, "kv_heads": spec.kv_heads, "head_dim": spec.head_dim,
                  "vocab": spec.vocab, "context": context, "flops_per_sequence": flops_per_seq},
        "threshold": {"model": "Qwen3-30B-A3B", "gpus": 8, "hardware": "h200-bf16", "link": "nvlink", "context": 2048,
                      "tokens_per_gpu": th.tokens, "t_gather_ms_8xh200": th.t_gather_s * 1e3, "tstar_used_tokens": tstar},
        "settings": {"iters": args.iters, "backend": args.backend, "dynamic_batch": not args.static, "budget_s": args.budget_s},
    }

    # Hard guard: whatever is running when the budget ends (a compile, a step), report and exit.
    def on_deadline():
        report["timed_out"] = True
        report["skipped"].append(f"budget of {args.budget_s:.0f} s ran out at {budget.elapsed():.0f} s; exiting from the watchdog")
        finish(report, json_path)
        os._exit(3)

    watchdog = threading.Timer(max(0.0, budget.left()), on_deadline)
    watchdog.daemon = True
    watchdog.start()

    print(f"gpu_check: {env['device']}, python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), "
          f"transformers {env['transformers']}, zp_compile from {Path(zp_compile.__file__).parent}", flush=True)
    peak_spec = H200_BF16_PEAK if device.type == "cuda" else None
    measured = matmul_rate(device)
    peak = peak_spec or measured
    report["peak_flops"] = {"used_for_mfu": peak, "spec_h200_bf16": peak_spec, "measured_matmul": measured}
    print(f"T* (planner: Qwen3-30B-A3B, 8 x H200 bf16, NVLink, 2048-token requests) = {th.tokens:,.0f} tokens per GPU "
          f"per step; gather of one layer's bank {th.t_gather_s * 1e3:.2f} ms. Sweep at T* = {tstar:,.0f}: "
          + ", ".join(f"{f:g} -> {s} x {context}" for f, s in sizes), flush=True)
    print(f"peak for MFU: {peak / 1e12:.3g} TFLOP/s ({'H200 dense bf16 spec' if peak_spec else 'measured matmul'}); "
          f"measured bf16 matmul {measured / 1e12:.3g} TFLOP/s", flush=True)

    phases = args.phases.split(",")
    import gpu_phases

    if "numerics" in phases:  # tiny models, a world of one: Inductor on the device (the dry run: aot_eager)
        gpu_phases.run_phase(report, "numerics", budget, 30, gpu_phases.numerics, device, "aot_eager" if args.tiny else args.backend)

    t0 = time.time()
    model = build_model(config, device)
    vocab = config.vocab_size
    n_params = sum(p.numel() for p in model.parameters())
    report["model"]["parameters"] = n_params
    report["model"]["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    report["model"]["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    print(f"model: {report['model']['name']}, {n_params / 1e9:.2f}B parameters bf16 on {device}, experts "
          f"{report['model']['experts_implementation']}, attention {report['model']['attn_implementation']} "
          f"(built in {time.time() - t0:.1f} s)", flush=True)

    gen = torch.Generator(device="cpu").manual_seed(1)
    inputs = {seqs: torch.randint(3, vocab, (seqs, context), generator=gen).to(device) for _, seqs in sizes}
    rows = {seqs: {"fraction": f, "seqs": seqs, "tokens": seqs * context} for f, seqs in sizes}
    reference_logits = {}

    def result(times: list[float], seqs: int, first_s: float) -> dict:
        step = statistics.median(times)
        return {"step_s": step, "times_s": times, "tokens_per_s": seqs * context / step,
                "mfu": seqs * flops_per_seq / step / peak, "peak_gib": peak_gib(device), "first_call_s": first_s}

    def fits(label: str, seqs: int, per_token_s: float | None, extra_s: float = 0.0) -> bool:
        """Skip a size whose warm-up + timed forwards would outlast the budget (estimated per token)."""
        if per_token_s is None:
            return True
        need = (args.iters + 1) * per_token_s * seqs * context + extra_s
        if need < budget.left() - args.reserve_s - 5:
            return True
        report["skipped"].append(f"{label} {seqs} x {context}: needs ~{need:.0f} s, {budget.left():.0f} s left")
        print(f"  skip {label} {seqs} x {context} (budget)", flush=True)
        return False

    with torch.inference_mode():
        # Eager first: transformers' unmodified forward on the same weights.
        per_token = None
        for _, seqs in sizes:
            if "sweep" not in phases or not fits("eager", seqs, per_token):
                continue
            ids = inputs[seqs]
            reset_peak(device)
            t = time.time()
            reference_logits[seqs] = model(input_ids=ids, logits_to_keep=1).logits.float().cpu()  # warm-up
            first = time.time() - t
            times = time_forward(lambda ids=ids: model(input_ids=ids, logits_to_keep=1), args.iters, device)
            rows[seqs]["eager"] = result(times, seqs, first)
            per_token = statistics.median(times) / (seqs * context)
            report["rows"] = [r for r in rows.values() if "eager" in r or "compiled" in r]
            print(f"  eager    {seqs:>3} x {context}: {rows[seqs]['eager']['tokens_per_s']:>12,.0f} tok/s, "
                  f"MFU {rows[seqs]['eager']['mfu']:.1%}, peak {fmt(rows[seqs]['eager']['peak_gib'], '.1f')} GiB", flush=True)

        # Stock torch.compile of the unmodified model (Inductor, the same dynamic batch), for comparison.
        stock = torch.compile(model, backend=args.backend, dynamic=False if args.static else None)
        stock_compile_s = None
        for _, seqs in sizes:
            if "sweep" not in phases or "eager" not in rows[seqs]:
                continue
            if not fits("stock compile", seqs, per_token, extra_s=(stock_compile_s or 60.0) if stock_compile_s is None or args.static else 0):
                continue
            ids = inputs[seqs]
            if not args.static:
                torch._dynamo.maybe_mark_dynamic(ids, 0)
            t = time.time()
            stock(input_ids=ids, logits_to_keep=1)
            sync(device)
            first = time.time() - t
            stock_compile_s = stock_compile_s or first
            times = time_forward(lambda ids=ids: stock(input_ids=ids, logits_to_keep=1), args.iters, device)
            rows[seqs]["stock_compile"] = result(times, seqs, first)
            print(f"  stock torch.compile {seqs:>3} x {context}: {rows[seqs]['stock_compile']['tokens_per_s']:>12,.0f} tok/s, "
                  f"MFU {rows[seqs]['stock_compile']['mfu']:.1%}, first call {first:.1f} s", flush=True)
        del stock
        torch._dynamo.reset()  # its graphs are not the ones measured next

        # Compiled: the same model through zp_compile (world of one: no shards, no gathers).
        pass_runs = count_pass_runs()
        t = time.time()
        zp_compile.optimize(model, backend=args.backend, dynamic=False if args.static else None)
        state = model.zero_prefill
        report["zp_compile"] = {"world_size": state.world_size, "moe_layers": len(state.layers),
                                "sharded_layers": len(state.sharded_layers), "prefetch": state.config.prefetch,
                                "gathers": "none: a world of one shards nothing (AsyncEP gathers need >= 2 ranks)"}
        print(f"zp_compile.optimize: world {state.world_size}, {len(state.layers)} MoE layers found, "
              f"{len(state.sharded_layers)} sharded (no gathers in a world of one) [{time.time() - t:.1f} s]", flush=True)
        compile_s = None
        for _, seqs in sizes:
            if "eager" not in rows[seqs]:
                continue
            # The first call compiles (the first size, or every size with --static): reserve for it.
            compiling = compile_s is None or args.static
            if not fits("compiled", seqs, per_token, extra_s=(compile_s or 0) if compiling else 0):
                continue
            ids = inputs[seqs]
            if not args.static:
                torch._dynamo.maybe_mark_dynamic(ids, 0)  # one graph for every batch size (sequence length fixed)
            reset_peak(device)
            t = time.time()
            logits = model(input_ids=ids, logits_to_keep=1).logits
            sync(device)
            first = time.time() - t
            if compile_s is None:
                compile_s = first
                report["compile_s"] = compile_s
                print(f"  compiled first call (compile) {compile_s:.1f} s", flush=True)
            ref = reference_logits[seqs]
            got = logits.float().cpu()
            diff = {"max_abs": (got - ref).abs().max().item(),
                    "rel_norm": ((got - ref).norm() / ref.norm()).item(),
                    "argmax_agree": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}
            model(input_ids=ids, logits_to_keep=1)  # second warm-up: lazy allocations, autotuning caches
            times = time_forward(lambda ids=ids: model(input_ids=ids, logits_to_keep=1), args.iters, device)
            rows[seqs]["compiled"] = {**result(times, seqs, first), "vs_eager_logits": diff,
                                      "dynamo_graphs_so_far": torch._dynamo.utils.counters["stats"]["unique_graphs"],
                                      "zp_pass_runs_so_far": pass_runs[0]}
            per_token = max(per_token or 0, statistics.median(times) / (seqs * context))
            report["rows"] = [r for r in rows.values() if "eager" in r or "compiled" in r]
            c = rows[seqs]["compiled"]
            print(f"  compiled {seqs:>3} x {context}: {c['tokens_per_s']:>12,.0f} tok/s, MFU {c['mfu']:.1%}, "
                  f"peak {fmt(c['peak_gib'], '.1f')} GiB, first call {first:.1f} s; vs eager logits: max|d| "
                  f"{diff['max_abs']:.3g}, rel {diff['rel_norm']:.3g}, argmax agree {diff['argmax_agree']:.0%}; "
                  f"graphs compiled so far {c['dynamo_graphs_so_far']}, zp passes ran {pass_runs[0]}x", flush=True)

    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tstar_seqs = next(seqs for f, seqs in sizes if f == 1.0) if any(f == 1.0 for f, _ in sizes) else sizes[0][1]
    if "asyncep" in phases:
        gpu_phases.run_phase(report, "asyncep", budget, 45 if args.tiny else 90, gpu_phases.asyncep, build_config, build_model, args,
                             device, tstar_seqs, context, max(3, args.iters // 2), args.backend)  # fmt: skip
    if "packed" in phases:
        cases = (512, [2, 8], 64, (4, 2), 16) if args.tiny else (8192, [8, 64, 256], 1024, (32, 4), 128)
        gpu_phases.run_phase(report, "packed", budget, 20 if args.tiny else 40, gpu_phases.packed, device, *cases, 3 if args.tiny else 10,
                             args.tiny)  # the dry run: FlexAttention uncompiled  # fmt: skip
    if "ranks" in phases:  # every GPU of the machine under torchrun (skipped with one); the dry run: 2 CPU ranks
        need = 30 if args.tiny else 120
        gpu_phases.run_phase(report, "ranks", budget, need, gpu_phases.ranks, device, args.tiny, budget.left() - 5)

    watchdog.cancel()
    best = max((r for r in report["rows"] if "compiled" in r), key=lambda r: r["compiled"]["tokens_per_s"], default=None)
    if best:
        report["summary"] = (f"best compiled: {best['compiled']['tokens_per_s']:,.0f} tok/s at {best['tokens']:,} tokens/step "
                             f"(MFU {best['compiled']['mfu']:.1%} of {peak / 1e12:.3g} TFLOP/s); compile {compile_s:.1f} s; "
                             f"layer/gather = compiled ms per layer over the planner's 8 x H200 gather of one bank "
                             f"({th.t_gather_s * 1e3:.2f} ms): >= 1 means that gather would hide behind this batch")
    finish(report, json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
