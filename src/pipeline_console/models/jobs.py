"""The job run history: every run of a named job, from the API, the CLI or the worker."""

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, CheckConstraint, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from pipeline_console.models.base import Base, BigId, UTCDateTime


class JobRun(Base):
    __tablename__ = "job_runs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job: Mapped[str] = mapped_column(String(64))
    trigger: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        CheckConstraint("status IN ('running', 'succeeded', 'failed')", name="status"),
        CheckConstraint("trigger IN ('api', 'cli', 'worker')", name="trigger"),
        Index(None, "job", "id"),
        Index(None, "status", "id"),
    )


class JobSchedule(Base):
    """When each scheduled job runs next, shared by every worker: a worker runs a job only
    after moving its next_run_at forward in one conditional UPDATE, so with several workers
    each scheduled run still happens once."""

    __tablename__ = "job_schedules"

    job: Mapped[str] = mapped_column(String(64), primary_key=True)
    next_run_at: Mapped[datetime] = mapped_column(UTCDateTime)
    claimed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # For a daily job, the day its last claimed run covers ('YYYY-MM-DD'): one run per day.
    last_period: Mapped[str | None] = mapped_column(String(16), nullable=True)
