"""Signing in to the console with an API token, and what every console action checks.

The session cookie holds the token itself (HttpOnly, SameSite=Strict, Secure behind HTTPS), so
revoking the token ends the session at once. Every form post carries a CSRF token derived
from the session token, and a post whose Origin is another site is refused."""

from __future__ import annotations

import hmac
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from pipeline_console.api.dependencies import Actor
from pipeline_console.auth.dependencies import PUBLIC, SESSION_COOKIE, Requires, bearer_token
from pipeline_console.auth.tokens import find_active
from pipeline_console.console.forms import form_of
from pipeline_console.console.templating import csrf_for, page
from pipeline_console.errors import Forbidden

router = APIRouter(include_in_schema=False)
SESSION_MAX_AGE_S = 12 * 3600


def check_origin(request: Request) -> None:
    """A browser's post must say it comes from this site: its Origin (or, without one, its
    Referer) names this host. 'null', another host, or neither is refused."""
    host = request.headers.get("host")
    origin = request.headers.get("origin")
    source = origin if origin is not None else request.headers.get("referer")
    if not source or source == "null" or urlsplit(source).netloc != host:
        raise Forbidden("this form was not posted from this site; it is refused")


class ConsoleAction(Requires):
    """A console form post: the role, the origin, and (for a cookie session) the CSRF token."""

    def __init__(self, role: str) -> None:
        super().__init__(role, cookie=True)

    async def __call__(self, request: Request) -> Actor:
        actor = await super().__call__(request)
        if bearer_token(request):  # a script with its token in a header: nothing to forge
            return actor
        check_origin(request)
        session_token = request.cookies.get(SESSION_COOKIE)
        if request.app.state.settings.auth != "disabled":
            form = await form_of(request)
            sent = str(form.get("csrf") or "")
            if not session_token or not hmac.compare_digest(sent, csrf_for(session_token)):
                raise Forbidden("the form's CSRF token is missing or wrong; reload the page "
                                "and try again")
        return actor


CONSOLE_VIEWER = Depends(Requires("viewer", cookie=True))
CONSOLE_OPERATOR = Depends(ConsoleAction("operator"))
# a page that only leads to an action
CONSOLE_OPERATOR_PAGE = Depends(Requires("operator", cookie=True))


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
                next: Annotated[str, Form(max_length=2000)] = "/") -> Response:
    check_origin(request)
    async with request.app.state.database.read() as session:
        found = await find_active(session, token.strip())
    if found is None:
        return page(request, "login.html", status_code=401, title="Sign in",
                    next=_safe_next(next), problem="That token is unknown or revoked.")
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, token.strip(), max_age=SESSION_MAX_AGE_S,
                        httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout", dependencies=[PUBLIC])
async def logout(request: Request) -> Response:
    check_origin(request)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
