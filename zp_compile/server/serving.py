"""What each task route does: turn a validated body into sequences, queue them, shape the answers.

One function per route (``classify``, ``score``, ``rerank``, ``completions``, ``tokenize``,
``detokenize``, ``tokenizer_info``), each taking the server's state, the body and the request (for its
disconnect), as vLLM's ``serving_*.py`` do for its routers.
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
                       truncate: int | None, params: tuple[str, str] = ("queries", "items"),
                       item_tokens: int | None = None) -> tuple[list[list[int]], list[list[float]]]:  # fmt: skip
    """Each (query, item) pair's label probabilities: one query for every item, or one per item.
    ``params``: the two sides' field names (for errors); ``item_tokens``: keep each item's first k tokens."""
    queries = [queries] if isinstance(queries, str) else queries
    items = [items] if isinstance(items, str) else items
    s.inputs.check_count(items, params[1])
    if not queries:
        raise ApiError(400, f"{params[0]} is empty", param=params[0])
    if len(queries) not in (1, len(items)):
        raise ApiError(400, f"{len(queries)} {params[0]} for {len(items)} {params[1]}: give one (1:N), or one per entry (1:1)", param=params[0])
    labels = s.inputs.labels_for(label_token_ids)
    tok = s.tokenizer
    ids = []
    for i, item in enumerate(items):
        q = queries[0] if len(queries) == 1 else queries[i]
        first, second = (item, q) if item_first else (q, item)
        a, b = tok.encode(first), tok.encode(second, add_special_tokens=False)
        if item_tokens is not None:  # rerank's documents (never item_first): the second side
            b = b[:item_tokens]
        ids.append(s.inputs.check_ids(a + b, f"{params[1]}[{i}]", truncate))
    outs = await s.submit(request, s.sequences(ids, Wants(tokens=labels)))
    probs = [softmax(o.tokens) if apply_softmax else [math.exp(x) for x in o.tokens] for o in outs]
    return ids, probs


async def score(s: ServerState, body: p.ScoreRequest, request: Request) -> p.ScoreResponse:
    s.inputs.check_model(body.model)
    (a, first), (b, second) = _sides(body)
    ids, probs = await _pair_scores(s, request, first, second, body.label_token_ids, body.apply_softmax, body.item_first,
                                    body.truncate_prompt_tokens, (a, b))  # fmt: skip
    data = [p.ScoreData(index=i, score=pr[0], probs=pr) for i, pr in enumerate(probs)]
    return p.ScoreResponse(model=s.settings.model_name, data=data, usage=usage(ids))


def _sides(body: p.ScoreRequest):
    """The two sides of a score request, ((name, value), (name, value)), under exactly one of vLLM's
    pairings (``protocol.SCORE_PAIRS``)."""
    given = [f for f in dict.fromkeys(f for pair in p.SCORE_PAIRS for f in pair) if getattr(body, f) is not None]
    for a, b in p.SCORE_PAIRS:
        if given == [a, b]:
            return (a, getattr(body, a)), (b, getattr(body, b))
    names = ", ".join(f"{a} with {b}" for a, b in p.SCORE_PAIRS)
    got = f"got {', '.join(given)}" if given else "got neither side"
    raise ApiError(400, f"give the two sides as exactly one pairing: {names}; {got}", param=given[-1] if given else "queries")


async def rerank(s: ServerState, body: p.RerankRequest, request: Request) -> p.RerankResponse:
    s.inputs.check_model(body.model)
    ids, probs = await _pair_scores(s, request, body.query, body.documents, body.label_token_ids, True, False, body.truncate_prompt_tokens,
                                    ("query", "documents"), body.max_tokens_per_doc)  # fmt: skip
    order = sorted(range(len(probs)), key=lambda i: -probs[i][0])[: body.top_n or None]  # top_n 0 or none: all
    results = [
        p.RerankResult(index=i, relevance_score=probs[i][0], document=p.RerankDocument(text=body.documents[i]) if body.return_documents else None)
        for i in order
    ]
    return p.RerankResponse(model=s.settings.model_name, results=results, usage=usage(ids))


async def completions(s: ServerState, body: p.CompletionRequest, request: Request) -> p.CompletionResponse:
    """OpenAI's legacy completions, one token at most. With ``echo`` the prompt comes back first (its
    text, and with ``logprobs`` every prompt token's log-probability and top alternatives, the first
    token's null): lm-evaluation-harness's loglikelihood request."""
    s.inputs.check_model(body.model)
    refuse = {
        "max_tokens": body.max_tokens is not None and body.max_tokens > 1,
        "stream": body.stream,
        "n": body.n > 1,
        "best_of": (body.best_of or 1) > 1,
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
    k = body.logprobs
    echo_logprobs = body.echo and k is not None
    wants = Wants(top=k or 0, sample=sample, prompt=k if echo_logprobs else None)
    outs = await s.submit(request, s.sequences(ids, wants))
    texts = _prompt_texts(body.prompt, ids, s.tokenizer) if body.echo else [""] * len(ids)
    decode = s.inputs.token_text
    choices = []
    for i, (x, out, prompt_text) in enumerate(zip(ids, outs, texts)):
        token, lp = out.next
        text = decode(token) if one else ""
        logprobs = None
        if k is not None:
            tokens, token_lps, tops = [], [], []
            if body.echo:
                lps, top_ids, top_lps = out.prompt_arrays()
                lps = lps.tolist()  # float32 -> float: exact
                tokens, token_lps = s.inputs.token_texts(x), [None, *lps]
                top_texts = s.inputs.token_texts(top_ids.ravel().tolist())
                tops = [None, *_top_dicts(top_texts, top_lps.tolist(), tokens[1:], lps)]
            if one:
                tokens.append(text)
                token_lps.append(lp)
                tops += _top_dicts(s.inputs.token_texts([t for t, _ in out.top]), [[v for _, v in out.top]], [text], [lp])
            offsets = [0]
            for t in tokens[:-1]:
                offsets.append(offsets[-1] + len(t))
            # Built here from typed readouts: validating hundreds of entries per prompt again costs more
            # than the rest of the answer (model_construct skips it; serialization is unchanged).
            logprobs = p.CompletionLogprobs.model_construct(tokens=tokens, token_logprobs=token_lps, top_logprobs=tops,
                                                            text_offset=offsets if body.echo else [len(s.tokenizer.decode(x))])  # fmt: skip
        choices.append(p.CompletionChoice(index=i, text=prompt_text + text, logprobs=logprobs))
    return p.CompletionResponse(model=s.settings.model_name, choices=choices, usage=usage(ids, len(ids) if one else 0))


def _prompt_texts(prompt, ids: list[list[int]], tokenizer) -> list[str]:
    """What ``echo`` returns for each prompt: the text as given, or the tokens' text (token ids, or text
    that ``truncate_prompt_tokens`` shortened)."""
    given = [prompt] if isinstance(prompt, str) else prompt if prompt and isinstance(prompt[0], str) else [None] * len(ids)
    return [t if isinstance(t, str) and tokenizer.encode(t) == x else tokenizer.decode(x) for t, x in zip(given, ids)]


def _top_dicts(top_texts: list[str], top_lps: list[list[float]], token_texts: list[str], token_lps: list[float]) -> list[dict[str, float]]:
    """Each position's ``top_logprobs``: its k most likely tokens (``top_texts``, k per position, most
    likely first; ``top_lps`` [positions][k]), and the token there (OpenAI returns it too, so up to
    k + 1 entries), by text."""
    k = len(top_lps[0]) if top_lps else 0
    if k == 1:  # lm-evaluation-harness's logprobs=1: one comprehension over hundreds of thousands of positions
        return [{a: x} if a == t else {a: x, t: v} for a, (x,), t, v in zip(top_texts, top_lps, token_texts, token_lps)]
    out = []
    for j, (lps, text, lp) in enumerate(zip(top_lps, token_texts, token_lps)):
        top = dict(zip(top_texts[j * k : (j + 1) * k], lps))
        top.setdefault(text, lp)
        out.append(top)
    return out


async def tokenize(s: ServerState, body: p.TokenizeRequest) -> p.TokenizeResponse:
    """vLLM's ``/tokenize``: a prompt's token ids, or chat messages' through the tokenizer's template."""
    s.inputs.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "give exactly one of prompt or messages", param="prompt")
    tok = s.tokenizer
    if body.prompt is not None:
        ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
    else:
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template: tokenize a prompt instead of messages", param="messages")
        try:
            ids = tok.apply_chat_template(body.messages, tokenize=True, return_dict=False, add_generation_prompt=body.add_generation_prompt,
                                          continue_final_message=body.continue_final_message)  # fmt: skip
        except Exception as e:  # the template's own complaint about these messages
            raise ApiError(400, f"messages: the chat template failed: {e}", param="messages") from e
        if body.add_special_tokens:
            ids = tok.build_inputs_with_special_tokens(ids)
    strs = tok.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return p.TokenizeResponse(count=len(ids), max_model_len=s.max_model_len, tokens=ids, token_strs=strs)


async def detokenize(s: ServerState, body: p.DetokenizeRequest) -> p.DetokenizeResponse:
    s.inputs.check_model(body.model)
    s.inputs.check_vocab(body.tokens, "tokens")
    return p.DetokenizeResponse(prompt=s.tokenizer.decode(body.tokens))


def tokenizer_info(s: ServerState) -> dict:
    """vLLM's ``/tokenizer_info``: the tokenizer's special tokens, chat template and limits (what a
    client that tokenizes through the server, such as lm-evaluation-harness's, reads)."""
    tok = s.tokenizer
    return {
        "tokenizer_class": type(tok).__name__,
        "eos_token": tok.eos_token,
        "bos_token": tok.bos_token,
        "pad_token": tok.pad_token,
        "unk_token": tok.unk_token,
        "chat_template": getattr(tok, "chat_template", None),
        "model_max_length": s.max_model_len,
        "vocab_size": s.inputs.vocab,
    }
