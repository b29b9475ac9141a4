"""The attention dashboard: what needs a person now. Every figure is one aggregate query over
an indexed status column, so it stays cheap on a large database.

Each item's path lists exactly the rows it counts: the same statuses (several, comma
separated, where the count takes several), the same system, the same time bound. The
console's cards link to the console page of the same path (console/views.console_path)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.auth.tokens import unscoped_summary
from pipeline_console.consumers import registry as consumers
from pipeline_console.db import hour_bucket
from pipeline_console.delivery.workers import card_since, lost_worker_summary
from pipeline_console.models import (
    AmbiguousOutcome,
    Anomaly,
    Circuit,
    DeadLetter,
    Delivery,
    DeliveryAttempt,
    IngestionAttempt,
    ReplayRequest,
    StagingRecord,
)


@dataclass(frozen=True)
class AttentionItem:
    name: str
    title: str
    count: int
    oldest_at: datetime | None
    oldest_age_s: float | None
    severity: str  # ok, warning, critical
    path: str
    system: str | None = None


def _item(name: str, title: str, count: int, oldest: datetime | None, now: datetime,
          severity_when_any: str, path: str, system: str | None = None) -> AttentionItem:
    return AttentionItem(name, title, count, oldest,
                         (now - oldest).total_seconds() if oldest else None,
                         severity_when_any if count else "ok", path, system)


def list_path(name: str, **filters: str | None) -> str:
    """The API path of a list with these filters (None: left out), readable: commas and the
    colons of a time are not escaped."""
    query = urlencode({key: value for key, value in filters.items() if value is not None},
                      safe=",:")
    return f"/api/v1/{name}" + (f"?{query}" if query else "")


def _time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


BACKLOG = ("pending", "held", "in_flight")  # the deliveries still to be made
UNSUCCESSFUL_REPLAYS = ("rejected", "failed")


def lag_severity(lag_s: float | None) -> str:
    if lag_s is None or lag_s < 300:
        return "ok"
    return "warning" if lag_s < 3600 else "critical"


async def attention(session: AsyncSession, *, now: datetime, stale_partial_after_s: float,
                    worker_lost_after_s: float, consumer_lost_after_s: float,
                    consumer_backlog_alert_s: float) -> list[AttentionItem]:
    items: list[AttentionItem] = []
    count, oldest = (await session.execute(
        select(func.count(), func.min(Anomaly.opened_at)).where(Anomaly.status == "open"))).one()
    items.append(_item("open_anomalies", "Same-version conflicts waiting for a decision",
                       count, oldest, now, "warning", list_path("anomalies", status="open")))

    for system, count, oldest in (await session.execute(
            select(DeadLetter.system, func.count(), func.min(DeadLetter.created_at))
            .where(DeadLetter.status == "open").group_by(DeadLetter.system)
            .order_by(DeadLetter.system))).all():
        items.append(_item("dead_letters", f"Dead letters for {system}", count, oldest, now,
                           "critical", list_path("dlq", system=system, status="open"),
                           system))
    if not any(item.name == "dead_letters" for item in items):
        items.append(_item("dead_letters", "Dead letters", 0, None, now, "critical",
                           list_path("dlq", status="open")))

    count, oldest = (await session.execute(
        select(func.count(), func.min(AmbiguousOutcome.created_at))
        .where(AmbiguousOutcome.status == "open"))).one()
    items.append(_item("ambiguous_outcomes", "Deliveries that may or may not have arrived",
                       count, oldest, now, "critical", list_path("ambiguous", status="open")))

    for state, severity in (("open", "critical"), ("half_open", "warning")):
        count, oldest = (await session.execute(
            select(func.count(), func.min(Circuit.changed_at))
            .where(Circuit.state == state))).one()
        items.append(_item(f"{state}_circuits", f"Circuits {state.replace('_', '-')}", count,
                           oldest, now, severity, list_path("circuits", state=state)))

    stale_before = now - timedelta(seconds=stale_partial_after_s)
    count, oldest = (await session.execute(
        select(func.count(), func.min(StagingRecord.staged_at))
        .where(StagingRecord.status == "partial",
               StagingRecord.staged_at < stale_before))).one()
    items.append(_item("stale_partials",
                       f"Partial records waiting longer than {stale_partial_after_s:.0f} s",
                       count, oldest, now, "warning",
                       list_path("staging", status="partial", staged_before=_time(stale_before))))

    for system, count, oldest in (await session.execute(
            select(Delivery.system, func.count(), func.min(Delivery.created_at))
            .where(Delivery.status.in_(BACKLOG))
            .group_by(Delivery.system).order_by(Delivery.system))).all():
        lag = (now - oldest).total_seconds() if oldest else None
        items.append(AttentionItem("delivery_backlog", f"Deliveries waiting for {system}",
                                   count, oldest, lag, lag_severity(lag),
                                   list_path("deliveries", system=system,
                                             status=",".join(BACKLOG)),
                                   system))

    since = now - timedelta(hours=24)
    count, oldest = (await session.execute(
        select(func.count(), func.min(ReplayRequest.created_at))
        .where(ReplayRequest.status.in_(UNSUCCESSFUL_REPLAYS),
               ReplayRequest.created_at >= since))).one()
    items.append(_item("unsuccessful_replays", "Replays rejected or failed in the last 24 h",
                       count, oldest, now, "warning",
                       list_path("replays", status=",".join(UNSUCCESSFUL_REPLAYS),
                                 **{"from": _time(since)})))
    count, oldest = await lost_worker_summary(session, now=now,
                                              lost_after_s=worker_lost_after_s)
    items.append(_item("lost_workers", "Workers lost in the last 24 h (no heartbeat, never "
                       "stopped)", count, oldest, now, "warning",
                       list_path("workers", status="lost",
                                 **{"from": _time(card_since(now))})))
    items.extend(await _intake_items(session, now=now, lost_after_s=consumer_lost_after_s,
                                     backlog_alert_s=consumer_backlog_alert_s))
    count, oldest = await unscoped_summary(session)
    if count:  # shown until the last one is replaced (an upgrade leaves them behind)
        many = count != 1
        items.append(_item("unscoped_ingest_tokens",
                           f"{count} ingest token{'s' if many else ''} "
                           f"{'have' if many else 'has'} no source scope: replace "
                           f"{'them' if many else 'it'}", count, oldest, now, "warning",
                           list_path("tokens", unscoped="true")))
    return items


async def _intake_items(session: AsyncSession, *, now: datetime, lost_after_s: float,
                        backlog_alert_s: float) -> list[AttentionItem]:
    """The broker consumers' cards, shown only while there is something to see (most
    installations take no broker at all)."""
    summary = await consumers.intake_summary(session, now=now, lost_after_s=lost_after_s,
                                             backlog_alert_s=backlog_alert_s)
    items = []
    if summary["lost"]:
        items.append(_item("lost_consumers", "Broker consumers lost in the last 24 h (no "
                           "heartbeat, never stopped)", summary["lost"],
                           summary["lost_oldest"], now, "warning",
                           list_path("intake", status="lost",
                                     **{"from": _time(consumers.card_since(now))})))
    if summary["falling_behind"]:
        items.append(_item("consumers_falling_behind", "Broker consumers whose broker's "
                           f"backlog has grown for more than {backlog_alert_s:.0f} s",
                           summary["falling_behind"], summary["falling_behind_oldest"], now,
                           "warning",
                           list_path("intake", status="alive", backlog_growing_before=_time(
                               consumers.growing_before(now, backlog_alert_s)))))
    return items


async def _recent_counts(session: AsyncSession, time_column: Any, word_column: Any,
                         windows: dict[str, datetime]) -> dict[str, dict[str, int]]:
    """Rows per word (decision, classification) since each window's start, in one query.

    The rows of the widest window are selected first (a MATERIALIZED CTE over the time
    index), then grouped: asked in one step, SQLite would rather walk an index on the word,
    which avoids a sort but reads the whole table (over a second at a million rows)."""
    widest = min(windows.values())
    recent = (select(time_column.label("at"), word_column.label("word"))
              .where(time_column >= widest).cte("recent").prefix_with("MATERIALIZED"))
    counts = {name: func.sum(case((recent.c.at >= start, 1), else_=0))
              for name, start in windows.items()}
    out: dict[str, dict[str, int]] = {name: {} for name in windows}
    for row in (await session.execute(
            select(recent.c.word, *(count.label(name) for name, count in counts.items()))
            .group_by(recent.c.word))).all():
        for name in windows:
            if row._mapping[name]:
                out[name][row.word] = row._mapping[name]
    return out


async def rates(session: AsyncSession, *, now: datetime) -> dict[str, Any]:
    """Messages decided and delivery attempts made in the last 5 minutes and the last hour."""
    spans = {"last_5_min": timedelta(minutes=5), "last_hour": timedelta(hours=1)}
    windows = {name: now - delta for name, delta in spans.items()}
    ingested = await _recent_counts(session, IngestionAttempt.received_at,
                                    IngestionAttempt.decision, windows)
    delivered = await _recent_counts(session, DeliveryAttempt.started_at,
                                     DeliveryAttempt.classification, windows)
    return {name: {"ingestion": ingested[name], "delivery": delivered[name],
                   "ingested_per_s": round(sum(ingested[name].values())
                                           / delta.total_seconds(), 3)}
            for name, delta in spans.items()}


@dataclass(frozen=True)
class HourlyActivity:
    hours: list[str]  # 'YYYY-MM-DD HH', oldest first
    ingestion: dict[str, dict[str, int]]  # hour -> decision -> count
    delivery: dict[str, dict[str, int]]  # hour -> classification -> count


async def hourly_activity(session: AsyncSession, *, now: datetime,
                          hours: int = 24) -> HourlyActivity:
    """Ingestion decisions and delivery outcomes per UTC hour over the last `hours` hours
    (the current hour included): one grouped query each."""
    end = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    labels = [f"{end - timedelta(hours=back):%Y-%m-%d %H}" for back in range(hours - 1, -1, -1)]
    start = end - timedelta(hours=hours - 1)
    dialect = session.bind.dialect.name
    figures = []
    for column, word in ((IngestionAttempt.received_at, IngestionAttempt.decision),
                         (DeliveryAttempt.started_at, DeliveryAttempt.classification)):
        bucket = hour_bucket(column, dialect)
        counts: dict[str, dict[str, int]] = {label: {} for label in labels}
        for hour, name, count in (await session.execute(
                select(bucket, word, func.count()).where(column >= start)
                .group_by(bucket, word))).all():
            if hour in counts:
                counts[hour][name] = count
        figures.append(counts)
    return HourlyActivity(labels, *figures)
