"""API tokens: random, shown once, stored only as a SHA-256 hash (a token is not a password:
with 256 bits of randomness a fast hash is enough, and lets every request look it up)."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.audit.service import AuditEntry, append_audit
from pipeline_console.auth.roles import ROLES, allows
from pipeline_console.auth.sessions import end_sessions_of_token, secret_hash
from pipeline_console.errors import Conflict, FieldError, InvalidInput, NotFound
from pipeline_console.models import ApiToken
from pipeline_console.pagination import Page, PageRequest, fetch_page

TOKEN_PREFIX = "pc_"
NAME_PATTERN = "letters, digits, '_', '.', '-', '@'; at most 64 characters"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


# one hash for every secret kept here: tokens, console sessions, login codes
hash_token = secret_hash


# what a message's source_system may be (ingestion/schemas.Name)
SOURCE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


@dataclass(frozen=True, slots=True)
class KnownToken:
    """Who an active token is, as a request needs it (what the TokenCache keeps)."""

    name: str
    role: str
    # the source systems an ingest token may post for; None: any (operators, admins, and
    # ingest tokens made before scoping existed: see `unscoped`)
    sources: frozenset[str] | None = None


def scope_of(role: str, sources: Iterable[str] | None) -> list[str] | None:
    """The sources to store for a new token: sorted, without repeats. An ingest token must
    name at least one (a leaked token then poses only as its own sources); operators and
    admins may post from any source and viewers not at all, so a scope on them would
    promise what it cannot keep."""
    given = sorted(set(sources or ()))
    errors = [FieldError("source", f"{source[:70]!r} is not a source system name (letters, "
                         "digits, '_', '.', '-'; at most 64 characters)", "argument")
              for source in given if not SOURCE_PATTERN.fullmatch(source)]
    if role == "ingest" and not given:
        errors.append(FieldError("source", "an ingest token needs at least one source system "
                                 "(--source erp): it may post only that source's messages",
                                 "argument"))
    if role != "ingest" and given:
        what = ("may post from any source" if allows(role, "ingest")
                else "may not post messages at all")
        errors.append(FieldError("source", f"only ingest tokens have sources; a {role} token "
                                 f"{what}", "argument"))
    if errors:
        raise InvalidInput(errors[0].message, errors)
    return given or None


def _check(name: str, role: str) -> None:
    errors = []
    if not (0 < len(name) <= 64 and all(c.isascii() and (c.isalnum() or c in "_.-@")
                                        for c in name)):
        errors.append(FieldError("name", NAME_PATTERN, "argument"))
    if role not in ROLES:
        errors.append(FieldError("role", f"one of {', '.join(ROLES)}", "argument"))
    if errors:
        raise InvalidInput("the token's name or role is not valid", errors)


async def create_token(session: AsyncSession, *, name: str, role: str, actor: str,
                       now: datetime, token: str | None = None,
                       sources: Iterable[str] | None = None) -> tuple[ApiToken, str]:
    """A new token; the plain text is returned once and never stored. A token never changes
    afterwards (the database refuses it): another role or scope is a new token."""
    _check(name, role)
    scope = scope_of(role, sources)
    if await active_token_named(session, name) is not None:
        raise Conflict(f"an active token is already named {name!r}; revoke it first")
    plain = token or new_token()
    row = ApiToken(name=name, role=role, token_hash=hash_token(plain), prefix=plain[:10],
                   created_at=now, created_by=actor, sources=scope)
    session.add(row)
    await session.flush()
    details: dict[str, object] = {"role": role, "prefix": row.prefix}
    if scope is not None:
        details["sources"] = scope
    await append_audit(session, [AuditEntry("token.created", "token", name, details)],
                       actor=actor, now=now)
    return row, plain


def unscoped(row: ApiToken) -> bool:
    """An active ingest token made before scoping existed: it may post for any source, so
    it is flagged (tokens list, the dashboard) until it is replaced."""
    return row.role == "ingest" and row.sources is None and row.revoked_at is None


def known_token(row: ApiToken) -> KnownToken:
    return KnownToken(row.name, row.role,
                      None if row.sources is None else frozenset(row.sources))


async def active_token_named(session: AsyncSession, name: str) -> ApiToken | None:
    return await session.scalar(select(ApiToken).where(ApiToken.name == name,
                                                       ApiToken.revoked_at.is_(None)))


async def revoke_token(session: AsyncSession, name: str, *, actor: str,
                       now: datetime) -> ApiToken:
    row = await session.scalar(select(ApiToken).where(
        ApiToken.name == name, ApiToken.revoked_at.is_(None)).with_for_update())
    if row is None:
        raise NotFound(f"no active token is named {name!r}")
    row.revoked_at, row.revoked_by = now, actor
    await session.flush()
    await end_sessions_of_token(session, row.id, now=now)  # the console's, at once
    await append_audit(session, [AuditEntry("token.revoked", "token", name,
                                            {"role": row.role, "prefix": row.prefix})],
                       actor=actor, now=now)
    return row


async def list_tokens(session: AsyncSession) -> list[ApiToken]:
    return list((await session.execute(select(ApiToken).order_by(ApiToken.id))).scalars())


# active ingest tokens made before scoping existed (the dashboard counts what the list shows)
UNSCOPED = (ApiToken.role == "ingest", ApiToken.sources.is_(None),
            ApiToken.revoked_at.is_(None))


async def list_token_page(session: AsyncSession, page: PageRequest, *, unscoped_only: bool,
                          role: str | None = None) -> Page[ApiToken]:
    return await fetch_page(session, ApiToken.id, page, equal=[(ApiToken.role, role)],
                            where=UNSCOPED if unscoped_only else ())


async def unscoped_summary(session: AsyncSession) -> tuple[int, datetime | None]:
    """How many active ingest tokens have no source scope, and when the oldest was made."""
    count, oldest = (await session.execute(
        select(func.count(), func.min(ApiToken.created_at)).where(*UNSCOPED))).one()
    return count, oldest


async def find_active(session: AsyncSession, token: str) -> ApiToken | None:
    """The active token with this plain text, by its hash (one indexed lookup)."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    return await session.scalar(select(ApiToken).where(
        ApiToken.token_hash == hash_token(token), ApiToken.revoked_at.is_(None)))


