"""Plot benchmarks/throughput.py's JSON: tokens/s against tokens per rank, T* marked.

    python benchmarks/plot_throughput.py out.json out.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    "asyncep": "AsyncEP (gloo all_gather)",
    "asyncep-shm": "AsyncEP (shared memory)",
    "replica": "full replica per rank",
    "tp": "transformers TP (compiled)",
    "ep": "transformers EP, all_to_all (compiled)",
}


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    rows = [r for r in data["results"] if "tok_s" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    marks = []
    for strategy, label in LABELS.items():
        points = sorted((r["tokens_per_rank"], r["tok_s"]) for r in rows if r["strategy"] == strategy)
        if points:
            line = ax.plot(*zip(*points), marker="o", label=label)[0]
            marks += [(r["t_star_tokens"], line.get_color()) for r in data["results"]
                      if r.get("strategy") == strategy and "t_star_tokens" in r]
    top = ax.get_ylim()[1]  # after every line: the final scale
    for t_star, color in marks:
        ax.axvline(t_star, color=color, linestyle="--", linewidth=1)
        ax.annotate(f"T* {t_star:,.0f}", (t_star, top), color=color, rotation=90, va="top", ha="right", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per rank per step")
    ax.set_ylabel("tokens/s (all ranks)")
    ax.set_title(f"Prefill throughput, {data['world_size']} CPU ranks, bf16, 82M-parameter Qwen3-MoE shape")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:3])
