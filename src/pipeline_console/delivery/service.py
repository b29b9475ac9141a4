"""deliver(): the one canonical delivery function. First tries, retries, "deliver now",
ambiguous-outcome resolution and replay all claim a delivery and then call it; nothing
else sends. A send happens between two short transactions, never inside one:

  claim   (transaction) pending → in_flight, with a lease and the circuit's permission
  send    (no transaction) through the transport
  record  (transaction) an append-only attempt row, the delivery's next state (delivered,
          retry later, dead letter, ambiguous) and the circuit's transition

A worker that dies between claim and record leaves an in-flight delivery whose lease expires;
recover_expired_leases() then makes it ambiguous: it may have left, so it is never silently
sent again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from pipeline_console.audit.service import AuditEntry, append_audit
from pipeline_console.clock import Clock
from pipeline_console.db import Database
from pipeline_console.delivery.circuits import apply_event, free_trial, lock_circuit
from pipeline_console.delivery.policy import (
    CircuitEvent,
    Classification,
    SendResult,
    Step,
    backoff_s,
    breaker_event,
    classify,
    next_step,
)
from pipeline_console.delivery.transports import (
    SystemConfig,
    Transports,
    build_request,
    total_deadline_s,
)
from pipeline_console.errors import Conflict, NotFound
from pipeline_console.metrics import count_delivery_attempt
from pipeline_console.models import (
    AmbiguousOutcome,
    Circuit,
    DeadLetter,
    Delivery,
    DeliveryAttempt,
    DownstreamSystem,
)

LIVE_STATUSES = ("pending", "held", "in_flight", "delivered", "ambiguous")
log = logging.getLogger("pipeline_console.delivery")


@dataclass
class Deliverer:
    """Everything a delivery needs: passed in, so tests control time and randomness."""

    database: Database
    transports: Transports
    clock: Clock
    worker_id: str
    lease_margin_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)


class Outcome(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD_LETTERED = "dead_lettered"
    AMBIGUOUS = "ambiguous"
    SUPERSEDED = "superseded"
    NOT_CLAIMED = "not_claimed"  # the lease was lost (another process recovered it)


@dataclass(frozen=True)
class DeliveryResult:
    delivery_id: int
    outcome: Outcome
    attempt_id: int | None = None
    classification: str | None = None


def system_config(system: DownstreamSystem) -> SystemConfig:
    return SystemConfig(system.name, system.transport, system.url, system.status_url,
                        system.timeout_s, system.simulation)


async def _lock_delivery(session: AsyncSession, delivery_id: int) -> Delivery:
    delivery = (
        await session.execute(
            select(Delivery).where(Delivery.id == delivery_id).with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if delivery is None:
        raise NotFound(f"delivery {delivery_id} does not exist")
    return delivery


def _no_older_in_flight() -> Any:
    """A delivery waits while another of the same record to the same system is being sent,
    so that the system receives a record's versions in order."""
    sibling = aliased(Delivery)
    return ~exists().where(sibling.system == Delivery.system,
                           sibling.idempotency_key == Delivery.idempotency_key,
                           sibling.status == "in_flight", sibling.id != Delivery.id)


def _lease(now: datetime, timeout_s: float, margin_s: float) -> datetime:
    return now + timedelta(seconds=total_deadline_s(timeout_s) + margin_s)


