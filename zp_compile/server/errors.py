"""Errors as the API answers them: ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape)
with the HTTP status in ``code``; validation errors as a 400 naming the field."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as p


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param)


def error_response(status: int, message: str, type: str, param: str | None = None, headers=None) -> JSONResponse:
    body = p.ErrorResponse(error=p.ErrorInfo(message=message, type=type, param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)



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



def install_handlers(app: FastAPI) -> None:
    """Every error a route or the framework raises, answered in the one shape."""

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
