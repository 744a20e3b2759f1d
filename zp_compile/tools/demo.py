"""End-to-end demo on an embedded default: ``torchrun --nproc_per_node 2 -m zp_compile.tools.demo``.

Builds a tiny random Qwen3-MoE checkpoint locally (no download), loads it with every rank holding 1/N
of each MoE layer's experts, compiles it with the AsyncEP passes (Inductor), scores a different padded
batch on each rank, and prints per rank: logits agreement with the unmodified model and expert memory.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from zp_compile.models.factory import QUANTIZATIONS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: a tiny built-in MoE)")
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager", "eager"])
    parser.add_argument("--device", default="auto", help="cuda (rank i on cuda:LOCAL_RANK), cpu, or auto (default): cuda when it works")
    parser.add_argument("--quantization", choices=QUANTIZATIONS,
                        help="build the built-in model in this published layout (fp8: block-FP8 Qwen3-MoE; mxfp4: gpt-oss MXFP4 experts)")
    args = parser.parse_args(argv)
    if args.quantization and args.model:
        parser.error("--quantization builds the built-in model; a --model directory's config.json says how it is stored")

    from transformers import AutoModelForCausalLM

    import zp_compile
    from zp_compile.models import default_checkpoint
    from zp_compile.models.discovery import find_moe_layers
    from zp_compile.devices import process_group_backend, resolve_device
    from zp_compile.models.rewrite import expert_bytes

    device = resolve_device(args.device)  # cuda:LOCAL_RANK: one GPU per rank
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group(process_group_backend(device))
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    path = args.model
    if path is None:
        if rank == 0:
            path = default_checkpoint(args.quantization)  # tiny random MoE + a tokenizer made locally
        if dist.is_initialized():
            holder = [path]
            dist.broadcast_object_list(holder, src=0)
            path = holder[0]

    model = zp_compile.from_pretrained(path, device=device, prefetch=args.prefetch, backend=args.backend)
    reference = AutoModelForCausalLM.from_pretrained(path).to(device).eval()  # full model, for the comparison only
    vocab = reference.config.get_text_config().vocab_size

    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(3, vocab, (4, 64), generator=g)
    mask = torch.ones_like(ids)
    mask[1:, : 8 * (rank + 1)] = 0  # left padding, different on every rank
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits
        expected = reference(input_ids=ids, attention_mask=mask).logits
    diff = (logits - expected)[mask.bool()].abs().max().item()
    full = expert_bytes(find_moe_layers(reference))
    state = model.zero_prefill
    lines = [
        f"rank {rank}/{world}: scored {int(mask.sum())} tokens; max|logits - unmodified model| = {diff:.2e}",
        f"rank {rank}/{world}: expert weights held {state.expert_bytes / 2**20:.2f} MiB of {full / 2**20:.2f} MiB "
        f"({len(state.sharded_layers)}/{len(state.layers)} MoE layers sharded, prefetch {args.prefetch}, {args.backend}, {device})",
    ]
    if dist.is_initialized():
        gathered = [None] * world
        dist.all_gather_object(gathered, lines)
        if rank == 0:
            print("\n".join(line for rank_lines in gathered for line in rank_lines), flush=True)
        dist.destroy_process_group()
    else:
        print("\n".join(lines))
    if diff > 1e-4 and logits.dtype == torch.float32:
        raise SystemExit(f"rank {rank}: logits differ from the unmodified model by {diff:.2e} > 1e-4")


if __name__ == "__main__":
    main()
