"""An MMLU-shaped evaluation through lm-evaluation-harness: ``zp-compile serve`` against lm-eval's own
``hf`` backend on the unmodified model, in one process on the same cores.

    OMP_NUM_THREADS=1 python benchmarks/lm_eval_serve.py --json benchmarks/results-lm-eval-2rank-cpu.json

Task (written here, no downloads): ``--subjects`` x ``--questions-per-subject`` questions of random
one-token words with 4 options, MMLU's prompt format (``Question``, ``A. ..`` to ``D. ..``, ``Answer:``),
5-shot from each subject's own dev questions (``first_n``: every question of a subject shares its
few-shot prefix, as in MMLU), continuations `` A`` .. `` D``: 4 loglikelihood requests per question,
which share the question too. Model: the project's 82M benchmark shape (Qwen3-MoE, hidden 512, 6
layers, 32 experts top-4) in float32 with 1,024 positions and a tokenizer made locally.

1. served: ``zp-compile serve`` (``--nproc`` CPU ranks, Inductor, ``--policy`` with each rank's prefix
   cache ``--cache-tokens``) and lm-eval's ``local-completions`` (``--num-concurrent`` requests in
   flight); wall time of ``simple_evaluate``, prompt tokens/s, accuracy, the server's prefix hit rate.
2. hf: lm-eval's ``hf`` backend on the same checkpoint, float32, ``--hf-batch-size``, torch threads =
   the cores the ranks use together; wall time, tokens/s (the same prompt tokens), accuracy.
3. replay: lm-eval's exact request bodies (its own ``_encode_pair`` and ``_create_payload``) written as
   JSON lines and sent by ``zp-compile bench-serve --dataset-name custom`` with ``--num-concurrent`` in
   flight, for every ``--policies`` (a server each).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

TASK = """task: zp_mmlu_shaped
dataset_path: json
dataset_kwargs:
  data_files:
    dev: {dir}/dev.jsonl
    test: {dir}/test.jsonl
output_type: multiple_choice
fewshot_split: dev
test_split: test
num_fewshot: 5
fewshot_config:
  sampler: first_n
description: "The following are multiple choice questions (with answers).\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
NAME = "zp_mmlu_shaped"


def write_task(root: Path, tokenizer, subjects: int, per_subject: int, question_words: int, option_words: int, seed: int) -> None:
    """Per subject: 5 dev questions, then ``per_subject`` test questions; a subject's questions share
    its first word (so only the few-shot prefix is shared across a subject). The task's ``dev`` split
    holds every subject's dev questions and the few-shot sampler takes the first 5, so each subject gets
    its own task file (``{NAME}_{s}``), grouped under ``NAME``."""
    from zp_compile.tools.bench_serve import word_pool

    rng = random.Random(seed)
    pool = word_pool(tokenizer)
    words = lambda k: "".join(rng.choices(pool, k=k)).strip()  # noqa: E731 - k one-token words
    group = []
    for s in range(subjects):
        d = root / f"s{s}"
        d.mkdir(parents=True, exist_ok=True)
        rows = [{"question": f"{pool[s]}{words(question_words - 1)}?".strip(), "choices": [words(option_words) for _ in range(4)],
                 "answer": rng.randrange(4)} for _ in range(5 + per_subject)]  # fmt: skip
        (d / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
        (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[5:]))
        (root / f"{NAME}_{s}.yaml").write_text(TASK.format(dir=d).replace(f"task: {NAME}", f"task: {NAME}_{s}"))
        group.append(f"{NAME}_{s}")
    (root / f"{NAME}.yaml").write_text(f"group: {NAME}\ntask: {json.dumps(group)}\naggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n")


def evaluate(tasks, model: str, model_args: str) -> dict:
    """lm-eval's ``simple_evaluate`` timed; accuracy and every sample's loglikelihoods."""
    import lm_eval

    started = time.perf_counter()
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[NAME], task_manager=tasks, log_samples=True,
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)  # fmt: skip
    seconds = time.perf_counter() - started
    samples = {(t, s["doc_id"]): [float(r[0][0]) for r in s["resps"]] for t, rows in out["samples"].items() for s in rows}
    return {"seconds": seconds, "acc": out["results"][NAME]["acc,none"], "samples": samples}


