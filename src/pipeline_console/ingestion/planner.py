"""Plan a batch of messages: a pure fold of the five-branch decision over the keys' states.

The planner decides every message in order, exactly as if the messages had arrived one at a
time, and returns everything the service must write: attempt outcomes, staging rows, the final
production row per key, the final state per key, the anomalies to open and the audit events.
A batch therefore costs a handful of statements per table, not a round trip per message, and a
batch's answers equal the answers the same messages would have got one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pipeline_console.ingestion.policy import CurrentState, Decision, decide

# (entity_type, payload) → what the payload lacks to satisfy its schema; empty means complete.
Completeness = Callable[[str, dict[str, Any]], list[dict[str, Any]]]


@dataclass(frozen=True)
class IncomingMessage:
    source_system: str
    entity_type: str
    entity_id: str
    key: str
    version: int
    payload: dict[str, Any]
    payload_hash: str
    correlation_id: str | None = None
    message_id: str | None = None
    occurred_at: datetime | None = None


@dataclass(frozen=True)
class KeySnapshot:
    """A key's state before the batch: its current state and its production version."""

    state: CurrentState
    production_version: int | None


@dataclass
class PlannedStaging:
    message_index: int
    key: str
    version: int
    status: str  # final status after the whole batch: partial, complete, promoted, superseded
    validation_errors: list[dict[str, Any]]


@dataclass(frozen=True)
class PlannedQuarantine:
    message_index: int
    key: str
    version: int
    current: CurrentState
    current_payload: dict[str, Any] | None  # known when the current version is in this batch


@dataclass(frozen=True)
class Outcome:
    decision: Decision
    reason: str
    staging_status: str | None  # the staged row's status right after this message was decided
    staging_index: int | None  # into Plan.staging
    quarantine_index: int | None  # into Plan.quarantines


@dataclass(frozen=True)
class AuditDraft:
    action: str
    key: str
    details: dict[str, Any]


@dataclass
class Plan:
    outcomes: list[Outcome] = field(default_factory=list)
    staging: list[PlannedStaging] = field(default_factory=list)
    quarantines: list[PlannedQuarantine] = field(default_factory=list)
    new_states: dict[str, CurrentState] = field(default_factory=dict)
    # key → index into staging of the row that ends the batch in production
    production: dict[str, int] = field(default_factory=dict)
    # keys whose pre-existing partial/complete staging rows a newer version supersedes
    superseding_keys: set[str] = field(default_factory=set)
    audit: list[AuditDraft] = field(default_factory=list)


def plan_batch(
    messages: Sequence[IncomingMessage],
    snapshots: dict[str, KeySnapshot],
    completeness: Completeness,
) -> Plan:
    plan = Plan()
    states = {key: snapshot.state for key, snapshot in snapshots.items()}
    production = {key: snapshot.production_version for key, snapshot in snapshots.items()}
    payloads_in_batch: dict[tuple[str, int, str], dict[str, Any]] = {}
    open_rows: dict[str, list[int]] = {}  # key → partial/complete staging rows of this batch

    for index, message in enumerate(messages):
        key = message.key
        current = states.get(key)
        verdict = decide(current, message.version, message.payload_hash, message.source_system)

        if verdict.decision is Decision.QUARANTINE:
            assert current is not None
            plan.quarantines.append(
                PlannedQuarantine(
                    message_index=index,
                    key=key,
                    version=message.version,
                    current=current,
                    current_payload=payloads_in_batch.get(
                        (key, current.version, current.payload_hash)
                    ),
                )
            )
            plan.outcomes.append(
                Outcome(verdict.decision, verdict.reason, None, None, len(plan.quarantines) - 1)
            )
            continue
        if not verdict.decision.accepted:
            plan.outcomes.append(Outcome(verdict.decision, verdict.reason, None, None, None))
            continue

        # Accepted: a newer version supersedes every not-yet-promoted older row of the key.
        for row_index in open_rows.pop(key, []):
            plan.staging[row_index].status = "superseded"
        if key in snapshots:
            plan.superseding_keys.add(key)

        errors = completeness(message.entity_type, message.payload)
        if errors:
            status = "partial"
        elif production.get(key) is None or message.version > production[key]:  # type: ignore[operator]
            status = "promoted"
        else:
            status = "complete"
        plan.staging.append(PlannedStaging(index, key, message.version, status, errors))
        staging_index = len(plan.staging) - 1
        if status == "promoted":
            production[key] = message.version
            plan.production[key] = staging_index
        else:
            open_rows.setdefault(key, []).append(staging_index)

        states[key] = CurrentState(message.version, message.payload_hash, message.source_system)
        plan.new_states[key] = states[key]
        payloads_in_batch[(key, message.version, message.payload_hash)] = message.payload
        plan.outcomes.append(Outcome(verdict.decision, verdict.reason, status, staging_index, None))
        plan.audit.append(
            AuditDraft(
                "record.accepted",
                key,
                {
                    "decision": str(verdict.decision),
                    "version": message.version,
                    "source_system": message.source_system,
                    "staging_status": status,
                    "reason": verdict.reason,
                },
            )
        )
        if status == "promoted":
            plan.audit.append(
                AuditDraft("record.promoted", key, {"version": message.version,
                                                    "source_system": message.source_system})
            )
        elif status == "partial":
            plan.audit.append(
                AuditDraft("record.staged_partial", key,
                           {"version": message.version, "missing": errors})
            )
    return plan

