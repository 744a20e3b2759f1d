"""The clients users already run, against a real ``zp-compile serve`` (2 CPU ranks, threshold routing
with the prefix cache): the ``openai`` SDK's completions with ``echo``, the ``cohere`` SDK's v2 rerank,
and lm-evaluation-harness itself on a small multiple-choice task written here (no downloads), whose
every loglikelihood must equal the unmodified Hugging Face model's and whose accuracy must equal
lm-eval's own ``hf`` backend's on the same model and task."""

from __future__ import annotations

import json
import re

import httpx
import pytest
import torch

from server_utils import Server

pytestmark = pytest.mark.xdist_group("serve")  # one server at a time, on one worker (pyproject.toml)

MODEL = "tiny-moe"
TOL = 1e-4  # fp32 logprobs: the packed, sharded forward against the unmodified model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from zp_compile.models import tiny_with_tokenizer

    return tiny_with_tokenizer("qwen3_moe", tmp_path_factory.mktemp("clients-tiny"), layers=2, num_experts=6, max_position_embeddings=512)


@pytest.fixture(scope="module")
def server(checkpoint):
    # Eager: the clients are what is tested; the compiled packed path with the prefix cache is
    # tests/test_server.py's (threshold admission) and tests/test_kv_cache.py's.
    args = ["--backend", "eager", "--served-model-name", MODEL, "--policy", "zero_prefill", "--cache-tokens", "4096",
            "--threshold-flops", "1e6", "--labels", " yes", " no"]  # fmt: skip
    with Server(checkpoint, *args) as srv:
        yield srv


@pytest.fixture(scope="module")
def hf(checkpoint):
    """The unmodified model and its tokenizer: log-probabilities after every position of one prompt [n, V]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()

    def every_position(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)

    every_position.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return every_position


def prefix_hits(server) -> float:
    text = server.client.get("/metrics").text
    return sum(float(v) for v in re.findall(r"^zp_prefix_hit_tokens_total(?:\{[^}]*\})? (\S+)$", text, re.M))


def test_openai_sdk_completions_with_echo(server, hf):
    """``client.completions.create`` with ``echo``, ``logprobs`` and batched token-id prompts, as the
    OpenAI SDK sends and parses it: the prompt's logprobs are the model's; a second request on the same
    prefix reads it from the rank's cache (prefix hits grow) and answers the same."""
    from openai import OpenAI

    tok = hf.tokenizer
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    shared = tok.encode("Question: which of these is a fruit? Choices: a stone, an apple, a car, a cloud. Answer:")
    prompts = [shared + tok.encode(c, add_special_tokens=False) for c in (" an apple", " a stone")]
    assert len(shared) > 32
    first = client.completions.create(model=MODEL, prompt=prompts, echo=True, logprobs=2, max_tokens=1, temperature=0)
    for choice, ids in zip(sorted(first.choices, key=lambda c: c.index), prompts):
        lp = hf(ids)
        assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.tokens) == len(ids) + 1
        want = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
        assert choice.logprobs.token_logprobs[1:-1] == pytest.approx(want, abs=TOL)
        assert max(choice.logprobs.top_logprobs[-1].values()) == pytest.approx(lp[-1].max().item(), abs=TOL)
    assert first.usage.prompt_tokens == sum(map(len, prompts)) and first.id.startswith("cmpl-")
    before = prefix_hits(server)
    again = client.completions.create(model=MODEL, prompt=prompts[:1], echo=True, logprobs=2, max_tokens=1, temperature=0)
    assert prefix_hits(server) >= before + 32  # the shared prefix's blocks, cached with their readouts
    assert again.choices[0].logprobs.token_logprobs == pytest.approx(first.choices[0].logprobs.token_logprobs, abs=TOL)
    text = client.completions.create(model=MODEL, prompt="The sky is", echo=True, max_tokens=0)
    assert text.choices[0].text == "The sky is" and text.usage.completion_tokens == 0


