"""Jinja2 for the console: autoescaped templates (payloads are untrusted), a few filters, and
the one mapping from domain errors to a message on a page."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import orjson
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from itsdangerous import BadSignature, URLSafeTimedSerializer

from pipeline_console.api.problems import status_of
from pipeline_console.auth.dependencies import bearer_token
from pipeline_console.auth.roles import allows
from pipeline_console.errors import DomainError, FieldError

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.autoescape = True
NOTICE_COOKIE = "console_notice"
NOTICE_MAX_AGE_S = 600  # shown on the page right after the action, or never


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


def csrf_for(session_id: str) -> str:
    """The CSRF token of a console session (every form carries it; console.auth checks it)."""
    return hashlib.sha256(b"console-csrf:" + session_id.encode()).hexdigest()[:40]


def path_segment(value: str) -> str:
    """A value as one URL path segment: '/' and dots-only segments cannot change the path."""
    return quote(value, safe=":")


templates.env.filters.update(when=when, age=age, pretty=pretty, path_segment=path_segment)
templates.env.globals.update(query=query)


def page(request: Request, template: str, status_code: int = 200, *, fragment: bool = False,
         **context: Any) -> HTMLResponse:
    """A page (or, with fragment=True, a piece of one that leaves the notice for the page)."""
    notice = None if fragment else read_notice(request)
    actor = getattr(request.state, "actor", None)
    session_id = getattr(request.state, "console_session", None)
    response = templates.TemplateResponse(request, template, {
        "notice": notice, "actor": actor,
        "may_operate": actor is not None and allows(actor.role, "operator"),
        "csrf": csrf_for(session_id) if session_id else "", **context},
        status_code=status_code)
    if not fragment and NOTICE_COOKIE in request.cookies:
        response.delete_cookie(NOTICE_COOKIE, path="/")
    return response


def _notice_binding(request: Request) -> str:
    """Whose notice it is: the console session (or the bearer token) that caused it. A
    notice is signed with the process's key and names its session, so a planted cookie, or
    one lifted from another session, shows nothing."""
    credential = (getattr(request.state, "console_session", None)
                  or bearer_token(request) or "")
    return hashlib.sha256(b"console-notice:" + credential.encode(errors="replace")
                          ).hexdigest()[:32]


def _signer(request: Request) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(request.app.state.console_secret, salt="console-notice")


def read_notice(request: Request) -> str | None:
    raw = request.cookies.get(NOTICE_COOKIE)
    if not raw:
        return None
    try:
        binding, notice = _signer(request).loads(raw, max_age=NOTICE_MAX_AGE_S)
    except (BadSignature, ValueError, TypeError):
        return None
    if not isinstance(notice, str) or binding != _notice_binding(request):
        return None
    return notice or None


def done(request: Request, url: str, notice: str) -> RedirectResponse:
    """After an action: back to a page (303, so a reload does not repeat it) with a notice
    that the next page of the same session shows once."""
    response = RedirectResponse(url, status_code=303)
    # itsdangerous' URL-safe text: a header is Latin-1, an operator's reason may hold any
    # character.
    signed = _signer(request).dumps([_notice_binding(request), notice[:1000]])
    response.set_cookie(NOTICE_COOKIE, signed, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https"
                        or request.app.state.settings.console_https)
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
