"""Named jobs, run the same way from the API, the CLI and the worker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.audit.service import AuditEntry, append_anchor, append_audit, chain_head
from pipeline_console.config import Settings
from pipeline_console.delivery.ambiguous import query_open_ambiguous
from pipeline_console.delivery.service import Deliverer, deliver_due
from pipeline_console.errors import NotFound
from pipeline_console.models import JobRun
from pipeline_console.records.staging_sweep import promote_staging, sweep_stale_partials
from pipeline_console.reports.service import daily_summary


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
                             concurrency=settings.worker_concurrency, actor=actor,
                             lost_after_s=settings.worker_lost_after_s)


async def _query_ambiguous(deliverer: Deliverer, _settings: Settings,
                           actor: str) -> dict[str, Any]:
    return await query_open_ambiguous(deliverer, actor=actor)


async def _stale_partial_sweep(deliverer: Deliverer, settings: Settings,
                               actor: str) -> dict[str, Any]:
    async with deliverer.database.transaction() as session:
        report = await sweep_stale_partials(session, now=deliverer.clock(), actor=actor,
                                            stale_after_s=settings.stale_partial_after_s)
    return report.as_dict()


async def _daily_report(deliverer: Deliverer, _settings: Settings,
                        _actor: str) -> dict[str, Any]:
    async with deliverer.database.read() as session:
        summary = await daily_summary(session, now=deliverer.clock())
    log.info("daily report for %s: %s", summary["day"], summary["reports"])
    return summary


async def _audit_anchor(deliverer: Deliverer, settings: Settings,
                        _actor: str) -> dict[str, Any]:
    """The audit log's head, written where the database cannot rewrite it: the process log
    (a structured line a log collector keeps) and, if set, AUDIT_ANCHOR_FILE. `audit
    verify --anchor ID:HASH` with a head kept this way detects a cut-off tail and a
    rewritten, rehashed log."""
    async with deliverer.database.read() as session:
        head = await chain_head(session)
    now = deliverer.clock()
    result: dict[str, Any] = {"head": None, "file": settings.audit_anchor_file,
                              "line": None}
    if head is None:
        return result  # nothing to anchor yet
    result["head"] = {"id": head.id, "hash": head.hash}
    anchor_log.info("audit anchor", anchor=str(head), audit_head_id=head.id,
                    audit_head_hash=head.hash)
    if settings.audit_anchor_file:
        result["line"] = await asyncio.to_thread(append_anchor, settings.audit_anchor_file,
                                                 head, now)
    return result


log = logging.getLogger("pipeline_console.jobs")
anchor_log = structlog.get_logger("pipeline_console.audit")

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
        Job("stale_partial_sweep", "mark partial records waiting longer than "
            "STALE_PARTIAL_AFTER_S as stale, once each, with an audit event naming what they "
            "miss", _stale_partial_sweep),
        Job("audit_anchor", "write the audit log's head (ID:HASH) to the log and to "
            "AUDIT_ANCHOR_FILE, to check the log against later (audit verify --anchor)",
            _audit_anchor),
        Job("daily_report", "the totals of every report for the UTC day before, with the "
            "path of each full report; kept in the job run history", _daily_report),
    )
}


@dataclass(frozen=True)
class RunRecord:
    id: int
    job: str
    status: str
    result: dict[str, Any] | None
    error: str | None


async def run_job(deliverer: Deliverer, settings: Settings, name: str, *, actor: str,
                  trigger: str) -> RunRecord:
    """Run one pass of a job and record it in the run history (start, end, outcome, result
    or error). A failing job is recorded as failed and reported, not raised."""
    job = JOBS.get(name)
    if job is None:
        raise NotFound(f"no job is named {name!r}; jobs: {', '.join(sorted(JOBS))}")

    async def start(session: AsyncSession) -> int:
        run = JobRun(job=name, trigger=trigger, actor=actor, status="running",
                     started_at=deliverer.clock())
        session.add(run)
        await session.flush()
        return run.id

    run_id = await deliverer.database.run_transaction(start)
    result: dict[str, Any] | None = None
    error: str | None = None
    try:
        result = await job.run(deliverer, settings, actor)
    except Exception as failure:
        log.exception("job %s (run %s) failed", name, run_id)
        error = f"{type(failure).__name__}: {failure}"[:2000]

    async def finish(session: AsyncSession) -> None:
        run = await session.get(JobRun, run_id, with_for_update=True)
        run.status = "failed" if error else "succeeded"
        run.finished_at, run.result, run.error = deliverer.clock(), result, error
        if trigger != "worker":  # a person ran it (the worker's schedule is in job_runs)
            await session.flush()
            await append_audit(session, [AuditEntry(
                "job.ran", "job", name, {"run_id": run_id, "trigger": trigger,
                                         "status": run.status})],
                actor=actor, now=deliverer.clock())

    await deliverer.database.run_transaction(finish)
    return RunRecord(run_id, name, "failed" if error else "succeeded", result, error)
