"""Prefill throughput of AsyncEP against transformers' TP and EP and a full replica per rank.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/throughput.py --json out.json

Same checkpoint, same requests, same ranks, one run. Each strategy loads the checkpoint its own way:
- asyncep: zp_compile.from_pretrained (1/N of each expert bank per rank, gathers one layer ahead over
  gloo); asyncep-shm: the same with transport="shm" (ranks on one host: shards in shared memory,
  a gather is a memcpy);
- replica: a full copy per rank, no communication (torch.compile'd): the limit AsyncEP approaches;
- tp: transformers' tensor parallelism, from_pretrained(tp_plan="auto"), torch.compile'd;
- ep: transformers' expert parallelism with all_to_all dispatch,
  DistributedConfig(fsdp_size=N, ep_size=N, ep_implementation="all_to_all"), torch.compile'd, under
  no_grad (it fails under inference_mode).
Every strategy is compiled with Inductor unless ``--backend eager`` (fp32 logits of compiled TP and EP
match the single-process model within 5e-5 on this checkpoint).
For every tokens-per-rank setting, each rank scores its own batch of ``tokens // context`` sequences of
``context`` tokens; a step ends when the slowest rank finishes (the ranks run in lockstep), and tokens/s
counts every rank's tokens. Tensor parallelism is the exception: its ranks compute one batch together,
so every TP rank gets the same batch of N x ``tokens`` tokens and those are counted once. Output length
is 1 (prefill only).

Run one strategy per process (``--strategies asyncep``) for clean peak-memory figures; ``--json``
appends to the file.

On GPUs (``--device cuda``, or ``auto`` where CUDA works: rank r on ``cuda:LOCAL_RANK``, NCCL between
ranks): the same strategies but ``asyncep-shm`` (shared memory is a host transport), each step timed after a
device synchronize, peak memory the device's (``torch.cuda.max_memory_allocated``) instead of the RSS:

    torchrun --nproc_per_node 8 benchmarks/throughput.py --device cuda --strategies asyncep,replica,tp,ep \
        --tokens 4096,16384 --json out.json

``--shape tiny`` is a 2-layer model of the same family for a quick run of the code path (the GPU check's
dry run).

Quantized checkpoints (``--quantization fp8|mxfp4``): the same model shape stored block-FP8 (Qwen3-MoE,
as Qwen3-*-FP8 ships) or with MXFP4 experts (gpt-oss, the family MXFP4 is published for). ``asyncep`` and
``asyncep-shm`` then load the quantized checkpoint (shards kept as stored, gathered so, decoded after
each gather); ``asyncep-bf16``, ``asyncep-shm-bf16``, ``replica``, ``tp`` and ``ep`` load the bf16
checkpoint of the same family. ``--tokens`` entries ending in ``T`` are fractions of the bf16 AsyncEP
T* measured at start-up (``0.25T,0.5T,1T``). ``--load-memory`` only loads the checkpoint with
``asyncep`` and prints, per rank, the shard bytes (values, scales, the rest), the dense bytes and the
peak RSS of the load; nothing is timed.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/throughput.py --quantization fp8 \
        --strategies asyncep,asyncep-bf16,replica --tokens 0.25T,0.5T,1T --json out.json
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/throughput.py --quantization fp8 --load-memory
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import zp_compile
from zp_compile.devices import process_group_backend, resolve_device, synchronize

# The model shape of the project's reference figures (docs/platform.md): 82M parameters, 25 MB of experts per
# layer in bf16, big enough that the gather is not trivial against compute on this CPU.
MODEL = dict(layers=6, hidden=512, num_experts=32, top_k=4, expert_size=256, vocab=4096, heads=8, kv_heads=4)
SHAPES = {"82m": MODEL, "tiny": dict(layers=2, hidden=64, num_experts=8, top_k=2, expert_size=32, vocab=4096, heads=4, kv_heads=2)}


QUANTIZATIONS = ("fp8", "mxfp4")
# The family each quantized layout is published for, at the shape above; gpt-oss's published sliding window.
FAMILY = {None: "qwen3_moe", "fp8": "qwen3_moe", "mxfp4": "gpt_oss"}
FAMILY_SHAPE = {"qwen3_moe": {"head_dim": 64, "intermediate_size": 1024}, "gpt_oss": {"head_dim": 64, "sliding_window": 128}}


def build_checkpoint(quantization: str | None = None, family: str = "qwen3_moe", shape: str = "82m") -> Path:
    """The benchmark checkpoint (``$ZP_BENCH_CKPT``, default /tmp/zp-bench-qwen3moe-82m), built if missing.
    Another family (gpt-oss), a quantized layout or another ``shape`` is a sibling directory: the name
    plus ``-gpt_oss``, ``-fp8``, ``-mxfp4`` or ``-tiny``."""
    from zp_compile.models import tiny

    suffix = ("" if family == "qwen3_moe" else f"-{family}") + (f"-{quantization}" if quantization else "") + ("" if shape == "82m" else f"-{shape}")
    path = Path(os.environ.get("ZP_BENCH_CKPT", "/tmp/zp-bench-qwen3moe-82m") + suffix)
    if not (path / "model.safetensors").exists():
        tiny(family, path, dtype=torch.bfloat16, quantization=quantization, **FAMILY_SHAPE[family], **SHAPES[shape])
    return path


def checkpoint(rank: int, quantization: str | None = None, family: str = "qwen3_moe", shape: str = "82m") -> Path:
    if rank == 0:  # built in a child process, so that building leaves nothing in this rank's memory
        import multiprocessing

        child = multiprocessing.get_context("spawn").Process(target=build_checkpoint, args=(quantization, family, shape))
        child.start()
        child.join()
    dist.barrier()
    return build_checkpoint(quantization, family, shape)  # built by rank 0 by now: only the path


def load(strategy: str, path: Path, backend: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    if strategy.startswith("asyncep"):
        transport = "shm" if strategy.startswith("asyncep-shm") else "collective"
        model = zp_compile.from_pretrained(path, dtype=torch.bfloat16, backend=backend, transport=transport, device=device)
        return model, torch.inference_mode
    if strategy == "replica":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval().to(device)
        return (torch.compile(model) if backend != "eager" else model), torch.inference_mode
    if strategy == "tp":  # transformers places each rank's part on its current device (cuda:LOCAL_RANK, set in main)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, tp_plan="auto").eval()
        return (torch.compile(model) if backend != "eager" else model), torch.no_grad
    if strategy == "ep":
        from transformers.distributed import DistributedConfig

        world = dist.get_world_size()
        config = DistributedConfig(fsdp_size=world, ep_size=world, ep_implementation="all_to_all")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, distributed_config=config).eval()
        return (torch.compile(model) if backend != "eager" else model), torch.no_grad
    raise ValueError(f"unknown strategy {strategy!r}")


def bytes_per_layer(strategy: str, tokens: int, world: int, model) -> float:
    """Bytes one rank receives per MoE layer per step (analytic; bf16 = 2 bytes).

    AsyncEP: the other ranks' shards of the layer's expert bank (over gloo, or copied out of shared
    memory: no network), as ``model`` holds them (a quantized checkpoint's values and scales). TP: two
    ring all-reduces of the [N x tokens, hidden] activations. EP: the dispatch and combine all-to-alls
    of [tokens x top_k, hidden] (the share routed to other ranks).
    """
    from zp_compile.models.rewrite import expert_bytes

    hidden, top_k = model.config.hidden_size, model.config.num_experts_per_tok
    if strategy.startswith("asyncep"):
        sharded = model.zero_prefill.sharded_layers
        return expert_bytes(sharded[:1]) * (world - 1) if sharded else 0.0
    if strategy == "tp":
        return 2 * 2 * (world - 1) / world * world * tokens * hidden * 2
    if strategy == "ep":
        return 2 * tokens * top_k * hidden * 2 * (world - 1) / world
    return 0.0


def load_memory(path: Path) -> dict:
    """Load ``path`` as ``asyncep`` does (no compile, nothing timed): this rank's expert shard bytes by
    stored role (values, scales, the rest: biases, unquantized banks), its other weights, and the
    process's resident memory before the load and at its peak."""
    from zp_compile.models.loading import stored_sizes
    from zp_compile.models.rewrite import expert_tensors

    stored_sizes(path)  # imports the model's code and reads the headers: the constant, before the baseline
    gc.collect()
    reset_peak(torch.device("cpu"))  # the peak (VmHWM) from the current RSS
    before, _ = resident_bytes()
    model = zp_compile.from_pretrained(path, dtype=torch.bfloat16, backend="eager")
    _, peak = resident_bytes()
    held = {"values": 0, "scales": 0, "other": 0}
    for layer in model.zero_prefill.layers:
        spec = getattr(layer.module, "_zp_gather", None)  # None: a resident (whole) layer
        roles = spec.roles if spec is not None else {}
        for slot, t in expert_tensors(layer).items():
            role = roles.get(slot, "")
            kind = "scales" if role in ("scale", "scales") else "values" if role else "other"
            held[kind] += t.numel() * t.element_size()
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {**{f"shard_{k}_bytes": v for k, v in held.items()}, "dense_bytes": total - sum(held.values()),
            "rss_before": before, "peak_rss": peak, "peak_over_before": peak - before}  # fmt: skip


def reset_peak(device: torch.device) -> None:
    """Start the peak-memory count from now: the device's allocator, or the process's RSS (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_bytes(device: torch.device) -> int:
    """Peak memory since ``reset_peak``: device memory allocated, or the process's peak RSS on the CPU."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resident_bytes()[1]


def resident_bytes() -> tuple[int, int]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024


def mix_batches(tokens: int, steps: int, context: int, vocab: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded [B, T] batches holding the first requests of the paper-like mix that add up to
    ``steps`` x ``tokens`` real tokens, each batch up to ``tokens`` real tokens (so about ``steps``
    batches, a few more where lengths do not pack evenly).

    A Hugging Face forward pads every sequence of a batch to the longest, so the requests are bucketed
    by length (sorted) before packing, as a length-aware batcher would; a request longer than the
    budget fills a batch alone.
    """
    from zp_compile.tools.workloads import paper_mix

    stream, requests, total = paper_mix(64 * steps + 64, seed=seed, vocab=vocab, max_context=context), [], 0
    for r in stream:
        if total >= steps * tokens:
            break
        requests.append(r)
        total += len(r)
    requests.sort(key=len)
    batches, i = [], 0
    while i < len(requests):
        chosen, used = [], 0
        while i < len(requests) and (not chosen or used + len(requests[i]) <= tokens):
            chosen.append(requests[i])
            used += len(requests[i])
            i += 1
        width = max(len(r) for r in chosen)
        ids = torch.zeros(len(chosen), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, r in enumerate(chosen):
            ids[row, : len(r)] = torch.tensor(r.token_ids)
            mask[row, : len(r)] = 1
        batches.append((ids, mask))
    return batches


def timed(device: torch.device, run) -> float:
    """Seconds of ``run()`` on every rank: from a barrier to the last rank's end, the device drained
    before each clock read (a host clock around queued GPU work times the launches)."""
    dist.barrier()
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    dist.barrier()
    return time.perf_counter() - start


def bench_mix(model, grad_ctx, tokens: int, context: int, steps: int, vocab: int, shared_batch: bool, device: torch.device) -> float:
    """tokens/s of real (unpadded) tokens over ``steps`` different mix batches, after one warm-up pass."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if shared_batch:  # TP: every rank runs the union of all ranks' batches
        per_rank = [mix_batches(tokens, steps, context, vocab, seed=r) for r in range(world)]
        batches = []
        for step in zip(*per_rank):
            width = max(ids.shape[1] for ids, _ in step)
            pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
            batches.append((torch.cat([pad(ids) for ids, _ in step]), torch.cat([pad(m) for _, m in step])))
    else:
        batches = mix_batches(tokens, steps, context, vocab, seed=rank)
    real = torch.tensor([float(sum(m.sum() for _, m in batches))], device=device)  # the collective's device: the model's
    batches = [(ids.to(device), mask.to(device)) for ids, mask in batches]

    def run():
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask)

    with grad_ctx():
        run()  # compile / warm up every shape
        elapsed = timed(device, run)
    if not shared_batch:
        dist.all_reduce(real)
    return real.item() / elapsed


def bench(model, grad_ctx, tokens: int, context: int, steps: int, vocab: int, shared_batch: bool, device: torch.device) -> float:
    rank, world = dist.get_rank(), dist.get_world_size()
    context = min(context, tokens)  # fewer tokens than one request: one shorter request
    if shared_batch:  # TP: all ranks hold the same N x tokens batch, computed once
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, vocab, (world * max(1, tokens // context), context), generator=g)
    else:
        g = torch.Generator().manual_seed(rank)
        ids = torch.randint(3, vocab, (max(1, tokens // context), context), generator=g)
    ids = ids.to(device)

    def run():
        for _ in range(steps):
            model(input_ids=ids)

    with grad_ctx():
        model(input_ids=ids)  # compile / warm up this shape
        elapsed = timed(device, run)
    return ids.numel() * (1 if shared_batch else world) * steps / elapsed


def bf16_t_star(path: Path, context: int, device: torch.device) -> float:
    """T* (tokens per rank) of bf16 AsyncEP on checkpoint ``path``, measured as the ranks would at
    start-up (the same on every rank: the measurement agrees on the worst rank)."""
    model = zp_compile.from_pretrained(path, dtype=torch.bfloat16, backend="eager", device=device)
    tokens = zp_compile.measure_threshold(model, context=context).tokens
    del model
    gc.collect()
    return tokens


def parse_tokens(spec: str, t_star) -> list[int]:
    """``--tokens``: integers, or fractions of the bf16 T* ending in ``T`` (``0.25T``), measured once."""
    measured = None
    out = []
    for item in spec.split(","):
        if item.endswith("T"):
            measured = measured if measured is not None else t_star()
            out.append(max(1, round(float(item[:-1]) * measured)))
        else:
            out.append(int(item))
    if measured is not None and dist.get_rank() == 0:
        print(f"bf16 AsyncEP T* = {measured:,.0f} tokens per rank: --tokens {spec} = {out}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategies", help="default: asyncep,asyncep-shm,replica,tp,ep (on GPUs without asyncep-shm)")
    parser.add_argument("--tokens", default="512,1024,2048,4096", help="tokens per rank per step")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager", "eager"])
    parser.add_argument("--workload", default="random", choices=["random", "mix"],
                        help="random: sequences of --context tokens; mix: the paper-like mix (zp_compile.tools.workloads), "
                        "prompts clipped to --context, steps filled up to --tokens real tokens per rank")
    parser.add_argument("--quantization", choices=QUANTIZATIONS,
                        help="asyncep and asyncep-shm load this layout of the checkpoint (fp8: Qwen3-MoE, mxfp4: gpt-oss); "
                        "asyncep-bf16, asyncep-shm-bf16, replica, tp and ep the bf16 one of the same family")
    parser.add_argument("--load-memory", action="store_true",
                        help="only load the checkpoint as asyncep does and print each rank's shard and peak memory")
    parser.add_argument("--device", default="auto",
                        help="cpu (gloo), cuda (rank r on cuda:LOCAL_RANK, NCCL), or auto (default): cuda when it works")
    parser.add_argument("--shape", default="82m", choices=SHAPES, help="the model shape (tiny: a quick run of the code path)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    device = resolve_device(args.device)
    strategies = (args.strategies or ("asyncep,asyncep-shm,replica,tp,ep" if device.type == "cpu" else "asyncep,replica,tp,ep")).split(",")
    if device.type != "cpu" and any(s.startswith("asyncep-shm") for s in strategies):
        parser.error(f"--strategies asyncep-shm: shared memory is a host transport; on {device.type} AsyncEP gathers over NCCL (asyncep)")
    if device.type != "cpu" and args.load_memory:
        parser.error("--load-memory measures the host's resident memory while loading: run it with --device cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL starts: each rank's communicator on its own GPU
    dist.init_process_group(process_group_backend(device))
    if device.type == "cpu":
        torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    family = FAMILY[args.quantization]
    path_of = functools.cache(lambda quantization: checkpoint(rank, quantization, family, args.shape))  # built on first use, on every rank
    model_shape = SHAPES[args.shape]
    # The process's peak RSS, or the device allocator's peak.
    peak_name, peak_label = ("peak_rss", "peak RSS") if device.type == "cpu" else ("peak_device_bytes", f"peak {device.type} memory")
    if args.load_memory:
        report = load_memory(path_of(args.quantization))
        reports = [None] * world
        dist.all_gather_object(reports, report)
        if rank == 0:
            for r, rep in enumerate(reports):
                print(f"rank {r}: " + ", ".join(f"{k} {v / 2**20:.3f} MiB" for k, v in rep.items()), flush=True)
            if args.json:
                args.json.write_text(json.dumps({"world_size": world, "quantization": args.quantization, "load_memory": reports}, indent=1))
        dist.destroy_process_group()
        return
    tokens_list = parse_tokens(args.tokens, lambda: bf16_t_star(path_of(None), args.context, device))
    results = []
    for strategy in strategies:
        gc.collect()
        reset_peak(device)
        quantized = strategy in ("asyncep", "asyncep-shm") and args.quantization
        path = path_of(args.quantization if quantized else None)
        model, grad_ctx = load(strategy, path, args.backend, device)
        if strategy.startswith("asyncep"):  # the threshold the scheduler would use, measured now
            threshold = zp_compile.saturation_threshold(model, context=args.context)
            t_star = {"strategy": strategy, "quantization": quantized or "", "t_star_tokens": threshold.tokens,
                      "t_gather_s": threshold.t_gather_s}  # fmt: skip
            results.append(t_star)
            if rank == 0:
                print(f"{strategy:<8} T* = {threshold.tokens:,.0f} tokens per rank (t_gather {threshold.t_gather_s * 1e3:.1f} ms)")
        for tokens in tokens_list:
            run = bench_mix if args.workload == "mix" else bench
            tok_s = run(model, grad_ctx, tokens, args.context, args.steps, model_shape["vocab"], strategy == "tp", device)
            peak = peak_bytes(device)
            row = {
                "strategy": strategy,
                "quantization": quantized or "",
                "family": family,
                "workload": args.workload,
                "tokens_per_rank": tokens,
                "context": args.context,
                "tok_s": tok_s,
                "device": device.type,
                peak_name: peak,
                "bytes_per_layer": bytes_per_layer(strategy, tokens, world, model),
            }
            peaks = [None] * world
            dist.all_gather_object(peaks, peak)
            row[f"{peak_name}_max"] = max(peaks)
            results.append(row)
            if rank == 0:
                print(f"{strategy:<8} tokens/rank {tokens:>6}  {tok_s:>9.0f} tok/s  {peak_label} {max(peaks) / 2**20:.0f} MiB", flush=True)
        del model
        torch._dynamo.reset()
    if rank == 0 and args.json:
        old = json.loads(args.json.read_text())["results"] if args.json.exists() else []
        args.json.write_text(json.dumps({"world_size": world, "model": model_shape, "results": old + results}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
