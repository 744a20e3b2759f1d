"""The AsyncEP order must survive Inductor: checked in the generated code, with Inductor numerics.

Two families, world size 2, real gloo ranks. Inductor's C++ compile takes tens of seconds here.
"""

from __future__ import annotations

import re

import pytest

from dist_utils import run_ranks
from workers import bf16_against_stock_compile, inductor_code, shm_transport

pytestmark = pytest.mark.inductor

GATHER = re.compile(r"^\s*(buf\d+) = torch\.ops\._c10d_functional\.all_gather_into_tensor\.default\(")
WAIT = re.compile(r"^\s*torch\.ops\._c10d_functional\.wait_tensor\.default\((buf\d+)\)")
KERNEL = re.compile(r"extern_kernels\.|cpp_fused_|torch\.ops\.transformers\.")


def check_generated_code(code: str, *, prefetch: int, layers: int, slots: int) -> None:
    body = code[code.index("def call(self, args)") :].splitlines()
    gathers: list[tuple[str, int]] = []
    waits: dict[str, int] = {}
    for i, line in enumerate(body):
        if m := GATHER.match(line):
            gathers.append((m.group(1), i))
        elif m := WAIT.match(line):
            waits[m.group(1)] = i
    assert len(gathers) == layers * slots, f"{len(gathers)} gathers in the generated code, expected {layers * slots}"

    def uses(buf: str) -> list[int]:
        word = re.compile(rf"\b{buf}\b")
        return [
            i
            for i, line in enumerate(body)
            if word.search(line) and not line.lstrip().startswith(("assert_", "#")) and i not in (waits[buf],)
            and not GATHER.match(line)
        ]

    first_use, end = {}, {}
    for buf, issued in gathers:
        assert buf in waits and waits[buf] > issued, f"{buf} is never waited on after its gather"
        lines = uses(buf)
        assert lines and min(lines) > waits[buf], f"{buf} is read before its wait"
        first_use[buf], end[buf] = min(lines), max(lines)

    layer_bufs = [gathers[k * slots : (k + 1) * slots] for k in range(layers)]
    start = [min(i for _, i in bufs) for bufs in layer_bufs]
    layer_first_use = [min(first_use[b] for b, _ in bufs) for bufs in layer_bufs]
    layer_end = [max(end[b] for b, _ in bufs) for bufs in layer_bufs]
    for k in range(layers):
        if prefetch and k + prefetch < layers:
            assert start[k + prefetch] < layer_first_use[k], f"layer {k + prefetch} not gathered before layer {k} computes"
        # Real overlap: compute kernels run between issuing a layer's gathers and waiting on them.
        first_wait = min(waits[b] for b, _ in layer_bufs[k])
        if prefetch:
            assert any(KERNEL.search(body[i]) for i in range(start[k] + 1, first_wait)), f"nothing overlaps layer {k}'s gather"
    peak = max(sum(1 for k in range(layers) if start[k] <= i <= layer_end[k]) for i in range(len(body)))
    assert peak <= prefetch + 1, f"{peak} gathered layers alive at once in the generated code"


@pytest.mark.parametrize(
    # prefetch + 2 layers: the peak of prefetch + 1 gathered layers is then a bound some layer could break
    "family, slots, prefetch, layers", [("gpt_oss", 4, 2, 4)]
)
def test_inductor_keeps_async_ep_order(checkpoints, family, slots, prefetch, layers):
    path = str(checkpoints(family, layers=layers, num_experts=6))
    for result in run_ranks(2, inductor_code, path, prefetch):
        assert result["max_abs_diff"] <= 1e-4, result["max_abs_diff"]
        (code,) = [c for c in result["code"] if "all_gather_into_tensor" in c]
        check_generated_code(code, prefetch=prefetch, layers=layers, slots=slots)


def ahead_of_the_piece(code: str) -> tuple[list[int], list[int], list[int]]:
    """In one compiled piece: the lines issuing and waiting for the gathers it only returns (the next
    layer's), and its compute kernels' lines."""
    body = code[code.index("def call(self, args)") :].splitlines()
    gathers = {m.group(1): i for i, line in enumerate(body) if (m := GATHER.match(line))}
    waits = {m.group(1): i for i, line in enumerate(body) if (m := WAIT.match(line))}
    ahead = []
    for buf in gathers:
        word = re.compile(rf"\b{buf}\b")
        reads = [line for i, line in enumerate(body) if word.search(line) and i not in (gathers[buf], waits[buf])
                 and not line.lstrip().startswith(("assert_", "#"))]  # fmt: skip
        if all(line.lstrip().startswith(("return", "del ")) for line in reads):
            ahead.append(buf)
    kernels = [i for i, line in enumerate(body) if KERNEL.search(line)]
    return [gathers[b] for b in ahead], [waits[b] for b in ahead], kernels


def test_inductor_keeps_the_regional_placement(checkpoints):
    """Compiled a decoder layer at a time (as serving ranks compile): 4 layers give 3 compiled pieces,
    and in the generated code of each of the first two the next layer's gathers are issued before its
    first kernel and waited for after its last."""
    path = str(checkpoints("qwen3_moe", layers=4, num_experts=6))
    for result in run_ranks(2, inductor_code, path, 1, True):
        assert result["max_abs_diff"] <= 1e-4, result["max_abs_diff"]
        assert len(result["code"]) == 3, len(result["code"])  # the first layer, the middle two (once), the last
        for code in result["code"][:2]:
            issued, waited, kernels = ahead_of_the_piece(code)
            assert len(issued) == 2, issued  # the next layer's two expert tensors
            assert max(issued) < min(kernels) and min(waited) > max(kernels), (issued, waited, kernels[0], kernels[-1])
        assert ahead_of_the_piece(result["code"][2])[0] == []  # the last layer: nothing ahead


def test_bf16_error_is_that_of_stock_compile(checkpoints):
    """bf16 under Inductor: routing can flip on bf16 rounding, so compare error against the fp32 model
    with stock torch.compile's on the same batch: ours must be no worse (plus 0.05)."""
    path = str(checkpoints("qwen3_moe", layers=3, num_experts=6))
    for r in run_ranks(2, bf16_against_stock_compile, path):
        assert r["ours_vs_fp32"] <= r["stock_vs_fp32"] + 0.05, r


def test_shared_memory_transport_under_inductor(checkpoints):
    path = str(checkpoints("qwen3_moe", layers=3, num_experts=5))
    for r in run_ranks(2, shm_transport, path, "inductor"):
        assert r["max_abs_diff"] <= 1e-4, r
        assert r["shm_gathers"] == r["expected_gathers"] > 0 and r["collectives"] == 0, r
