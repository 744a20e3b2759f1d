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
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import zp_compile

# The model shape of the project's reference figures (docs/platform.md): 82M parameters, 25 MB of experts per
# layer in bf16, big enough that the gather is not trivial against compute on this CPU.
MODEL = dict(layers=6, hidden=512, num_experts=32, top_k=4, expert_size=256, vocab=4096, heads=8, kv_heads=4)


def build_checkpoint() -> Path:
    """The benchmark checkpoint (``$ZP_BENCH_CKPT``, default /tmp/zp-bench-qwen3moe-82m), built if missing."""
    from zp_compile.models import tiny

    path = Path(os.environ.get("ZP_BENCH_CKPT", "/tmp/zp-bench-qwen3moe-82m"))
    if not (path / "model.safetensors").exists():
        tiny("qwen3_moe", path, dtype=torch.bfloat16, head_dim=64, intermediate_size=1024, **MODEL)
    return path


def checkpoint(rank: int) -> Path:
    if rank == 0:
        build_checkpoint()
    dist.barrier()
    return build_checkpoint()  # built by rank 0 by now: only the path


def load(strategy: str, path: Path, backend: str):
    from transformers import AutoModelForCausalLM

    if strategy in ("asyncep", "asyncep-shm"):
        transport = "shm" if strategy == "asyncep-shm" else "collective"
        model = zp_compile.from_pretrained(path, dtype=torch.bfloat16, backend=backend, transport=transport)
        return model, torch.inference_mode
    if strategy == "replica":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        return (torch.compile(model) if backend != "eager" else model), torch.inference_mode
    if strategy == "tp":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, tp_plan="auto").eval()
        return (torch.compile(model) if backend != "eager" else model), torch.no_grad
    if strategy == "ep":
        from transformers.distributed import DistributedConfig

        world = dist.get_world_size()
        config = DistributedConfig(fsdp_size=world, ep_size=world, ep_implementation="all_to_all")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, distributed_config=config).eval()
        return (torch.compile(model) if backend != "eager" else model), torch.no_grad
    raise ValueError(f"unknown strategy {strategy!r}")


def bytes_per_layer(strategy: str, tokens: int, world: int) -> float:
    """Bytes one rank receives per MoE layer per step (analytic; bf16 = 2 bytes).

    AsyncEP: the other ranks' shards of the layer's expert bank (over gloo, or copied out of shared
    memory: no network). TP: two ring all-reduces of the [N x tokens, hidden] activations. EP: the
    dispatch and combine all-to-alls of [tokens x top_k, hidden] (the share routed to other ranks).
    """
    hidden, experts, width, top_k = MODEL["hidden"], MODEL["num_experts"], MODEL["expert_size"], MODEL["top_k"]
    bank = experts * 3 * hidden * width * 2
    if strategy.startswith("asyncep"):
        return bank * (world - 1) / world
    if strategy == "tp":
        return 2 * 2 * (world - 1) / world * world * tokens * hidden * 2
    if strategy == "ep":
        return 2 * tokens * top_k * hidden * 2 * (world - 1) / world
    return 0.0


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


def bench_mix(model, grad_ctx, tokens: int, context: int, steps: int, vocab: int, shared_batch: bool) -> float:
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
    with grad_ctx():
        for ids, mask in batches:  # compile / warm up every shape
            model(input_ids=ids, attention_mask=mask)
        dist.barrier()
        start = time.perf_counter()
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask)
        dist.barrier()
        elapsed = time.perf_counter() - start
    real = torch.tensor([float(sum(m.sum() for _, m in batches))])
    if not shared_batch:
        dist.all_reduce(real)
    return real.item() / elapsed


def bench(model, grad_ctx, tokens: int, context: int, steps: int, vocab: int, shared_batch: bool) -> float:
    rank, world = dist.get_rank(), dist.get_world_size()
    if shared_batch:  # TP: all ranks hold the same N x tokens batch, computed once
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, vocab, (world * max(1, tokens // context), context), generator=g)
    else:
        g = torch.Generator().manual_seed(rank)
        ids = torch.randint(3, vocab, (max(1, tokens // context), context), generator=g)
    with grad_ctx():
        model(input_ids=ids)  # compile / warm up this shape
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            model(input_ids=ids)
        dist.barrier()
        elapsed = time.perf_counter() - start
    return ids.numel() * (1 if shared_batch else world) * steps / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategies", default="asyncep,asyncep-shm,replica,tp,ep")
    parser.add_argument("--tokens", default="512,1024,2048,4096", help="tokens per rank per step")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager", "eager"])
    parser.add_argument("--workload", default="random", choices=["random", "mix"],
                        help="random: sequences of --context tokens; mix: the paper-like mix (zp_compile.tools.workloads), "
                        "prompts clipped to --context, steps filled up to --tokens real tokens per rank")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    path = checkpoint(rank)
    results = []
    for strategy in args.strategies.split(","):
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")
        model, grad_ctx = load(strategy, path, args.backend)
        if strategy.startswith("asyncep"):  # the threshold the scheduler would use, measured now
            threshold = zp_compile.saturation_threshold(model, context=args.context)
            t_star = {"strategy": strategy, "t_star_tokens": threshold.tokens, "t_gather_s": threshold.t_gather_s}
            results.append(t_star)
            if rank == 0:
                print(f"{strategy:<8} T* = {threshold.tokens:,.0f} tokens per rank (t_gather {threshold.t_gather_s * 1e3:.1f} ms)")
        for tokens in map(int, args.tokens.split(",")):
            run = bench_mix if args.workload == "mix" else bench
            tok_s = run(model, grad_ctx, tokens, args.context, args.steps, MODEL["vocab"], strategy == "tp")
            _, peak = resident_bytes()
            row = {
                "strategy": strategy,
                "workload": args.workload,
                "tokens_per_rank": tokens,
                "context": args.context,
                "tok_s": tok_s,
                "peak_rss": peak,
                "bytes_per_layer": bytes_per_layer(strategy, tokens, world),
            }
            peaks = [None] * world
            dist.all_gather_object(peaks, peak)
            row["peak_rss_max"] = max(peaks)
            results.append(row)
            if rank == 0:
                print(f"{strategy:<8} tokens/rank {tokens:>6}  {tok_s:>9.0f} tok/s  peak RSS {max(peaks) / 2**20:.0f} MiB", flush=True)
        del model
        torch._dynamo.reset()
    if rank == 0 and args.json:
        old = json.loads(args.json.read_text())["results"] if args.json.exists() else []
        args.json.write_text(json.dumps({"world_size": world, "model": MODEL, "results": old + results}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
