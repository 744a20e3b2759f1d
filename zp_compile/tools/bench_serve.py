"""``zp-compile bench-serve``: a load generator for a running ``zp-compile serve``, after ``vllm bench serve``
and ``sglang.bench_serving`` (their flag names, their Poisson arrivals, their report's layout).

- datasets (pure functions of a tokenizer and a seed) give ``(endpoint body, prompt tokens)`` pairs:
  ``random_dataset`` (vLLM's ``random``), ``shared_prefix_dataset`` (sglang's ``generated-shared-prefix``)
  and ``mix_dataset`` (``workloads.paper_mix``'s lengths and shared prefixes, as text); ``custom_dataset``
  reads bodies from a JSON-lines file (vLLM's ``custom``), such as lm-evaluation-harness's requests;
- ``run`` sends them (Poisson arrivals, optional concurrency cap) and scrapes ``GET /metrics`` before and
  after, for the server's own figures over the run (steps, FLOPs imbalance, tokens per rank).

Prompts are text made of words that are each exactly one token of the server's tokenizer (a space and
letters: byte-level BPE pre-tokenizes every `` word`` apart), so a prompt of N tokens is N tokens as the
server counts them (``len(tokenizer.encode(text))``, special tokens included). Every dataset re-encodes
what it built and refuses a tokenizer that breaks this; the report compares each answer's
``usage.prompt_tokens`` with the count sent (``token_mismatches``).

Every request gets exactly one outcome (an HTTP status, or the client error that stopped it); nothing is
dropped from the report. The ``/metrics`` deltas are the server's: another client's traffic during the
run is counted in them too.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

ENDPOINTS = ("/classify", "/score", "/v1/completions")  # the built datasets' endpoints (a custom dataset may use any)

Requests = list[tuple[dict, int]]  # (endpoint body, prompt tokens as the server counts them)


# ---- datasets -----------------------------------------------------------------------------------
def word_pool(tokenizer) -> list[str]:
    """Words (a space and ASCII letters) that the tokenizer encodes as exactly one token, by token id."""
    decoded = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    words = sorted({" " + s.strip() for s in decoded if re.fullmatch(r"\s?[A-Za-z]+", s)})
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    pool = sorted((x[0], w) for w, x in zip(words, ids) if len(x) == 1)
    if not pool:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no single-token ' word' tokens to build prompts from")
    return [w for _, w in pool]


def _body(endpoint: str, head: str, tail: str, model: str | None) -> dict:
    """One request scoring the prompt ``head + tail``. ``/score`` takes ``head`` as the query and ``tail``
    as the item; the server joins their tokens (``encode(query) + encode(item, no specials)``), which is
    the prompt's tokens because both halves are whole words."""
    if endpoint == "/classify":
        body = {"input": head + tail}
    elif endpoint == "/score":
        body = {"queries": head, "items": tail}
    elif endpoint == "/v1/completions":
        body = {"prompt": head + tail, "max_tokens": 1}
    else:
        raise ValueError(f"endpoint {endpoint!r} is not one of {', '.join(ENDPOINTS)}")
    return body if model is None else {"model": model, **body}


def _finish(tokenizer, prompts: list[tuple[list[str], list[str]]], endpoint: str, model: str | None) -> Requests:
    """Bodies of (head words, tail words) prompts, their token counts checked by encoding them."""
    special = tokenizer.num_special_tokens_to_add()
    texts = [("".join(h), "".join(t)) for h, t in prompts]
    expected = [special + len(h) + len(t) for h, t in prompts]
    got = [len(x) for x in tokenizer([h + t for h, t in texts])["input_ids"]] if texts else []
    bad = [i for i, (e, g) in enumerate(zip(expected, got)) if e != g]
    if bad:
        i = bad[0]
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} does not keep ' word' tokens apart: prompt {i} was built "
                         f"from {expected[i]} tokens and encodes to {got[i]}; exact prompt lengths need a byte-level BPE tokenizer")  # fmt: skip
    return [(_body(endpoint, h, t, model), n) for (h, t), n in zip(texts, expected)]


