"""The GPU check's dry run: the same code paths as on an H200 (numerics, the per-rank sweep against eager
and stock torch.compile, AsyncEP on one device through a simulated world of 8, packed attention), on CPU
with tiny shapes, so that the script cannot rot between the sessions that have a GPU. The model graphs
run through aot_eager here and FlexAttention uncompiled: Inductor's CPU compiles of them are the rest of
the suite's (tests/test_packed.py for the kernel), and none is the GPU's."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--iters", "2", "--backend", "aot_eager"], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = [r for r in report["rows"] if {"eager", "stock_compile", "compiled"} <= r.keys()]
    assert rows, report["rows"]
    phases = report["phases"]
    assert not [name for name, p in phases.items() if "error" in p or "skipped" in p], phases
    assert len([k for k in phases["numerics"] if k != "seconds"]) == 4
    for case, r in phases["numerics"].items():
        if case != "seconds" and case.endswith("float32"):
            assert r["max_abs_vs_unmodified"] <= 1e-4, (case, r)
    a = phases["asyncep"]
    assert a["world"] == 8 and a["sharded_layers"] == 2 and a["copied_bytes_per_step"] > 0 and a["overlap_cost"] > 0
    assert {(c["rows"], c["prefix"]) for c in phases["packed"]["cases"]} == {(2, 0), (8, 0), (2, 64), (8, 64)}
    assert all(c["max_abs_diff"] < 0.05 for c in phases["packed"]["cases"])  # bf16
    # throughput.py under torchrun: every strategy ran on both ranks and counted tokens.
    r = phases["ranks"]
    assert r["world"] == 2 and {row["strategy"] for row in r["rows"]} == {"asyncep", "replica", "tp", "ep"}, r
    assert all(row["tok_s"] > 0 and row["device"] == "cpu" for row in r["rows"]) and r["t_star"], r
