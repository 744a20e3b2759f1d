"""``zp-compile serve`` end to end: a real subprocess with real ranks (torchrun, gloo), real HTTP over
loopback. Each server start costs a torchrun launch and a compile, so one server (``served`` in
conftest.py, shared with tests/test_bench_serve.py) answers every test that does not change its state;
the fault tests start their own."""

from __future__ import annotations

import asyncio
import math
import signal
import threading
import time

import httpx
import pytest
import torch

from server_utils import Server, wait_for
from server_utils import flood as _flood
from zp_compile import cli
from zp_compile.server import protocol as p

pytestmark = pytest.mark.xdist_group("serve")  # one server at a time, on one worker (pyproject.toml)

LABELS = [" yes", " no"]


@pytest.fixture(scope="module")
def checkpoint(served_checkpoint):
    return served_checkpoint


@pytest.fixture(scope="module")
def server(served):
    return served


@pytest.fixture(scope="module")
def offline(checkpoint):
    """The offline optimized model (world of one): next-token log-probabilities of one unpadded prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import zp_compile

    model = zp_compile.optimize(AutoModelForCausalLM.from_pretrained(checkpoint).eval(), backend="aot_eager")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)

    def logprobs(prompt) -> torch.Tensor:
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        with torch.inference_mode():
            return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)  # [V]

    logprobs.tokenizer = tokenizer
    return logprobs


PROMPTS = ["Is the sky blue? Answer:", "The film was boring, too long and badly written.", "a", "Paris is the capital of " * 9, [5, 9, 33, 7]]


def test_answers_equal_the_offline_optimized_model(server, offline):
    assert "shm transport" in server.output()  # --transport auto: both ranks are CPU processes on this host
    tok = offline.tokenizer
    label_ids = [tok.encode(x, add_special_tokens=False)[0] for x in LABELS]
    # /v1/completions: top-5 log-probabilities and the greedy token, for each prompt (batched together)
    r = server.client.post("/v1/completions", json={"prompt": [x for x in PROMPTS if isinstance(x, str)], "logprobs": 5})
    assert r.status_code == 200, r.text
    body = p.CompletionResponse.model_validate(r.json())
    for choice, prompt in zip(body.choices, [x for x in PROMPTS if isinstance(x, str)]):
        expected = offline(prompt)
        values, ids = expected.topk(5)
        assert choice.text == tok.decode([int(ids[0])])
        got = choice.logprobs.top_logprobs[0]
        want = {tok.decode([i]): v for i, v in zip(ids.tolist(), values.tolist())}  # keyed by text, as OpenAI's format is
        assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-4 for k in want)
        assert abs(choice.logprobs.token_logprobs[0] - values[0].item()) < 1e-4
    # token-id prompt
    r = server.client.post("/v1/completions", json={"prompt": PROMPTS[-1], "logprobs": 1})
    assert abs(r.json()["choices"][0]["logprobs"]["token_logprobs"][0] - offline(PROMPTS[-1]).max().item()) < 1e-4
    # /classify: softmax over the label tokens' logits
    r = server.client.post("/classify", json={"input": PROMPTS[:4]})
    assert r.status_code == 200, r.text
    for d, prompt in zip(p.ClassifyResponse.model_validate(r.json()).data, PROMPTS[:4]):
        expected = torch.softmax(offline(prompt)[label_ids], -1).tolist()
        assert max(abs(a - b) for a, b in zip(d.probs, expected)) < 1e-4
        assert d.label == LABELS[max(range(2), key=expected.__getitem__)]
    # /score 1:N, full-vocabulary probabilities: query tokens then item tokens
    items = ["it is", "no way", "maybe so"]
    r = server.client.post("/score", json={"queries": "Is water wet?", "items": items, "label_token_ids": label_ids, "apply_softmax": False})
    assert r.status_code == 200, r.text
    for d, item in zip(p.ScoreResponse.model_validate(r.json()).data, items):
        ids = tok.encode("Is water wet?") + tok.encode(item, add_special_tokens=False)
        assert abs(d.score - math.exp(offline(ids)[label_ids[0]].item())) < 1e-5
    # /score 1:1 and /rerank: sorted by the same score, cut at top_n
    r = server.client.post("/score", json={"queries": ["q one", "q two"], "items": ["a", "b"]})
    assert [d["index"] for d in r.json()["data"]] == [0, 1]
    docs = ["sunny day", "the capital of France", "rain", "water boils"]
    r = server.client.post("/rerank", json={"query": "weather", "documents": docs, "top_n": 3})
    results = p.RerankResponse.model_validate(r.json()).results
    assert len(results) == 3 and [x.relevance_score for x in results] == sorted([x.relevance_score for x in results], reverse=True)
    for x in results:
        ids = tok.encode("weather") + tok.encode(docs[x.index], add_special_tokens=False)
        assert abs(x.relevance_score - torch.softmax(offline(ids)[label_ids], -1)[0].item()) < 1e-4
        assert x.document.text == docs[x.index]


def test_echo_returns_every_prompt_tokens_logprob(server, offline):
    """``echo`` with ``logprobs`` (lm-evaluation-harness's loglikelihood request, batched token ids and
    text): every prompt position's logprob and top-k equal the unpadded model's at that position; the
    first is null; the completion token follows; ``max_tokens`` 0 returns the prompt alone. Two prompts
    of one request share their first block, which the second reads from the first in the same step."""
    from transformers import AutoModelForCausalLM

    tok = offline.tokenizer
    hf = AutoModelForCausalLM.from_pretrained(server.args[1]).eval()

    def every_position(ids):  # [n, V]
        with torch.inference_mode():
            return torch.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0].float(), -1)

    shared = tok.encode("The quick brown fox jumps over the lazy dog, and then the dog runs to the house")
    prompts = [shared + tok.encode(" sleeps again.", add_special_tokens=False), shared + tok.encode(" runs away fast", add_special_tokens=False), [5, 9]]
    assert len(shared) >= 16
    body = {"prompt": prompts, "echo": True, "logprobs": 3, "max_tokens": 1, "temperature": 0, "seed": 1234}
    r = server.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    for choice, ids in zip(sorted(r.json()["choices"], key=lambda c: c["index"]), prompts):
        lp = every_position(ids)
        got = choice["logprobs"]
        assert len(got["tokens"]) == len(ids) + 1 and got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
        want = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert max(abs(a - b) for a, b in zip(got["token_logprobs"][1:-1], want.tolist())) < 1e-4
        for pos in range(1, len(ids)):
            values, top = lp[pos - 1].topk(3)
            expected = {tok.decode([t]): v for t, v in zip(top.tolist(), values.tolist())}
            expected.setdefault(tok.decode([ids[pos]]), lp[pos - 1, ids[pos]].item())  # the prompt token too: up to k + 1
            assert got["top_logprobs"][pos].keys() == expected.keys()
            assert all(abs(got["top_logprobs"][pos][k] - v) < 1e-4 for k, v in expected.items())
        assert abs(got["token_logprobs"][-1] - lp[-1].max().item()) < 1e-4  # the greedy completion token
        assert choice["text"] == tok.decode(ids) + tok.decode([int(lp[-1].argmax())])
        assert got["text_offset"][0] == 0 and got["text_offset"] == sorted(got["text_offset"])
    # max_tokens 0: the prompt alone; a text prompt echoes its own text
    r = server.client.post("/v1/completions", json={"prompt": "Paris is the capital of", "echo": True, "logprobs": 0, "max_tokens": 0})
    choice = r.json()["choices"][0]
    ids = tok.encode("Paris is the capital of")
    assert choice["text"] == "Paris is the capital of" and len(choice["logprobs"]["tokens"]) == len(ids)
    assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    lp = every_position(ids)
    assert abs(choice["logprobs"]["token_logprobs"][-1] - lp[-2, ids[-1]].item()) < 1e-4
    assert all(len(t) == 1 for t in choice["logprobs"]["top_logprobs"][1:])  # k = 0: the prompt token alone
    # echo without logprobs: the text only
    r = server.client.post("/v1/completions", json={"prompt": [5, 9, 33], "echo": True, "max_tokens": 1})
    assert r.json()["choices"][0]["logprobs"] is None and r.json()["choices"][0]["text"].startswith(tok.decode([5, 9, 33]))


def test_vllm_score_pairings_rerank_routes_and_tokenizer_routes(server, offline):
    """/v1/score under each of vLLM's pairings gives the same scores; /v1/rerank and /v2/rerank answer
    as /rerank (top_n 0: all); /tokenize and /detokenize round-trip; usage and id prefixes on each."""
    queries, docs = "Is water wet?", ["it is", "no way", "maybe so"]
    scores = None
    for a, b in p.SCORE_PAIRS:
        r = server.client.post("/v1/score", json={a: queries, b: docs})
        assert r.status_code == 200, r.text
        got = [d["score"] for d in r.json()["data"]]
        assert r.json()["id"].startswith("score-") and r.json()["usage"]["prompt_tokens"] > 0
        scores = scores or got
        assert got == scores
    ranked = None
    for route in ("/rerank", "/v1/rerank", "/v2/rerank"):
        r = server.client.post(route, json={"query": queries, "documents": docs, "top_n": 0})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["id"].startswith("rerank-") and out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] > 0
        got = [(x["index"], x["relevance_score"], x["document"]["text"]) for x in out["results"]]
        ranked = ranked or got
        assert got == ranked and len(got) == 3
    assert sorted(ranked, key=lambda x: -x[1]) == ranked
    assert [x[1] for x in sorted(ranked)] == pytest.approx(scores, abs=1e-6)  # the same pairs, softmax over the labels
    # max_tokens_per_doc keeps each document's first k tokens
    long_doc = "water is wet because it is water " * 3
    r1 = server.client.post("/v2/rerank", json={"query": queries, "documents": [long_doc], "max_tokens_per_doc": 4})
    tok = offline.tokenizer
    r2 = server.client.post("/score", json={"queries": queries, "items": [tok.decode(tok.encode(long_doc, add_special_tokens=False)[:4])]})
    assert abs(r1.json()["results"][0]["relevance_score"] - r2.json()["data"][0]["score"]) < 1e-6
    r = server.client.post("/tokenize", json={"prompt": "Paris is nice", "return_token_strs": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["tokens"] == tok.encode("Paris is nice") and out["count"] == len(out["tokens"]) and out["max_model_len"] == 256
    assert out["token_strs"] == tok.convert_ids_to_tokens(out["tokens"])
    assert server.client.post("/tokenize", json={"prompt": "Paris", "add_special_tokens": False}).json()["tokens"] == tok.encode("Paris", add_special_tokens=False)
    assert server.client.post("/detokenize", json={"tokens": out["tokens"]}).json() == {"prompt": tok.decode(out["tokens"])}
    info = server.client.get("/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["model_max_length"] == 256


BAD = [
    # (route, body, status, param)
    ("/classify", {"input": []}, 400, "input"),
    ("/classify", {"input": ""}, 400, "input[0]"),
    ("/classify", {"input": ["ok"], "unknown_field": 1}, 400, "unknown_field"),
    ("/classify", {"input": 5}, 400, "input"),
    ("/classify", {}, 400, "input"),
    ("/classify", {"input": [10**6]}, 400, "input[0]"),
    ("/classify", {"input": "word " * 300}, 400, "input[0]"),  # over max_position_embeddings (256)
    ("/classify", {"input": ["x"] * 300}, 400, "input"),  # over --max-items (256)
    ("/classify", {"input": "x", "model": "other"}, 404, "model"),
    ("/score", {"queries": ["a", "b"], "items": ["x", "y", "z"]}, 400, "queries"),
    ("/score", {"queries": "a", "items": []}, 400, "items"),
    ("/score", {"queries": "a", "items": "b", "label_token_ids": [10**6]}, 400, "label_token_ids"),
    ("/score", {"queries": "a", "items": "b", "apply_softmax": "yes"}, 400, "apply_softmax"),
    ("/rerank", {"query": "a", "documents": ["b"], "top_n": -1}, 400, "top_n"),
    ("/v2/rerank", {"query": "a", "documents": ["b"], "max_tokens_per_doc": 0}, 400, "max_tokens_per_doc"),
    ("/score", {"queries": "a"}, 400, "queries"),  # one side only
    ("/v1/score", {"queries": "a", "documents": ["b"], "items": ["c"]}, 400, "items"),  # two pairings at once
    ("/v1/score", {"text_1": "a", "data_2": "b"}, 400, "data_2"),  # halves of two pairings
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": []}, 400, "prompt"),
    ("/detokenize", {"tokens": [10**6]}, 400, "tokens"),
    ("/detokenize", {"tokens": [1], "extra": 1}, 400, "extra"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 2}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "stream": True}, 400, "stream"),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "a", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "word " * 300, "truncate_prompt_tokens": 1000}, 400, "truncate_prompt_tokens"),
]


def test_bad_input_is_an_error_naming_the_field(server):
    for route, body, status, param in BAD:
        r = server.client.post(route, json=body)
        assert r.status_code == status, (route, body, r.text)
        err = p.ErrorResponse.model_validate(r.json()).error
        assert err.code == status and err.param == param, (route, body, err)
        assert param.split("[")[0].split(".")[0] in err.message or status == 404 and "model" in err.message
    r = server.client.post("/classify", content=b'{"input": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    # truncation on request keeps the last k tokens instead of refusing
    r = server.client.post("/classify", json={"input": "word " * 300, "truncate_prompt_tokens": 100})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 100
    r = server.client.get("/no/such/route")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


def _load_bodies(n: int) -> list[tuple[str, dict]]:
    words = "the quick brown fox jumps over the lazy dog and the answer is yes".split()
    text = lambda i: " ".join(words[(i + j) % len(words)] for j in range(1 + (i * 37) % 120))  # noqa: E731 - 1..120 words
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append(("/classify", {"input": [text(i), text(i + 1)] if i % 3 else text(i)}))
        elif kind == 1:
            out.append(("/score", {"queries": text(i), "items": [text(i + k) for k in range(1 + i % 3)]}))
        elif kind == 2:
            out.append(("/rerank", {"query": text(i), "documents": [text(i + 5), text(i + 7)], "top_n": 1}))
        else:
            out.append(("/v1/completions", {"prompt": text(i), "max_tokens": 1, "logprobs": i % 4}))
    return out


RESPONSES = {"/classify": p.ClassifyResponse, "/score": p.ScoreResponse, "/rerank": p.RerankResponse, "/v1/completions": p.CompletionResponse}


def test_load_every_request_answered_once_and_counted(server):
    bodies = _load_bodies(2000)
    before = {route: server.metric("zp_requests_total", route=route, status="200") for route in RESPONSES}
    tokens_before = server.metric("zp_prompt_tokens_total")

    async def run() -> list[httpx.Response]:
        limit = asyncio.Semaphore(64)
        async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=httpx.Limits(max_connections=64)) as client:

            async def one(route, body):
                async with limit:
                    return await client.post(route, json=body)

            return await asyncio.gather(*(one(route, body) for route, body in bodies))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * len(bodies), {r.status_code: r.text for r in responses if r.status_code != 200}
    prompt_tokens = 0
    for (route, body), r in zip(bodies, responses):
        parsed = RESPONSES[route].model_validate(r.json())
        prompt_tokens += parsed.usage.prompt_tokens
        if route == "/classify":
            assert len(parsed.data) == (1 if isinstance(body["input"], str) else len(body["input"]))
        elif route == "/score":
            assert len(parsed.data) == len(body["items"])
        elif route == "/v1/completions":
            assert len(parsed.choices[0].logprobs.top_logprobs[0]) <= body["logprobs"] or body["logprobs"] == 0
    for route in RESPONSES:
        sent = sum(1 for r, _ in bodies if r == route)
        assert server.metric("zp_requests_total", route=route, status="200") - before[route] == sent
    assert server.metric("zp_prompt_tokens_total") - tokens_before == prompt_tokens
    assert server.metric("zp_sequences_waiting") == 0
    # Each rank's own step time is part of the step's wall time, never more.
    busy = [server.metric("zp_rank_busy_seconds_total", rank=str(r)) for r in range(2)]
    assert all(0 < b <= server.metric("zp_step_seconds_sum") for b in busy)


def test_health_answers_while_a_step_runs(server):
    """A long request is in flight (its steps run on the ranks) while /health is asked: it answers."""
    done = threading.Event()
    result = {}

    def long_request():
        result["r"] = server.client.post("/classify", json={"input": ["word " * 60] * 256})
        done.set()

    threading.Thread(target=long_request).start()
    wait_for(lambda: server.metric("zp_sequences_running") > 0 or done.is_set(), "the long request to start")
    health = httpx.get(server.url + "/health", timeout=5)
    running = not done.is_set()
    done.wait(300)
    assert health.status_code == 200 and health.json()["status"] == "ready"
    assert result["r"].status_code == 200, result["r"].text
    assert running, "the long request finished before /health was asked; make it longer"


def test_fuzz_every_endpoint_from_the_openapi_schema(server):
    """Hypothesis-generated bodies (valid and invalid) for every operation in /openapi.json: never a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(server.client.get("/openapi.json").json())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= set(RESPONSES) | {"/health", "/v1/models", "/metrics"}
    for op in operations:
        modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if op.method.upper() == "POST" else (GenerationMode.POSITIVE,)
        for mode in modes:

            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                response = case.call(base_url=server.url, timeout=120)
                assert response.status_code < 500, (op.path, case.body, response.text)
                if response.status_code >= 400:
                    assert p.ErrorResponse.model_validate(response.json()).error.code == response.status_code

            check()
    assert server.client.get("/health").status_code == 200


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory):
    """Wider than ``checkpoint``: steps take long enough for a queue to build up on 2 cores."""
    from zp_compile.models import tiny_with_tokenizer

    path = tmp_path_factory.mktemp("serve-slow")
    return tiny_with_tokenizer("qwen3_moe", path, layers=4, hidden=256, num_experts=8, expert_size=512, max_position_embeddings=512)


