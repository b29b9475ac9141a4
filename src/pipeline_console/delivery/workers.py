"""Workers register when they start and heartbeat while they run, so that an operator sees
them (GET /api/v1/workers) and so that a lost worker's claims are recovered as soon as its
heartbeat stops, not only when their leases run out.

The heartbeat is also half of the fence (claims.may_send): another worker may take this one
for lost once its last heartbeat is WORKER_LOST_AFTER_S old, and recover its claims. So a
worker sends a claim only while its own heartbeat has never been that stale since the claim
was made: Liveness keeps an epoch that moves on whenever a gap between two heartbeats came
close to WORKER_LOST_AFTER_S (a freeze, a database outage), and a claim made in an earlier
epoch is never sent."""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.db import Database
from pipeline_console.delivery.base import MONOTONIC
from pipeline_console.models import Delivery, Worker
from pipeline_console.pagination import PageRequest, fetch_page

log = logging.getLogger("pipeline_console.worker")
_workers = Worker.__table__
_deliveries = Delivery.__table__


EARLIEST = datetime.min.replace(tzinfo=UTC)


@dataclass
class Liveness:
    """This process's own view of its heartbeat, on the monotonic clock."""

    lost_after_s: float
    safety_s: float
    monotonic: Callable[[], float] = MONOTONIC
    beat_started: float = -math.inf  # when the last committed heartbeat began
    epoch: int = 0
    # the wall clock when the current epoch began: a claim made before it (its updated_at)
    # belongs to an earlier epoch, whenever it is checked
    epoch_since: datetime = EARLIEST

    @property
    def limit_s(self) -> float:
        """How stale our heartbeat may get before a claim is no longer safe to send: the
        lost-after time less a margin for the other side's clock and transaction."""
        return self.lost_after_s - min(self.safety_s, self.lost_after_s / 3)

    def beat(self, started: float, committed: float, wall: datetime | None = None) -> None:
        """A heartbeat that began at `started` committed at `committed` (`wall`: the wall
        clock then). If the database went that long without a fresh one, claims of earlier
        epochs may be recovered."""
        if committed - self.beat_started >= self.limit_s:
            self.epoch += 1
            if wall is not None:
                self.epoch_since = wall
        self.beat_started = started

    def epoch_of_claim(self, claimed_at: datetime) -> int | None:
        """The epoch a claim made at `claimed_at` (wall clock) belongs to, if the current."""
        return self.epoch if claimed_at >= self.epoch_since else None

    def holds(self, epoch: int | None, now: float) -> bool:
        return epoch == self.epoch and now - self.beat_started < self.limit_s


@dataclass
class Identity:
    id: str
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    @classmethod
    def new(cls) -> Identity:
        host, pid = socket.gethostname(), os.getpid()
        # host:pid alone repeats (pid 1 in every container); the suffix keeps ids unique
        return cls(f"worker:{host}:{pid}:{os.urandom(3).hex()}", host, pid)


async def heartbeat(database: Database, identity: Identity, liveness: Liveness,
                    clock: Callable[[], datetime]) -> None:
    """Register (the first time) or refresh this worker's row; then tell Liveness. The
    monotonic clock is read before the wall clock: the row may say we were seen earlier
    than Liveness believes, never later."""
    started = liveness.monotonic()
    now = clock()

    async def work(session: AsyncSession) -> None:
        result = await session.execute(
            update(_workers).where(_workers.c.id == identity.id)
            .values(last_seen_at=now, stopped_at=None))
        if result.rowcount == 0:
            await session.execute(insert(_workers).values(
                id=identity.id, host=identity.host[:255], pid=identity.pid, started_at=now,
                last_seen_at=now, stopped_at=None))

    await database.run_transaction(work)
    liveness.beat(started, liveness.monotonic(), clock())


async def mark_stopped(database: Database, identity: Identity, now: datetime) -> None:
    await database.run_transaction(lambda session: session.execute(
        update(_workers).where(_workers.c.id == identity.id)
        .values(stopped_at=now, last_seen_at=now)))


def status_of(worker: Any, now: datetime, lost_after_s: float) -> str:
    if worker.stopped_at is not None:
        return "stopped"
    if worker.last_seen_at < now - timedelta(seconds=lost_after_s):
        return "lost"
    return "alive"


async def list_workers(session: AsyncSession, page: PageRequest, *, now: datetime,
                       lost_after_s: float, status: set[str] | None = None,
                       seen_from: datetime | None = None,
                       ) -> tuple[list[dict[str, Any]], str | None]:
    """Workers by id, each with its status and the deliveries it holds now. The filters (a
    status, last seen at or after `seen_from`) are applied in SQL, so that pages stay full."""
    cutoff = now - timedelta(seconds=lost_after_s)
    where = [] if seen_from is None else [Worker.last_seen_at >= seen_from]
    if status:
        clauses = {"stopped": Worker.stopped_at.is_not(None),
                   "lost": and_(Worker.stopped_at.is_(None), Worker.last_seen_at < cutoff),
                   "alive": and_(Worker.stopped_at.is_(None), Worker.last_seen_at >= cutoff)}
        where.append(or_(*(clauses[word] for word in sorted(status))))
    result = await fetch_page(session, Worker.id, page, where=where)
    ids = [worker.id for worker in result.items]
    claims = dict((await session.execute(
        select(_deliveries.c.claimed_by, func.count())
        .where(_deliveries.c.status == "in_flight", _deliveries.c.claimed_by.in_(ids))
        .group_by(_deliveries.c.claimed_by))).all()) if ids else {}
    return [{"id": worker.id, "host": worker.host, "pid": worker.pid,
             "started_at": worker.started_at, "last_seen_at": worker.last_seen_at,
             "status": status_of(worker, now, lost_after_s), "claims": claims.get(worker.id, 0)}
            for worker in result.items], result.next_cursor


# A lost worker stays on the dashboard this long after it was last seen; after that it is
# history (GET /workers still lists it): a worker killed and replaced should not light the
# dashboard for ever.
LOST_WORKER_CARD = timedelta(hours=24)


def card_since(now: datetime) -> datetime:
    """The start of the card's window, to the second (as its path writes it)."""
    return (now - LOST_WORKER_CARD).replace(microsecond=0)


async def lost_worker_summary(session: AsyncSession, *, now: datetime,
                              lost_after_s: float) -> tuple[int, datetime | None]:
    """How many workers were lost (silent, not stopped) in the last day, and the last time
    the oldest of them was seen: the dashboard's card."""
    cutoff = now - timedelta(seconds=lost_after_s)
    count, oldest = (await session.execute(
        select(func.count(), func.min(Worker.last_seen_at))
        .where(Worker.stopped_at.is_(None), Worker.last_seen_at < cutoff,
               Worker.last_seen_at >= card_since(now)))).one()
    return count, oldest
