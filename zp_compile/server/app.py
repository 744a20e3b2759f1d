"""The HTTP front end: FastAPI app, the step loop that feeds the ranks, faults, drain, metrics.

One asyncio loop owns all state. Request handlers tokenize, validate and queue ``Sequence``s, then wait
for their futures; the step loop takes one batch per rank from the scheduler, runs the step on a
dedicated thread (``Ranks.run`` blocks), and resolves the futures. Nothing a rank does can block the
loop, so ``/health`` answers while a step runs.

Every request gets exactly one answer: its result, or an error with a status. A rank failure answers
everything in flight and queued with 503; a drain (SIGTERM) lets queued work finish and refuses new work
with 503; a disconnected client's queued sequences are dropped; ``request_timeout`` bounds every wait.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..planner import flops_per_request, spec_from_config
from . import protocol as p
from .metrics import Metrics
from .ranks import RankFailure, Ranks
from .routing import RouterSettings, ThresholdScheduler
from .scheduler import FifoScheduler, Scheduler, Sequence, padded_len

log = logging.getLogger("zp_compile.server")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param)


def error_response(status: int, message: str, type: str, param: str | None = None, headers=None) -> JSONResponse:
    body = p.ErrorResponse(error=p.ErrorInfo(message=message, type=type, param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


@dataclass
class ServeSettings:
    """Everything ``zp-compile serve`` takes; the defaults are the CLI's."""

    model: str
    model_name: str
    tokenizer: str | None = None  # default: the model directory
    labels: list[str] = field(default_factory=list)
    max_model_len: int | None = None  # default: the config's max_position_embeddings
    max_tokens_per_rank: int = 8192  # tokens per rank per step (fifo: padded; a routing policy: computed, packed)
    max_seqs_per_rank: int = 256
    max_waiting: int = 4096  # sequences queued; beyond: 429
    max_items: int = 256  # inputs / items / documents in one request
    max_body_bytes: int = 4 << 20
    request_timeout: float = 600.0
    api_key: str | None = None
    on_worker_failure: str = "restart"  # or "exit"
    # "fifo" (FifoScheduler) or a routing policy of server/routing.py: round_robin, least_flops,
    # cache_aware, zero_prefill (ThresholdScheduler: per-rank queues, steps filled to T).
    policy: str = "fifo"
    threshold_flops: float | None = None  # T per rank per step; None: measured by the ranks at start-up
    max_wait_ms: float = 50.0  # the longest a step is held back for more work while every rank is under T
    cache_tokens: int = 0  # each rank's prefix KV cache budget in tokens, mirrored by the router's view


