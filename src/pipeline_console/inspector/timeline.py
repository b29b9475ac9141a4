"""The inspector's timeline: one sentence per event saying what happened and why. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pipeline_console.inspector.stored_json import json_of


@dataclass(frozen=True)
class Entry:
    at: datetime
    kind: str
    summary: str
    ref: dict[str, Any]


# The rows are SQLAlchemy Core rows, read through their mapping: a Row's attribute access
# is a Python __getattr__ (0.7 µs), its mapping's lookup a C one; a timeline of 600 entries
# read ten columns each.

def attempt_entry(row: Any, staged: Any = None) -> Entry:
    """`staged`: the staging row the attempt wrote, when known. The attempt keeps the answer
    the caller got, which is the status the row had when the message was decided; a newer
    version later in the same batch can still have superseded it before anything was
    written, and then the sentence says so rather than repeat "promoted"."""
    row = row._mapping
    decision, message_id = row["decision"], row["message_id"]
    where = f" (message {message_id})" if message_id else ""
    if decision == "rejected":
        fields = ", ".join(error.get("field", "?") for error in json_of(row["errors"]) or [])
        summary = f"rejected{where}: {row['reason'].removeprefix('rejected: ')} ({fields})"
    else:
        summary = f"{decision}{where}: {row['reason']}"
        answered = row["staging_status"]
        if answered == "promoted" and staged is not None and staged.status == "superseded" \
                and staged.promoted_at is None:
            summary += ("; staged as complete, but a newer version in the same batch "
                        "superseded it before it was promoted (the answer said promoted)")
        elif answered:
            summary += f"; staged as {answered}"
    return Entry(row["received_at"], f"ingestion.{decision}", summary, {"attempt_id": row["id"]})


def delivery_attempt_entry(row: Any) -> Entry:
    row = row._mapping
    answer = (f"HTTP {row['response_status']}" if row["response_status"] is not None
              else row["error"] or "no answer")
    summary = (f"delivery {row['delivery_id']} to {row['system']}, try "
               f"{row['attempt_number']} ({row['trigger']}, by {row['actor']}): "
               f"{row['classification']} by rule {row['rule']} — {answer}")
    return Entry(row["started_at"], f"delivery.{row['classification']}", summary,
                 {"delivery_attempt_id": row["id"], "delivery_id": row["delivery_id"]})


_AUDIT_SENTENCES = {
    "record.accepted": "version {version} accepted ({decision}) from {source_system}",
    "record.promoted": "version {version} promoted to production",
    "record.superseded": "version {version} ({staged_as}) superseded by version "
                         "{superseded_by}: {reason}",
    "record.staged_partial": "version {version} staged as partial: it does not satisfy the "
                             "entity type's schema yet",
    "record.partial_stale": "version {version} from {source_system} is still partial after "
                            "{waiting_s} s, missing: {missing}",
    "anomaly.opened": "anomaly opened: {incoming_source_system} and {current_source_system} "
                      "disagree about version {version} ({differing_fields} fields differ)",
    "anomaly.resolved": "anomaly resolved ({resolution}): {note}",
    "delivery.dead_lettered": "delivery to {system} dead-lettered: {reason}",
    "delivery.ambiguous": "delivery to {system} is ambiguous: {reason}",
    "ambiguous.queried": "status query about the ambiguous delivery to {system}: {result}",
    "ambiguous.resolved": "ambiguous delivery to {system} resolved as {resolution}: {note}",
}


def audit_entry(row: Any) -> Entry:
    row = row._mapping
    action, details = row["action"], row["details"]
    template = _AUDIT_SENTENCES.get(action)
    try:
        sentence = template.format(**details) if template else None
    except (KeyError, IndexError):
        sentence = None
    sentence = sentence or f"{action}: {details}"
    return Entry(row["occurred_at"], f"audit.{action}", f"{sentence} (by {row['actor']})",
                 {"audit_id": row["id"]})


def replay_entry(request: Any, item: Any) -> Entry:
    return Entry(request.created_at, "replay.requested",
                 f"replay {request.id} requested by {request.requested_by} ({request.reason}): "
                 f"this record {'eligible' if item.eligible else 'ineligible'} — {item.reason}; "
                 f"request {request.status}", {"replay_id": request.id})


def merge(*groups: list[Entry]) -> list[Entry]:
    """Oldest first; at the same instant, ingestion before audit before delivery."""
    order = {"ingestion": 0, "audit": 1, "replay": 2, "delivery": 3}
    entries = [entry for group in groups for entry in group]
    return sorted(entries, key=lambda e: (e.at, order.get(e.kind.split(".")[0], 9)))
