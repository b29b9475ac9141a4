"""Consumers register when they start and heartbeat while they run, with their counts and
their broker's backlog, so that an operator sees them (GET /api/v1/intake, the console's
intake page, the dashboard) and sees when one is lost or falls behind."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.db import Database
from pipeline_console.models import IntakeConsumer
from pipeline_console.pagination import PageRequest, fetch_page

_consumers = IntakeConsumer.__table__


def without_credentials(url: str) -> str:
    """The broker URL as it may be shown: no user, no password (nor a query, where some
    clients take a token)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass
class Counts:
    received: int = 0
    acknowledged: int = 0
    rejected: int = 0


@dataclass
class ConsumerIdentity:
    kind: str  # rabbitmq | nats
    source: str  # without credentials
    queue: str
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            # host:pid alone repeats (pid 1 in every container); the suffix keeps ids unique
            self.id = f"consumer:{self.host}:{self.pid}:{os.urandom(3).hex()}"[:128]


async def heartbeat(database: Database, identity: ConsumerIdentity, counts: Counts,
                    backlog: int | None, now: datetime) -> None:
    """Register (the first time) or refresh this consumer's row with its counts and the
    backlog its broker reported (None: not known this time)."""
    values = {"last_seen_at": now, "stopped_at": None, "received": counts.received,
              "acknowledged": counts.acknowledged, "rejected": counts.rejected}

    async def work(session: AsyncSession) -> None:
        row = (await session.execute(
            select(_consumers.c.backlog, _consumers.c.backlog_growing_since)
            .where(_consumers.c.id == identity.id))).first()
        if row is None:
            await session.execute(insert(_consumers).values(
                id=identity.id, kind=identity.kind, source=identity.source[:500],
                queue=identity.queue[:255], host=identity.host[:255], pid=identity.pid,
                started_at=now, backlog=backlog, backlog_growing_since=None, **values))
            return
        growing_since = row.backlog_growing_since
        if backlog is not None:
            if row.backlog is not None and backlog > row.backlog:
                growing_since = growing_since or now
            else:
                growing_since = None
        await session.execute(update(_consumers).where(_consumers.c.id == identity.id).values(
            backlog=row.backlog if backlog is None else backlog,
            backlog_growing_since=growing_since, **values))

    await database.run_transaction(work)


async def mark_stopped(database: Database, identity: ConsumerIdentity, counts: Counts,
                       now: datetime) -> None:
    await database.run_transaction(lambda session: session.execute(
        update(_consumers).where(_consumers.c.id == identity.id).values(
            stopped_at=now, last_seen_at=now, received=counts.received,
            acknowledged=counts.acknowledged, rejected=counts.rejected)))


def status_of(consumer: Any, now: datetime, lost_after_s: float) -> str:
    if consumer.stopped_at is not None:
        return "stopped"
    if consumer.last_seen_at < now - timedelta(seconds=lost_after_s):
        return "lost"
    return "alive"


def _status_clauses(now: datetime, lost_after_s: float) -> dict[str, Any]:
    cutoff = now - timedelta(seconds=lost_after_s)
    return {"stopped": IntakeConsumer.stopped_at.is_not(None),
            "lost": and_(IntakeConsumer.stopped_at.is_(None),
                         IntakeConsumer.last_seen_at < cutoff),
            "alive": and_(IntakeConsumer.stopped_at.is_(None),
                          IntakeConsumer.last_seen_at >= cutoff)}


def read_view(consumer: IntakeConsumer, now: datetime, lost_after_s: float) -> dict[str, Any]:
    return {"id": consumer.id, "kind": consumer.kind, "source": consumer.source,
            "queue": consumer.queue, "host": consumer.host, "pid": consumer.pid,
            "started_at": consumer.started_at, "last_seen_at": consumer.last_seen_at,
            "stopped_at": consumer.stopped_at,
            "status": status_of(consumer, now, lost_after_s),
            "received": consumer.received, "acknowledged": consumer.acknowledged,
            "rejected": consumer.rejected, "backlog": consumer.backlog,
            "backlog_growing_since": consumer.backlog_growing_since}


async def list_consumers(session: AsyncSession, page: PageRequest, *, now: datetime,
                         lost_after_s: float, status: set[str] | None = None,
                         kind: str | None = None,
                         ) -> tuple[list[dict[str, Any]], str | None]:
    """Consumers by id, each with its status; the filters are applied in SQL."""
    where = [] if kind is None else [IntakeConsumer.kind == kind]
    if status:
        clauses = _status_clauses(now, lost_after_s)
        where.append(or_(*(clauses[word] for word in sorted(status))))
    result = await fetch_page(session, IntakeConsumer.id, page, where=where)
    return [read_view(consumer, now, lost_after_s) for consumer in result.items], \
        result.next_cursor


# As for workers: a lost consumer stays on the dashboard for a day after it was last seen.
LOST_CONSUMER_CARD = timedelta(hours=24)


async def intake_summary(session: AsyncSession, *, now: datetime, lost_after_s: float,
                         backlog_alert_s: float) -> dict[str, Any]:
    """The dashboard's card: consumers lost in the last day, and live consumers whose
    broker's backlog has grown at every heartbeat for `backlog_alert_s`."""
    cutoff = now - timedelta(seconds=lost_after_s)
    lost = (await session.execute(
        select(func.count()).where(IntakeConsumer.stopped_at.is_(None),
                                   IntakeConsumer.last_seen_at < cutoff,
                                   IntakeConsumer.last_seen_at >= now - LOST_CONSUMER_CARD)
    )).scalar_one()
    behind = (await session.execute(
        select(func.count()).where(
            IntakeConsumer.stopped_at.is_(None), IntakeConsumer.last_seen_at >= cutoff,
            IntakeConsumer.backlog_growing_since <= now - timedelta(seconds=backlog_alert_s))
    )).scalar_one()
    return {"lost": lost, "falling_behind": behind}
