"""Console sessions and one-time login codes: what a browser holds instead of an API token.

Signing in with a token (or a login code made from one) starts a session: a random id that
only the browser's cookie holds, stored here as its SHA-256. The API never takes it (it is
not a token: another prefix, another table), and a token placed in the cookie opens nothing.
A session ends at logout, at its expiry, after an idle time, when the same browser signs in
again, and when its token is revoked (every lookup joins the token and wants it active).

A login code (`tokens login-link`) is short-lived and works once: it is spent by one
conditional UPDATE, so of two browsers that present it at the same moment one wins."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from fastapi import Request
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.api.dependencies import Actor
from pipeline_console.audit.service import AuditEntry, append_audit
from pipeline_console.auth.roles import allows
from pipeline_console.errors import Conflict, NotFound, Unauthorized
from pipeline_console.models import ApiToken
from pipeline_console.models.auth import ConsoleSession, LoginCode

SESSION_PREFIX = "cs_"
LOGIN_CODE_PREFIX = "lc_"
# A session's last_seen_at is written at most this often: reading pages writes nothing else,
# and an idle timeout of an hour does not need a finer clock.
TOUCH_EVERY = timedelta(seconds=60)
MAX_SECRET_LENGTH = 100


def secret_hash(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", errors="replace")).hexdigest()


def _plausible(value: str, prefix: str) -> bool:
    return value.startswith(prefix) and len(value) <= MAX_SECRET_LENGTH


@dataclass(frozen=True)
class SignedIn:
    """A live session: whose token it was made from, and whether last_seen_at is due."""

    id: int
    name: str
    role: str
    touch_due: bool


async def start_session(session: AsyncSession, token: ApiToken, *, now: datetime,
                        max_age_s: float, replacing: str | None = None) -> str:
    """A new session for `token`; the plain id is returned once (for the cookie). The
    browser's previous session, if it sent one, ends ('replaced')."""
    if replacing:
        await end_session(session, replacing, now=now, reason="replaced")
    plain = SESSION_PREFIX + secrets.token_urlsafe(32)
    session.add(ConsoleSession(session_hash=secret_hash(plain), token_id=token.id,
                               created_at=now, last_seen_at=now,
                               expires_at=now + timedelta(seconds=max_age_s)))
    await session.flush()
    return plain


async def end_session(session: AsyncSession, plain: str, *, now: datetime,
                      reason: str) -> bool:
    """End the session with this id (logout, replaced); False if none was live."""
    if not _plausible(plain, SESSION_PREFIX):
        return False
    result = await session.execute(
        update(ConsoleSession)
        .where(ConsoleSession.session_hash == secret_hash(plain),
               ConsoleSession.ended_at.is_(None))
        .values(ended_at=now, ended_reason=reason))
    return bool(result.rowcount)


async def end_sessions_of_token(session: AsyncSession, token_id: int, *, now: datetime,
                                reason: str = "token revoked") -> int:
    """Mark the token's live sessions ended (the lookup already refuses them once the token
    is revoked; this records when and why)."""
    result = await session.execute(
        update(ConsoleSession)
        .where(ConsoleSession.token_id == token_id, ConsoleSession.ended_at.is_(None))
        .values(ended_at=now, ended_reason=reason))
    return int(result.rowcount or 0)


async def find_session(session: AsyncSession, plain: str, *, now: datetime,
                       idle_s: float) -> SignedIn | None:
    """The live session with this id: not ended, not expired, used within `idle_s`, and
    made from a token that is still active. One indexed lookup."""
    if not _plausible(plain, SESSION_PREFIX):
        return None
    row = (await session.execute(
        select(ConsoleSession.id, ConsoleSession.last_seen_at, ApiToken.name, ApiToken.role)
        .join(ApiToken, ApiToken.id == ConsoleSession.token_id)
        .where(ConsoleSession.session_hash == secret_hash(plain),
               ConsoleSession.ended_at.is_(None),
               ConsoleSession.expires_at > now,
               ConsoleSession.last_seen_at > now - timedelta(seconds=idle_s),
               ApiToken.revoked_at.is_(None)))).first()
    if row is None:
        return None
    return SignedIn(id=row.id, name=row.name, role=row.role,
                    touch_due=now - row.last_seen_at >= touch_every(idle_s))


