"""The GPU check's phases beyond the per-rank forward sweep (``gpu_check.py`` runs them in order, each
within what is left of its budget; a phase that fails is reported with its error and the next one runs):

- ``numerics``: optimized against unmodified transformers logits on the device, two families (Qwen3-MoE,
  GPT-OSS: sliding windows and attention sinks), fp32 and bf16, through Inductor on the device.
- ``asyncep``: the sharded graph of a world of 8 on one device, each gather a device-to-device copy of
  7/8 of the bank on a side stream, against the same graph with no transfer (``asyncep_one_gpu.py``).
- ``packed``: one layer's packed attention, FlexAttention against the per-row loop it replaced and one
  padded SDPA call (``packed_attention.py``).
- ``ranks``: on a machine with >= 2 GPUs, the real thing: ``throughput.py`` under torchrun with NCCL,
  AsyncEP against TP, EP and a replica (the dry run: 2 CPU ranks over gloo).
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_phase(report: dict, name: str, budget, need_s: float, fn, *args) -> None:
    """``fn(*args)`` into ``report["phases"][name]`` unless fewer than ``need_s`` seconds are left."""
    phases = report.setdefault("phases", {})
    if budget.left() < need_s:
        phases[name] = {"skipped": f"needs ~{need_s:.0f} s, {budget.left():.0f} s left"}
        print(f"phase {name}: skipped (budget)", flush=True)
        return
    t = time.time()
    try:
        phases[name] = fn(*args)
    except Exception as e:  # an unseen machine: report and go on to the next phase
        phases[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        print(f"phase {name}: FAILED {type(e).__name__}: {e}", flush=True)
    phases[name]["seconds"] = round(time.time() - t, 1)


def numerics(device, backend: str) -> dict:
    """max |optimized - unmodified| of the logits, a world of one, per family and dtype. bf16 is also
    compared with the fp32 model (routing may flip under bf16 rounding: the README's bound)."""
    import torch
    from transformers import AutoModelForCausalLM

    import zp_compile
    from zp_compile.models import tiny_config

    out = {}
    ids = torch.randint(3, 256, (3, 40), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[1:, :7] = 0  # left padding
    for family in ("qwen3_moe", "gpt_oss"):
        torch.manual_seed(0)
        fp32 = AutoModelForCausalLM.from_config(tiny_config(family)).to(device).eval()
        for dtype in (torch.float32, torch.bfloat16):
            torch._dynamo.reset()
            reference = AutoModelForCausalLM.from_config(tiny_config(family)).to(device, dtype).eval()
            reference.load_state_dict(fp32.state_dict())
            model = AutoModelForCausalLM.from_config(tiny_config(family)).to(device, dtype).eval()
            model.load_state_dict(fp32.state_dict())
            zp_compile.optimize(model, backend=backend)
            with torch.inference_mode():
                want = reference(input_ids=ids, attention_mask=mask).logits.float()
                got = model(input_ids=ids, attention_mask=mask).logits.float()
                exact = fp32(input_ids=ids, attention_mask=mask).logits.float()
            keep = mask.bool()
            name = f"{family} {str(dtype).removeprefix('torch.')}"
            out[name] = {
                "max_abs_vs_unmodified": (got - want)[keep].abs().max().item(),
                "max_abs_vs_fp32_model": (got - exact)[keep].abs().max().item(),
                "unmodified_vs_fp32_model": (want - exact)[keep].abs().max().item(),
            }
            print(f"  numerics {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in out[name].items()), flush=True)
    return out


def asyncep(build_config, build_model, config_args, device, seqs: int, context: int, iters: int, backend: str, world: int = 8) -> dict:
    """Step time of a rank of ``world`` on this one device with its gathers as side-stream copies,
    against the same graph without them."""
    import torch
    import torch.distributed as dist

    import zp_compile
    from asyncep_one_gpu import init, measure

    torch._dynamo.reset()
    init(world)
    try:
        config = build_config(config_args)
        model = build_model(config, device)
        zp_compile.optimize(model, backend=backend)
        state = model.zero_prefill
        ids = torch.randint(3, config.vocab_size, (seqs, context), device=device)
        r = measure(model, ids, iters, device)
        r.update(world=world, sharded_layers=len(state.sharded_layers), seqs=seqs, context=context, expert_bytes_per_rank=state.expert_bytes)
        print(f"  asyncep: world {world} on one {device}, {len(state.sharded_layers)} sharded layers, {seqs} x {context} tokens: "
              f"{r['step_s_with_copies'] * 1e3:.1f} ms with the gathers' copies, {r['step_s_without'] * 1e3:.1f} ms without "
              f"-> overlap cost {r['overlap_cost']:.3f} (target <= 1.05 at T*)", flush=True)  # fmt: skip
        del model
        return r
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()


def packed(device, tokens: int, rows: list[int], prefix: int, heads: tuple[int, int], head_dim: int, reps: int, eager: bool = False) -> dict:
    """packed_attention.py's cases on ``device``: FlexAttention, the loop it replaced, one padded SDPA.
    ``eager`` (the CPU dry run): FlexAttention uncompiled. Its CPU compile is Inductor's C++ template, not
    the GPU's Triton kernel, and the test suite compiles it already (tests/test_packed.py)."""
    import contextlib

    import torch

    from packed_attention import layout, padded_sdpa, row_loop, timed
    from zp_compile.rank import packed as kernel

    H, Hkv = heads
    scale = head_dim**-0.5
    g = torch.Generator().manual_seed(0)
    out = []
    with kernel.eagerly() if eager else contextlib.nullcontext():
        for p, n_rows in [(p, n) for p in (0, prefix) for n in rows]:
            q = torch.randn(1, H, tokens, head_dim, generator=g).to(device, torch.bfloat16)
            k = torch.randn(1, Hkv, p + tokens, head_dim, generator=g).to(device, torch.bfloat16)
            v = torch.randn(1, Hkv, p + tokens, head_dim, generator=g).to(device, torch.bfloat16)
            r, ranges = layout(n_rows, tokens, p)
            kernel_before, kernel.CPU_KERNEL = kernel.CPU_KERNEL, "flex"
            try:

                def flex():
                    return torch.ops.zp_compile.packed_attention(q, k, v, r, ranges, scale)

                got = flex()
                err = (got.float() - row_loop(q, k, v, r, ranges, scale).float()).abs().max().item()
                row = {"rows": n_rows, "prefix": p, "tokens": tokens, "flex_ms": 1e3 * timed(flex, reps, device),
                       "loop_ms": 1e3 * timed(lambda: row_loop(q, k, v, r, ranges, scale), reps, device),
                       "padded_sdpa_ms": 1e3 * timed(lambda: padded_sdpa(q, k, v, n_rows, p, scale), reps, device), "max_abs_diff": err}  # fmt: skip
            finally:
                kernel.CPU_KERNEL = kernel_before
            out.append(row)
            print(f"  packed {n_rows:>3} rows, prefix {p:>4}: flex {row['flex_ms']:.2f} ms, loop {row['loop_ms']:.2f} ms, "
                  f"padded sdpa {row['padded_sdpa_ms']:.2f} ms, max|flex - loop| {err:.2e}", flush=True)  # fmt: skip
    return {"cases": out, "heads": list(heads), "head_dim": head_dim}


def ranks(device, tiny: bool, seconds: float) -> dict:
    """``throughput.py`` under torchrun on every GPU of this machine, NCCL between them: AsyncEP against
    transformers' TP and EP and a full replica per GPU. Needs >= 2 GPUs (one rank per GPU). The dry run:
    2 CPU ranks over gloo, the tiny shape, no compile: the same script and flags otherwise."""
    import json
    import subprocess
    import sys
    import tempfile

    import torch

    n = torch.cuda.device_count() if device.type == "cuda" else 2
    if n < 2:
        return {"skipped": f"{n} GPU visible: AsyncEP's gathers need >= 2 ranks, one GPU each"}
    shape = ["--shape", "tiny", "--backend", "eager", "--tokens", "64", "--context", "32", "--steps", "1"] if tiny else \
        ["--tokens", "4096,16384", "--context", "1024", "--steps", "3"]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="zp-gpu-ranks-") as tmp:
        out = Path(tmp) / "throughput.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(HERE / "throughput.py"),
               "--device", device.type, "--strategies", "asyncep,replica,tp,ep", "--json", str(out), *shape]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ZP_BENCH_CKPT": str(Path(tmp) / "ckpt")}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(1.0, seconds))
        if proc.returncode != 0:
            raise RuntimeError(f"throughput.py exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}")
        print("\n".join(f"  ranks {line}" for line in proc.stdout.splitlines() if "tok/s" in line or "T* =" in line), flush=True)
        report = json.loads(out.read_text())
    rows = [r for r in report["results"] if "tok_s" in r]
    return {"world": n, "device": device.type, "model": report["model"], "rows": rows,
            "t_star": [r for r in report["results"] if "t_star_tokens" in r]}  # fmt: skip