async def claim_due(deliverer: Deliverer, limit: int) -> list[int]:
    """Claim up to `limit` due deliveries for this worker. Deliveries of a system whose circuit
    is open are held instead; a half-open circuit lets exactly one trial through.

    Lock order, the same everywhere: circuits (by name), then deliveries (by id)."""

    async def work(session: AsyncSession) -> list[int]:
        now = deliverer.clock()
        due = (Delivery.status == "pending", Delivery.next_attempt_at <= now)
        systems = sorted((await session.execute(
            select(Delivery.system).where(*due).group_by(Delivery.system))).scalars())
        if not systems:
            return []
        circuits = {system: await lock_circuit(session, system) for system in systems}
        query = (select(Delivery.id, Delivery.system)
                 .where(*due, Delivery.system.in_(systems), _no_older_in_flight())
                 .order_by(Delivery.next_attempt_at, Delivery.id).limit(limit))
        if not deliverer.database.is_sqlite:
            query = query.with_for_update(skip_locked=True, of=Delivery)
        rows = (await session.execute(query)).all()
        timeouts = dict((await session.execute(
            select(DownstreamSystem.name, DownstreamSystem.timeout_s)
            .where(DownstreamSystem.name.in_(systems)))).all())
        claimed, held = [], []
        for delivery_id, system in rows:
            circuit = circuits[system]
            if circuit.state == "open":
                held.append(delivery_id)
            elif circuit.state == "half_open":
                if circuit.trial_delivery_id is None:
                    circuit.trial_delivery_id = delivery_id
                    claimed.append((delivery_id, system))
                else:
                    held.append(delivery_id)
            else:
                claimed.append((delivery_id, system))
        for delivery_id, system in claimed:
            await session.execute(
                update(Delivery).where(Delivery.id == delivery_id).values(
                    status="in_flight", claimed_by=deliverer.worker_id,
                    claim_trigger="scheduled", updated_at=now,
                    lease_expires_at=_lease(now, timeouts[system], deliverer.lease_margin_s)))
        if held:
            await session.execute(update(Delivery).where(Delivery.id.in_(held))
                                  .values(status="held", updated_at=now))
        return [delivery_id for delivery_id, _ in claimed]

    return await deliverer.database.run_transaction(work)


async def claim_one(
    deliverer: Deliverer, delivery_id: int, *, trigger: str, allowed: tuple[str, ...],
) -> None:
    """Claim one named delivery for an operator action (deliver now, resolution, replay)."""

    async def work(session: AsyncSession) -> None:
        await claim_in(session, deliverer, delivery_id, trigger=trigger, allowed=allowed)

    await deliverer.database.run_transaction(work)


async def claim_in(session: AsyncSession, deliverer: Deliverer, delivery_id: int, *,
                   trigger: str, allowed: tuple[str, ...]) -> None:
    """claim_one inside the caller's transaction, so that a caller can check something and
    claim in one atomic step (replay does)."""
    now = deliverer.clock()
    system = await session.scalar(select(Delivery.system).where(Delivery.id == delivery_id))
    if system is None:
        raise NotFound(f"delivery {delivery_id} does not exist")
    circuit = await lock_circuit(session, system)
    delivery = await _lock_delivery(session, delivery_id)
    if delivery.status not in allowed:
        raise Conflict(f"delivery {delivery_id} is {delivery.status}; "
                       f"this action needs it {' or '.join(allowed)}")
    if circuit.state == "open":
        raise Conflict(f"the circuit of {system} is open; nothing is sent until "
                       "an operator resets it")
    if circuit.state == "half_open":
        if circuit.trial_delivery_id not in (None, delivery_id):
            raise Conflict(f"the circuit of {system} is half-open and its trial "
                           f"delivery {circuit.trial_delivery_id} is under way")
        circuit.trial_delivery_id = delivery_id
    in_flight = await session.scalar(
        select(Delivery.id).where(Delivery.system == system,
                                  Delivery.idempotency_key == delivery.idempotency_key,
                                  Delivery.status == "in_flight").limit(1))
    if in_flight is not None:
        raise Conflict(f"delivery {in_flight} of the same record to {system} is being "
                       "sent; try again when it has an outcome")
    timeout = await session.scalar(
        select(DownstreamSystem.timeout_s).where(DownstreamSystem.name == system))
    delivery.status = "in_flight"
    delivery.claimed_by = deliverer.worker_id
    delivery.claim_trigger = trigger
    delivery.lease_expires_at = _lease(now, timeout, deliverer.lease_margin_s)
    delivery.updated_at = now
    await session.flush()


