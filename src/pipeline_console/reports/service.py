"""Reports over a time range [start, end): ingestion, delivery, anomalies, replays.

Each report is a flat table (columns and rows, the same for JSON and CSV) plus totals. Every
figure is a grouped aggregate computed by the database; only the latency percentiles read
single rows (nearest rank, `ORDER BY latency LIMIT 1 OFFSET rank`), two per system."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.models import (
    Anomaly,
    DeadLetter,
    Delivery,
    DeliveryAttempt,
    IngestionAttempt,
    RecordState,
    ReplayExecution,
    ReplayItem,
    ReplayRequest,
)
from pipeline_console.models.delivery import CLASSIFICATIONS

DECISIONS = ("accept_new", "accept_supersede", "skip_duplicate", "quarantine", "skip_stale",
             "rejected")
REPLAY_STATUSES = ("validated", "rejected", "executing", "completed", "failed")
UNREADABLE = "(unreadable)"  # a rejected message whose source or type could not be read


@dataclass(frozen=True)
class Report:
    name: str
    title: str
    start: datetime
    end: datetime
    columns: list[str]
    rows: list[dict[str, Any]]
    totals: dict[str, Any]


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


async def ingestion_report(session: AsyncSession, start: datetime, end: datetime) -> Report:
    """Decisions by source system and entity type, rejected messages included."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for source, entity_type, decision, count in (await session.execute(
            select(IngestionAttempt.source_system, IngestionAttempt.entity_type,
                   IngestionAttempt.decision, func.count())
            .where(IngestionAttempt.received_at >= start, IngestionAttempt.received_at < end)
            .group_by(IngestionAttempt.source_system, IngestionAttempt.entity_type,
                      IngestionAttempt.decision))).all():
        key = (source or UNREADABLE, entity_type or UNREADABLE)
        row = rows.setdefault(key, {"source_system": key[0], "entity_type": key[1],
                                    **dict.fromkeys(DECISIONS, 0), "total": 0})
        row[decision] += count
        row["total"] += count
    ordered = [rows[key] for key in sorted(rows)]
    totals = {decision: sum(row[decision] for row in ordered) for decision in DECISIONS}
    totals["total"] = sum(totals.values())
    return Report("ingestion", "Ingestion decisions by source system and entity type",
                  start, end, ["source_system", "entity_type", *DECISIONS, "total"], ordered,
                  totals)


async def _percentile(session: AsyncSession, system: str, start: datetime, end: datetime,
                      count: int, fraction: float) -> float | None:
    if not count:
        return None
    rank = max(math.ceil(fraction * count), 1)  # nearest rank
    return (await session.execute(
        select(DeliveryAttempt.latency_ms)
        .where(DeliveryAttempt.system == system, DeliveryAttempt.started_at >= start,
               DeliveryAttempt.started_at < end, DeliveryAttempt.latency_ms.is_not(None))
        .order_by(DeliveryAttempt.latency_ms).limit(1).offset(rank - 1))).scalar()


def dead_letter_reason(classification: str, rule: str | None, status: int | None) -> str:
    if classification == "permanent":
        return f"permanent: {f'HTTP {status} ' if status is not None else ''}({rule})"
    return f"retries exhausted, last {classification} ({rule})"


