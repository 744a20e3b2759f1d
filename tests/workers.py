"""Per-rank bodies for multi-process tests (importable by spawned processes)."""

from __future__ import annotations

import copy

import torch


def padded_batch(rank: int, vocab: int, batch: int = 3, length: int = 9):
    """A left-padded batch that differs per rank: [B, T] ids and attention mask."""
    g = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(1, batch):
        pad = (b * (rank + 2)) % (length - 1)
        mask[b, :pad] = 0
        ids[b, :pad] = 0
    return ids, mask


def reference(path: str, rank: int):
    """The unmodified model, this rank's padded batch and its logits: (model, ids, mask, logits)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    ids, mask = padded_batch(rank, ref.config.get_text_config().vocab_size)
    with torch.inference_mode():
        return ref, ids, mask, ref(input_ids=ids, attention_mask=mask).logits


def max_logit_error(rank: int, world_size: int, path: str, cases: list[dict]) -> list[dict]:
    """For each case: optimized logits vs the unmodified model on this rank's own batch."""
    from transformers import AutoModelForCausalLM

    import zp_compile
    from zp_compile.models.discovery import find_moe_layers
    from zp_compile.models.rewrite import expert_bytes

    out = []
    for case in cases:
        torch._dynamo.reset()
        dtype = getattr(torch, case.get("dtype", "float32"))
        ref = AutoModelForCausalLM.from_pretrained(case.get("path", path), dtype=dtype).eval()
        ids, mask = padded_batch(rank, ref.config.get_text_config().vocab_size)
        with torch.inference_mode():
            expected = ref(input_ids=ids, attention_mask=mask).logits.float()
        model = zp_compile.optimize(
            copy.deepcopy(ref),
            prefetch=case["prefetch"],
            backend=case.get("backend", "aot_eager"),
            resident_first_layer=case.get("resident_first_layer", False),
            regional=case.get("regional", False),
        )
        if case.get("corrupt_shards"):
            for layer in model.zero_prefill.sharded_layers:
                shard = getattr(layer.module, layer.expert_params[0] + "_shard")
                shard.data = shard.data.roll(1, dims=0)
        with torch.inference_mode():
            got = model(input_ids=ids, attention_mask=mask).logits.float()
        valid = mask.bool()
        out.append(
            {
                **case,
                "max_abs_diff": (got - expected)[valid].abs().max().item(),
                "logit_scale": expected[valid].abs().max().item(),
                "expert_bytes": model.zero_prefill.expert_bytes,
                "full_expert_bytes": expert_bytes(find_moe_layers(ref)),
            }
        )
    return out


def transformers_ep_adopted(rank: int, world_size: int, path: str) -> dict:
    """Load with transformers' EP plan (all_to_all dispatch), optimize, and report graph and numerics."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import zp_compile
    from zp_compile.models.transformers_ep import uses_transformers_ep
    from zp_compile.passes.predicates import is_all_to_all

    from dist_utils import captured_graphs
    from graph_checks import gathers

    _, ids, mask, expected = reference(path, rank)
    config = DistributedConfig(fsdp_size=world_size, ep_size=world_size, ep_implementation="all_to_all")
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=config).eval()
    dispatch_before = uses_transformers_ep(model)
    with captured_graphs() as graphs:
        zp_compile.optimize(model, backend="aot_eager")
        with torch.inference_mode():
            got = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    return {
        "dispatch_before": dispatch_before,
        "dispatch_after": uses_transformers_ep(model),
        "max_abs_diff": (got - expected)[valid].abs().max().item(),
        "graphs": len(graphs),
        "all_to_all": sum(is_all_to_all(n) for g in graphs for n in g.nodes),
        "all_gather": sum(len(gathers(g)) for g in graphs),
    }


def inductor_code(rank: int, world_size: int, path: str, prefetch: int, regional: bool = False) -> dict:
    """Optimize with Inductor; return the generated code and the logits error on this rank's batch."""
    from torch._inductor.utils import run_and_get_code

    import zp_compile

    torch._dynamo.reset()
    _, ids, mask, expected = reference(path, rank)
    model = zp_compile.from_pretrained(path, prefetch=prefetch, backend="inductor", regional=regional)
    with torch.inference_mode():
        got, code = run_and_get_code(lambda: model(input_ids=ids, attention_mask=mask).logits)
    valid = mask.bool()
    return {"max_abs_diff": (got - expected)[valid].abs().max().item(), "code": code}


def empty_batch_on_rank_zero(rank: int, world_size: int, path: str, backend: str) -> list:
    """Rank 0 has no tokens in some steps; the other ranks must neither hang nor get wrong logits."""
    from transformers import AutoModelForCausalLM

    import zp_compile

    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    model = zp_compile.from_pretrained(path, backend=backend)
    out = []
    for step in range(3):
        ids, mask = padded_batch(rank + step, ref.config.vocab_size)
        if rank == 0 and step != 1:
            ids, mask = ids[:, :0], mask[:, :0]  # [B, 0]: nothing to score this step
        with torch.inference_mode():
            got = model(input_ids=ids, attention_mask=mask).logits
            expected = ref(input_ids=ids, attention_mask=mask).logits if ids.numel() else got
        valid = mask.bool()
        out.append({"shape": list(got.shape), "max_abs_diff": (got - expected)[valid].abs().max().item() if valid.any() else 0.0})
    return out