def request_bodies(tasks, model_name: str, base_url: str, tokenizer_dir: str) -> list[dict]:
    """lm-eval's loglikelihood requests for the task, as its ``local-completions`` backend builds them."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import get_task_dict

    lm = LocalCompletionsAPI(model=model_name, base_url=base_url, tokenizer=tokenizer_dir, tokenizer_backend="huggingface", max_length=1024)
    bodies = []
    for task in get_task_dict([NAME], tasks).values():
        for t in (task.values() if isinstance(task, dict) else [task]):
            t.build_all_requests(rank=0, world_size=1)
            for inst in t.instances:
                context, continuation = inst.args
                ctx, cont = lm._encode_pair(context, continuation)
                bodies.append(lm._create_payload(lm.create_message([(ctx + cont)[-(lm.max_length + 1) :]]), generate=False))
    return bodies


def counters(client) -> tuple[float, float]:
    """The server's prefix-hit tokens and steps so far."""
    from zp_compile.tools.bench_serve import metric_sum, parse_metrics

    metrics = parse_metrics(client.get("/metrics").text)
    return metric_sum(metrics, "zp_prefix_hit_tokens_total"), metric_sum(metrics, "zp_steps_total")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--questions-per-subject", type=int, default=32)
    parser.add_argument("--question-words", type=int, default=40)
    parser.add_argument("--option-words", type=int, default=6)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--backend", default="inductor", help="the server's compile backend")
    parser.add_argument("--policy", default="zero_prefill")
    parser.add_argument("--fill", default="threshold", choices=["threshold", "queue"], help="the server's --fill")
    parser.add_argument("--policies", nargs="+", default=["fifo", "round_robin", "least_flops", "cache_aware", "zero_prefill"],
                        help="the replay's policies")  # fmt: skip
    parser.add_argument("--cache-tokens", type=int, default=8192)
    parser.add_argument("--num-concurrent", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--threshold-tokens", type=int, default=4096,
                        help="T = the FLOPs of this many tokens in 512-token requests (0: measured by the ranks at start-up)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["served", "hf", "replay"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from lm_eval.tasks import TaskManager
    from server_utils import Server
    from throughput import MODEL
    from zp_compile.costmodel.flops import flops_per_request
    from zp_compile.costmodel.spec import spec_from_config
    from zp_compile.models import tiny_with_tokenizer
    from zp_compile.tools import bench_serve

    ckpt = Path(tempfile.gettempdir()) / "zp-bench-qwen3moe-82m-fp32-1k"
    if not (ckpt / "model.safetensors").exists():
        shape = {k: v for k, v in MODEL.items() if k != "vocab"}  # the tokenizer made locally sets the vocabulary
        tiny_with_tokenizer("qwen3_moe", ckpt, dtype=torch.float32, head_dim=64, intermediate_size=1024, max_position_embeddings=1024, **shape)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    root = Path(tempfile.mkdtemp(prefix="zp-lm-eval-"))
    write_task(root, tokenizer, args.subjects, args.questions_per_subject, args.question_words, args.option_words, args.seed)
    os.environ["HF_DATASETS_CACHE"] = str(root / "datasets")
    tasks = TaskManager(include_path=str(root))
    T = args.threshold_tokens / 512 * flops_per_request(spec_from_config(AutoConfig.from_pretrained(ckpt)), 512) if args.threshold_tokens else None
    flags = lambda policy: ["--served-model-name", "m", "--nproc", str(args.nproc), "--policy", policy, "--cache-tokens", str(args.cache_tokens),  # noqa: E731
                            "--backend", args.backend, "--max-waiting", "100000", "--log-level", "warning", "--labels", " yes", " no",
                            "--fill", args.fill, *(["--threshold-flops", str(T)] if T else [])]  # fmt: skip
    bodies = request_bodies(tasks, "m", "http://unused/v1/completions", str(ckpt))
    prompt_tokens = sum(len(b["prompt"][0]) for b in bodies)
    questions = args.subjects * args.questions_per_subject
    print(f"{questions} questions x 4 choices: {len(bodies)} requests, {prompt_tokens:,} prompt tokens "
          f"({prompt_tokens / len(bodies):.0f} per request)", flush=True)  # fmt: skip
    result = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "requests": len(bodies), "prompt_tokens": prompt_tokens}

    served = hf = None
    if "served" not in args.skip:
        with Server(ckpt, *flags(args.policy)) as srv:
            hits_before, steps_before = counters(srv.client)
            served = evaluate(tasks, "local-completions", f"model=m,base_url={srv.url}/v1/completions,tokenizer={ckpt},"
                                                          f"tokenizer_backend=huggingface,num_concurrent={args.num_concurrent},max_length=1024")  # fmt: skip
            hits, steps = (after - before for after, before in zip(counters(srv.client), (hits_before, steps_before)))
        result["served"] = {"seconds": served["seconds"], "acc": served["acc"], "tokens_per_s": prompt_tokens / served["seconds"],
                            "prefix_hit_rate": hits / prompt_tokens, "policy": args.policy, "fill": args.fill, "steps": steps}  # fmt: skip
        print(f"served ({args.nproc} ranks, {args.policy}, lm-eval local-completions, {args.num_concurrent} concurrent): "
              f"{served['seconds']:.1f} s, {prompt_tokens / served['seconds']:,.0f} prompt tok/s, acc {served['acc']:.4f}, "
              f"prefix hit rate {hits / prompt_tokens:.3f}, {steps:.0f} steps (--fill {args.fill})", flush=True)  # fmt: skip
    if "hf" not in args.skip:
        torch.set_num_threads(args.nproc * int(os.environ.get("OMP_NUM_THREADS", "1")))
        hf = evaluate(tasks, "hf", f"pretrained={ckpt},dtype=float32,device=cpu,batch_size={args.hf_batch_size},max_length=1024")
        result["hf"] = {"seconds": hf["seconds"], "acc": hf["acc"], "tokens_per_s": prompt_tokens / hf["seconds"], "threads": torch.get_num_threads()}
        print(f"hf backend ({torch.get_num_threads()} threads, batch {args.hf_batch_size}): {hf['seconds']:.1f} s, "
              f"{prompt_tokens / hf['seconds']:,.0f} prompt tok/s, acc {hf['acc']:.4f}", flush=True)  # fmt: skip
    if served and hf:
        diffs = [abs(a - b) for k in hf["samples"] for a, b in zip(served["samples"][k], hf["samples"][k])]
        result["speedup"] = hf["seconds"] / served["seconds"]
        result["max_loglikelihood_diff"] = max(diffs)
        result["same_accuracy"] = served["acc"] == hf["acc"]
        print(f"served / hf: {result['speedup']:.2f}x faster; accuracy {'identical' if result['same_accuracy'] else 'DIFFERENT'}; "
              f"max |loglikelihood difference| {max(diffs):.2e} over {len(diffs)} requests", flush=True)  # fmt: skip
    if "replay" not in args.skip:
        path = root / "lm-eval-requests.jsonl"
        path.write_text("".join(json.dumps(b) + "\n" for b in bodies))
        result["replay"] = []
        for policy in args.policies:
            with Server(ckpt, *flags(policy)) as srv:
                trace = bench_serve.custom_dataset(tokenizer, path, model="m")
                r = asyncio.run(bench_serve.run(srv.url, "/v1/completions", trace, max_concurrency=args.num_concurrent))
                s = r.server
                row = {"policy": policy, "completed": r.completed, "failed": r.failed, "seconds": r.duration_s, "req_per_s": r.request_throughput,
                       "input_tok_per_s": r.input_throughput, "p50_ms": r.latency_ms["p50"], "p99_ms": r.latency_ms["p99"],
                       "prefix_hit_rate": s.prefix_hit_rate if s else None, "steps": s.steps if s else None}  # fmt: skip
                result["replay"].append(row)
                print(f"replay {policy:>13s}: {r.completed}/{r.num_requests} ok in {r.duration_s:.1f} s, {r.input_throughput:,.0f} tok/s, "
                      f"p50 {r.latency_ms['p50']:.0f} ms, p99 {r.latency_ms['p99']:.0f} ms, hit rate {row['prefix_hit_rate']:.3f}", flush=True)  # fmt: skip
    if args.json:
        out = Path(args.json)
        results = json.loads(out.read_text()) if out.exists() else []
        results.append({**result, "when": time.strftime("%Y-%m-%d %H:%M")})
        out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
