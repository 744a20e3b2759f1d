"""``zp-compile bench-serve``: datasets of exact token lengths, Poisson arrivals, the report's arithmetic,
``/metrics`` deltas, and one run against a real server whose own counters must agree with the report."""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter

import pytest

from server_utils import free_port
from zp_compile.tools import bench_serve as bench
from zp_compile import cli

pytestmark = pytest.mark.xdist_group("serve")  # one server at a time, on one worker (pyproject.toml)


@pytest.fixture(scope="module")
def tokenizer():
    from zp_compile.models import tiny_tokenizer

    return tiny_tokenizer()


def _text(body: dict) -> str:
    return body.get("input") or body.get("prompt") or body["queries"] + body["items"]


def _server_count(tokenizer, body: dict) -> int:
    """Prompt tokens as the server counts them (app.py: /score joins query and item tokens)."""
    if "queries" in body:
        return len(tokenizer.encode(body["queries"]) + tokenizer.encode(body["items"], add_special_tokens=False))
    return len(tokenizer.encode(_text(body)))


# ---- datasets -----------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", bench.ENDPOINTS)
def test_random_prompts_have_exact_lengths_and_depend_on_the_seed(tokenizer, endpoint):
    requests = bench.random_dataset(tokenizer, 40, 64, seed=3, endpoint=endpoint, model="m")
    assert [n for _, n in requests] == [64] * 40
    assert all(_server_count(tokenizer, body) == 64 and body["model"] == "m" for body, _ in requests)
    assert requests == bench.random_dataset(tokenizer, 40, 64, seed=3, endpoint=endpoint, model="m")
    assert requests != bench.random_dataset(tokenizer, 40, 64, seed=4, endpoint=endpoint, model="m")
    # range ratio: lengths spread over [32, 96], each still exact
    spread = bench.random_dataset(tokenizer, 200, 64, 0.5, seed=0, endpoint=endpoint)
    lengths = [n for _, n in spread]
    assert min(lengths) >= 32 and max(lengths) <= 96 and len(set(lengths)) > 20
    assert all(_server_count(tokenizer, body) == n for body, n in spread)
    assert "model" not in spread[0][0]


def test_one_token_prompts_and_bad_sizes(tokenizer):
    assert [(_server_count(tokenizer, b), n) for b, n in bench.random_dataset(tokenizer, 3, 1, endpoint="/score")] == [(1, 1)] * 3
    assert bench.random_dataset(tokenizer, 0, 8) == []
    with pytest.raises(ValueError, match="range ratio"):
        bench.random_dataset(tokenizer, 1, 8, 1.0)
    with pytest.raises(ValueError, match="--gsp-num-groups 1000 exceeds the 152 one-token words"):
        bench.shared_prefix_dataset(tokenizer, 1000, 2, 8, 4)
    with pytest.raises(ValueError, match="endpoint '/rerank'"):
        bench.random_dataset(tokenizer, 1, 8, endpoint="/rerank")


def test_shared_prefix_groups_share_exactly_their_prefix_in_shuffled_order(tokenizer):
    groups, per_group, system, question = 6, 5, 24, 7
    requests = bench.shared_prefix_dataset(tokenizer, groups, per_group, system, question, seed=1)
    assert requests == bench.shared_prefix_dataset(tokenizer, groups, per_group, system, question, seed=1)
    assert [n for _, n in requests] == [system + question] * groups * per_group
    ids = [tokenizer.encode(_text(body)) for body, _ in requests]
    assert all(len(x) == system + question for x in ids)
    by_prefix = Counter(tuple(x[:system]) for x in ids)
    assert sorted(by_prefix.values()) == [per_group] * groups  # every group: its prompts, one prefix
    for a in range(len(ids)):
        for b in range(a + 1, len(ids)):
            common = next((i for i, (x, y) in enumerate(zip(ids[a], ids[b])) if x != y), len(ids[a]))
            same = ids[a][:system] == ids[b][:system]
            assert common == (system if same else 0), (a, b, common)  # exactly the prefix, or nothing
    order = [list(by_prefix).index(tuple(x[:system])) for x in ids]
    assert order != sorted(order)  # shuffled: not group after group
    # /score: the system prompt is the query, the question the item
    score = bench.shared_prefix_dataset(tokenizer, groups, per_group, system, question, seed=1, endpoint="/score")
    assert {len(tokenizer.encode(b["queries"])) for b, _ in score} == {system}
    assert {b["queries"] + b["items"] for b, _ in score} == {_text(b) for b, _ in requests}