def _prompt_words(tokenizer, tokens: int, what: str) -> int:
    """Words for a prompt of ``tokens`` tokens as the server counts them (the tokenizer's specials included)."""
    special = tokenizer.num_special_tokens_to_add()
    if tokens <= special:
        raise ValueError(f"{what} is {tokens} tokens; the tokenizer adds {special} special token(s), so prompts need at least {special + 1}")
    return tokens - special


def random_dataset(tokenizer, n: int, input_len: int, range_ratio: float = 0.0, *, seed: int = 0,
                   endpoint: str = "/classify", model: str | None = None) -> Requests:  # fmt: skip
    """``n`` prompts of random words, lengths uniform in [input_len * (1 - r), input_len * (1 + r)] (vLLM's
    ``random`` dataset and its ``--random-range-ratio``; r = 0: every prompt exactly ``input_len`` tokens)."""
    if n < 0 or input_len < 1 or not 0 <= range_ratio < 1:
        raise ValueError(f"need num prompts >= 0, input len >= 1 and 0 <= range ratio < 1; got {n}, {input_len}, {range_ratio}")
    rng = random.Random(seed)
    pool = word_pool(tokenizer)
    low, high = int(input_len * (1 - range_ratio)), int(input_len * (1 + range_ratio))
    _prompt_words(tokenizer, max(1, low), "the shortest random prompt")
    prompts = []
    for _ in range(n):
        words = rng.choices(pool, k=_prompt_words(tokenizer, rng.randint(max(1, low), high), "a random prompt"))
        prompts.append((words[:1], words[1:]))  # /score: the first word is the query
    return _finish(tokenizer, prompts, endpoint, model)


def shared_prefix_dataset(tokenizer, num_groups: int, prompts_per_group: int, system_prompt_len: int, question_len: int, *,
                          seed: int = 0, endpoint: str = "/classify", model: str | None = None) -> Requests:  # fmt: skip
    """sglang's ``generated-shared-prefix``: ``num_groups`` system prompts of ``system_prompt_len`` tokens, each
    followed by ``prompts_per_group`` questions of ``question_len`` tokens; arrival order shuffled.

    A group shares exactly its prefix: system prompts start with different words, and a group's questions
    start with different words, so no two prompts share more than their group's prefix (specials included).
    """
    if min(num_groups, prompts_per_group, system_prompt_len, question_len) < 1:
        raise ValueError(f"need every shared-prefix size >= 1; got {num_groups} groups x {prompts_per_group} prompts, "
                         f"system prompt {system_prompt_len}, question {question_len} tokens")  # fmt: skip
    rng = random.Random(seed)
    pool = word_pool(tokenizer)
    for count, what in ((num_groups, "--gsp-num-groups"), (prompts_per_group, "--gsp-prompts-per-group")):
        if count > len(pool):
            raise ValueError(f"{what} {count} exceeds the {len(pool)} one-token words of the tokenizer: "
                             "prefixes could not start with different words")  # fmt: skip
    system_words = _prompt_words(tokenizer, system_prompt_len, "--gsp-system-prompt-len")
    prompts = []
    for first in rng.sample(pool, num_groups):
        system = [first, *rng.choices(pool, k=system_words - 1)]
        for q in rng.sample(pool, prompts_per_group):
            prompts.append((system, [q, *rng.choices(pool, k=question_len - 1)]))
    rng.shuffle(prompts)
    return _finish(tokenizer, prompts, endpoint, model)


