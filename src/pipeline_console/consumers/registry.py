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

from sqlalchemy import and_, case, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.db import Database
from pipeline_console.models import IntakeConsumer
from pipeline_console.pagination import PageRequest, fetch_page

_consumers = IntakeConsumer.__table__


def without_credentials(url: str) -> str:
    """The broker URL as it may be shown: no user, no password (nor a query, where some
    clients take a token)."""
    scheme, _, rest = url.partition("://")
    # a password with a '/', '?' or '#' not percent-encoded ends the netloc early: whatever
    # stands before the last '@' is taken for credentials, wherever it is
    parts = urlsplit(f"{scheme}://{rest.rpartition('@')[2]}")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port is None else f"{host}:{port}"
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
    # stored without credentials; stripped again so that a row written otherwise (an older
    # consumer, a hand-made row) still never shows them
    return {"id": consumer.id, "kind": consumer.kind,
            "source": without_credentials(consumer.source),
            "queue": consumer.queue, "host": consumer.host, "pid": consumer.pid,
            "started_at": consumer.started_at, "last_seen_at": consumer.last_seen_at,
            "stopped_at": consumer.stopped_at,
            "status": status_of(consumer, now, lost_after_s),
            "received": consumer.received, "acknowledged": consumer.acknowledged,
            "rejected": consumer.rejected, "backlog": consumer.backlog,
            "backlog_growing_since": consumer.backlog_growing_since}


async def list_consumers(session: AsyncSession, page: PageRequest, *, now: datetime,
                         lost_after_s: float, status: set[str] | None = None,
                         kind: str | None = None, seen_from: datetime | None = None,
                         backlog_growing_before: datetime | None = None,
                         ) -> tuple[list[dict[str, Any]], str | None]:
    """Consumers by id, each with its status. The filters (statuses, a kind, last seen at or
    after `seen_from`, a backlog growing since at or before `backlog_growing_before`) are
    applied in SQL, so that pages stay full."""
    where = [] if kind is None else [IntakeConsumer.kind == kind]
    if seen_from is not None:
        where.append(IntakeConsumer.last_seen_at >= seen_from)
    if backlog_growing_before is not None:
        where.append(IntakeConsumer.backlog_growing_since <= backlog_growing_before)
    if status:
        clauses = _status_clauses(now, lost_after_s)
        where.append(or_(*(clauses[word] for word in sorted(status))))
    result = await fetch_page(session, IntakeConsumer.id, page, where=where)
    return [read_view(consumer, now, lost_after_s) for consumer in result.items], \
        result.next_cursor


# As for workers: a lost consumer stays on the dashboard for a day after it was last seen.
LOST_CONSUMER_CARD = timedelta(hours=24)


def card_since(now: datetime) -> datetime:
    """The start of the lost card's window, to the second (as its path writes it)."""
    return (now - LOST_CONSUMER_CARD).replace(microsecond=0)


def growing_before(now: datetime, backlog_alert_s: float) -> datetime:
    """Backlogs growing since this time or earlier are on the dashboard, to the second (as
    its path writes it)."""
    return (now - timedelta(seconds=backlog_alert_s)).replace(microsecond=0)


async def intake_summary(session: AsyncSession, *, now: datetime, lost_after_s: float,
                         backlog_alert_s: float) -> dict[str, Any]:
    """The dashboard's cards: consumers lost in the last day, and live consumers whose
    broker's backlog has grown at every heartbeat for `backlog_alert_s`; each count with the
    oldest time behind it (the last heartbeat of the longest lost, the start of the longest
    growth)."""
    cutoff = now - timedelta(seconds=lost_after_s)
    lost, lost_oldest = (await session.execute(
        select(func.count(), func.min(IntakeConsumer.last_seen_at))
        .where(IntakeConsumer.stopped_at.is_(None), IntakeConsumer.last_seen_at < cutoff,
               IntakeConsumer.last_seen_at >= card_since(now)))).one()
    behind, behind_oldest = (await session.execute(
        select(func.count(), func.min(IntakeConsumer.backlog_growing_since)).where(
            IntakeConsumer.stopped_at.is_(None), IntakeConsumer.last_seen_at >= cutoff,
            IntakeConsumer.backlog_growing_since <= growing_before(now, backlog_alert_s))
    )).one()
    return {"lost": lost, "falling_behind": behind, "lost_oldest": lost_oldest,
            "falling_behind_oldest": behind_oldest}


async def consumer_counts(session: AsyncSession, *, now: datetime, lost_after_s: float,
                          ) -> dict[tuple[str, str], int]:
    """Consumers seen in the last day by (kind, status), for /metrics: older ones are
    history, as on the dashboard."""
    cutoff = now - timedelta(seconds=lost_after_s)
    status = case((IntakeConsumer.stopped_at.is_not(None), "stopped"),
                  (IntakeConsumer.last_seen_at < cutoff, "lost"), else_="alive"
                  ).label("status")  # grouped by its name: one bound cutoff, not two
    return {(kind, word): count for kind, word, count in (await session.execute(
        select(IntakeConsumer.kind, status, func.count())
        .where(IntakeConsumer.last_seen_at >= card_since(now))
        .group_by(IntakeConsumer.kind, status))).all()}


async def live_backlogs(session: AsyncSession, *, now: datetime, lost_after_s: float,
                        ) -> list[Any]:
    """What the brokers of the live consumers last reported, per (kind, queue): consumers
    sharing a queue report the same backlog, so the latest heartbeat's figure is the
    queue's; with when it began to grow (None: it is not growing)."""
    cutoff = now - timedelta(seconds=lost_after_s)
    rows = (await session.execute(
        select(IntakeConsumer.kind, IntakeConsumer.queue, IntakeConsumer.backlog,
               IntakeConsumer.backlog_growing_since)
        .where(IntakeConsumer.stopped_at.is_(None), IntakeConsumer.last_seen_at >= cutoff,
               IntakeConsumer.backlog.is_not(None))
        .order_by(IntakeConsumer.last_seen_at))).all()
    latest = {(row.kind, row.queue): row for row in rows}  # the last heartbeat wins
    return [latest[key] for key in sorted(latest)]