def test_cohere_sdk_rerank(server, hf):
    """``cohere.ClientV2(base_url=...).rerank`` against ``/v2/rerank``: its results parse, ordered by
    relevance, cut at ``top_n``, with the scores ``/score`` gives the same pairs."""
    import cohere

    client = cohere.ClientV2(api_key="unused", base_url=server.url)
    query, docs = "weather today", ["sunny and warm", "the capital of France", "heavy rain", "water boils at 100 C"]
    out = client.rerank(model=MODEL, query=query, documents=docs, top_n=3)
    assert len(out.results) == 3
    scores = [r.relevance_score for r in out.results]
    assert scores == sorted(scores, reverse=True)
    direct = httpx.post(server.url + "/v1/score", json={"queries": query, "documents": docs}).json()["data"]
    assert [r.relevance_score for r in out.results] == pytest.approx([direct[r.index]["score"] for r in out.results], abs=1e-6)
    everything = client.rerank(model=MODEL, query=query, documents=docs)
    assert sorted(r.index for r in everything.results) == [0, 1, 2, 3]


QUESTIONS = [
    ("Which animal barks?", ["a dog", "a fish", "a stone", "a tree"], 0),
    ("What color is the sky on a clear day?", ["green", "blue", "red", "black"], 1),
    ("How many legs does a cat have?", ["two", "six", "four", "none"], 2),
    ("Which of these is a fruit?", ["a car", "a cloud", "a chair", "an apple"], 3),
    ("What do bees make?", ["honey", "milk", "bread", "glass"], 0),
    ("Where do fish live?", ["in trees", "in water", "in fire", "in the sky"], 1),
    ("What is ice made of?", ["sand", "metal", "water", "wood"], 2),
    ("Which one is a day of the week?", ["June", "Winter", "Noon", "Monday"], 3),
]

TASK = """task: zp_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {dir}/train.jsonl
    test: {dir}/test.jsonl
output_type: multiple_choice
training_split: train
fewshot_split: train
test_split: test
num_fewshot: 2
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_local_completions_equals_the_hf_backend(server, checkpoint, tmp_path, monkeypatch):
    """lm-evaluation-harness's ``local-completions`` backend against the server (2-shot, 4 choices: a
    shared few-shot prefix for every question, one question shared by its choices) gets every
    loglikelihood the unmodified model gives within the fp32 tolerance, and the same accuracy as lm-eval's
    ``hf`` backend on the same model and task; the prefix cache serves the shared prefixes."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[3:]))
    (tmp_path / "zp_tiny_mc.yaml").write_text(TASK.format(dir=tmp_path))
    tasks = TaskManager(include_path=str(tmp_path))

    def evaluate(model: str, model_args: str) -> tuple[float, list[list[float]]]:
        out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["zp_tiny_mc"], task_manager=tasks, log_samples=True,
                                      random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)  # fmt: skip
        samples = sorted(out["samples"]["zp_tiny_mc"], key=lambda s: s["doc_id"])
        return out["results"]["zp_tiny_mc"]["acc,none"], [[float(r[0][0]) for r in s["resps"]] for s in samples]

    before = prefix_hits(server)
    served_acc, served = evaluate("local-completions", f"model={MODEL},base_url={server.url}/v1/completions,tokenizer={checkpoint},"
                                                       "tokenizer_backend=huggingface,num_concurrent=4,max_length=512")  # fmt: skip
    hf_acc, offline = evaluate("hf", f"pretrained={checkpoint},dtype=float32,device=cpu,batch_size=4")
    assert len(served) == len(QUESTIONS) - 3 and all(len(x) == 4 for x in served)
    assert [x for row in served for x in row] == pytest.approx([x for row in offline for x in row], abs=TOL)
    assert served_acc == hf_acc
    assert prefix_hits(server) > before  # the few-shot prefix, read from the cache or a batch-mate
