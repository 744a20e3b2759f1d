"""The guard in front of every route: bearer-token check, body size limit, and the request counter."""

from __future__ import annotations

import hmac
import time

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import error_response
from .settings import ServeSettings


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


ROUTES = ("/classify", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank", "/v1/completions", "/tokenize", "/detokenize",
          "/tokenizer_info", "/health", "/v1/models", "/metrics", "/openapi.json", "/docs")


def _route(path: str) -> str:
    return path if path in ROUTES else "other"  # bounded label set, whatever paths clients try
