"""Signing in to the console, and what every console action checks.

Signing in with an API token (or a one-time login code made from one) starts a console
session (auth/sessions.py): the cookie holds only its random id (HttpOnly, SameSite=Strict;
over HTTPS Secure and named __Host-…). The API never takes that id, and the console never
takes a token from the cookie. Every form post carries a CSRF token derived from the
session id, and a post whose Origin is not this site (scheme, host and port) is refused."""

from __future__ import annotations

import hmac
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from pipeline_console.api.dependencies import Actor
from pipeline_console.auth.dependencies import (
    PUBLIC,
    SECURE_SESSION_COOKIE,
    Requires,
    bearer_token,
    session_cookie_name,
)
from pipeline_console.auth.roles import allows
from pipeline_console.auth.sessions import (
    end_session,
    peek_login_code,
    redeem_login_code,
    start_session,
)
from pipeline_console.auth.tokens import find_active
from pipeline_console.console.forms import form_of
from pipeline_console.console.templating import csrf_for, page
from pipeline_console.errors import Forbidden

router = APIRouter(include_in_schema=False)
DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_of(url: str) -> tuple[str, str, int | None] | None:
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:  # a port that is not a number
        return None
    return (parts.scheme.lower(), (parts.hostname or "").lower(), port)


def check_origin(request: Request) -> None:
    """A browser's post must say it comes from this site: its Origin (or, without one, its
    Referer) has this site's scheme, host and port. 'null', anything else, or neither is
    refused."""
    origin = request.headers.get("origin")
    source = origin if origin is not None else request.headers.get("referer")
    scheme = "https" if request.app.state.settings.console_https else request.url.scheme
    here = _origin_of(f"{scheme}://{request.headers.get('host', '')}")
    if not source or source == "null" or _origin_of(source) != here:
        raise Forbidden("this form was not posted from this site; it is refused")


def csrf_matches(sent: str, expected: str) -> bool:
    """Compared as bytes: compare_digest refuses a str with non-ASCII characters."""
    return hmac.compare_digest(sent.encode("utf-8", errors="replace"), expected.encode())


class ConsoleAction(Requires):
    """A console form post: the role, the origin, and (for a cookie session) the CSRF token."""

    def __init__(self, role: str) -> None:
        super().__init__(role, cookie=True)

    async def __call__(self, request: Request) -> Actor:
        actor = await super().__call__(request)
        if bearer_token(request):  # a script with its token in a header: nothing to forge
            return actor
        check_origin(request)
        session_id = getattr(request.state, "console_session", None)
        if request.app.state.settings.auth != "disabled":
            form = await form_of(request)
            sent = str(form.get("csrf") or "")
            if not session_id or not csrf_matches(sent, csrf_for(session_id)):
                raise Forbidden("the form's CSRF token is missing or wrong; reload the page "
                                "and try again")
        return actor


CONSOLE_VIEWER = Depends(Requires("viewer", cookie=True))
CONSOLE_OPERATOR = Depends(ConsoleAction("operator"))
# a page that only leads to an action
CONSOLE_OPERATOR_PAGE = Depends(Requires("operator", cookie=True))


NO_CONSOLE_FOR_INGEST = ("An ingest token only posts messages; it cannot sign in to the console. "
                         "Sign in with a viewer, operator or admin token.")


def _safe_next(target: str | None) -> str:
    """Only a path on this site: never //host or a scheme (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


@router.get("/login", response_class=HTMLResponse, dependencies=[PUBLIC])
async def login_page(request: Request, next: str | None = None) -> Response:
    return page(request, "login.html", title="Sign in", next=_safe_next(next), problem=None)


@router.post("/login", dependencies=[PUBLIC])
async def login(request: Request, token: Annotated[str, Form(max_length=256)] = "",
                code: Annotated[str, Form(max_length=256)] = "",
                next: Annotated[str, Form(max_length=2000)] = "/") -> Response:
    """Sign in with a token or a one-time login code: a new session, the old one (if this
    browser had one) ended."""
    check_origin(request)
    settings, now = request.app.state.settings, request.app.state.clock()
    cookie = session_cookie_name(request)
    async with request.app.state.database.transaction() as session:
        if code.strip():
            found = await redeem_login_code(session, code.strip(), now=now)
        else:
            found = await find_active(session, token.strip())
        console_role = found is not None and allows(found.role, "viewer")  # every page's
        plain = None if not console_role else await start_session(
            session, found, now=now, max_age_s=settings.console_session_max_age_s,
            replacing=request.cookies.get(cookie))
    if found is not None and not console_role:
        return page(request, "login.html", status_code=403, title="Sign in",
                    next=_safe_next(next), problem=NO_CONSOLE_FOR_INGEST)
    if plain is None:
        problem = ("That login link is unknown, used or expired; ask for a new one."
                   if code.strip() else "That token is unknown or revoked.")
        return page(request, "login.html", status_code=401, title="Sign in",
                    next=_safe_next(next), problem=problem)
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(cookie, plain, max_age=settings.console_session_max_age_s,
                        httponly=True, samesite="strict", path="/",
                        secure=cookie == SECURE_SESSION_COOKIE)
    return response


@router.post("/login/who", dependencies=[PUBLIC])
async def login_who(request: Request, token: Annotated[str, Form(max_length=256)] = "",
                    code: Annotated[str, Form(max_length=256)] = "") -> Response:
    """Whom a login link would sign in as (the code is not spent), so that the sign-in page
    asks "Sign in as NAME (ROLE)?" before anything happens: a link someone else made
    signs in as them, and the page says so."""
    check_origin(request)
    if not (token.strip() or code.strip()):
        return JSONResponse({"detail": "give a token or a code"}, status_code=404)
    async with request.app.state.database.read() as session:
        found = (await peek_login_code(session, code.strip(), now=request.app.state.clock())
                 if code.strip() else await find_active(session, token.strip()))
    if found is None:
        return JSONResponse({"detail": "unknown, used, expired or revoked"}, status_code=404)
    return JSONResponse({"name": found.name, "role": found.role})


@router.post("/logout", dependencies=[PUBLIC])
async def logout(request: Request) -> Response:
    """End the session at once (its id is worth nothing after), and forget the cookie."""
    check_origin(request)
    cookie = session_cookie_name(request)
    plain = request.cookies.get(cookie)
    if plain:
        async with request.app.state.database.transaction() as session:
            await end_session(session, plain, now=request.app.state.clock(), reason="logout")
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(cookie, path="/", httponly=True, samesite="strict",
                           secure=cookie == SECURE_SESSION_COOKIE)
    return response
