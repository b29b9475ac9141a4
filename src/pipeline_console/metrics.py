"""Prometheus metrics.

Two kinds, rendered together by GET /metrics:
- process counters (module-level, the default registry): what *this* process did. They are
  incremented only after the transaction that stored the thing counted has committed.
- gauges read from the database at scrape time (a fresh registry per scrape): the state every
  API and worker process shares, so any process answers the same.

Label values are bounded: decisions, classifications, methods and statuses are fixed words;
system names are configured by an administrator; source system names come from untrusted
input, so they are truncated and, past a cap of distinct names per process, counted as
"other".
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.consumers.registry import consumer_counts, live_backlogs
from pipeline_console.ingestion.intake import RejectedMessage
from pipeline_console.ingestion.planner import IncomingMessage
from pipeline_console.ingestion.policy import REJECTED
from pipeline_console.models import (
    AmbiguousOutcome,
    Anomaly,
    Circuit,
    DeadLetter,
    Delivery,
    StagingRecord,
)

SOURCE_LABEL_LENGTH = 64
MAX_SOURCE_LABELS = 1000
CIRCUIT_STATES = ("closed", "open", "half_open")
CONSUMER_KINDS = ("rabbitmq", "nats")
CONSUMER_STATUSES = ("alive", "lost", "stopped")
QUEUE_LABEL_LENGTH = 64
BACKLOG_STATUSES = ("pending", "held", "in_flight")

INGESTION_DECISIONS = Counter(
    "pipeline_ingestion_decisions", "Messages decided (and committed) by this process",
    ["decision", "source_system"])
DELIVERY_ATTEMPTS = Counter(
    "pipeline_delivery_attempts", "Delivery attempts recorded by this process",
    ["system", "classification"])
DELIVERY_LATENCY = Histogram(
    "pipeline_delivery_latency_seconds", "Time a delivery's send took, as recorded",
    ["system"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
HTTP_REQUEST_DURATION = Histogram(
    "pipeline_http_request_duration_seconds",
    "HTTP requests served by this process, by route template", ["method", "route", "status"])
HTTP_ERRORS = Counter(
    "pipeline_http_errors_total",
    "HTTP answers with a 4xx or 5xx status, by route template and class", ["route", "class"])

_source_labels: set[str] = set()


def source_label(name: str | None, *, validated: bool = True) -> str:
    """A source system's name as a label value: never empty, never long, never unbounded.
    Only names from accepted (validated) messages become new labels: a rejected message's
    source is whatever the sender wrote, so it reuses a known label or counts as unknown."""
    if not name:
        return "unknown"
    label = name[:SOURCE_LABEL_LENGTH]
    if label not in _source_labels:
        if not validated:
            return "unknown"
        if len(_source_labels) >= MAX_SOURCE_LABELS:
            return "other"
        _source_labels.add(label)
    return label


def count_ingestion(items: Sequence[IncomingMessage | RejectedMessage],
                    results: Sequence[Any]) -> None:
    """Count committed ingestion results; `results` are ingest_messages' answers to `items`."""
    for item, result in zip(items, results, strict=True):
        if isinstance(item, RejectedMessage):
            label = source_label(item.known.get("source_system"), validated=False)
            INGESTION_DECISIONS.labels(REJECTED, label).inc()
        else:
            INGESTION_DECISIONS.labels(result.decision, source_label(item.source_system)).inc()


def count_delivery_attempt(system: str, classification: str,
                           latency_ms: float | None = None) -> None:
    DELIVERY_ATTEMPTS.labels(system, classification).inc()
    if latency_ms is not None:
        DELIVERY_LATENCY.labels(system).observe(latency_ms / 1000)