async def deliver(deliverer: Deliverer, delivery_id: int, *, trigger: str,
                  actor: str) -> DeliveryResult:
    """Send one claimed delivery and record what happened. THE way anything is sent."""

    async def prepare(session: AsyncSession) -> Any:
        delivery = await _lock_delivery(session, delivery_id)
        if delivery.status != "in_flight" or delivery.claimed_by != deliverer.worker_id:
            return None
        newer = await session.scalar(
            select(Delivery.version).where(
                Delivery.system == delivery.system,
                Delivery.idempotency_key == delivery.idempotency_key,
                or_(Delivery.version > delivery.version,
                    and_(Delivery.version == delivery.version, Delivery.id > delivery.id)),
                Delivery.status.in_(LIVE_STATUSES),
            ).limit(1)
        )
        if newer is not None:
            await _supersede(session, delivery, newer, deliverer.clock())
            return Outcome.SUPERSEDED
        system = await session.get(DownstreamSystem, delivery.system)
        return (system_config(system), build_request(delivery, delivery.attempts + 1),
                system.classification_overrides, system.max_attempts, system.failure_threshold,
                (system.backoff_base_s, system.backoff_max_s))

    prepared = await deliverer.database.run_transaction(prepare)
    if prepared is None:
        return DeliveryResult(delivery_id, Outcome.NOT_CLAIMED)
    if prepared is Outcome.SUPERSEDED:
        return DeliveryResult(delivery_id, Outcome.SUPERSEDED)
    config, request, overrides, max_attempts, threshold, backoff = prepared

    started_at = deliverer.clock()
    result = await deliverer.transports.send(config, request)
    classification, rule = classify(result, overrides)

    async def record(session: AsyncSession) -> DeliveryResult:
        now = deliverer.clock()
        circuit = await lock_circuit(session, config.name)
        delivery = await _lock_delivery(session, delivery_id)
        attempt = DeliveryAttempt(
            delivery_id=delivery_id, system=config.name, attempt_number=request.attempt_number,
            trigger=trigger, actor=actor, started_at=started_at, latency_ms=result.latency_ms,
            request=request.summary(config), response_status=result.status,
            response_body=result.body or None, classification=classification.value,
            rule=rule, error=result.error,
        )
        session.add(attempt)
        await session.flush()
        audit: list[AuditEntry] = []
        ours = delivery.status == "in_flight" and delivery.claimed_by == deliverer.worker_id
        late = None if ours else await _late_answer_to(session, delivery, deliverer.worker_id,
                                                       classification)
        if not ours and late is None:
            # Another process recovered this delivery meanwhile; the attempt row tells what
            # happened, and the circuit already counted the recovery.
            await free_trial(session, circuit, delivery_id, now)
            return DeliveryResult(delivery_id, Outcome.NOT_CLAIMED, attempt.id,
                                  classification.value)
        delivery.attempts = max(delivery.attempts, request.attempt_number)
        step = next_step(classification, delivery.attempts, max_attempts)
        outcome = await _apply_step(session, delivery, step, attempt, result,
                                    backoff, deliverer.rng, now, audit)
        if late is not None:
            audit.append(await _settle_late(session, late, delivery, classification, now))
        else:
            audit += await apply_event(
                session, circuit, breaker_event(classification), threshold=threshold, now=now,
                reason=f"delivery {delivery_id}: {classification.value} ({rule})", actor=actor,
            )
        await free_trial(session, circuit, delivery_id, now)
        await session.flush()
        await append_audit(session, audit, actor=actor, now=now)
        return DeliveryResult(delivery_id, outcome, attempt.id, classification.value)

    recorded = await deliverer.database.run_transaction(record)
    # Counted once the attempt row is committed, whichever of the outcomes above it had.
    count_delivery_attempt(config.name, classification.value, result.latency_ms)
    return recorded


async def _late_answer_to(session: AsyncSession, delivery: Delivery, worker_id: str,
                          classification: Classification) -> AmbiguousOutcome | None:
    """The open ambiguous outcome that the recovery of *our* expired claim created, when our
    send has now answered for certain (success, or a failure that means "not applied")."""
    if delivery.status != "ambiguous" or classification is Classification.AMBIGUOUS:
        return None
    return (await session.execute(
        select(AmbiguousOutcome)
        .join(DeliveryAttempt, DeliveryAttempt.id == AmbiguousOutcome.attempt_id)
        .where(AmbiguousOutcome.delivery_id == delivery.id, AmbiguousOutcome.status == "open",
               DeliveryAttempt.rule == "lease_expired", DeliveryAttempt.actor == worker_id)
        .with_for_update(of=AmbiguousOutcome)
    )).scalars().first()