def test_mix_is_the_paper_mix_as_text(tokenizer):
    from zp_compile.tools.workloads import paper_mix

    requests = bench.mix_dataset(tokenizer, 60, 300, seed=2, endpoint="/score")
    mix = paper_mix(60, seed=2, vocab=len(bench.word_pool(tokenizer)) + 3, max_context=300)
    assert [n for _, n in requests] == [len(r) for r in mix] and max(len(r) for r in mix) == 300  # clipped
    assert all(_server_count(tokenizer, body) == n for body, n in requests)
    for (body, _), r in zip(requests, mix):  # shared prefixes are the /score queries, exactly
        if r.prefix_len:
            assert len(tokenizer.encode(body["queries"])) == r.prefix_len
    prefixes = Counter(b["queries"] for (b, _), r in zip(requests, mix) if r.group)
    assert max(prefixes.values()) > 1  # some groups repeat in 60 requests
    assert requests == bench.mix_dataset(tokenizer, 60, 300, seed=2, endpoint="/score")


# ---- arrivals -----------------------------------------------------------------------------------
def test_poisson_arrivals():
    offsets = bench.arrival_offsets(20_000, 50.0, seed=7)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0 and min(gaps) >= 0
    mean = sum(gaps) / len(gaps)
    assert abs(mean - 1 / 50) < 0.02 * (1 / 50)
    std = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps))
    assert abs(std / mean - 1) < 0.05  # exponential: std = mean
    bursty = bench.arrival_offsets(20_000, 50.0, burstiness=0.25, seed=7)
    assert abs(bursty[-1] / (len(bursty) - 1) - 1 / 50) < 0.05 * (1 / 50)  # same mean rate, burstier gaps
    assert offsets == bench.arrival_offsets(20_000, 50.0, seed=7)
    assert bench.arrival_offsets(5, math.inf) == [0.0] * 5
    assert bench.arrival_offsets(0, 3.0) == []
    with pytest.raises(ValueError, match="request rate > 0"):
        bench.arrival_offsets(3, 0.0)


# ---- report arithmetic --------------------------------------------------------------------------
def test_report_arithmetic_on_crafted_outcomes():
    ok = [bench.Outcome(200, (i + 1) / 1000, 10, prompt_tokens=10) for i in range(100)]  # 1..100 ms
    ok[0] = bench.Outcome(200, 0.001, 10, prompt_tokens=11)  # the server counted differently
    bad = [bench.Outcome(400, 0.5, 10, error="input[0] has 300 tokens"), bench.Outcome(503, 0.2, 10, error="draining"),
           bench.Outcome(400, 0.1, 10, error="x"), bench.Outcome(None, 2.0, 10, error="ConnectError: refused")]  # fmt: skip
    r = bench.summarize("/classify", ok + bad, duration_s=4.0)
    assert (r.num_requests, r.completed, r.failed) == (104, 100, {"400": 2, "503": 1, "ConnectError": 1})
    assert r.total_input_tokens == 1001 and r.input_throughput == 1001 / 4 and r.request_throughput == 25.0
    assert r.token_mismatches == 1
    # failures are not in the latencies: mean 50.5 ms, numpy's linear percentiles
    assert r.latency_ms == pytest.approx({"mean": 50.5, "p50": 50.5, "p90": 90.1, "p99": 99.01})
    none = bench.summarize("/score", bad, duration_s=1.0)
    assert none.completed == 0 and none.latency_ms == {"mean": None, "p50": None, "p90": None, "p99": None}
    text = bench.format_result(none)
    assert "Failed requests:                         4" in text and "Mean E2EL (ms):                          n/a" in text
    assert "n/a (GET /metrics failed)" in text


