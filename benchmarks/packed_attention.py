"""One layer's packed attention: FlexAttention (``zp_compile::packed_attention``, one kernel call) against
the per-row loop it replaced, and against one padded SDPA call over the same rows.

Columns: ``flex`` the FlexAttention kernel; ``op`` what a serving step runs (the same on a GPU; on a CPU
one SDPA per row for these full-attention layers, ``packed.CPU_KERNEL``); ``loop`` the kernel before
(commit 8cac809); ``padded`` one SDPA call over [B, H, n, D] with the prefix copied into every row.

    OMP_NUM_THREADS=1 python benchmarks/packed_attention.py [--device cuda] [--json FILE]

A step of ``--tokens`` new tokens (8,192) cut into 8 / 64 / 256 equal rows, Qwen3-30B-A3B's attention
shape (32 query heads, 4 key/value heads, head dim 128), bf16; each case once with no past and once with
every row reusing the same ``--prefix`` cached tokens (a shared few-shot prefix: the rows read one copy).
Reported per case: milliseconds per call (median of ``--reps`` after a warm-up; the device synchronised
around every call), the speedup over the loop, and max |flex - loop| over the outputs. The first call
compiles the kernel (dynamic sizes: once for every case); its time is reported apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from zp_compile.devices import resolve_device, synchronize
from zp_compile.rank import packed


def row_loop(query, key, value, rows, ranges, scale):
    """The kernel before FlexAttention (commit 8cac809): per row a cat of its key ranges, a K/V repeat for
    grouped heads, a mask and a masked SDPA."""
    H, L, Hkv = query.shape[1], query.shape[2], key.shape[1]
    out = query.new_zeros((1, L, H, value.shape[-1]))
    spans = ranges.tolist()
    for q0, q1, r0, r1 in rows.tolist():
        if q1 == q0:
            continue
        parts = spans[r0:r1]
        k = torch.cat([key[:, :, a:b] for a, b in parts], dim=2)
        v = torch.cat([value[:, :, a:b] for a, b in parts], dim=2)
        n, m = q1 - q0, k.shape[2]
        if Hkv != H:
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        q = query[:, :, q0:q1]
        if m == n:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            mask = torch.arange(m, device=q.device)[None, :] <= torch.arange(m - n, m, device=q.device)[:, None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out[0, q0:q1] = o[0].transpose(0, 1)
    return out


def padded_sdpa(query, key, value, n_rows, prefix, scale):
    """The same rows as one [B, H, n, D] batch (equal rows: no padding needed), their shared prefix
    copied into every row: what a padded step computes."""
    H, L, D = query.shape[1], query.shape[2], query.shape[3]
    n = L // n_rows
    q = query[0].view(H, n_rows, n, D).transpose(0, 1)  # [B, H, n, D]
    own_k = key[0, :, prefix:].view(key.shape[1], n_rows, n, D).transpose(0, 1)
    own_v = value[0, :, prefix:].view(value.shape[1], n_rows, n, D).transpose(0, 1)
    k = torch.cat([key[:, :, :prefix].expand(n_rows, -1, -1, -1), own_k], dim=2)
    v = torch.cat([value[:, :, :prefix].expand(n_rows, -1, -1, -1), own_v], dim=2)
    mask = torch.arange(prefix + n, device=q.device)[None, :] <= torch.arange(prefix, prefix + n, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def layout(n_rows: int, tokens: int, prefix: int):
    """rows / ranges as the rank's step assembles them: the prefix in the past [0, P), then each row's
    own tokens."""
    n = tokens // n_rows
    rows, ranges = [], []
    for b in range(n_rows):
        first = len(ranges)
        if prefix:
            ranges.append([0, prefix])
        ranges.append([prefix + b * n, prefix + (b + 1) * n])
        rows.append([b * n, (b + 1) * n, first, len(ranges)])
    return torch.tensor(rows), torch.tensor(ranges)


def timed(fn, reps: int, device) -> float:
    times = []
    for _ in range(reps):
        synchronize(device)
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--heads", type=int, nargs=2, default=[32, 4], metavar=("H", "HKV"))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = resolve_device(args.device)
    H, Hkv, D = *args.heads, args.head_dim
    scale = D**-0.5
    g = torch.Generator().manual_seed(0)
    results = []
    print(f"{args.tokens} tokens per step, {H}/{Hkv} heads of {D}, bf16, {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for prefix in (0, args.prefix):
        for n_rows in args.rows:
            L, K = args.tokens, prefix + args.tokens
            q = torch.randn(1, H, L, D, generator=g).to(device, torch.bfloat16)
            k = torch.randn(1, Hkv, K, D, generator=g).to(device, torch.bfloat16)
            v = torch.randn(1, Hkv, K, D, generator=g).to(device, torch.bfloat16)
            rows, ranges = layout(n_rows, args.tokens, prefix)

            def op():
                return torch.ops.zp_compile.packed_attention(q, k, v, rows, ranges, scale)

            def flex():
                kernel, packed.CPU_KERNEL = packed.CPU_KERNEL, "flex"
                try:
                    return op()
                finally:
                    packed.CPU_KERNEL = kernel

            synchronize(device)
            t = time.perf_counter()
            out = flex()  # the first call: compiles (first case) and builds the step's mask
            synchronize(device)
            first = time.perf_counter() - t
            reference = row_loop(q, k, v, rows, ranges, scale)
            err = (out.float() - reference.float()).abs().max().item()
            row = {"rows": n_rows, "prefix": prefix, "tokens": L, "first_call_s": first,
                   "flex_ms": 1e3 * timed(flex, args.reps, device), "op_ms": 1e3 * timed(op, args.reps, device), "loop_ms": 1e3 * timed(lambda: row_loop(q, k, v, rows, ranges, scale), args.reps, device),
                   "padded_sdpa_ms": 1e3 * timed(lambda: padded_sdpa(q, k, v, n_rows, prefix, scale), args.reps, device), "max_abs_diff": err}  # fmt: skip
            results.append(row)
            print(f"{n_rows:4d} rows of {L // n_rows:5d}, prefix {prefix:5d}: flex {row['flex_ms']:8.1f} ms "
                  f"({row['loop_ms'] / row['flex_ms']:.2f}x the loop), op {row['op_ms']:8.1f} ms, loop {row['loop_ms']:8.1f} ms, padded sdpa {row['padded_sdpa_ms']:8.1f} ms; max|flex - loop| {err:.2e}; "
                  f"first call {first:.1f} s", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