async def _settle_late(session: AsyncSession, outcome: AmbiguousOutcome, delivery: Delivery,
                       classification: Classification, now: datetime) -> AuditEntry:
    delivered = classification is Classification.SUCCESS
    outcome.status = "resolved"
    outcome.resolution = "delivered" if delivered else "not_delivered"
    outcome.resolution_note = (f"the original send answered after its lease expired: "
                               f"{classification.value}")
    outcome.resolved_by = "system"
    outcome.resolved_at = now
    return AuditEntry("ambiguous.resolved", "ambiguous", str(outcome.id),
                      {"resolution": outcome.resolution, "note": outcome.resolution_note,
                       "delivery_id": delivery.id, "system": delivery.system},
                      delivery.idempotency_key)


async def _apply_step(
    session: AsyncSession, delivery: Delivery, step: Step, attempt: DeliveryAttempt,
    result: SendResult, backoff: tuple[float, float], rng: random.Random, now: datetime,
    audit: list[AuditEntry],
) -> Outcome:
    delivery.claimed_by = None
    delivery.lease_expires_at = None
    delivery.updated_at = now
    delivery.last_error = result.error or (
        f"HTTP {result.status}" if attempt.classification != "success" else None)
    key = delivery.idempotency_key
    if step is Step.DELIVERED:
        delivery.status = "delivered"
        delivery.delivered_at = now
        await _close_dead_letters(session, delivery.id, now)
        return Outcome.DELIVERED
    if step is Step.RETRY:
        delivery.status = "pending"
        delivery.next_attempt_at = now + timedelta(seconds=backoff_s(
            delivery.attempts, *backoff, rng, retry_after_s=result.retry_after_s))
        return Outcome.RETRY
    if step is Step.DEAD_LETTER:
        if attempt.classification == Classification.PERMANENT:
            reason = (f"permanent: HTTP {result.status} ({attempt.rule}): "
                      f"{(result.body or '')[:300]}")
        else:
            reason = f"retries_exhausted: {delivery.attempts} attempts, last {attempt.rule}"
        delivery.status = "dead_lettered"
        await _close_dead_letters(session, delivery.id, now)  # the new entry replaces them
        session.add(DeadLetter(delivery_id=delivery.id, system=delivery.system,
                               idempotency_key=key, reason=reason,
                               classification=attempt.classification, attempt_id=attempt.id,
                               status="open", created_at=now))
        audit.append(AuditEntry("delivery.dead_lettered", "delivery", str(delivery.id),
                                {"system": delivery.system, "version": delivery.version,
                                 "reason": reason}, key))
        return Outcome.DEAD_LETTERED
    delivery.status = "ambiguous"
    reason = f"{attempt.rule}: {result.error or 'no answer'}"
    session.add(AmbiguousOutcome(delivery_id=delivery.id, system=delivery.system,
                                 idempotency_key=key, reason=reason, attempt_id=attempt.id,
                                 status="open", queries=0, created_at=now))
    audit.append(AuditEntry("delivery.ambiguous", "delivery", str(delivery.id),
                            {"system": delivery.system, "version": delivery.version,
                             "reason": reason}, key))
    return Outcome.AMBIGUOUS


async def _close_dead_letters(session: AsyncSession, delivery_id: int, now: datetime) -> None:
    await session.execute(
        update(DeadLetter).where(DeadLetter.delivery_id == delivery_id,
                                 DeadLetter.status == "open")
        .values(status="closed", closed_at=now))


async def _supersede(session: AsyncSession, delivery: Delivery, newer: int,
                     now: datetime) -> None:
    delivery.status = "superseded"
    delivery.claimed_by = None
    delivery.lease_expires_at = None
    delivery.updated_at = now
    delivery.last_error = (f"superseded by a newer delivery (version {newer}); an older "
                           "payload is never sent after a newer one")
    await _close_dead_letters(session, delivery.id, now)
    circuit = (await session.execute(select(Circuit).where(Circuit.system == delivery.system)
                                     .with_for_update())).scalar_one()
    await free_trial(session, circuit, delivery.id, now)