def test_overload_auth_body_limit_and_disconnects(slow_checkpoint):
    args = ["--backend", "eager", "--labels", *LABELS, "--max-waiting", "32", "--max-items", "16", "--max-body-bytes", "20000",
            "--heartbeat-timeout", "300"]  # fmt: skip
    with Server(slow_checkpoint, *args, api_key="s3cret") as srv:
        assert httpx.get(srv.url + "/health").status_code == 200  # no key needed
        for path in ("/v1/models", "/metrics", "/openapi.json"):
            r = httpx.get(srv.url + path)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.post(srv.url + "/classify", json={"input": "x"}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = srv.client.post("/classify", json={"input": "x" * 30000})
        assert r.status_code == 413 and r.json()["error"]["code"] == 413
        # Overload: 16-item requests from 64 clients. The queue holds 32 sequences: the rest get 429 at once.
        bodies = [("/classify", {"input": [f"review number {i} " * 20] * 16}) for i in range(200)]
        waiting_seen = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                waiting_seen.append(srv.metric("zp_sequences_waiting"))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        responses = _flood(srv, bodies, 64)
        stop.set()
        watcher.join()
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and codes.count(429) > 0 and codes.count(200) > 0, codes
        for r in responses:
            if r.status_code == 429:
                assert r.json()["error"]["type"] == "rate_limit_error"
        assert max(waiting_seen) <= 32
        # A client that disconnects while its work is queued: the work is dropped, never run. The ranks
        # are stopped first (--heartbeat-timeout keeps that from counting as a failure), so the one-sequence
        # step handed out next cannot finish and the "dropped" request stays queued behind it, whatever the
        # machine's speed.
        dropped_before = srv.metric("zp_sequences_dropped_total")
        ranks = srv.ranks()
        for proc in ranks:
            proc.suspend()
        try:
            out = {}
            blocker = threading.Thread(target=lambda: out.update(r=_flood(srv, [("/classify", {"input": "blocker"})], 1)))
            blocker.start()
            wait_for(lambda: srv.metric("zp_sequences_running") == 1, "the blocking step to be handed to the stopped ranks")
            with pytest.raises(httpx.ReadTimeout):
                srv.client.post("/classify", json={"input": ["dropped"] * 8}, timeout=0.5)
            wait_for(lambda: srv.metric("zp_sequences_dropped_total") - dropped_before >= 8, "the dropped sequences to be counted")
            assert srv.metric("zp_sequences_waiting") == 0
        finally:
            for proc in ranks:
                proc.resume()
        blocker.join()
        assert [r.status_code for r in out["r"]] == [200]
        assert srv.metric("zp_sequences_dropped_total") - dropped_before == 8, srv.client.get("/metrics").text
        assert srv.metric("zp_requests_total", route="/classify", status="499") >= 1
        assert srv.metric("zp_worker_failures_total") == 0
        assert srv.client.post("/classify", json={"input": "after"}).status_code == 200


def test_auto_transport_is_shared_memory_only_for_cpu_ranks_on_one_host():
    from zp_compile.rank.worker import resolve_transport

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_transport("auto", cpu, world=4, local=4) == "shm"
    assert resolve_transport("auto", cpu, world=4, local=2) == "collective"  # two hosts
    assert resolve_transport("auto", gpu, world=2, local=2) == "collective"
    assert resolve_transport("shm", cpu, world=4, local=2) == "shm"  # a user's choice is kept (its setup then checks it)
    assert resolve_transport("collective", cpu, world=2, local=2) == "collective"


def test_serve_refuses_bad_settings_before_starting_ranks(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    for flag, value, message in [("--heartbeat-timeout", "0", "--heartbeat-timeout must be > 0"),
                                 ("--cache-tokens", "-1", "--cache-tokens must be >= 0")]:  # fmt: skip
        with pytest.raises(SystemExit) as e:
            cli.main(["serve", "--model", str(tmp_path), flag, value])
        assert message in str(e.value), e.value


def _answered(responses) -> list[int]:
    """Every request got an HTTP answer (no client-side timeout or connection error)."""
    errors = [r for r in responses if isinstance(r, Exception)]
    assert not errors, errors[:3]
    return [r.status_code for r in responses]


def _load_under_way(srv: Server, bodies) -> tuple[threading.Thread, dict]:
    """16 clients sending ``bodies`` from a thread (responses in ``out["r"]`` once it ends); returns once
    the server has run 3 steps of it."""
    out = {}
    load = threading.Thread(target=lambda: out.update(r=_flood(srv, bodies, 16, timeout=120)))
    load.start()
    steps = srv.metric("zp_steps_total")
    wait_for(lambda: srv.metric("zp_steps_total") >= steps + 3, "the load to get going")
    return load, out


def test_rank_hung_in_a_collective_mid_load_then_drain(slow_checkpoint):
    """A rank stopped (SIGSTOP) under load leaves its peer waiting inside an all-gather: the heartbeat
    check catches it, the peer's stack is written, both are killed and restarted, and every request gets
    an answer. Then a drain (SIGTERM) mid-load. A rank killed mid-step (SIGKILL), and the answers a
    failed step's requests get, are tests/test_recovery.py's."""
    args = ["--backend", "eager", "--labels", *LABELS, "--transport", "collective", "--on-worker-failure", "restart", "--step-timeout", "60"]
    bodies = [("/classify", {"input": [f"text {i} " * 40] * 4}) for i in range(120)]
    with Server(slow_checkpoint, *args) as srv:
        load, out = _load_under_way(srv, bodies)
        old = srv.ranks()
        old[1].send_signal(signal.SIGSTOP)
        load.join(150)
        assert not load.is_alive(), "requests still waiting 150 s after a rank hung"
        codes = _answered(out["r"])
        assert set(codes) <= {200, 503} and 200 in codes, codes  # the failed step's requests run again (tests/test_recovery.py)
        for r in out["r"]:
            if r.status_code == 503:
                assert "worker rank failed" in r.json()["error"]["message"] or "not ready" in r.json()["error"]["message"]
        srv.wait_healthy()  # restarted
        import psutil

        _, alive = psutil.wait_procs(old, timeout=30)
        assert not alive, "ranks of the hung generation still alive"
        assert srv.client.post("/classify", json={"input": "after the restart"}).status_code == 200
        assert "most recent call first" in srv.output() and "gather" in srv.output(), srv.output()[-3000:]  # the peer's stack
        assert srv.metric("zp_worker_failures_total") == 1 and srv.metric("zp_sequences_retried_total") > 0
        # SIGTERM mid-load: accepted requests finish (200), later ones get 503, the server exits 0.
        load, out = _load_under_way(srv, bodies)
        workers = srv.ranks()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(120) == 0, srv.output()[-3000:]
        load.join(60)
        codes = [r.status_code if not isinstance(r, Exception) else "refused" for r in out["r"]]
        assert codes.count(200) > 0 and set(codes) <= {200, 503, "refused"}, codes
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, "ranks outlived the drained server"


def test_threshold_admission_and_prefix_reuse_answer_like_the_offline_model(checkpoint, offline):
    """--policy zero_prefill --cache-tokens: T measured by the ranks at start-up, per-rank queues, steps
    filled to T, prefix KV reused on the ranks. Answers stay those of the offline model (uncached); a
    lone request is released by --max-wait-ms."""
    tok = offline.tokenizer
    label_ids = [tok.encode(x, add_special_tokens=False)[0] for x in LABELS]
    args = ["--backend", "aot_eager", "--labels", *LABELS, "--policy", "zero_prefill", "--max-wait-ms", "200", "--cache-tokens", "2048"]
    with Server(checkpoint, *args) as srv:
        threshold = srv.client.get("/health").json()["threshold"]
        assert threshold["flops_per_step"] > 0 and threshold["t_gather_s"] > 0
        r = srv.client.post("/classify", json={"input": "a lone request"})  # under T: waits max-wait-ms, then runs
        assert r.status_code == 200
        assert srv.metric("zp_steps_below_threshold_total") == srv.metric("zp_steps_total") == 1
        prompts = [f"{i} " + f"prompt number {i} " * (1 + i % 7) for i in range(40)]  # each opens with its own number: no shared first block
        responses = _flood(srv, [("/classify", {"input": x}) for x in prompts], 40)
        for x, r in zip(prompts, responses):
            expected = torch.softmax(offline(x)[label_ids], -1).tolist()
            assert max(abs(a - b) for a, b in zip(r.json()["data"][0]["probs"], expected)) < 1e-4
        assert srv.metric("zp_rank_tokens_total", rank="0") > 0 and srv.metric("zp_rank_tokens_total", rank="1") > 0
        assert srv.metric("zp_prefix_hit_tokens_total") == 0  # no prompt shared a whole block (contract.BLOCK) so far
        # Shared prefixes: two groups, a first wave fills the ranks' caches, a second wave reuses them.
        groups = ["Read the passage and answer yes or no. " * 4, "The film was boring, too long and badly written. " * 3]
        for wave in range(2):
            prompts = [g + f"Question {wave} {i}: is it true?" for g in groups for i in range(6)]
            responses = _flood(srv, [("/classify", {"input": x}) for x in prompts], 12)
            for x, r in zip(prompts, responses):
                assert r.status_code == 200, r.text
                expected = torch.softmax(offline(x)[label_ids], -1).tolist()
                assert max(abs(a - b) for a, b in zip(r.json()["data"][0]["probs"], expected)) < 1e-4
        assert srv.metric("zp_prefix_hit_tokens_total") > 0


def test_ranks_exit_when_the_front_end_is_killed(checkpoint):
    import psutil

    # Collectives: the ranks' main threads may be blocked in an all-gather when the front end dies.
    with Server(checkpoint, "--backend", "eager", "--labels", *LABELS, "--transport", "collective") as srv:
        ranks = srv.ranks()
        assert len(ranks) == 2
        srv.proc.kill()  # SIGKILL: no drain, no goodbye to the ranks
        srv.proc.wait()
        _, alive = psutil.wait_procs(ranks, timeout=30)
        assert not alive, "ranks outlived a killed front end"


def test_external_ranks_join_and_failure_exits(checkpoint):
    import subprocess
    import sys

    from server_utils import free_port

    worker_port = free_port(consecutive=2)  # the store on it, the data socket on the next
    args = ["--backend", "eager", "--labels", *LABELS, "--external-ranks", "--worker-port", str(worker_port), "--on-worker-failure", "exit"]
    with Server(checkpoint, *args, wait=False) as srv:
        assert httpx_health(srv) == 503  # up, waiting for its ranks
        torchrun = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "zp_compile.rank", "--frontend", f"127.0.0.1:{worker_port}"],
            start_new_session=True,
        )  # fmt: skip
        try:
            srv.wait_healthy()
            assert srv.client.post("/classify", json={"input": ["joined", "ranks"]}).status_code == 200
            import psutil

            workers = [c for c in psutil.Process(torchrun.pid).children() if "torch.distributed.run" not in c.cmdline()]
            assert len(workers) == 2
            workers[0].kill()
            out = _flood(srv, [("/classify", {"input": "after the kill"})] * 4, 4, timeout=60)
            assert all(isinstance(r, Exception) or r.status_code == 503 for r in out), [r if isinstance(r, Exception) else (r.status_code, r.text[:300]) for r in out]
            assert srv.proc.wait(60) == 1  # --on-worker-failure exit
        finally:
            torchrun.kill()
            torchrun.wait()


def httpx_health(srv: Server, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"server exited with {srv.proc.returncode}:\n{srv.output()[-4000:]}")
        try:
            return httpx.get(srv.url + "/health", timeout=2).status_code
        except httpx.HTTPError:
            time.sleep(0.2)
    raise TimeoutError("the server never answered /health")