async def database_registry(session: AsyncSession, *, now: datetime,
                            consumer_lost_after_s: float) -> CollectorRegistry:
    """The shared state as gauges, read now: one grouped count per queue, each on an indexed
    status column, and the broker consumers."""
    registry = CollectorRegistry(auto_describe=True)
    circuit_state = Gauge("pipeline_circuit_state",
                          "1 for the circuit's current state, 0 for the others",
                          ["system", "state"], registry=registry)
    depth = Gauge("pipeline_queue_depth", "Items waiting in each queue, read from the database",
                  ["queue", "system"], registry=registry)

    circuits = dict((await session.execute(select(Circuit.system, Circuit.state))).all())
    for system, current in circuits.items():
        for state in CIRCUIT_STATES:
            circuit_state.labels(system, state).set(1 if state == current else 0)

    depth.labels("open_anomalies", "").set(await session.scalar(
        select(func.count()).where(Anomaly.status == "open")))
    depth.labels("partial_staging", "").set(await session.scalar(
        select(func.count()).where(StagingRecord.status == "partial")))

    per_system: dict[str, dict[str, int]] = {
        queue: dict.fromkeys(circuits, 0)
        for queue in ("dead_letters", "ambiguous_outcomes",
                      *(f"deliveries_{status}" for status in BACKLOG_STATUSES))}
    for system, count in (await session.execute(
            select(DeadLetter.system, func.count()).where(DeadLetter.status == "open")
            .group_by(DeadLetter.system))).all():
        per_system["dead_letters"][system] = count
    for system, count in (await session.execute(
            select(AmbiguousOutcome.system, func.count())
            .where(AmbiguousOutcome.status == "open").group_by(AmbiguousOutcome.system))).all():
        per_system["ambiguous_outcomes"][system] = count
    for system, status, count in (await session.execute(
            select(Delivery.system, Delivery.status, func.count())
            .where(Delivery.status.in_(BACKLOG_STATUSES))
            .group_by(Delivery.system, Delivery.status))).all():
        per_system[f"deliveries_{status}"][system] = count
    for queue, counts in per_system.items():
        for system, count in counts.items():
            depth.labels(queue, system).set(count)
    await _consumer_gauges(session, registry, now=now, lost_after_s=consumer_lost_after_s)
    return registry


async def _consumer_gauges(session: AsyncSession, registry: CollectorRegistry, *,
                           now: datetime, lost_after_s: float) -> None:
    """The broker consumers by kind and status (every pair, 0 included), and per queue of a
    live consumer its broker's backlog. Labels are fixed words and queue names (given by
    whoever starts a consumer, cut to 64 characters): never a broker URL, so never its
    credentials; the queues are those of consumers alive now, so their number is bounded by
    the processes running."""
    consumers = Gauge("pipeline_intake_consumers",
                      "Broker consumers seen in the last 24 h, by kind and status",
                      ["kind", "status"], registry=registry)
    counts = await consumer_counts(session, now=now, lost_after_s=lost_after_s)
    for kind in CONSUMER_KINDS:
        for status in CONSUMER_STATUSES:
            consumers.labels(kind, status).set(counts.get((kind, status), 0))
    backlog = Gauge("pipeline_intake_backlog",
                    "Messages waiting on the broker, as a live consumer of the queue last "
                    "reported", ["kind", "queue"], registry=registry)
    growing = Gauge("pipeline_intake_backlog_growing_seconds",
                    "How long the queue's backlog has grown at every heartbeat (0: it is not "
                    "growing)", ["kind", "queue"], registry=registry)
    for row in await live_backlogs(session, now=now, lost_after_s=lost_after_s):
        queue = row.queue[:QUEUE_LABEL_LENGTH]
        backlog.labels(row.kind, queue).set(row.backlog)
        since = row.backlog_growing_since
        growing.labels(row.kind, queue).set(
            0 if since is None else max(0.0, (now - since).total_seconds()))


def render(database_registry: CollectorRegistry | None) -> bytes:
    """This process's counters, then the database's gauges (or, when the database could not
    be read, pipeline_database_up 0, so the counters still reach Prometheus)."""
    registry = database_registry or CollectorRegistry(auto_describe=True)
    Gauge("pipeline_database_up", "1 when the gauges below could be read from the database",
          registry=registry).set(0 if database_registry is None else 1)
    return generate_latest(REGISTRY) + generate_latest(registry)