async def recover_expired_leases(deliverer: Deliverer, limit: int = 100) -> int:
    """In-flight deliveries whose worker stopped before recording an outcome become ambiguous:
    the request may have reached the system, so it is never simply sent again. (If that
    worker was only slow and its answer arrives after all, the answer settles the outcome.)"""

    async def work(session: AsyncSession) -> list[str]:
        now = deliverer.clock()
        expired_where = (Delivery.status == "in_flight", Delivery.lease_expires_at < now)
        systems = sorted((await session.execute(
            select(Delivery.system).where(*expired_where).group_by(Delivery.system)
        )).scalars())
        if not systems:
            return []
        circuits = {system: await lock_circuit(session, system) for system in systems}
        query = (select(Delivery).where(*expired_where, Delivery.system.in_(systems))
                 .order_by(Delivery.id).limit(limit))
        if not deliverer.database.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        expired = list((await session.execute(query)).scalars())
        audit: list[AuditEntry] = []
        for delivery in expired:
            system = await session.get(DownstreamSystem, delivery.system)
            worker = delivery.claimed_by or "unknown"
            attempt = DeliveryAttempt(
                delivery_id=delivery.id, system=delivery.system,
                attempt_number=delivery.attempts + 1,
                trigger=delivery.claim_trigger or "scheduled", actor=worker,
                started_at=delivery.updated_at,
                request=build_request(delivery, delivery.attempts + 1).summary(
                    system_config(system)),
                classification="ambiguous", rule="lease_expired",
                error=f"worker {worker} stopped before recording an outcome; "
                      "the request may have been sent",
            )
            session.add(attempt)
            await session.flush()
            delivery.attempts += 1
            await _apply_step(session, delivery, Step.AMBIGUOUS, attempt,
                              SendResult(error=attempt.error), (0, 0), random.Random(0), now,
                              audit)
            circuit = circuits[delivery.system]
            audit += await apply_event(session, circuit, CircuitEvent.FAILURE,
                                       threshold=system.failure_threshold, now=now,
                                       reason=f"delivery {delivery.id}: lease expired",
                                       actor="system")
            await free_trial(session, circuit, delivery.id, now)
        await session.flush()
        await append_audit(session, audit, actor="system", now=now)
        return [delivery.system for delivery in expired]

    recovered = await deliverer.database.run_transaction(work)
    for system in recovered:  # attempt rows too (rule lease_expired), though nothing was timed
        count_delivery_attempt(system, Classification.AMBIGUOUS.value)
    return len(recovered)


async def deliver_now(deliverer: Deliverer, delivery_id: int, *, actor: str) -> DeliveryResult:
    """An operator's "send this pending delivery now", through the canonical path."""
    await claim_one(deliverer, delivery_id, trigger="manual", allowed=("pending",))
    result = await deliver(deliverer, delivery_id, trigger="manual", actor=actor)
    if result.attempt_id is None:
        raise Conflict(f"delivery {delivery_id} was not sent: {result.outcome.value}")
    return result


async def deliver_due(deliverer: Deliverer, *, limit: int, concurrency: int,
                      actor: str | None = None) -> dict[str, int]:
    """One pass of the worker: recover expired leases, claim what is due, send it.

    It claims no more than it sends at once, so that no claim waits for a free slot while its
    lease runs. Attempts name the worker (or the person who ran the pass) as their actor."""
    actor = actor or deliverer.worker_id
    recovered = await recover_expired_leases(deliverer)
    claimed = await claim_due(deliverer, min(limit, concurrency))
    results = await asyncio.gather(
        *(deliver(deliverer, delivery_id, trigger="scheduled", actor=actor)
          for delivery_id in claimed),
        return_exceptions=True,
    )
    counts = {"recovered_as_ambiguous": recovered, "claimed": len(claimed)}
    for result in results:
        if isinstance(result, BaseException):
            # The delivery stays claimed; its lease expires and it is recovered as ambiguous.
            log.error("delivery failed unexpectedly", exc_info=result)
            counts["errors"] = counts.get("errors", 0) + 1
        else:
            counts[result.outcome.value] = counts.get(result.outcome.value, 0) + 1
    return counts