async def delivery_report(session: AsyncSession, start: datetime, end: datetime) -> Report:
    """Per system: attempts by classification, success rate, p50/p95 latency, deliveries
    completed, and dead letters by reason."""
    rows: dict[str, dict[str, Any]] = {}

    def row_for(system: str) -> dict[str, Any]:
        return rows.setdefault(system, {
            "system": system, "attempts": 0, **dict.fromkeys(CLASSIFICATIONS, 0),
            "success_rate": None, "p50_latency_ms": None, "p95_latency_ms": None,
            "delivered": 0, "dead_lettered": 0, "dlq_reasons": {}})

    in_range = (DeliveryAttempt.started_at >= start, DeliveryAttempt.started_at < end)
    for system, classification, count in (await session.execute(
            select(DeliveryAttempt.system, DeliveryAttempt.classification, func.count())
            .where(*in_range)
            .group_by(DeliveryAttempt.system, DeliveryAttempt.classification))).all():
        row = row_for(system)
        row[classification] += count
        row["attempts"] += count
    timed = dict((await session.execute(
        select(DeliveryAttempt.system, func.count())
        .where(*in_range, DeliveryAttempt.latency_ms.is_not(None))
        .group_by(DeliveryAttempt.system))).all())
    for system, count in (await session.execute(
            select(Delivery.system, func.count())
            .where(Delivery.delivered_at >= start, Delivery.delivered_at < end)
            .group_by(Delivery.system))).all():
        row_for(system)["delivered"] = count
    for system, classification, rule, status, count in (await session.execute(
            select(DeadLetter.system, DeadLetter.classification, DeliveryAttempt.rule,
                   DeliveryAttempt.response_status, func.count())
            .outerjoin(DeliveryAttempt, DeliveryAttempt.id == DeadLetter.attempt_id)
            .where(DeadLetter.created_at >= start, DeadLetter.created_at < end)
            .group_by(DeadLetter.system, DeadLetter.classification, DeliveryAttempt.rule,
                      DeliveryAttempt.response_status))).all():
        row = row_for(system)
        reason = dead_letter_reason(classification, rule, status)
        row["dlq_reasons"][reason] = row["dlq_reasons"].get(reason, 0) + count
        row["dead_lettered"] += count
    for system, row in rows.items():
        # worker_lost says nothing about the system: not held against its success rate
        row["success_rate"] = _rate(row["success"], row["attempts"] - row["worker_lost"])
        for column, fraction in (("p50_latency_ms", 0.5), ("p95_latency_ms", 0.95)):
            row[column] = await _percentile(session, system, start, end,
                                            timed.get(system, 0), fraction)
    ordered = [rows[system] for system in sorted(rows)]
    totals: dict[str, Any] = {column: sum(row[column] for row in ordered)
                              for column in ("attempts", *CLASSIFICATIONS, "delivered",
                                             "dead_lettered")}
    totals["success_rate"] = _rate(totals["success"],
                                   totals["attempts"] - totals["worker_lost"])
    return Report("delivery", "Delivery by downstream system", start, end,
                  ["system", "attempts", *CLASSIFICATIONS, "success_rate", "p50_latency_ms",
                   "p95_latency_ms", "delivered", "dead_lettered", "dlq_reasons"],
                  ordered, totals)


