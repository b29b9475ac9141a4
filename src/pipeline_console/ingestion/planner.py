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
from typing import Any, NamedTuple, cast

from pipeline_console.ingestion.policy import CurrentState, Decision, decide

QUARANTINE, ACCEPT_NEW, ACCEPT_SUPERSEDE = (
    Decision.QUARANTINE, Decision.ACCEPT_NEW, Decision.ACCEPT_SUPERSEDE)

# (entity_type, payload) → what the payload lacks to satisfy its schema; empty means complete.
Completeness = Callable[[str, dict[str, Any]], list[dict[str, Any]]]


class IncomingMessage(NamedTuple):
    """A message that passed validation: what the planner decides on."""

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


# The planner's records are NamedTuples (and PlannedStaging a slotted dataclass): a batch makes
# several per message, and a frozen dataclass's __init__ (object.__setattr__ per field) was a
# measurable share of a batch (bench/notes/01-ingestion.md).


class KeySnapshot(NamedTuple):
    """A key's state before the batch: its current state and its production version."""

    state: CurrentState
    production_version: int | None


@dataclass(slots=True)
class PlannedStaging:
    message_index: int
    key: str
    version: int
    status: str  # final status after the whole batch: partial, complete, promoted, superseded
    validation_errors: list[dict[str, Any]]


class PlannedQuarantine(NamedTuple):
    message_index: int
    key: str
    version: int
    current: CurrentState
    current_payload: dict[str, Any] | None  # known when the current version is in this batch


class Outcome(NamedTuple):
    decision: Decision
    reason: str
    staging_status: str | None  # the staged row's status right after this message was decided
    staging_index: int | None  # into Plan.staging
    quarantine_index: int | None  # into Plan.quarantines


class AuditDraft(NamedTuple):
    """An audit event about a record, in the shape append_audit takes (an AuditEntry's)."""

    action: str
    subject_type: str
    subject_id: str
    details: dict[str, Any]
    idempotency_key: str | None


@dataclass
class Plan:
    outcomes: list[Outcome] = field(default_factory=list)
    staging: list[PlannedStaging] = field(default_factory=list)
    quarantines: list[PlannedQuarantine] = field(default_factory=list)
    new_states: dict[str, CurrentState] = field(default_factory=dict)
    # key → index into staging of the row that ends the batch in production
    production: dict[str, int] = field(default_factory=dict)
    # key → the version of the batch's first accepted message of a key known before the
    # batch: it supersedes the key's pre-existing partial/complete staging rows
    superseding_keys: dict[str, int] = field(default_factory=dict)
    audit: list[AuditDraft] = field(default_factory=list)


def superseded_draft(key: str, version: int, source_system: str, staged_as: str,
                     superseded_by: int, *, within_batch: bool) -> AuditDraft:
    """record.superseded: a staged version that a newer one replaced before it was ever
    promoted, so it never reached production and was never delivered."""
    how = ("it arrived in the same batch" if within_batch else
           f"it was accepted while version {version} was still {staged_as} in staging")
    return AuditDraft("record.superseded", "record", key, {
        "version": version, "superseded_by": superseded_by, "source_system": source_system,
        "staged_as": staged_as, "within_batch": within_batch,
        "reason": f"{how}, so version {version} was never promoted to production and never "
                  "delivered",
    }, key)


def plan_batch(
    messages: Sequence[IncomingMessage],
    snapshots: dict[str, KeySnapshot],
    completeness: Completeness,
) -> Plan:
    plan = Plan()
    outcomes, staging = plan.outcomes, plan.staging
    # None marks a record.promoted draft withdrawn because a newer version of the same key
    # took its place in production before the batch was written (it never was promoted).
    audit: list[AuditDraft | None] = []
    withdrawn = False
    promoted_audit: dict[str, int] = {}  # key → index into audit of its record.promoted
    accepted_details: dict[int, dict[str, Any]] = {}  # staging index → its record.accepted
    states = {key: snapshot.state for key, snapshot in snapshots.items()}
    production = {key: snapshot.production_version for key, snapshot in snapshots.items()}
    latest_in_batch: dict[str, int] = {}  # key → index of its last accepted message here
    open_rows: dict[str, list[int]] = {}  # key → partial/complete staging rows of this batch

    for index, message in enumerate(messages):
        key = message.key
        current = states.get(key)
        decision, reason = decide(current, message.version, message.payload_hash,
                                  message.source_system)

        if decision is QUARANTINE:
            assert current is not None
            latest = latest_in_batch.get(key)
            # The key's current state came from this batch when a message of it was accepted
            # here; its payload is then that message's.
            plan.quarantines.append(PlannedQuarantine(
                index, key, message.version, current,
                messages[latest].payload if latest is not None else None,
            ))
            outcomes.append(Outcome(decision, reason, None, None, len(plan.quarantines) - 1))
            continue
        if decision is not ACCEPT_NEW and decision is not ACCEPT_SUPERSEDE:
            outcomes.append(Outcome(decision, reason, None, None, None))
            continue

        # Accepted: a newer version supersedes every not-yet-promoted older row of the key.
        superseded = open_rows.pop(key, ())
        if key in snapshots:
            plan.superseding_keys.setdefault(key, message.version)

        errors = completeness(message.entity_type, message.payload)
        if errors:
            status = "partial"
        elif (held := production.get(key)) is None or message.version > held:
            status = "promoted"
        else:
            status = "complete"
        staging_index = len(staging)
        staging.append(PlannedStaging(index, key, message.version, status, errors))
        replaced = None  # this batch's row of the key that this one replaces in production
        if status == "promoted":
            production[key] = message.version
            replaced = plan.production.get(key)
            plan.production[key] = staging_index
        else:
            open_rows.setdefault(key, []).append(staging_index)

        states[key] = plan.new_states[key] = CurrentState(
            message.version, message.payload_hash, message.source_system)
        latest_in_batch[key] = index
        outcomes.append(Outcome(decision, reason, status, staging_index, None))
        accepted_details[staging_index] = details = {
            "decision": str(decision),
            "version": message.version,
            "source_system": message.source_system,
            "staging_status": status,
            "reason": reason,
        }
        audit.append(AuditDraft("record.accepted", "record", key, details, key))
        for row_index in superseded:
            row = staging[row_index]
            row.status = "superseded"
            audit.append(superseded_draft(
                key, row.version, messages[row.message_index].source_system,
                accepted_details[row_index]["staging_status"], message.version,
                within_batch=True))
        if replaced is not None:
            # Promoted earlier in this batch, but production is written once per key, with
            # the batch's last promoted version: the earlier one never reached it, and no
            # delivery was ever queued for it.
            row = staging[replaced]
            row.status = "superseded"
            accepted_details[replaced]["staging_status"] = "complete"
            audit[promoted_audit.pop(key)] = None
            withdrawn = True
            audit.append(superseded_draft(
                key, row.version, messages[row.message_index].source_system, "complete",
                message.version, within_batch=True))
        if status == "promoted":
            promoted_audit[key] = len(audit)
            audit.append(AuditDraft("record.promoted", "record", key, {
                "version": message.version, "source_system": message.source_system}, key))
        elif status == "partial":
            audit.append(AuditDraft("record.staged_partial", "record", key,
                                    {"version": message.version, "missing": errors}, key))
    plan.audit = [draft for draft in audit if draft is not None] if withdrawn else cast(
        list[AuditDraft], audit)
    return plan