def mix_dataset(tokenizer, n: int, max_model_len: int, *, seed: int = 0, endpoint: str = "/classify", model: str | None = None) -> Requests:
    """``workloads.paper_mix``'s requests as text: its lengths, clipped to ``max_model_len``, and its shared
    prefixes. Its token ids index the word pool, so prompts of a group share exactly the prefix's words."""
    from .workloads import paper_mix

    pool = word_pool(tokenizer)
    offset = 3  # paper_mix draws ids from [3, vocab): 0..2 are left for pad/bos/eos
    context = _prompt_words(tokenizer, max_model_len, "the server's max_model_len")
    prompts = []
    for r in paper_mix(n, seed=seed, vocab=len(pool) + offset, max_context=context):
        words = [pool[t - offset] for t in r.token_ids]
        cut = r.prefix_len or 1  # /score: the shared prefix (or the first word) is the query
        prompts.append((words[:cut], words[cut:]))
    return _finish(tokenizer, prompts, endpoint, model)


# ---- arrivals -----------------------------------------------------------------------------------
def custom_dataset(tokenizer, path, *, model: str | None = None) -> Requests:
    """Request bodies as given, one JSON object per line of ``path`` (vLLM's ``custom`` dataset, here the
    endpoint's whole body: e.g. lm-evaluation-harness's loglikelihood requests, recorded). A body's prompt
    tokens are its token ids, or its text encoded by ``tokenizer``; ``model`` replaces the body's."""
    import json
    from pathlib import Path

    out = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i + 1}: not a JSON object: {e}") from None
        inputs = next((body[k] for k in ("prompt", "input", "queries") if k in body), None) if isinstance(body, dict) else None
        if inputs is None:
            raise ValueError(f"{path}:{i + 1}: a body needs prompt, input or queries")
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        tokens = sum(len(x) if isinstance(x, list) else len(tokenizer.encode(x)) for x in inputs)
        out.append(({**body, "model": model} if model is not None else body, tokens))
    return out


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send time of each request, seconds after the first (vLLM's ``get_request``): gaps are gamma-distributed
    with mean 1 / rate (burstiness 1: exponential, a Poisson process); rate inf: all at once."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"need request rate > 0 and burstiness > 0; got {rate}, {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        if i:
            t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        out.append(t)
    return out


# ---- server metrics -----------------------------------------------------------------------------
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus text exposition: (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def metric_sum(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float | None:
    """Growth of the sum of ``name``'s samples whose labels include ``labels``; None: the server does not export it."""
    if not any(k[0] == name for k in after):
        return None
    return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


@dataclass
class ServerFigures:
    """Deltas of the server's ``/metrics`` over the run."""

    steps: int
    mean_imbalance: float | None  # mean over the run's steps of max-rank FLOPs / mean-rank FLOPs
    rank_tokens: dict[str, int]  # rank -> prompt tokens scored
    prompt_tokens: int  # accepted for scoring
    requests: dict[str, int]  # status -> requests answered on the benchmarked route
    prefix_hit_rate: float | None  # prompt tokens served from a prefix cache / prompt tokens; None: not exported
    below_threshold_share: float | None  # steps below the saturation threshold / steps; None: not exported


def server_figures(before: str, after: str, route: str) -> ServerFigures:
    """The figures of one run from two ``/metrics`` scrapes, before and after."""
    b, a = parse_metrics(before), parse_metrics(after)
    d = lambda name, **labels: _delta(b, a, name, **labels) or 0  # noqa: E731
    ranks = sorted({dict(ls)["rank"] for n, ls in a if n == "zp_rank_tokens_total"}, key=int)
    statuses = sorted({dict(ls)["status"] for n, ls in a if n == "zp_requests_total" and dict(ls).get("route") == route})
    requests = {s: round(d("zp_requests_total", route=route, status=s)) for s in statuses}
    return ServerFigures(
        steps=round(d("zp_steps_total")),
        mean_imbalance=_ratio(_delta(b, a, "zp_step_flops_imbalance_sum"), _delta(b, a, "zp_step_flops_imbalance_count")),
        rank_tokens={r: round(d("zp_rank_tokens_total", rank=r)) for r in ranks},
        prompt_tokens=round(d("zp_prompt_tokens_total")),
        requests={s: n for s, n in requests.items() if n},
        prefix_hit_rate=_ratio(_delta(b, a, "zp_prefix_hit_tokens_total"), _delta(b, a, "zp_prompt_tokens_total")),
        below_threshold_share=_ratio(_delta(b, a, "zp_steps_below_threshold_total"), _delta(b, a, "zp_steps_total")),
    )


# ---- the run ------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What became of one request."""

    status: int | None  # HTTP status; None: no answer (``error`` says why)
    latency_s: float  # send to answer (or to the client error)
    expected_tokens: int  # prompt tokens sent, as the dataset counted them
    prompt_tokens: int | None = None  # usage.prompt_tokens of a 200 answer
    error: str | None = None  # the server's error message, or the client exception

    @property
    def key(self) -> str:
        """The bucket this outcome is counted in: the status code, or the client exception's name."""
        return str(self.status) if self.status is not None else (self.error or "error").split(":")[0]


@dataclass
class BenchResult:
    endpoint: str
    num_requests: int
    completed: int  # answered 200
    failed: dict[str, int]  # status code or client exception -> requests
    duration_s: float
    request_throughput: float  # completed / duration
    total_input_tokens: int  # sum of usage.prompt_tokens over completed requests
    input_throughput: float
    token_mismatches: int  # completed requests whose usage.prompt_tokens differs from the tokens sent
    latency_ms: dict[str, float | None]  # mean, p50, p90, p99 over completed requests
    server: ServerFigures | None  # None: /metrics could not be scraped
    outcomes: list[Outcome] = field(repr=False)


def latency_stats(latencies_s: list[float]) -> dict[str, float | None]:
    """Mean and linearly interpolated percentiles (numpy's default, as vLLM's report), in ms."""
    if not latencies_s:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ms = np.asarray(latencies_s) * 1e3
    return {"mean": float(ms.mean()), **{f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)}}


def summarize(endpoint: str, outcomes: list[Outcome], duration_s: float, server: ServerFigures | None = None) -> BenchResult:
    ok = [o for o in outcomes if o.status == 200]
    tokens = sum(o.prompt_tokens or 0 for o in ok)
    rate = lambda x: x / duration_s if duration_s > 0 else 0.0  # noqa: E731
    return BenchResult(
        endpoint=endpoint, num_requests=len(outcomes), completed=len(ok),
        failed=dict(sorted(Counter(o.key for o in outcomes if o.status != 200).items())),
        duration_s=duration_s, request_throughput=rate(len(ok)), total_input_tokens=tokens, input_throughput=rate(tokens),
        token_mismatches=sum(o.prompt_tokens != o.expected_tokens for o in ok),
        latency_ms=latency_stats([o.latency_s for o in ok]), server=server, outcomes=outcomes,
    )  # fmt: skip


async def _scrape(client, base_url: str) -> str | None:
    try:
        async with client.get(base_url + "/metrics") as r:
            return await r.text() if r.status == 200 else None
    except Exception:  # noqa: BLE001 - a server without /metrics still gets benchmarked
        return None


async def _send(client, url: str, body: dict, tokens: int) -> Outcome:
    start = time.perf_counter()
    try:
        async with client.post(url, json=body) as r:
            status, raw = r.status, await r.read()
    except Exception as e:  # noqa: BLE001 - any failure is this request's one outcome, never lost from the report
        return Outcome(None, time.perf_counter() - start, tokens, error=f"{type(e).__name__}: {e}")
    latency = time.perf_counter() - start
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    answer = answer if isinstance(answer, dict) else {}
    if status == 200:
        usage = answer.get("usage")
        return Outcome(200, latency, tokens, prompt_tokens=usage.get("prompt_tokens") if isinstance(usage, dict) else None)
    error = answer.get("error")
    return Outcome(status, latency, tokens, error=error.get("message") if isinstance(error, dict) else raw[:200].decode(errors="replace"))


async def run(base_url: str, endpoint: str, requests: Requests, *, request_rate: float = math.inf, burstiness: float = 1.0,
              max_concurrency: int | None = None, seed: int = 0, api_key: str | None = None, timeout: float = 3600.0) -> BenchResult:  # fmt: skip
    """Send ``requests`` to ``base_url + endpoint`` at their arrival times and report; ``/metrics`` is
    scraped before the first and after the last answer."""
    # aiohttp, the client of vLLM's serving benchmark: on the 2-core machine httpx's AsyncClient took
    # 1.3-1.5 s of CPU for 512 requests where aiohttp took 0.5 s (benchmarks/serve_throughput.py), CPU the
    # server's ranks lack; replaying lm-eval's 800 requests at 1,024 in flight went from 25-33 s to 10-16 s.
    import aiohttp

    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max concurrency must be at least 1, got {max_concurrency}")
    offsets = arrival_offsets(len(requests), request_rate, burstiness, seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base_url = base_url.rstrip("/")
    url = base_url + endpoint
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else nullcontext()
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0)  # 0: no cap on connections
    session = aiohttp.ClientSession(headers=headers, connector=connector, timeout=aiohttp.ClientTimeout(total=timeout))
    async with session as client:

        async def one(body: dict, tokens: int) -> Outcome:
            async with limit:  # arrivals keep their schedule; the cap delays sends (vLLM's --max-concurrency)
                return await _send(client, url, body, tokens)

        before = await _scrape(client, base_url)
        start = time.perf_counter()
        tasks = []
        for (body, tokens), at in zip(requests, offsets):
            wait = start + at - time.perf_counter()  # absolute times: sleeping late does not shift later arrivals
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(body, tokens)))
        outcomes = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
        after = await _scrape(client, base_url)
    server = server_figures(before, after, endpoint) if before is not None and after is not None else None
    return summarize(endpoint, outcomes, duration, server)


# ---- the report ---------------------------------------------------------------------------------
def format_result(r: BenchResult) -> str:
    """vLLM's table: a 40-character label column."""
    row = lambda label, value: f"{label:<40} {value}"  # noqa: E731
    num = lambda x, fmt=".2f": "n/a" if x is None else format(x, fmt)  # noqa: E731
    rule = lambda title="", c="-": f"{title:{c}^50}"  # noqa: E731
    lines = [
        rule(" Serving Benchmark Result ", "="),
        row("Endpoint:", r.endpoint),
        row("Successful requests:", r.completed),
        row("Failed requests:", r.num_requests - r.completed),
        *(row(f"  {key}:", n) for key, n in r.failed.items()),
        row("Benchmark duration (s):", num(r.duration_s)),
        row("Total input tokens:", r.total_input_tokens),
        row("Request throughput (req/s):", num(r.request_throughput)),
        row("Input token throughput (tok/s):", num(r.input_throughput)),
        row("Prompt token count mismatches:", r.token_mismatches),
        rule("End-to-end Latency"),
        *(row(f"{name} E2EL (ms):", num(r.latency_ms[key])) for name, key in (("Mean", "mean"), ("Median", "p50"), ("P90", "p90"), ("P99", "p99"))),
        rule("Server (/metrics deltas)"),
    ]
    s = r.server
    if s is None:
        lines.append(row("Server metrics:", "n/a (GET /metrics failed)"))
    else:
        lines += [
            row("Steps run:", s.steps),
            row("Mean step FLOPs imbalance (max/mean):", num(s.mean_imbalance, ".3f")),
            *(row(f"Rank {rank} tokens:", n) for rank, n in s.rank_tokens.items()),
            row("Prefix hit rate (tokens):", num(s.prefix_hit_rate, ".2%")),
            row("Steps below saturation threshold:", num(s.below_threshold_share, ".2%")),
        ]
    lines.append("=" * 50)
    return "\n".join(lines)