class TokenCache:
    """Who a token is, remembered for a few seconds (TOKEN_CACHE_S) so that a busy client
    does not pay a database read per request: in benchmark 3 that read was most of what a
    pipeline request cost over a bare insert. Only found tokens are kept, by hash (never the
    token), so a new token works at once; a revoked one keeps working for at most the
    lifetime of an entry in a process that had just seen it. 0 turns the cache off.

    Requests that miss at the same moment (a client's 32 senders when an entry expires)
    share one lookup instead of each reading the token: they queued for the connection pool
    behind each other, and the group that came after waited 100 ms more (benchmark 3's
    p99)."""

    def __init__(self, ttl_s: float, clock: Callable[[], datetime],
                 max_entries: int = 10_000) -> None:
        self.ttl = timedelta(seconds=ttl_s)
        self.clock, self.max_entries = clock, max_entries
        self._entries: dict[str, tuple[KnownToken, datetime]] = {}
        self._lookups: dict[str, asyncio.Future[KnownToken | None]] = {}
        self.lookups = 0  # lookups started, for tests and diagnostics

    async def resolve(
        self, token: str, lookup: Callable[[], Awaitable[KnownToken | None]]
    ) -> KnownToken | None:
        """Who an active token is, from the cache or from `lookup` (None: unknown or
        revoked). A lookup already under way for the token is awaited, not repeated."""
        known = self.get(token)
        if known is not None:
            return known
        if not self.ttl:
            self.lookups += 1
            return await lookup()
        key = hash_token(token)
        pending = self._lookups.get(key)
        if pending is None:
            self.lookups += 1
            pending = asyncio.ensure_future(self._look_up(token, lookup))
            self._lookups[key] = pending
            pending.add_done_callback(lambda done: self._forget(key, done))
        # shielded: a caller that goes away does not cancel the others' lookup
        return await asyncio.shield(pending)

    async def _look_up(self, token: str,
                       lookup: Callable[[], Awaitable[KnownToken | None]]
                       ) -> KnownToken | None:
        found = await lookup()
        if found is not None:
            self.put(token, found)
        return found

    def _forget(self, key: str, done: asyncio.Future[KnownToken | None]) -> None:
        """The lookup ended (or was cancelled before it began): the next miss looks again.
        Its error, if every waiter had gone, is marked as seen (they all got or lost it)."""
        if self._lookups.get(key) is done:
            del self._lookups[key]
        if not done.cancelled():
            done.exception()

    def get(self, token: str) -> KnownToken | None:
        """Who a token seen within the lifetime is, else None."""
        if not self.ttl:
            return None
        entry = self._entries.get(hash_token(token))
        if entry is None or entry[1] <= self.clock():
            return None
        return entry[0]

    def put(self, token: str, known: KnownToken) -> None:
        if not self.ttl:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[hash_token(token)] = (known, self.clock() + self.ttl)


BOOTSTRAP_NAME = "bootstrap-admin"


async def ensure_bootstrap_admin(session: AsyncSession, token: str, *, now: datetime) -> bool:
    """The admin token from PIPELINE_CONSOLE_BOOTSTRAP_ADMIN_TOKEN exists and is active;
    True when this call created it (replacing an older bootstrap token)."""
    if await find_active(session, token) is not None:
        return False
    if await session.scalar(select(ApiToken.id).where(
            ApiToken.token_hash == hash_token(token))) is not None:
        raise Conflict("PIPELINE_CONSOLE_BOOTSTRAP_ADMIN_TOKEN names a token that was revoked "
                       "(or is another token); choose a new value (pipeline-console tokens "
                       "new)")
    if await active_token_named(session, BOOTSTRAP_NAME) is not None:
        await revoke_token(session, BOOTSTRAP_NAME, actor="bootstrap", now=now)
    await create_token(session, name=BOOTSTRAP_NAME, role="admin", actor="bootstrap", now=now,
                       token=token)
    return True
