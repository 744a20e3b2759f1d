"""The HTTP front end: the FastAPI app and its routes, thin as vLLM's ``api_router.py``.

A route reads the state, hands the validated body to its task in ``serving.py`` and returns the
answer. The state and the step loop: ``engine.py``; errors: ``errors.py``; auth, body limit and the
request counter: ``guard.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from . import protocol as p
from . import serving
from .engine import ServerState
from .errors import install_handlers
from .guard import Guard
from .inputs import label_token_ids
from .ranks import Ranks
from .scheduler import step_tokens
from .settings import ServeSettings

_ERRORS = {400: {"model": p.ErrorResponse}}


def create_app(settings: ServeSettings, ranks: Ranks, tokenizer, config) -> FastAPI:
    """The FastAPI app. ``ranks`` is started in the background at start-up; ``/health`` says when ready."""
    label_token_ids(tokenizer, settings.labels)  # bad labels fail here, before anything starts
    longest = settings.max_model_len or config.get_text_config().max_position_embeddings
    if step_tokens([longest], padded=True) > settings.max_tokens_per_rank:  # padded: the stricter count
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
    install_handlers(app)

    def state_of(request: Request) -> ServerState:
        return request.app.state.zp

    @app.get("/health")
    async def health(request: Request):
        s = state_of(request)
        ok = s.status == "ready" and not s.draining
        body = {"status": "draining" if s.draining else s.status, "detail": s.detail, "ranks": s.settings.nproc}
        if s.startup:
            body["startup"] = s.startup  # the last start's seconds per phase, the slowest rank's
        if s.threshold is not None:
            body["threshold"] = dataclasses.asdict(s.threshold)
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models", response_model=p.ModelList)
    async def models(request: Request):
        s = state_of(request)
        return p.ModelList(data=[p.ModelCard(id=s.settings.model_name, max_model_len=s.max_model_len)])

    @app.get("/metrics")
    async def metrics(request: Request):
        body, content_type = state_of(request).metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/classify", response_model=p.ClassifyResponse, responses=_ERRORS)
    async def classify(body: p.ClassifyRequest, request: Request):
        return await serving.classify(state_of(request), body, request)

    @app.post("/score", response_model=p.ScoreResponse, responses=_ERRORS)
    @app.post("/v1/score", response_model=p.ScoreResponse, responses=_ERRORS)
    async def score(body: p.ScoreRequest, request: Request):
        return await serving.score(state_of(request), body, request)

    @app.post("/rerank", response_model=p.RerankResponse, responses=_ERRORS)
    @app.post("/v1/rerank", response_model=p.RerankResponse, responses=_ERRORS)  # Jina's clients
    @app.post("/v2/rerank", response_model=p.RerankResponse, responses=_ERRORS)  # Cohere's
    async def rerank(body: p.RerankRequest, request: Request):
        return await serving.rerank(state_of(request), body, request)

    @app.post("/tokenize", response_model=p.TokenizeResponse, responses=_ERRORS)
    async def tokenize(body: p.TokenizeRequest, request: Request):
        return await serving.tokenize(state_of(request), body)

    @app.post("/detokenize", response_model=p.DetokenizeResponse, responses=_ERRORS)
    async def detokenize(body: p.DetokenizeRequest, request: Request):
        return await serving.detokenize(state_of(request), body)

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        return serving.tokenizer_info(state_of(request))

    @app.post("/v1/completions", response_model=p.CompletionResponse, responses=_ERRORS)
    async def completions(body: p.CompletionRequest, request: Request):
        return await serving.completions(state_of(request), body, request)

    return app
