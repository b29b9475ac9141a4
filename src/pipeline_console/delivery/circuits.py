"""Circuit breakers, one per system, whose state lives in the database for every worker."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.audit.service import AuditEntry, append_audit
from pipeline_console.delivery.policy import (
    Breaker,
    CircuitEvent,
    CircuitState,
    TransitionRefused,
    transition,
)
from pipeline_console.errors import Conflict, NotFound
from pipeline_console.models import Circuit, Delivery, DownstreamSystem


async def lock_circuit(session: AsyncSession, system: str) -> Circuit:
    circuit = (
        await session.execute(
            select(Circuit).where(Circuit.system == system).with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if circuit is None:
        raise NotFound(f"no downstream system is named {system!r}")
    return circuit


async def apply_event(
    session: AsyncSession, circuit: Circuit, event: CircuitEvent, *, threshold: int,
    now: datetime, reason: str, actor: str,
) -> list[AuditEntry]:
    """Move a locked circuit; returns the audit entries of a change of state."""
    before = Breaker(CircuitState(circuit.state), circuit.consecutive_failures)
    after = transition(before, event, threshold)
    circuit.consecutive_failures = after.consecutive_failures
    if after.state is before.state:
        return []
    circuit.state = after.state.value
    circuit.changed_at = now
    circuit.reason = reason
    if event in (CircuitEvent.HEALTHY, CircuitEvent.FAILURE):
        # An outcome ends the trial. An operator's force-open or reset does not: a trial
        # still being sent keeps the slot, so a reset can never start a second one.
        circuit.trial_delivery_id = None
    if after.state is CircuitState.HALF_OPEN and circuit.trial_delivery_id is None:
        await release_held(session, circuit.system, now, only_oldest=True)
    if after.state is CircuitState.CLOSED:
        # The trial went through: what waited behind the open circuit may go now.
        await release_held(session, circuit.system, now)
    return [AuditEntry(f"circuit.{after.state.value}", "circuit", circuit.system,
                       {"from": before.state.value, "to": after.state.value,
                        "event": event.value, "reason": reason,
                        "consecutive_failures": after.consecutive_failures})]


async def release_held(session: AsyncSession, system: str, now: datetime, *,
                       only_oldest: bool = False) -> None:
    """Held deliveries of a system go back to the queue (locked in id order)."""
    query = (select(Delivery.id).where(Delivery.system == system, Delivery.status == "held")
             .order_by(Delivery.id).with_for_update())
    if only_oldest:
        query = query.limit(1)
    ids = list((await session.execute(query)).scalars())
    if ids:
        await session.execute(update(Delivery).where(Delivery.id.in_(ids)).values(
            status="pending", next_attempt_at=now, updated_at=now))


async def free_trial(session: AsyncSession, circuit: Circuit, delivery_id: int,
                     now: datetime) -> None:
    """The trial ended without an outcome (superseded, or its claim was lost): let the next
    held delivery be the trial, so a half-open circuit never waits for nothing."""
    if circuit.trial_delivery_id != delivery_id:
        return
    circuit.trial_delivery_id = None
    if circuit.state == "half_open":
        await release_held(session, circuit.system, now, only_oldest=True)


async def operator_transition(
    session: AsyncSession, system: str, event: CircuitEvent, reason: str, *, actor: str,
    now: datetime,
) -> tuple[Circuit, list[AuditEntry]]:
    circuit = await lock_circuit(session, system)
    threshold = await session.scalar(
        select(DownstreamSystem.failure_threshold).where(DownstreamSystem.name == system)
    )
    try:
        entries = await apply_event(session, circuit, event, threshold=threshold, now=now,
                                    reason=reason, actor=actor)
    except TransitionRefused as error:
        raise Conflict(str(error)) from error
    await session.flush()
    return circuit, entries


async def operator_action(session: AsyncSession, system: str, event: CircuitEvent,
                          reason: str, *, actor: str, now: datetime) -> Circuit:
    """An operator's reset or force-open, audited: what the API and the console call."""
    circuit, entries = await operator_transition(session, system, event, reason, actor=actor,
                                                 now=now)
    await append_audit(session, entries, actor=actor, now=now)
    return circuit
