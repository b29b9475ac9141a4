"""The one mapping from errors to RFC 9457 problem+json responses."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException

from pipeline_console.db import Unavailability, is_retryable, unavailability
from pipeline_console.errors import (
    Conflict,
    DomainError,
    FieldError,
    Forbidden,
    InvalidInput,
    NotFound,
    TooLarge,
    Unauthorized,
    error_path,
)

log = logging.getLogger("pipeline_console")

PROBLEM_MEDIA_TYPE = "application/problem+json"


class ProblemFieldError(BaseModel):
    field: str
    location: str
    message: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[ProblemFieldError] | None = None


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        response = {"model": Problem, "content": {PROBLEM_MEDIA_TYPE: {}},
                    "description": _DESCRIPTIONS.get(status) or _TITLES.get(status, "Error")}
        if status == 503:
            response["headers"] = {"Retry-After": RETRY_AFTER_HEADER}
        responses[status] = response
    return responses


RETRY_AFTER_HEADER = {"description": "seconds to wait before sending the request again",
                      "schema": {"type": "integer", "minimum": 0}}
_DESCRIPTIONS = {
    503: "The database is unreachable or busy (refused, starting up, every connection in use, "
         "lost mid-transaction), or the server is shutting down: the request was not carried "
         "out. Send it again after Retry-After seconds.",
}


_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Invalid input",
    500: "Internal server error",
    503: "Service unavailable",
}
_SLUGS = {403: "forbidden", 404: "not-found", 409: "conflict", 413: "too-large",
          415: "unsupported-media-type", 422: "invalid-input"}


def problem(
    status: int, detail: str, *, errors: list[FieldError] | None = None, **extras: Any
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"/problems/{_SLUGS.get(status, 'http-' + str(status))}",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = [error.as_dict() for error in errors]
    body.update(extras)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE)


def status_of(error: DomainError) -> int:
    if isinstance(error, Unauthorized):
        return 401
    if isinstance(error, Forbidden):
        return 403
    if isinstance(error, NotFound):
        return 404
    if isinstance(error, Conflict):
        return 409
    if isinstance(error, TooLarge):
        return 413
    if isinstance(error, InvalidInput):
        return 422
    return 400


# How long a client should wait: a pool or a lock frees up in moments; a server that is gone
# takes a while to come back (and every try until then costs a connect).
RETRY_AFTER_S: dict[Unavailability, int] = {"busy": 1, "unreachable": 5}
UNAVAILABLE_DETAILS: dict[Unavailability, str] = {
    "unreachable": "the database is unreachable, so the request was not carried out; send "
                   "it again in a few seconds",
    "busy": "the database is busy (every connection in use, or locked by another process), "
            "so the request was not carried out; send it again shortly",
}


MACHINE_PREFIXES = ("/api/", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs",
                    "/static/")
HtmlErrors = Callable[[Request, int, str, list[FieldError]], Response]


def is_for_machines(request: Request) -> bool:
    """The API and operations endpoints answer problem+json; the console's pages answer HTML."""
    return request.url.path.startswith(MACHINE_PREFIXES)


def install_problem_handlers(app: FastAPI, html: HtmlErrors | None = None) -> None:
    """Domain, validation and HTTP errors as problem+json, or, for a console page when `html`
    is given, as an HTML page saying the same."""

    def answer(request: Request, status: int, detail: str,
               errors: list[FieldError] | None = None) -> Response:
        if html is not None and not is_for_machines(request):
            return html(request, status, detail, errors or [])
        return problem(status, detail, errors=errors)

    @app.exception_handler(DomainError)
    async def on_domain_error(request: Request, error: DomainError) -> Response:
        errors = error.errors if isinstance(error, InvalidInput) else None
        response = answer(request, status_of(error), error.detail, errors)
        if isinstance(error, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Bearer realm="pipeline-console"'
        return response

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> Response:
        errors = []
        for item in error.errors():
            location = [str(part) for part in item.get("loc", ())]
            where = location[0] if location else "body"
            path = error_path({**item, "loc": item["loc"][1:]},
                              error.body if where == "body" else None) if location else []
            errors.append(FieldError(field=".".join(path) or where, location=where,
                                     message=str(item.get("msg", "invalid")),
                                     type=str(item.get("type", "invalid"))))
        names = ", ".join(sorted({e.field for e in errors}))
        return answer(request, 422, f"invalid input: {names}", errors)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, error: HTTPException) -> Response:
        if error.status_code == 400 and isinstance(error.__cause__, UnicodeDecodeError):
            # FastAPI's "error parsing the body" for bytes that are not UTF-8: JSON must be
            # (RFC 8259), so this is invalid input like any other malformed JSON, not a 400.
            return answer(request, 422, "invalid input: body", [FieldError(
                field="body", location="body", message="the body is not UTF-8 encoded JSON",
                type="json_invalid")])
        detail = error.detail if isinstance(error.detail, str) else _TITLES.get(error.status_code,
                                                                                 "Error")
        response = answer(request, error.status_code, detail)
        for name, value in (error.headers or {}).items():
            response.headers[name] = value
        return response

    def unavailable(request: Request, error: BaseException, kind: Unavailability) -> Response:
        # One line, no traceback: during an outage every request says the same.
        log.warning("database %s on %s %s: %s", kind, request.method, request.url.path,
                    type(error).__name__)
        response = answer(request, 503, UNAVAILABLE_DETAILS[kind])
        response.headers["Retry-After"] = str(RETRY_AFTER_S[kind])
        return response

    @app.exception_handler(PoolTimeout)
    async def on_pool_timeout(request: Request, error: PoolTimeout) -> Response:
        return unavailable(request, error, "busy")

    @app.exception_handler(DBAPIError)
    async def on_database_error(request: Request, error: DBAPIError) -> Response:
        kind = unavailability(error)
        if kind is not None:
            return unavailable(request, error, kind)
        if is_retryable(error):
            response = answer(request, 503, "the request collided with concurrent work and "
                              "was rolled back; retry it")
            response.headers["Retry-After"] = "1"
            return response
        log.exception("database error on %s %s", request.method, request.url.path)
        return answer(request, 500, "an unexpected error occurred; it has been logged")

    @app.exception_handler(ExceptionGroup)
    async def on_exception_group(request: Request, error: ExceptionGroup) -> Response:
        # Task groups (anyio's, asyncio's) wrap what their tasks raised.
        kind = unavailability(error)
        if kind is not None:
            return unavailable(request, error, kind)
        log.exception("unhandled error on %s %s", request.method, request.url.path,
                      exc_info=error)
        return answer(request, 500, "an unexpected error occurred; it has been logged")

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return answer(request, 500, "an unexpected error occurred; it has been logged")
