"""Named jobs, run the same way from the API, the CLI and the worker."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pipeline_console.config import Settings
from pipeline_console.delivery.ambiguous import query_open_ambiguous
from pipeline_console.delivery.service import Deliverer, deliver_due
from pipeline_console.errors import NotFound
from pipeline_console.records.staging_sweep import promote_staging


@dataclass(frozen=True)
class Job:
    name: str
    description: str
    run: Callable[[Deliverer, Settings, str], Awaitable[dict[str, Any]]]


async def _promote_staging(deliverer: Deliverer, _settings: Settings,
                           actor: str) -> dict[str, Any]:
    async with deliverer.database.transaction() as session:
        report = await promote_staging(session, now=deliverer.clock(), actor=actor)
    return report.as_dict()


async def _deliver_due(deliverer: Deliverer, settings: Settings, actor: str) -> dict[str, Any]:
    return await deliver_due(deliverer, limit=settings.worker_batch_size,
                             concurrency=settings.worker_concurrency, actor=actor)


async def _query_ambiguous(deliverer: Deliverer, _settings: Settings,
                           actor: str) -> dict[str, Any]:
    return await query_open_ambiguous(deliverer, actor=actor)


JOBS: dict[str, Job] = {
    job.name: job
    for job in (
        Job("deliver_due", "recover expired leases, claim due deliveries and send them "
            "(one pass of the worker)", _deliver_due),
        Job("promote_staging",
            "re-check staged records that are not promoted yet and promote the complete ones",
            _promote_staging),
        Job("query_ambiguous", "ask systems with a status query about open ambiguous "
            "outcomes: 200 delivered, 404 send again", _query_ambiguous),
    )
}


async def run_job(deliverer: Deliverer, settings: Settings, name: str, *,
                  actor: str) -> dict[str, Any]:
    job = JOBS.get(name)
    if job is None:
        raise NotFound(f"no job is named {name!r}; jobs: {', '.join(sorted(JOBS))}")
    return await job.run(deliverer, settings, actor)
