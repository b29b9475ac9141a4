"""Named jobs, run the same way from the API, the CLI and (later) the worker's schedule."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pipeline_console.db import Database
from pipeline_console.errors import NotFound
from pipeline_console.records.staging_sweep import promote_staging


@dataclass(frozen=True)
class Job:
    name: str
    description: str
    run: Callable[[Database, datetime, str], Awaitable[dict[str, Any]]]


async def _promote_staging(database: Database, now: datetime, actor: str) -> dict[str, Any]:
    async with database.transaction() as session:
        report = await promote_staging(session, now=now, actor=actor)
    return report.as_dict()


JOBS: dict[str, Job] = {
    job.name: job
    for job in (
        Job("promote_staging",
            "re-check staged records that are not promoted yet and promote the complete ones",
            _promote_staging),
    )
}


async def run_job(database: Database, name: str, *, now: datetime, actor: str) -> dict[str, Any]:
    job = JOBS.get(name)
    if job is None:
        raise NotFound(f"no job is named {name!r}; jobs: {', '.join(sorted(JOBS))}")
    return await job.run(database, now, actor)