BEFORE = """\
# HELP zp_requests_total HTTP requests answered, by route and status
# TYPE zp_requests_total counter
zp_requests_total{route="/classify",status="200"} 5.0
zp_requests_total{route="/metrics",status="200"} 3.0
# TYPE zp_prompt_tokens_total counter
zp_prompt_tokens_total 100.0
# TYPE zp_steps_total counter
zp_steps_total 4.0
# TYPE zp_rank_tokens_total counter
zp_rank_tokens_total{rank="0"} 60.0
zp_rank_tokens_total{rank="1"} 40.0
# TYPE zp_step_flops_imbalance histogram
zp_step_flops_imbalance_bucket{le="1.0"} 1.0
zp_step_flops_imbalance_bucket{le="+Inf"} 4.0
zp_step_flops_imbalance_count 4.0
zp_step_flops_imbalance_sum 6.0
"""

AFTER = """\
# HELP zp_requests_total HTTP requests answered, by route and status
# TYPE zp_requests_total counter
zp_requests_total{route="/classify",status="200"} 25.0
zp_requests_total{route="/classify",status="400"} 2.0
zp_requests_total{route="/score",status="200"} 9.0
zp_requests_total{route="/metrics",status="200"} 4.0
# TYPE zp_prompt_tokens_total counter
zp_prompt_tokens_total 500.0
# TYPE zp_steps_total counter
zp_steps_total 12.0
# TYPE zp_rank_tokens_total counter
zp_rank_tokens_total{rank="0"} 260.0
zp_rank_tokens_total{rank="1"} 240.0
zp_rank_tokens_total{rank="10"} 0.0
# TYPE zp_step_flops_imbalance histogram
zp_step_flops_imbalance_bucket{le="1.0"} 3.0
zp_step_flops_imbalance_bucket{le="+Inf"} 12.0
zp_step_flops_imbalance_count 12.0
zp_step_flops_imbalance_sum 15.6
"""


def test_metrics_deltas_on_crafted_text():
    s = bench.server_figures(BEFORE, AFTER, "/classify")
    assert (s.steps, s.prompt_tokens, s.requests) == (8, 400, {"200": 20, "400": 2})
    assert s.rank_tokens == {"0": 200, "1": 200, "10": 0}  # numeric rank order
    assert s.mean_imbalance == pytest.approx(9.6 / 8)
    assert s.prefix_hit_rate is None and s.below_threshold_share is None  # not exported (yet)
    text = bench.format_result(bench.summarize("/classify", [], 1.0, s))
    assert "Prefix hit rate (tokens):                n/a" in text and "Steps below saturation threshold:        n/a" in text
    assert "Rank 10 tokens:" in text and "Mean step FLOPs imbalance (max/mean):    1.200" in text
    # once the server exports them: rates over the run's deltas
    extra_before = "# TYPE zp_prefix_hit_tokens_total counter\nzp_prefix_hit_tokens_total 50.0\n# TYPE zp_steps_below_threshold_total counter\nzp_steps_below_threshold_total 1.0\n"
    extra_after = "# TYPE zp_prefix_hit_tokens_total counter\nzp_prefix_hit_tokens_total 150.0\n# TYPE zp_steps_below_threshold_total counter\nzp_steps_below_threshold_total 3.0\n"
    s = bench.server_figures(BEFORE + extra_before, AFTER + extra_after, "/classify")
    assert s.prefix_hit_rate == pytest.approx(100 / 400) and s.below_threshold_share == pytest.approx(2 / 8)
    assert "Prefix hit rate (tokens):                25.00%" in bench.format_result(bench.summarize("/classify", [], 1.0, s))
    # no step in the run: no imbalance to average
    assert bench.server_figures(BEFORE, BEFORE, "/classify").mean_imbalance is None


