"""What a process checks about the downstream systems before it starts: that its secret key
is a key and reads every stored secret, and that no system's URL still holds credentials (a
URL with user:password@ from before auth existed: `pipeline-console migrate` moves them into
auth)."""

from __future__ import annotations

from datetime import datetime
from urllib.parse import unquote, urlsplit, urlunsplit

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.audit.service import AuditEntry, append_audit
from pipeline_console.db import Database
from pipeline_console.delivery import vault as secrets
from pipeline_console.delivery.vault import KeyProblem, Vault, check_readable
from pipeline_console.errors import InvalidInput
from pipeline_console.models import DownstreamSystem


class StartupRefused(Exception):
    """A clear, one-paragraph reason this process will not start."""


def has_credentials(url: str | None) -> bool:
    return bool(url) and "@" in urlsplit(url).netloc


def check_key(vault: Vault) -> None:
    """StartupRefused when PIPELINE_CONSOLE_SECRET_KEY is set but is not a key: refused
    before anything runs, even on a database without secrets, rather than at the first
    secret stored or read."""
    try:
        vault.check()
    except KeyProblem as problem:
        raise StartupRefused(str(problem)) from None


async def check_connections(database: Database, vault: Vault) -> None:
    check_key(vault)
    async with database.read() as session:
        try:
            await check_readable(session, vault)
        except KeyProblem as problem:
            raise StartupRefused(str(problem)) from None
        rows = (await session.execute(select(DownstreamSystem.name, DownstreamSystem.url,
                                             DownstreamSystem.status_url))).all()
    holding = sorted(name for name, url, status_url in rows
                     if has_credentials(url) or has_credentials(status_url))
    if holding:
        raise StartupRefused(
            f"the URLs of {len(holding)} downstream systems hold credentials "
            f"({', '.join(holding[:5])}{', …' if len(holding) > 5 else ''}): every viewer can "
            "read a URL. Run `pipeline-console migrate` with PIPELINE_CONSOLE_SECRET_KEY set: "
            "it moves them into each system's auth (basic), encrypted.")


def _split_credentials(url: str) -> tuple[str, str, str]:
    """(url without userinfo, username, password), the last two percent-decoded."""
    parts = urlsplit(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    return (urlunsplit(parts._replace(netloc=host)), unquote(username), unquote(password))


def redact_url(url: str) -> str:
    """A URL as it may be shown: any user:password@ as ***@."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


async def move_url_credentials(database: Database, vault: Vault, *, now: datetime) -> list[str]:
    """Every system whose URL (or status URL) holds user:password@: the credentials become
    its auth (basic, the password encrypted) and leave the URL, audited without them. A
    system that already has an auth, or whose two URLs hold different credentials, is left
    for a person (StartupRefused names it). The names of the systems changed."""

    async def work(session: AsyncSession) -> list[str]:
        systems = list((await session.execute(
            select(DownstreamSystem).order_by(DownstreamSystem.name)
            .with_for_update())).scalars())
        holding = [system for system in systems
                   if has_credentials(system.url) or has_credentials(system.status_url)]
        if not holding:
            return []
        require = [system.name for system in holding
                   if system.auth or len({_split_credentials(url)[1:] for url in
                                          (system.url, system.status_url)
                                          if has_credentials(url)}) > 1]
        if require:
            raise StartupRefused(
                f"the URLs of {', '.join(require)} hold credentials that cannot be moved "
                "into auth (the system has an auth already, or its two URLs hold different "
                "credentials): PATCH the system with a url without them and the auth it needs")
        try:
            secrets.require_key(vault, "url")
        except InvalidInput:
            raise StartupRefused(
                f"the URLs of {len(holding)} downstream systems hold credentials "
                f"({', '.join(system.name for system in holding[:5])}): set "
                "PIPELINE_CONSOLE_SECRET_KEY (make one with `pipeline-console secrets "
                "new-key`) and run `pipeline-console migrate` again to move them into "
                "auth") from None
        audit = []
        for system in holding:
            before = {"url": system.url and redact_url(system.url),
                      "status_url": system.status_url and redact_url(system.status_url),
                      "auth": {"type": "none"}}
            username = password = ""
            for field in ("url", "status_url"):
                url = getattr(system, field)
                if has_credentials(url):
                    stripped, username, password = _split_credentials(url)
                    setattr(system, field, stripped)
            fingerprint = await secrets.put_secret(session, vault, system.name, "auth",
                                                   password, now=now)
            system.auth = {"type": "basic", "username": username}
            system.updated_at = now
            audit.append(AuditEntry("system.updated", "system", system.name, {
                "before": before,
                "after": {"url": system.url, "status_url": system.status_url,
                          "auth": {**system.auth,
                                   "password": secrets.secret_view(fingerprint)}},
                "reason": "credentials moved from the URL into auth"}))
        await session.flush()
        await append_audit(session, audit, actor="migrate", now=now)
        return [system.name for system in holding]

    return await database.run_transaction(work)