class ServerState:
    """The front end's mutable state; lives on ``app.state.zp``."""

    def __init__(self, settings: ServeSettings, ranks: Ranks, tokenizer, config):
        self.settings, self.ranks, self.tokenizer = settings, ranks, tokenizer
        self.spec = spec_from_config(config, settings.model_name)
        self.vocab = config.get_text_config().vocab_size
        self.max_model_len = settings.max_model_len or config.get_text_config().max_position_embeddings
        n = ranks.settings.ranks
        self.scheduler: Scheduler = FifoScheduler(n, settings.max_tokens_per_rank, settings.max_seqs_per_rank)
        self.threshold: dict | None = None  # what the ranks measured at start-up (threshold.MeasuredThreshold)
        self.metrics = Metrics(n)
        self.status = "starting"  # -> ready -> (unhealthy -> ready | exiting) ; draining
        self.detail = "loading and compiling the model on every rank"
        self.draining = False
        self.exit_code = 0
        self.exit_requested = False  # the uvicorn server polls it (serve.DrainingServer.on_tick)
        self.inflight = 0
        self.running: list[Sequence] = []
        self.work = asyncio.Event()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="zp-ranks")  # the one thread that talks to ranks
        self.label_ids = label_token_ids(tokenizer, settings.labels)

    def flops(self, tokens: int) -> float:
        return flops_per_request(self.spec, tokens)

    # ---- life cycle -------------------------------------------------------------------------------
    async def start_ranks(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            info = await loop.run_in_executor(self.executor, self.ranks.start)
        except RankFailure as e:
            log.error("zp-compile: the ranks failed to start: %s", e)
            await loop.run_in_executor(self.executor, self.ranks.kill)
            self.status, self.detail = "unhealthy", f"ranks failed to start: {e}"
            self.request_exit(1)
            return
        self.threshold = info[0].get("threshold")
        self.scheduler = self.new_scheduler()  # a fresh one after a restart: the ranks' caches are gone
        self.status, self.detail = "ready", f"{len(info)} ranks ready"
        log.info("zp-compile: %d ranks ready (generation %d, %s transport); serving %s", len(info), self.ranks.generation,
                 info[0].get("transport"), self.settings.model_name)  # fmt: skip

    def new_scheduler(self) -> Scheduler:
        s, n = self.settings, self.ranks.settings.ranks
        if s.policy == "fifo":
            return FifoScheduler(n, s.max_tokens_per_rank, s.max_seqs_per_rank)
        T = s.threshold_flops or self.threshold["flops_per_step"]
        log.info("zp-compile: %s routing, steps filled to T = %.3g FLOPs per rank", s.policy, T)
        router = RouterSettings(T, s.max_tokens_per_rank, s.max_seqs_per_rank, s.max_wait_ms, s.cache_tokens, policy=s.policy)
        return ThresholdScheduler(n, self.spec, router)

    def _wake_later(self) -> None:
        """A threshold scheduler held the step back for more work: ask again when its wait runs out."""
        wait = getattr(self.scheduler, "wake_in", lambda: None)()
        if wait is not None:
            asyncio.get_running_loop().call_later(wait, self.work.set)

    async def step_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.work.wait()
            self.work.clear()
            if self.status != "ready":
                continue
            batches = self.scheduler.next_step()
            if not any(batches):
                self._wake_later()
                continue
            self.work.set()  # more may be waiting: come back after this step
            now = time.monotonic()
            self.running = [s for b in batches for s in b]
            for s in self.running:
                s.started = now
                self.metrics.queue_time.observe(now - s.arrival)
            self.metrics.set_queue(len(self.running), self.scheduler.waiting())
            payload = [[s.payload() for s in b] for b in batches]
            try:
                results = await loop.run_in_executor(self.executor, self.ranks.run, payload)
            except RankFailure as e:
                await self.fail(e)
                continue
            finally:
                self.metrics.step_seconds.observe(time.monotonic() - now)
            for batch, outs in zip(batches, results):
                for s, out in zip(batch, outs):
                    if not s.future.done():
                        s.future.set_result(out)
            self.metrics.record_step([sum(len(s.ids) for s in b) for b in batches], [sum(s.flops for s in b) for b in batches],
                                     self.ranks.last_seconds)  # fmt: skip
            step = getattr(self.scheduler, "last_step", None)
            if step is not None:  # the threshold scheduler's view of the step it made
                self.metrics.record_admission(step.below_threshold, sum(step.cached_tokens))
            self.running = []
            self.metrics.set_queue(0, self.scheduler.waiting())

    async def fail(self, error: RankFailure) -> None:
        """A rank failed: answer everything in flight and queued with 503, then restart or exit."""
        log.error("zp-compile: worker failure: %s", error)
        self.status, self.detail = "unhealthy", f"worker failure: {error}"
        lost = self.running + self.scheduler.drain()
        self.running = []
        for s in lost:
            if not s.future.done():
                s.future.set_exception(ApiError(503, f"a worker rank failed: {error}", "service_unavailable"))
        self.metrics.worker_failures.inc()
        self.metrics.set_queue(0, 0)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self.ranks.kill)
        if self.settings.on_worker_failure == "restart" and not self.draining:
            self.status, self.detail = "starting", f"restarting the ranks after: {error}"
            await self.start_ranks()
            self.work.set()
        else:
            self.request_exit(1)

    async def shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        if self.status == "ready":
            await loop.run_in_executor(self.executor, self.ranks.stop)
        else:
            await loop.run_in_executor(self.executor, self.ranks.kill)
        self.executor.shutdown(wait=False)

    def begin_drain(self) -> None:
        """SIGTERM: refuse new work (503), let what was accepted finish, then exit."""
        self.draining = True
        self.detail = "draining: finishing accepted requests, refusing new ones"

    def request_exit(self, code: int) -> None:
        self.exit_code = code
        self.exit_requested = True

    # ---- requests -------------------------------------------------------------------------------
    async def submit(self, request: Request, seqs: list[Sequence]) -> list[dict]:
        if self.draining:
            raise ApiError(503, "the server is shutting down", "service_unavailable")
        if self.status != "ready":
            raise ApiError(503, f"the server is not ready: {self.detail}", "service_unavailable")
        if self.scheduler.waiting() + len(seqs) > self.settings.max_waiting:
            raise ApiError(429, f"the queue is full ({self.settings.max_waiting} sequences waiting); retry later", "rate_limit_error")
        self.scheduler.add(seqs)
        self.metrics.set_queue(len(self.running), self.scheduler.waiting())
        self.work.set()
        self.inflight += 1
        gathered = asyncio.gather(*(s.future for s in seqs))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({gathered, gone}, timeout=self.settings.request_timeout, return_when=asyncio.FIRST_COMPLETED)
            if gathered in done:
                return gathered.result()
            self.metrics.dropped.inc(self.scheduler.discard(seqs))  # nobody will read the answer: do not compute it
            self.metrics.set_queue(len(self.running), self.scheduler.waiting())
            gathered.cancel()
            if gone in done:
                raise ApiError(499, "the client disconnected", "client_closed")
            raise ApiError(504, f"no answer within the request timeout ({self.settings.request_timeout:g} s)", "timeout")
        finally:
            gone.cancel()
            self.inflight -= 1

    def encode(self, inputs, param: str, truncate: int | None) -> list[list[int]]:
        """Token ids of each input (text or ids), checked against the vocabulary and the length limit."""
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        self.check_count(inputs, param)
        return [self.check_ids(self.tokenizer.encode(x) if isinstance(x, str) else x, f"{param}[{i}]", truncate) for i, x in enumerate(inputs)]

    def check_count(self, entries: list, param: str) -> None:
        """A request's inputs / items / documents: at least one, at most ``--max-items``."""
        if not entries:
            raise ApiError(400, f"{param} is empty", param=param)
        if len(entries) > self.settings.max_items:
            raise ApiError(400, f"{param} has {len(entries)} entries; the limit is {self.settings.max_items} per request", param=param)

    def check_vocab(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if t >= self.vocab]
        if bad:
            raise ApiError(400, f"{param} has token id {bad[0]}, outside the vocabulary (size {self.vocab})", param=param)

    def check_ids(self, ids: list[int], param: str, truncate: int | None) -> list[int]:
        if not ids:
            raise ApiError(400, f"{param} has no tokens", param=param)
        self.check_vocab(ids, param)
        if truncate is not None:
            if truncate > self.max_model_len:
                raise ApiError(400, f"truncate_prompt_tokens={truncate} exceeds the maximum length {self.max_model_len}", param="truncate_prompt_tokens")
            ids = ids[-truncate:]
        if len(ids) > self.max_model_len:
            raise ApiError(
                400,
                f"{param} has {len(ids)} tokens; the maximum length is {self.max_model_len} "
                "(set truncate_prompt_tokens to keep only the last k tokens)",
                param=param,
            )
        return ids

    def sequences(self, ids: list[list[int]], readout: dict) -> list[Sequence]:
        loop = asyncio.get_running_loop()
        self.metrics.prompt_tokens.inc(sum(len(x) for x in ids))
        return [Sequence(x, readout, loop.create_future(), self.flops(len(x))) for x in ids]

    def labels_for(self, label_token_ids: list[int] | None, param: str = "label_token_ids") -> list[int]:
        ids = label_token_ids if label_token_ids is not None else self.label_ids
        if not ids:
            raise ApiError(400, "no label tokens: pass label_token_ids or start the server with --labels", param=param)
        self.check_vocab(ids, param)
        return ids

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.settings.model_name!r}", "not_found_error", "model")