async def anomalies_report(session: AsyncSession, start: datetime, end: datetime) -> Report:
    """Same-version conflicts opened in the range, by entity type and the two systems that
    disagreed, with how they were resolved and how long that took."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    waited: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for entity_type, current, incoming, status, resolution, count in (
            await session.execute(
                select(RecordState.entity_type, Anomaly.current_source_system,
                       Anomaly.incoming_source_system, Anomaly.status, Anomaly.resolution,
                       func.count())
                .join(RecordState, RecordState.idempotency_key == Anomaly.idempotency_key)
                .where(Anomaly.opened_at >= start, Anomaly.opened_at < end)
                .group_by(RecordState.entity_type, Anomaly.current_source_system,
                          Anomaly.incoming_source_system, Anomaly.status,
                          Anomaly.resolution))).all():
        key = (entity_type, current, incoming)
        row = rows.setdefault(key, {
            "entity_type": entity_type, "current_source_system": current,
            "incoming_source_system": incoming, "opened": 0, "open": 0,
            "accept_incoming": 0, "keep_current": 0, "mean_resolution_s": None})
        row["opened"] += count
        if status == "open":
            row["open"] += count
        else:
            row[resolution] += count
    for entity_type, current, incoming, opened_at, resolved_at in (await session.execute(
            select(RecordState.entity_type, Anomaly.current_source_system,
                   Anomaly.incoming_source_system, Anomaly.opened_at, Anomaly.resolved_at)
            .join(RecordState, RecordState.idempotency_key == Anomaly.idempotency_key)
            .where(Anomaly.opened_at >= start, Anomaly.opened_at < end,
                   Anomaly.status == "resolved"))).all():
        waited[(entity_type, current, incoming)].append(
            (resolved_at - opened_at).total_seconds())
    for key, seconds in waited.items():
        rows[key]["mean_resolution_s"] = round(sum(seconds) / len(seconds), 3)
    ordered = [rows[key] for key in sorted(rows)]
    totals = {column: sum(row[column] for row in ordered)
              for column in ("opened", "open", "accept_incoming", "keep_current")}
    return Report("anomalies", "Same-version conflicts by entity type and the systems that "
                  "disagreed", start, end,
                  ["entity_type", "current_source_system", "incoming_source_system", "opened",
                   "open", "accept_incoming", "keep_current", "mean_resolution_s"],
                  ordered, totals)


async def replays_report(session: AsyncSession, start: datetime, end: datetime) -> Report:
    """Replay requests made in the range by status, with their items and what executing them
    did (execution outcomes)."""
    rows: dict[str, dict[str, Any]] = {}

    def row_for(status: str) -> dict[str, Any]:
        return rows.setdefault(status, {"status": status, "requests": 0, "items": 0,
                                        "eligible_items": 0, "executions": 0,
                                        "outcomes": {}})

    in_range = (ReplayRequest.created_at >= start, ReplayRequest.created_at < end)
    for status, count in (await session.execute(
            select(ReplayRequest.status, func.count()).where(*in_range)
            .group_by(ReplayRequest.status))).all():
        row_for(status)["requests"] = count
    for status, eligible, count in (await session.execute(
            select(ReplayRequest.status, ReplayItem.eligible, func.count())
            .join(ReplayItem, ReplayItem.request_id == ReplayRequest.id).where(*in_range)
            .group_by(ReplayRequest.status, ReplayItem.eligible))).all():
        row = row_for(status)
        row["items"] += count
        row["eligible_items"] += count if eligible else 0
    for status, outcome, count in (await session.execute(
            select(ReplayRequest.status, ReplayExecution.outcome, func.count())
            .join(ReplayExecution, ReplayExecution.request_id == ReplayRequest.id)
            .where(*in_range)
            .group_by(ReplayRequest.status, ReplayExecution.outcome))).all():
        row = row_for(status)
        row["executions"] += count
        row["outcomes"][outcome] = count
    ordered = [rows[status] for status in REPLAY_STATUSES if status in rows]
    totals = {column: sum(row[column] for row in ordered)
              for column in ("requests", "items", "eligible_items", "executions")}
    return Report("replays", "Replay requests by status, with their items and executions",
                  start, end,
                  ["status", "requests", "items", "eligible_items", "executions", "outcomes"],
                  ordered, totals)


REPORTS: dict[str, Callable[[AsyncSession, datetime, datetime], Awaitable[Report]]] = {
    "ingestion": ingestion_report,
    "delivery": delivery_report,
    "anomalies": anomalies_report,
    "replays": replays_report,
}


def _z(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def daily_summary(session: AsyncSession, *, now: datetime) -> dict[str, Any]:
    """The four reports' totals for the UTC day before `now`, with the path of each full
    report, and per system the delivery figures an operator reads first."""
    start = datetime.combine((now.astimezone(UTC) - timedelta(days=1)).date(), time(0), UTC)
    end = start + timedelta(days=1)
    summary: dict[str, Any] = {"day": start.date().isoformat(), "from": _z(start),
                               "to": _z(end), "reports": {}}
    for name, build in REPORTS.items():
        report = await build(session, start, end)
        entry: dict[str, Any] = {
            "totals": report.totals,
            "path": f"/api/v1/reports/{name}?from={_z(start)}&to={_z(end)}"}
        if name == "delivery":
            entry["systems"] = {
                row["system"]: {column: row[column] for column in
                                ("attempts", "success_rate", "p95_latency_ms",
                                 "dead_lettered")}
                for row in report.rows}
        summary["reports"][name] = entry
    return summary
