"""When scheduled jobs run. The schedule lives in the database (job_schedules), so with
several workers on several machines each scheduled run happens once: a worker runs a job only
if its conditional UPDATE moved next_run_at forward."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.clock import Clock
from pipeline_console.config import Settings
from pipeline_console.db import Database, insert_for
from pipeline_console.models import JobSchedule


def next_daily(now: datetime, at: time) -> datetime:
    """The next moment at `at` (UTC) strictly after now."""
    today = datetime.combine(now.astimezone(UTC).date(), at, UTC)
    return today if today > now else today + timedelta(days=1)


def parse_time_of_day(value: str) -> time | None:
    return time.fromisoformat(value) if value else None


RETRY_FAILED_AFTER = timedelta(minutes=5)


@dataclass(frozen=True)
class Scheduled:
    job: str
    interval_s: float | None = None  # every so many seconds, the first run at once
    daily_at: time | None = None  # once a day at this UTC time, for the day before

    def first_run(self, now: datetime) -> datetime:
        return next_daily(now, self.daily_at) if self.daily_at else now

    def next_run(self, now: datetime) -> datetime:
        if self.daily_at:
            return next_daily(now, self.daily_at)
        assert self.interval_s
        return now + timedelta(seconds=self.interval_s)

    def horizon(self) -> timedelta:
        """A next run further away than this was set by a worker with a clock ahead of ours
        or a longer interval: it does not hold us back."""
        return timedelta(days=1) if self.daily_at else timedelta(seconds=self.interval_s or 0)

    def period(self, now: datetime) -> str | None:
        """What a daily run covers (the UTC day before); each period runs once, whatever time
        of day each worker is configured with."""
        if not self.daily_at:
            return None
        return (now.astimezone(UTC) - timedelta(days=1)).date().isoformat()


@dataclass(frozen=True)
class Claim:
    claimed: bool
    due: datetime  # when the job is due next
    previous_period: str | None = None


def worker_schedule(settings: Settings) -> list[Scheduled]:
    """The jobs the worker runs besides delivering, from the settings (0 or '' turns one off)."""
    intervals = {
        "promote_staging": settings.promote_staging_interval_s,
        "query_ambiguous": settings.query_ambiguous_interval_s,
        "stale_partial_sweep": settings.stale_partial_sweep_interval_s,
        "audit_anchor": settings.audit_anchor_interval_s,
    }
    schedule = [Scheduled(job, interval_s=interval)
                for job, interval in intervals.items() if interval > 0]
    daily_at = parse_time_of_day(settings.daily_report_at_utc)
    if daily_at is not None:
        schedule.append(Scheduled("daily_report", daily_at=daily_at))
    return schedule


async def claim_scheduled_run(database: Database, scheduled: Scheduled, *,
                              now: datetime | Clock, worker: str) -> Claim:
    """Claim the job's run if it is due (one conditional UPDATE: of several workers asking at
    once, one wins). A run is due when its time has come, or when the stored time is further
    away than this job's horizon; a daily job is due only for a day it has not covered.

    Pass the clock, not a time read earlier: the time is read once the schedule row is locked.
    A time read before waiting for the lock is older than the winner's, so the winner's next
    run looked further away than the horizon, and the job ran twice (seen with two workers)."""

    async def claim(session: AsyncSession) -> Claim:
        insert = insert_for(session.bind.dialect.name)
        first = now() if callable(now) else now
        await session.execute(
            insert(JobSchedule)
            .values(job=scheduled.job, next_run_at=scheduled.first_run(first))
            .on_conflict_do_nothing(index_elements=["job"]))
        row = (await session.execute(
            select(JobSchedule.next_run_at, JobSchedule.last_period)
            .where(JobSchedule.job == scheduled.job).with_for_update())).one()
        current = now() if callable(now) else now
        return await _claim_locked(session, scheduled, row, current, worker)

    return await database.run_transaction(claim)


async def _claim_locked(session: AsyncSession, scheduled: Scheduled, row: Any,
                        now: datetime, worker: str) -> Claim:
    # The schedule row is locked (FOR UPDATE; on SQLite the write lock) and `now` read since.
    next_at, period = scheduled.next_run(now), scheduled.period(now)
    conditions = [JobSchedule.job == scheduled.job,
                  or_(JobSchedule.next_run_at <= now,
                      JobSchedule.next_run_at > now + scheduled.horizon())]
    if period is not None:
        conditions.append(or_(JobSchedule.last_period.is_(None),
                              JobSchedule.last_period < period))
    values = {"next_run_at": next_at, "claimed_by": worker, "claimed_at": now}
    if period is not None:
        values["last_period"] = period
    moved = await session.execute(update(JobSchedule).where(*conditions).values(**values))
    if moved.rowcount == 1:
        return Claim(True, next_at, row.last_period)
    due = row.next_run_at
    if period is not None and row.last_period is not None and row.last_period >= period:
        due = max(due, next_at)  # this day is covered: look again at the next slot
    return Claim(False, due)


async def release_failed_run(database: Database, scheduled: Scheduled, claim: Claim, *,
                             now: datetime, worker: str) -> None:
    """A claimed run failed: try again in a few minutes, and give a daily job its day back."""

    async def release(session: AsyncSession) -> None:
        await session.execute(
            update(JobSchedule)
            .where(JobSchedule.job == scheduled.job, JobSchedule.claimed_by == worker)
            .values(next_run_at=min(now + RETRY_FAILED_AFTER, claim.due),
                    last_period=claim.previous_period))

    await database.run_transaction(release)