def touch_every(idle_s: float) -> timedelta:
    """How stale last_seen_at may get: a minute, or half the idle timeout if that is shorter
    (a session in use must never look idle for want of a write)."""
    return min(TOUCH_EVERY, timedelta(seconds=idle_s / 2))


async def touch_session(session: AsyncSession, session_id: int, *, now: datetime,
                        idle_s: float) -> None:
    """Record that the session was used (at most once per touch_every(idle_s), by the
    condition: two requests at the same moment write once)."""
    await session.execute(
        update(ConsoleSession)
        .where(ConsoleSession.id == session_id, ConsoleSession.ended_at.is_(None),
               ConsoleSession.last_seen_at <= now - touch_every(idle_s))
        .values(last_seen_at=now))


async def create_login_code(session: AsyncSession, token: ApiToken, *, now: datetime,
                            ttl_s: float) -> str:
    """A one-time code that signs a browser in as `token`; the plain code is returned once."""
    plain = LOGIN_CODE_PREFIX + secrets.token_urlsafe(32)
    session.add(LoginCode(code_hash=secret_hash(plain), token_id=token.id, created_at=now,
                          expires_at=now + timedelta(seconds=ttl_s)))
    await session.flush()
    return plain


async def issue_login_code(session: AsyncSession, name: str, *, actor: str, now: datetime,
                           ttl_s: float) -> str:
    """A login code for the active token `name` (audited: it is worth a session)."""
    token = await session.scalar(select(ApiToken).where(ApiToken.name == name,
                                                        ApiToken.revoked_at.is_(None)))
    if token is None:
        raise NotFound(f"no active token is named {name!r}")
    if not allows(token.role, "viewer"):  # it could only reach pages that refuse it
        raise Conflict(f"{name!r} is an ingest token: it posts messages and cannot sign in to "
                       "the console")
    plain = await create_login_code(session, token, now=now, ttl_s=ttl_s)
    await append_audit(session, [AuditEntry("token.login_code", "token", name,
                                            {"role": token.role, "valid_s": ttl_s})],
                       actor=actor, now=now)
    return plain


async def peek_login_code(session: AsyncSession, plain: str, *,
                          now: datetime) -> ApiToken | None:
    """The active token a live code would sign in as, without spending it."""
    if not _plausible(plain, LOGIN_CODE_PREFIX):
        return None
    return await session.scalar(
        select(ApiToken).join(LoginCode, LoginCode.token_id == ApiToken.id)
        .where(LoginCode.code_hash == secret_hash(plain), LoginCode.used_at.is_(None),
               LoginCode.expires_at > now, ApiToken.revoked_at.is_(None)))


async def redeem_login_code(session: AsyncSession, plain: str, *,
                            now: datetime) -> ApiToken | None:
    """Spend the code: the active token it was made for, or None (unknown, used, expired,
    or its token revoked). The UPDATE's condition decides, so only one caller ever wins."""
    if not _plausible(plain, LOGIN_CODE_PREFIX):
        return None
    token_id = await session.scalar(
        update(LoginCode)
        .where(LoginCode.code_hash == secret_hash(plain), LoginCode.used_at.is_(None),
               LoginCode.expires_at > now)
        .values(used_at=now)
        .returning(LoginCode.token_id))
    if token_id is None:
        return None
    return await session.scalar(select(ApiToken).where(ApiToken.id == token_id,
                                                       ApiToken.revoked_at.is_(None)))


async def session_actor(request: Request, cookie_name: str) -> Actor:
    """Who the console's session cookie signs in: the token's name and role, read from the
    database on every request (no cache: logout and revocation count at once, in every
    process). The session id is kept on the request for the CSRF token and the notices."""
    plain = request.cookies.get(cookie_name)
    if not plain:
        raise Unauthorized("sign in: this page needs a console session")
    database, now = request.app.state.database, request.app.state.clock()
    settings = request.app.state.settings
    async with database.read() as session:
        found = await find_session(session, plain, now=now,
                                   idle_s=settings.console_session_idle_s)
    if found is None:
        raise Unauthorized("the console session has ended or is unknown; sign in again")
    if found.touch_due:
        async with database.transaction() as session:
            await touch_session(session, found.id, now=now,
                                idle_s=settings.console_session_idle_s)
    request.state.console_session = plain
    return Actor(name=found.name, role=found.role)
