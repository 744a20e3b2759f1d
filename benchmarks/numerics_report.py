"""Max |logits - unmodified model| per family and world size, and per-rank expert memory.

    python benchmarks/numerics_report.py [--json out.json]
    python benchmarks/numerics_report.py --quantized [--json out.json]

Every family of the support table, world sizes 1-4 (real gloo processes on this machine), prefetch 1,
the passes in front of aot_eager (or ``--backend inductor``), fp32 and bf16; each rank scores its own left-padded batch. Reuses the
test suite's rank launcher and per-rank body.

``--quantized``: the families published quantized (qwen3_moe and deepseek_v3 in block-FP8, gpt_oss in
MXFP4), loaded sharded by ``zp_compile.from_pretrained`` (fp32, aot_eager) against the unmodified model
that transformers builds from the same checkpoint, dequantized at load.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dist_utils import run_ranks  # noqa: E402
from workers import max_logit_error, quantized_logit_error  # noqa: E402

from zp_compile.models import VERIFIED_FAMILIES, tiny  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--backend", default="aot_eager", choices=["aot_eager", "inductor"])
    parser.add_argument("--quantized", action="store_true", help="the published quantized forms against their dequantized reference")
    args = parser.parse_args()
    if args.quantized:
        return quantized(args)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {f: str(tiny(f, Path(tmp) / f, layers=3, num_experts=6)) for f in VERIFIED_FAMILIES}
        cases = [
            {"path": paths[f], "family": f, "prefetch": 1, "dtype": dt, "backend": args.backend} for f in VERIFIED_FAMILIES for dt in ("float32", "bfloat16")
        ]
        rows = []
        for world in args.world_sizes:
            results = run_ranks(world, max_logit_error, "", cases)
            for i, case in enumerate(cases):
                per_rank = [r[i] for r in results]
                rows.append(
                    {
                        "family": case["family"],
                        "dtype": case["dtype"],
                        "world_size": world,
                        "max_abs_diff": max(r["max_abs_diff"] for r in per_rank),
                        "logit_scale": max(r["logit_scale"] for r in per_rank),
                        "expert_MiB_per_rank": per_rank[0]["expert_bytes"] / 2**20,
                        "expert_MiB_full": per_rank[0]["full_expert_bytes"] / 2**20,
                    }
                )
    print(f"{'family':<12} {'dtype':<9} " + " ".join(f"N={w:<22}" for w in args.world_sizes))
    for f in VERIFIED_FAMILIES:
        for dt in ("float32", "bfloat16"):
            cells = [
                next(r for r in rows if r["family"] == f and r["dtype"] == dt and r["world_size"] == w) for w in args.world_sizes
            ]
            print(
                f"{f:<12} {dt:<9} "
                + " ".join(f"{c['max_abs_diff']:.1e} {c['expert_MiB_per_rank']:.3f}/{c['expert_MiB_full']:.3f}MiB " for c in cells)
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


PUBLISHED = [("qwen3_moe", "fp8"), ("deepseek_v3", "fp8"), ("gpt_oss", "mxfp4")]


def quantized(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # hidden 256, expert width 128: FP8's 128 x 128 scale blocks tile every expert matrix more than once.
        cases = [{"path": str(tiny(f, Path(tmp) / f"{f}-{q}", quantization=q, layers=3, num_experts=6, hidden=256, expert_size=128)),
                  "family": f, "quantization": q} for f, q in PUBLISHED]  # fmt: skip
        rows = []
        for world in args.world_sizes:
            results = run_ranks(world, quantized_logit_error, cases)
            for i, case in enumerate(cases):
                per_rank = [r[i] for r in results]
                rows.append({"family": case["family"], "quantization": case["quantization"], "world_size": world,
                             "max_abs_diff": max(r["max_abs_diff"] for r in per_rank),
                             "logit_scale": max(r["logit_scale"] for r in per_rank),
                             "sharded_layers": per_rank[0]["sharded_layers"]})  # fmt: skip
    print(f"{'family':<12} {'format':<6} " + " ".join(f"N={w:<9}" for w in args.world_sizes))
    for f, q in PUBLISHED:
        cells = [next(r for r in rows if r["family"] == f and r["world_size"] == w) for w in args.world_sizes]
        print(f"{f:<12} {q:<6} " + " ".join(f"{c['max_abs_diff']:<11.1e}" for c in cells) + f" (logit scale {cells[0]['logit_scale']:.2f})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