def label_token_ids(tokenizer, labels: list[str]) -> list[int]:
    """The one token of each label; a label that is not exactly one token is an error that says so."""
    out = []
    for label in labels:
        ids = tokenizer.encode(label, add_special_tokens=False)
        if len(ids) != 1:
            hint = ""
            if not label.startswith(" ") and len(tokenizer.encode(" " + label, add_special_tokens=False)) == 1:
                hint = f"; {' ' + label!r} (with a leading space) is one token"
            raise ValueError(f"label {label!r} is {len(ids)} tokens {ids}; each label must be exactly one token{hint}")
        out.append(ids[0])
    return out


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One message naming the offending field, from pydantic's errors (the first field that failed).

    The field is the first element of the error location; a value that fits none of a union's forms
    (``input``: text, texts, token ids, lists of token ids) yields one error per form, listed together.
    """
    err = errors[0]
    loc = [x for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":  # loc holds the character offset, not a field
        return f"malformed JSON body at character {loc[0] if loc else '?'}: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    if not loc:
        return f"request body: {err.get('msg')}", None
    field = str(loc[0])
    if err.get("type") == "extra_forbidden":
        return f"unknown field {field!r}", field
    same = [e for e in errors if [x for x in e.get("loc", ()) if x != "body"][:1] == loc[:1]]
    forms = sorted({str(x[1]) for e in same if len(x := [y for y in e["loc"] if y != "body"]) > 1 and isinstance(x[1], str)})
    if len(forms) > 1:
        return f"{field}: invalid value; expected one of: {', '.join(forms)}", field
    where = "".join(f"[{x}]" for x in loc[1:] if isinstance(x, int))
    return f"{field}{where}: {err.get('msg')}", field


def softmax(logprobs: list[float]) -> list[float]:
    top = max(logprobs)
    e = [math.exp(x - top) for x in logprobs]
    return [x / sum(e) for x in e]


def usage(ids: list[list[int]], completion: int = 0) -> p.Usage:
    n = sum(len(x) for x in ids)
    return p.Usage(prompt_tokens=n, total_tokens=n + completion, completion_tokens=completion)


def create_app(settings: ServeSettings, ranks: Ranks, tokenizer, config) -> FastAPI:
    """The FastAPI app. ``ranks`` is started in the background at start-up; ``/health`` says when ready."""
    label_token_ids(tokenizer, settings.labels)  # bad labels fail here, before anything starts
    longest = settings.max_model_len or config.get_text_config().max_position_embeddings
    if padded_len(longest) > settings.max_tokens_per_rank:
        raise ValueError(f"the longest input ({longest} tokens, --max-model-len) cannot fit one rank's step of "
                         f"{settings.max_tokens_per_rank} tokens (--max-tokens-per-rank): raise that or lower --max-model-len")  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = ServerState(settings, ranks, tokenizer, config)
        app.state.zp = state
        tasks = [asyncio.create_task(state.start_ranks()), asyncio.create_task(state.step_loop())]
        yield
        for t in tasks:
            t.cancel()
        await state.shutdown()

    app = FastAPI(title="zp-compile", summary="Prefill-only scoring of MoE models (AsyncEP)", lifespan=lifespan)
    app.add_middleware(Guard, settings=settings)

    def state_of(request: Request) -> ServerState:
        return request.app.state.zp

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code, "invalid_request_error")
        return error_response(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))

    @app.get("/health")
    async def health(request: Request):
        s = state_of(request)
        ok = s.status == "ready" and not s.draining
        body = {"status": "draining" if s.draining else s.status, "detail": s.detail, "ranks": s.ranks.settings.ranks}
        if s.threshold is not None:
            body["threshold"] = s.threshold
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models", response_model=p.ModelList)
    async def models(request: Request):
        s = state_of(request)
        return p.ModelList(data=[p.ModelCard(id=s.settings.model_name, max_model_len=s.max_model_len)])

    @app.get("/metrics")
    async def metrics(request: Request):
        body, content_type = state_of(request).metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/classify", response_model=p.ClassifyResponse, responses={400: {"model": p.ErrorResponse}})
    async def classify(body: p.ClassifyRequest, request: Request):
        s = state_of(request)
        s.check_model(body.model)
        labels = s.labels_for(None, param="input")
        ids = s.encode(body.input, "input", body.truncate_prompt_tokens)
        outs = await s.submit(request, s.sequences(ids, {"tokens": labels}))
        data = []
        for i, out in enumerate(outs):
            probs = softmax(out["tokens"])
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append(p.ClassifyData(index=i, label=s.settings.labels[best], probs=probs, num_classes=len(probs)))
        return p.ClassifyResponse(model=s.settings.model_name, data=data, usage=usage(ids))

    async def _pair_scores(s: ServerState, request: Request, queries, items, label_token_ids, apply_softmax, item_first, truncate, items_param):
        queries = [queries] if isinstance(queries, str) else queries
        items = [items] if isinstance(items, str) else items
        s.check_count(items, items_param)
        if not queries:
            raise ApiError(400, "queries is empty", param="queries")
        if len(queries) not in (1, len(items)):
            raise ApiError(400, f"{len(queries)} queries for {len(items)} items: give one query, or one per item", param="queries")
        labels = s.labels_for(label_token_ids)
        tok = s.tokenizer
        ids = []
        for i, item in enumerate(items):
            q = queries[0] if len(queries) == 1 else queries[i]
            first, second = (item, q) if item_first else (q, item)
            ids.append(s.check_ids(tok.encode(first) + tok.encode(second, add_special_tokens=False), f"{items_param}[{i}]", truncate))
        outs = await s.submit(request, s.sequences(ids, {"tokens": labels}))
        probs = [softmax(o["tokens"]) if apply_softmax else [math.exp(x) for x in o["tokens"]] for o in outs]
        return ids, probs

    @app.post("/score", response_model=p.ScoreResponse, responses={400: {"model": p.ErrorResponse}})
    async def score(body: p.ScoreRequest, request: Request):
        s = state_of(request)
        s.check_model(body.model)
        ids, probs = await _pair_scores(s, request, body.queries, body.items, body.label_token_ids, body.apply_softmax, body.item_first, body.truncate_prompt_tokens, "items")
        data = [p.ScoreData(index=i, score=pr[0], probs=pr) for i, pr in enumerate(probs)]
        return p.ScoreResponse(model=s.settings.model_name, data=data, usage=usage(ids))

    @app.post("/rerank", response_model=p.RerankResponse, responses={400: {"model": p.ErrorResponse}})
    async def rerank(body: p.RerankRequest, request: Request):
        s = state_of(request)
        s.check_model(body.model)
        ids, probs = await _pair_scores(s, request, body.query, body.documents, body.label_token_ids, True, False, body.truncate_prompt_tokens, "documents")
        order = sorted(range(len(probs)), key=lambda i: -probs[i][0])[: body.top_n]
        results = [
            p.RerankResult(index=i, relevance_score=probs[i][0], document=p.RerankDocument(text=body.documents[i]) if body.return_documents else None)
            for i in order
        ]
        return p.RerankResponse(model=s.settings.model_name, results=results, usage=usage(ids))

    @app.post("/v1/completions", response_model=p.CompletionResponse, responses={400: {"model": p.ErrorResponse}})
    async def completions(body: p.CompletionRequest, request: Request):
        s = state_of(request)
        s.check_model(body.model)
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
        ids = s.encode(body.prompt, "prompt", body.truncate_prompt_tokens)
        readout = {"top": body.logprobs or 0}
        if body.temperature:  # None or 0: greedy
            readout["sample"] = {"temperature": body.temperature, "top_p": body.top_p, "seed": body.seed}
        one = body.max_tokens != 0
        outs = await s.submit(request, s.sequences(ids, readout))
        choices = []
        for i, (x, out) in enumerate(zip(ids, outs)):
            token, lp = out["next"]
            text = s.tokenizer.decode([token]) if one else ""
            logprobs = None
            if body.logprobs is not None and one:
                top = {s.tokenizer.decode([t]): v for t, v in out["top"]}
                offset = len(s.tokenizer.decode(x))
                logprobs = p.CompletionLogprobs(tokens=[text], token_logprobs=[lp], top_logprobs=[top], text_offset=[offset])
            choices.append(p.CompletionChoice(index=i, text=text, logprobs=logprobs))
        return p.CompletionResponse(model=s.settings.model_name, choices=choices, usage=usage(ids, len(ids) if one else 0))

    return app


class Guard:
    """Pure ASGI middleware in front of every route: bearer-token check, body size limit, and the
    request counter (every answer, including errors, counted once by route and status)."""

    def __init__(self, app, settings: ServeSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = {}
        started = time.monotonic()

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            rejected = self._reject(scope, path)
            if rejected is not None:
                return await rejected(scope, receive, send_counted)
            limit, seen = self.settings.max_body_bytes, 0

            async def receive_limited():
                nonlocal seen
                message = await receive()
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(413, _too_large_message(limit))
                return message

            try:
                await self.app(scope, receive_limited, send_counted)
            except _TooLarge:
                if "code" not in status:
                    await _too_large(limit)(scope, receive, send_counted)
        finally:
            state = getattr(scope.get("app"), "state", None)
            zp = getattr(state, "zp", None) if state is not None else None
            if zp is not None and "code" in status:
                zp.metrics.count_request(_route(path), status["code"], time.monotonic() - started)

    def _reject(self, scope, path: str):
        key = self.settings.api_key
        if key and path != "/health":
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(auth.encode(), f"Bearer {key}".encode()):
                return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error",
                                      headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.settings.max_body_bytes:
            return _too_large(self.settings.max_body_bytes)
        return None


class _TooLarge(StarletteHTTPException):
    """Raised from inside the body read; FastAPI re-raises HTTP exceptions, so the handler formats it."""


def _too_large_message(limit: int) -> str:
    return f"request body over the limit of {limit} bytes (--max-body-bytes)"


def _too_large(limit: int) -> JSONResponse:
    return error_response(413, _too_large_message(limit), "request_too_large")


ROUTES = ("/classify", "/score", "/rerank", "/v1/completions", "/health", "/v1/models", "/metrics", "/openapi.json", "/docs")


def _route(path: str) -> str:
    return path if path in ROUTES else "other"  # bounded label set, whatever paths clients try