def loader_peak_memory(rank: int, world_size: int, path: str, how: str) -> dict:
    """Peak resident memory added by loading ``path`` (``how``: "sharded" or "transformers")."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    import zp_compile

    def status(field: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
        return int(line.split()[1]) * 1024

    # Import the model's code first (transformers imports modeling modules lazily, tens of MB).
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    with init_empty_weights():
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident set
    before = status("VmRSS:")
    if how == "sharded":
        model = zp_compile.from_pretrained(path, backend="eager")
        held = model.zero_prefill.expert_bytes
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
        held = None
    return {"peak_added": status("VmHWM:") - before, "expert_bytes": held}


def bf16_against_stock_compile(rank: int, world_size: int, path: str) -> dict:
    """bf16 error vs the fp32 model: ours (Inductor) and stock torch.compile of the unmodified model."""
    from transformers import AutoModelForCausalLM

    import zp_compile

    fp32 = AutoModelForCausalLM.from_pretrained(path).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids, mask = padded_batch(rank, fp32.config.vocab_size)
    valid = mask.bool()
    with torch.inference_mode():
        expected = fp32(input_ids=ids, attention_mask=mask).logits
        torch._dynamo.reset()
        stock = torch.compile(copy.deepcopy(bf16))(input_ids=ids, attention_mask=mask).logits.float()
        torch._dynamo.reset()
        ours = zp_compile.optimize(bf16, backend="inductor")(input_ids=ids, attention_mask=mask).logits.float()
    return {
        "ours_vs_fp32": (ours - expected)[valid].abs().max().item(),
        "stock_vs_fp32": (stock - expected)[valid].abs().max().item(),
    }


def shm_transport(rank: int, world_size: int, path: str, backend: str, regional: bool = False) -> dict:
    """transport="shm": logits, and what the compiled graph gathers with."""
    import zp_compile
    from zp_compile.passes.predicates import is_all_gather, is_shm_gather

    from dist_utils import captured_graphs

    torch._dynamo.reset()
    _, ids, mask, expected = reference(path, rank)
    with captured_graphs() as graphs:
        model = zp_compile.from_pretrained(path, backend=backend, transport="shm", regional=regional)
        with torch.inference_mode():
            got = model(input_ids=ids, attention_mask=mask).logits
            empty = model(input_ids=ids[:, :0], attention_mask=mask[:, :0]).logits  # no peer needed
    valid = mask.bool()
    return {
        "max_abs_diff": (got - expected)[valid].abs().max().item(),
        "shm_gathers": sum(is_shm_gather(n) for g in graphs for n in g.nodes),
        "collectives": sum(is_all_gather(n) for g in graphs for n in g.nodes),
        "expected_gathers": sum(len(layer.module._zp_gather.slots) for layer in model.zero_prefill.sharded_layers),  # one per stored tensor
        "expert_bytes": model.zero_prefill.expert_bytes,
        "empty_shape": list(empty.shape),
    }


def measured_threshold(rank: int, world_size: int, path: str, transport: str) -> dict:
    import dataclasses

    import zp_compile

    model = zp_compile.from_pretrained(path, backend="eager", transport=transport)
    return dataclasses.asdict(zp_compile.saturation_threshold(model, context=256, reps=2))


def quantized_logit_error(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    """For each quantized checkpoint: ``zp_compile.from_pretrained`` logits (fp32, this rank's experts
    only) vs the unmodified model transformers builds from the same checkpoint, dequantized at load."""
    from transformers import AutoModelForCausalLM

    import zp_compile

    out = []
    for case in cases:
        torch._dynamo.reset()
        # Without a GPU transformers' FP8 and MXFP4 quantizers dequantize every weight at load.
        ref = AutoModelForCausalLM.from_pretrained(case["path"], dtype=torch.float32).eval()
        ids, mask = padded_batch(rank, ref.config.get_text_config().vocab_size)
        model = zp_compile.from_pretrained(case["path"], dtype=torch.float32, prefetch=case.get("prefetch", 1), backend="aot_eager")
        with torch.inference_mode():
            expected = ref(input_ids=ids, attention_mask=mask).logits
            got = model(input_ids=ids, attention_mask=mask).logits
        valid = mask.bool()
        out.append(
            {
                **case,
                "max_abs_diff": (got - expected)[valid].abs().max().item(),
                "logit_scale": expected[valid].abs().max().item(),
                "sharded_layers": len(model.zero_prefill.sharded_layers),
            }
        )
    return out
