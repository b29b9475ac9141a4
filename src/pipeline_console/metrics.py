"""Prometheus metrics.

Process counters (module-level, the default registry): what *this* process did. They are
incremented only after the transaction that stored the thing counted has committed.

Label values are bounded: decisions and classifications are fixed words;
system names are configured by an administrator; source system names come from untrusted
input, so they are truncated and, past a cap of distinct names per process, counted as
"other".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import Counter, Histogram

from pipeline_console.ingestion.intake import RejectedMessage
from pipeline_console.ingestion.planner import IncomingMessage
from pipeline_console.ingestion.policy import REJECTED

SOURCE_LABEL_LENGTH = 64
MAX_SOURCE_LABELS = 1000

INGESTION_DECISIONS = Counter(
    "pipeline_ingestion_decisions", "Messages decided (and committed) by this process",
    ["decision", "source_system"])
DELIVERY_ATTEMPTS = Counter(
    "pipeline_delivery_attempts", "Delivery attempts recorded by this process",
    ["system", "classification"])
DELIVERY_LATENCY = Histogram(
    "pipeline_delivery_latency_seconds", "Time a delivery's send took, as recorded",
    ["system"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

_source_labels: set[str] = set()


def source_label(name: str | None) -> str:
    """A source system's name as a label value: never empty, never long, never unbounded."""
    if not name:
        return "unknown"
    label = name[:SOURCE_LABEL_LENGTH]
    if label not in _source_labels:
        if len(_source_labels) >= MAX_SOURCE_LABELS:
            return "other"
        _source_labels.add(label)
    return label


def count_ingestion(items: Sequence[IncomingMessage | RejectedMessage],
                    results: Sequence[Any]) -> None:
    """Count committed ingestion results; `results` are ingest_messages' answers to `items`."""
    for item, result in zip(items, results, strict=True):
        if isinstance(item, RejectedMessage):
            decision, source = REJECTED, item.known.get("source_system")
        else:
            decision, source = result.decision, item.source_system
        INGESTION_DECISIONS.labels(decision, source_label(source)).inc()


def count_delivery_attempt(system: str, classification: str,
                           latency_ms: float | None = None) -> None:
    DELIVERY_ATTEMPTS.labels(system, classification).inc()
    if latency_ms is not None:
        DELIVERY_LATENCY.labels(system).observe(latency_ms / 1000)