def test_client_errors_are_outcomes_too(tokenizer):
    requests = bench.random_dataset(tokenizer, 5, 8)
    r = asyncio.run(bench.run(f"http://127.0.0.1:{free_port()}", "/classify", requests, max_concurrency=2, timeout=5))
    assert (r.num_requests, r.completed, r.failed, r.server) == (5, 0, {"ClientConnectorError": 5}, None)
    assert all(o.status is None and o.error.startswith("ClientConnectorError") for o in r.outcomes)


# ---- end to end ---------------------------------------------------------------------------------
def test_against_a_live_server(served, served_checkpoint, tmp_path, capsys):
    from transformers import AutoTokenizer

    groups, per_group, system, question = 5, 8, 40, 10
    out = tmp_path / "result.json"
    srv, checkpoint = served, served_checkpoint  # the server tests' server (conftest.py): its counters are read as deltas
    with pytest.raises(SystemExit) as done:
        cli.main(["bench-serve", "--base-url", srv.url, "--tokenizer", str(checkpoint), "--dataset-name", "shared-prefix",
                  "--gsp-num-groups", str(groups), "--gsp-prompts-per-group", str(per_group), "--gsp-system-prompt-len", str(system),
                  "--gsp-question-len", str(question), "--request-rate", "200", "--max-concurrency", "8",
                  "--save-result", "--result-filename", str(out)])  # fmt: skip
    assert done.value.code == 0
    # the library directly: 7 prompts that fit, 3 over the 256-token limit (400 each), all at once
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    mixed = bench.random_dataset(tokenizer, 7, 30, seed=1) + bench.random_dataset(tokenizer, 3, 300, seed=2)
    refused = asyncio.run(bench.run(srv.url, "/classify", mixed))
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and f"Successful requests:                     {groups * per_group}" in printed

    r = json.loads(out.read_text())
    sent, tokens = groups * per_group, groups * per_group * (system + question)
    assert (r["num_requests"], r["completed"], r["failed"], r["token_mismatches"]) == (sent, sent, {}, 0)
    assert len(r["outcomes"]) == sent and r["total_input_tokens"] == tokens
    s = r["server"]  # the server's own counters over the run agree with what was sent
    assert s["requests"] == {"200": sent} and s["prompt_tokens"] == tokens
    assert sorted(s["rank_tokens"]) == ["0", "1"] and sum(s["rank_tokens"].values()) == tokens
    assert s["steps"] >= 1 and s["mean_imbalance"] >= 1.0

    assert (refused.num_requests, refused.completed, refused.failed, refused.token_mismatches) == (10, 7, {"400": 3}, 0)
    assert all("300 tokens" in o.error for o in refused.outcomes if o.status == 400)
    assert refused.server.requests == {"200": 7, "400": 3} and refused.total_input_tokens == 7 * 30
    assert sum(refused.server.rank_tokens.values()) == 7 * 30


def test_custom_dataset_sends_bodies_as_given(tokenizer, tmp_path):
    """``--dataset-name custom``: one body per line, counted by its token ids or its encoded text; a line
    that is not a body is an error naming the line."""
    bodies = [{"prompt": [[5, 6, 7]], "echo": True, "logprobs": 1, "max_tokens": 1}, {"prompt": " hello world", "max_tokens": 1}]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps(b) for b in bodies) + "\n\n")
    got = bench.custom_dataset(tokenizer, path, model="m")
    assert [b for b, _ in got] == [{**b, "model": "m"} for b in bodies]
    assert [n for _, n in got] == [3, len(tokenizer.encode(" hello world"))]
    path.write_text(json.dumps(bodies[0]) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"requests.jsonl:2: a body needs prompt"):
        bench.custom_dataset(tokenizer, path)
