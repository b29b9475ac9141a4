"""Jinja2 for the console: autoescaped templates (payloads are untrusted), a few filters, and
the one mapping from domain errors to a message on a page."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode

import orjson
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from pipeline_console.api.problems import status_of
from pipeline_console.auth.dependencies import SESSION_COOKIE
from pipeline_console.auth.roles import allows
from pipeline_console.errors import DomainError, FieldError

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.autoescape = True
NOTICE_COOKIE = "console_notice"


def when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") + "Z" if value else "—"


def age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def pretty(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


def query(request: Request, **changes: Any) -> str:
    """The current query string with `changes` applied (None removes a parameter)."""
    params = dict(request.query_params)
    if "cursor" not in changes:  # a new filter starts again at the first page
        params.pop("cursor", None)
    for name, value in changes.items():
        if value is None:
            params.pop(name, None)
        else:
            params[name] = str(value)
    return "?" + urlencode(params) if params else "?"


def csrf_for(session_token: str) -> str:
    """The CSRF token of a console session (every form carries it; console.auth checks it)."""
    return hashlib.sha256(b"console-csrf:" + session_token.encode()).hexdigest()[:40]


def path_segment(value: str) -> str:
    """A value as one URL path segment: '/' and dots-only segments cannot change the path."""
    return quote(value, safe=":")


templates.env.filters.update(when=when, age=age, pretty=pretty, path_segment=path_segment)
templates.env.globals.update(query=query)


def page(request: Request, template: str, status_code: int = 200, *, fragment: bool = False,
         **context: Any) -> HTMLResponse:
    """A page (or, with fragment=True, a piece of one that leaves the notice for the page)."""
    notice = None if fragment else unquote(request.cookies.get(NOTICE_COOKIE) or "") or None
    actor = getattr(request.state, "actor", None)
    session_token = request.cookies.get(SESSION_COOKIE)
    response = templates.TemplateResponse(request, template, {
        "notice": notice, "actor": actor,
        "may_operate": actor is not None and allows(actor.role, "operator"),
        "csrf": csrf_for(session_token) if session_token else "", **context},
        status_code=status_code)
    if notice:
        response.delete_cookie(NOTICE_COOKIE, path="/")
    return response


def done(url: str, notice: str) -> RedirectResponse:
    """After an action: back to a page (303, so a reload does not repeat it) with a notice
    that the next page shows once."""
    response = RedirectResponse(url, status_code=303)
    # Percent-encoded: a header is Latin-1, an operator's reason may hold any character.
    response.set_cookie(NOTICE_COOKIE, quote(notice[:1000], safe=" "), httponly=True,
                        samesite="strict", path="/")
    return response


def error_page(request: Request, error: DomainError) -> HTMLResponse:
    return html_error(request, status_of(error), error.detail, getattr(error, "errors", []))


def html_error(request: Request, status: int, detail: str,
               errors: list[FieldError]) -> Response:
    """An error on a console page, as a page (the API answers problem+json instead); without
    a valid session, the way to the sign-in page."""
    if status == 401 and request.method == "GET":
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?{urlencode({'next': target})}", status_code=303)
    return page(request, "error.html", status_code=status, status=status, message=detail,
                details=[f"{e.field}: {e.message}" for e in errors])
