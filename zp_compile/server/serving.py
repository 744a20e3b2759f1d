"""What each task route does: turn a validated body into sequences, queue them, shape the answers.

One function per route (``classify``, ``score``, ``rerank``, ``completions``), each taking the server's
state, the body and the request (for its disconnect), as vLLM's ``serving_*.py`` do for its routers.
"""

from __future__ import annotations

import json
import math

from fastapi import Request

from ..contract import Sample, Wants
from . import protocol as p
from .engine import ServerState
from .errors import ApiError


def softmax(logprobs: list[float]) -> list[float]:
    top = max(logprobs)
    e = [math.exp(x - top) for x in logprobs]
    return [x / sum(e) for x in e]


def usage(ids: list[list[int]], completion: int = 0) -> p.Usage:
    n = sum(len(x) for x in ids)
    return p.Usage(prompt_tokens=n, total_tokens=n + completion, completion_tokens=completion)


async def classify(s: ServerState, body: p.ClassifyRequest, request: Request) -> p.ClassifyResponse:
    s.inputs.check_model(body.model)
    labels = s.inputs.labels_for(None, param="input")
    ids = s.inputs.encode(body.input, "input", body.truncate_prompt_tokens)
    outs = await s.submit(request, s.sequences(ids, Wants(tokens=labels)))
    data = []
    for i, out in enumerate(outs):
        probs = softmax(out.tokens)
        best = max(range(len(probs)), key=probs.__getitem__)
        data.append(p.ClassifyData(index=i, label=s.settings.labels[best], probs=probs, num_classes=len(probs)))
    return p.ClassifyResponse(model=s.settings.model_name, data=data, usage=usage(ids))


async def _pair_scores(s: ServerState, request: Request, queries, items, label_token_ids, apply_softmax: bool, item_first: bool,
                       truncate: int | None, items_param: str) -> tuple[list[list[int]], list[list[float]]]:  # fmt: skip
    """Each (query, item) pair's label probabilities: one query for every item, or one per item."""
    queries = [queries] if isinstance(queries, str) else queries
    items = [items] if isinstance(items, str) else items
    s.inputs.check_count(items, items_param)
    if not queries:
        raise ApiError(400, "queries is empty", param="queries")
    if len(queries) not in (1, len(items)):
        raise ApiError(400, f"{len(queries)} queries for {len(items)} items: give one query, or one per item", param="queries")
    labels = s.inputs.labels_for(label_token_ids)
    tok = s.tokenizer
    ids = []
    for i, item in enumerate(items):
        q = queries[0] if len(queries) == 1 else queries[i]
        first, second = (item, q) if item_first else (q, item)
        ids.append(s.inputs.check_ids(tok.encode(first) + tok.encode(second, add_special_tokens=False), f"{items_param}[{i}]", truncate))
    outs = await s.submit(request, s.sequences(ids, Wants(tokens=labels)))
    probs = [softmax(o.tokens) if apply_softmax else [math.exp(x) for x in o.tokens] for o in outs]
    return ids, probs


async def score(s: ServerState, body: p.ScoreRequest, request: Request) -> p.ScoreResponse:
    s.inputs.check_model(body.model)
    ids, probs = await _pair_scores(s, request, body.queries, body.items, body.label_token_ids, body.apply_softmax, body.item_first,
                                    body.truncate_prompt_tokens, "items")  # fmt: skip
    data = [p.ScoreData(index=i, score=pr[0], probs=pr) for i, pr in enumerate(probs)]
    return p.ScoreResponse(model=s.settings.model_name, data=data, usage=usage(ids))


async def rerank(s: ServerState, body: p.RerankRequest, request: Request) -> p.RerankResponse:
    s.inputs.check_model(body.model)
    ids, probs = await _pair_scores(s, request, body.query, body.documents, body.label_token_ids, True, False, body.truncate_prompt_tokens,
                                    "documents")  # fmt: skip
    order = sorted(range(len(probs)), key=lambda i: -probs[i][0])[: body.top_n]
    results = [
        p.RerankResult(index=i, relevance_score=probs[i][0], document=p.RerankDocument(text=body.documents[i]) if body.return_documents else None)
        for i in order
    ]
    return p.RerankResponse(model=s.settings.model_name, results=results, usage=usage(ids))


async def completions(s: ServerState, body: p.CompletionRequest, request: Request) -> p.CompletionResponse:
    s.inputs.check_model(body.model)
    refuse = {
        "max_tokens": body.max_tokens is not None and body.max_tokens > 1,
        "stream": body.stream,
        "n": body.n > 1,
        "best_of": (body.best_of or 1) > 1,
        "echo": body.echo,
        "logit_bias": bool(body.logit_bias),
        "suffix": body.suffix is not None,
    }
    for param, refused in refuse.items():
        if refused:
            value = json.dumps(getattr(body, param))
            raise ApiError(400, f"{param}={value} is not supported: this server is prefill-only (one forward, no decoding, "
                           "one token per prompt: max_tokens 1)", param=param)  # fmt: skip
    ids = s.inputs.encode(body.prompt, "prompt", body.truncate_prompt_tokens)
    sample = Sample(body.temperature, body.top_p, body.seed) if body.temperature else None  # None or 0: greedy
    one = body.max_tokens != 0
    outs = await s.submit(request, s.sequences(ids, Wants(top=body.logprobs or 0, sample=sample)))
    choices = []
    for i, (x, out) in enumerate(zip(ids, outs)):
        token, lp = out.next
        text = s.tokenizer.decode([token]) if one else ""
        logprobs = None
        if body.logprobs is not None and one:
            top = {s.tokenizer.decode([t]): v for t, v in out.top}
            offset = len(s.tokenizer.decode(x))
            logprobs = p.CompletionLogprobs(tokens=[text], token_logprobs=[lp], top_logprobs=[top], text_offset=[offset])
        choices.append(p.CompletionChoice(index=i, text=text, logprobs=logprobs))
    return p.CompletionResponse(model=s.settings.model_name, choices=choices, usage=usage(ids, len(ids) if one else 0))
