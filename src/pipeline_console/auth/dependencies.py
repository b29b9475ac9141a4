"""Every route declares the role it needs with `dependencies=[requires(ROLE)]`; the request's
actor (the token's name and role) is then what the audit log records."""

from __future__ import annotations

from fastapi import Depends, Request

from pipeline_console.api.dependencies import Actor
from pipeline_console.auth.roles import allows
from pipeline_console.auth.sessions import session_actor
from pipeline_console.auth.tokens import KnownToken, find_active, known_token
from pipeline_console.errors import Forbidden, Unauthorized

SESSION_COOKIE = "console_session"
# Over HTTPS: a cookie with this prefix is only accepted by the browser with Secure, Path=/
# and no Domain, so neither plain HTTP nor another subdomain can plant or overwrite it.
SECURE_SESSION_COOKIE = "__Host-console_session"


def session_cookie_name(request: Request) -> str:
    secure = request.url.scheme == "https" or request.app.state.settings.console_https
    return SECURE_SESSION_COOKIE if secure else SESSION_COOKIE


class Requires:
    """The dependency a route declares; tests find it on every route."""

    def __init__(self, role: str, *, cookie: bool = False) -> None:
        self.role = role
        # Only console routes take the session cookie: an API call must carry its token in
        # a header, which a page on another site can never make a browser send.
        self.cookie = cookie

    async def __call__(self, request: Request) -> Actor:
        settings = request.app.state.settings
        if settings.auth == "disabled":
            actor = Actor(name="anonymous", role="admin")
        elif self.cookie and not bearer_token(request):
            # a console page: the cookie is a session id, never a token (auth/sessions.py)
            actor = await session_actor(request, session_cookie_name(request))
        else:
            token = bearer_token(request)
            if not token:
                raise Unauthorized("send an API token: Authorization: Bearer <token>")
            database = request.app.state.database

            async def lookup() -> KnownToken | None:
                async with database.read() as session:
                    found = await find_active(session, token)
                return None if found is None else known_token(found)

            known = await request.app.state.token_cache.resolve(token, lookup)
            if known is None:
                raise Unauthorized("the token is unknown or revoked")
            actor = Actor(name=known.name, role=known.role, sources=known.sources)
        if not allows(actor.role, self.role):
            raise Forbidden(f"the role {actor.role} may not do this; it needs {self.role}")
        request.state.actor = actor
        return actor


class Public:
    """The declared role of /healthz and /readyz: anyone, no token."""

    role = "public"

    async def __call__(self) -> None:
        return None


class MetricsAccess(Requires):
    """GET /metrics: open, or for viewers, as METRICS_AUTH says."""

    def __init__(self) -> None:
        super().__init__("viewer")

    async def __call__(self, request: Request) -> Actor:
        if request.app.state.settings.metrics_auth == "open":
            return Actor(name="anonymous", role="none")
        return await super().__call__(request)


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def requires(role: str) -> Depends:  # type: ignore[valid-type]
    return Depends(Requires(role))


INGEST = requires("ingest")
VIEWER = requires("viewer")
OPERATOR = requires("operator")
ADMIN = requires("admin")
PUBLIC = Depends(Public())
METRICS = Depends(MetricsAccess())
