"""When scheduled jobs run. The schedule lives in the database (job_schedules), so with
several workers on several machines each scheduled run happens once: a worker runs a job only
if its conditional UPDATE moved next_run_at forward."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.config import Settings
from pipeline_console.db import Database, insert_for
from pipeline_console.models import JobSchedule


def next_daily(now: datetime, at: time) -> datetime:
    """The next moment at `at` (UTC) strictly after now."""
    today = datetime.combine(now.astimezone(UTC).date(), at, UTC)
    return today if today > now else today + timedelta(days=1)


def parse_time_of_day(value: str) -> time | None:
    return time.fromisoformat(value) if value else None


@dataclass(frozen=True)
class Scheduled:
    job: str
    interval_s: float | None = None  # every so many seconds, the first run at once
    daily_at: time | None = None  # once a day at this UTC time

    def first_run(self, now: datetime) -> datetime:
        return next_daily(now, self.daily_at) if self.daily_at else now

    def next_run(self, now: datetime) -> datetime:
        if self.daily_at:
            return next_daily(now, self.daily_at)
        assert self.interval_s
        return now + timedelta(seconds=self.interval_s)


def worker_schedule(settings: Settings) -> list[Scheduled]:
    """The jobs the worker runs besides delivering, from the settings (0 or '' turns one off)."""
    intervals = {
        "promote_staging": settings.promote_staging_interval_s,
        "query_ambiguous": settings.query_ambiguous_interval_s,
        "stale_partial_sweep": settings.stale_partial_sweep_interval_s,
    }
    schedule = [Scheduled(job, interval_s=interval)
                for job, interval in intervals.items() if interval > 0]
    daily_at = parse_time_of_day(settings.daily_report_at_utc)
    if daily_at is not None:
        schedule.append(Scheduled("daily_report", daily_at=daily_at))
    return schedule


async def claim_scheduled_run(database: Database, scheduled: Scheduled, *, now: datetime,
                              worker: str) -> tuple[bool, datetime]:
    """(True, next) when this worker is to run the job now; (False, when it is due) otherwise."""

    async def claim(session: AsyncSession) -> tuple[bool, datetime]:
        insert = insert_for(session.bind.dialect.name)
        await session.execute(
            insert(JobSchedule)
            .values(job=scheduled.job, next_run_at=scheduled.first_run(now))
            .on_conflict_do_nothing(index_elements=["job"]))
        next_at = scheduled.next_run(now)
        moved = await session.execute(
            update(JobSchedule)
            .where(JobSchedule.job == scheduled.job, JobSchedule.next_run_at <= now)
            .values(next_run_at=next_at, claimed_by=worker, claimed_at=now))
        if moved.rowcount == 1:
            return True, next_at
        due = await session.scalar(
            select(JobSchedule.next_run_at).where(JobSchedule.job == scheduled.job))
        return False, due

    return await database.run_transaction(claim)
