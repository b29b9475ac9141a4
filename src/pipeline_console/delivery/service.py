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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from pipeline_console.audit.service import AuditEntry, append_audit
from pipeline_console.clock import Clock
from pipeline_console.db import Database, allocate_ids
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
    DeliveryRequest,
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


def _lease(now: datetime, timeout_s: float, margin_s: float) -> datetime:
    return now + timedelta(seconds=total_deadline_s(timeout_s) + margin_s)


async def claim_due(deliverer: Deliverer, limit: int) -> list[int]:
    """Claim up to `limit` due deliveries for this worker, in a transaction of its own."""
    return await deliverer.database.run_transaction(
        lambda session: claim_due_in(session, deliverer, limit))


async def claim_due_in(session: AsyncSession, deliverer: Deliverer, limit: int) -> list[int]:
    """claim_due in the caller's transaction. Deliveries of a system whose circuit is open
    are held instead; a half-open circuit lets exactly one trial through.

    Lock order, the same everywhere: circuits (by name), then deliveries."""
    now = deliverer.clock()
    circuits = await _circuits_for_claim(session)
    # Due rows in next_attempt_at order: the (status, next_attempt_at) index gives the order
    # and the scan stops after the window (ordering by id as well made both databases read
    # and sort the whole queue on every claim). Ties go in index order. The window is
    # wider than `limit` because rows waiting behind an older send of the same record are
    # left out below.
    query = (select(Delivery.id, Delivery.system, Delivery.idempotency_key)
             .where(Delivery.status == "pending", Delivery.next_attempt_at <= now)
             .order_by(Delivery.next_attempt_at).limit(2 * limit + 10))
    if not deliverer.database.is_sqlite:
        query = query.with_for_update(skip_locked=True, of=Delivery)
    candidates = (await session.execute(query)).all()
    if not candidates:
        return []
    sending = await _records_being_sent(session, {row.idempotency_key for row in candidates})
    rows = [(row.id, row.system) for row in candidates
            if (row.system, row.idempotency_key) not in sending][:limit]
    systems = sorted({system for _, system in rows})
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
    for system in sorted({system for _, system in claimed}):  # one statement per system
        await session.execute(
            update(Delivery).where(Delivery.id.in_(
                [delivery_id for delivery_id, name in claimed if name == system]))
            .values(status="in_flight", claimed_by=deliverer.worker_id,
                    claim_trigger="scheduled", updated_at=now,
                    lease_expires_at=_lease(now, timeouts[system],
                                            deliverer.lease_margin_s))
            .execution_options(synchronize_session=False))
    if held:
        await session.execute(update(Delivery).where(Delivery.id.in_(held))
                              .values(status="held", updated_at=now)
                              .execution_options(synchronize_session=False))
    return [delivery_id for delivery_id, _ in claimed]


async def _circuits_for_claim(session: AsyncSession) -> dict[str, Circuit]:
    """Every circuit, read; the open and half-open ones locked (by name). A closed circuit
    is only read: claiming under it changes nothing in it, and workers claiming at once
    need not queue on its row (a claim that commits just before an operator opens the
    circuit is sent, like any send already under way). Holding deliveries and picking the
    one trial of a half-open circuit must not race, hence the lock."""
    circuits = {circuit.system: circuit for circuit in (await session.execute(
        select(Circuit).execution_options(populate_existing=True))).scalars()}
    for name in sorted(name for name, circuit in circuits.items() if circuit.state != "closed"):
        circuits[name] = await lock_circuit(session, name)
    return circuits


async def _records_being_sent(session: AsyncSession, keys: set[str]) -> set[tuple[str, str]]:
    """(system, key) of the in-flight deliveries of these records: a delivery waits while
    another of the same record to the same system is being sent, so that the system
    receives a record's versions in order. Looked up by key (the (idempotency_key, system,
    version) index); the status is compared as an expression so that the planner cannot
    choose a status index instead, whose in_flight range fills with dead entries between
    two vacuums while a queue drains (265 ms per claim seen on PostgreSQL)."""
    rows = await session.execute(
        select(Delivery.system, Delivery.idempotency_key)
        .where(Delivery.idempotency_key.in_(sorted(keys)),
               func.coalesce(Delivery.status, "") == "in_flight"))
    return {(system, key) for system, key in rows.all()}


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
    """Send one claimed delivery and record what happened (deliver_many of one)."""
    [result] = await deliver_many(deliverer, [delivery_id], trigger=trigger, actor=actor)
    if isinstance(result, BaseException):
        raise result
    return result


@dataclass(frozen=True)
class _Prepared:
    """A claimed delivery that is ours to send, with its system's settings."""

    config: SystemConfig
    request: DeliveryRequest
    overrides: list[dict[str, Any]]
    max_attempts: int
    threshold: int
    backoff: tuple[float, float]


@dataclass(frozen=True)
class _Sent:
    prepared: _Prepared
    started_at: datetime
    result: SendResult
    classification: Classification
    rule: str

    @property
    def delivery_id(self) -> int:
        return self.prepared.request.delivery_id


async def deliver_many(
    deliverer: Deliverer, delivery_ids: Sequence[int] = (), *, trigger: str, actor: str,
    claim: Callable[[AsyncSession], Awaitable[list[int]]] | None = None,
) -> list[DeliveryResult | BaseException]:
    """Send claimed deliveries and record what happened. THE way anything is sent.

    One transaction checks that the claims are still ours (and that no newer version
    supersedes one), the sends run at once outside any transaction, and one transaction
    records every outcome. One result per id, in order; if recording the batch fails, each
    outcome is recorded on its own, so that one bad row cannot strand the others (an
    outcome that still cannot be recorded is returned as its exception: the delivery stays
    claimed until its lease expires and it becomes ambiguous).

    `claim`, instead of ids, claims them inside the checking transaction (the worker's pass:
    one transaction fewer per batch)."""

    async def prepare(session: AsyncSession) -> tuple[list[int], dict[int, Any]]:
        ids = list(delivery_ids) if claim is None else await claim(session)
        return ids, await _prepare(session, deliverer, ids)

    delivery_ids, prepared = await deliverer.database.run_transaction(prepare)

    async def send(item: _Prepared) -> _Sent:
        started_at = deliverer.clock()
        result = await deliverer.transports.send(item.config, item.request)
        return _Sent(item, started_at, result, *classify(result, item.overrides))

    sent = await asyncio.gather(*(send(item) for item in prepared.values()
                                  if isinstance(item, _Prepared)))
    recorded: dict[int, DeliveryResult | BaseException] = {}
    try:
        recorded.update(await deliverer.database.run_transaction(
            lambda session: _record(session, deliverer, sent, trigger, actor)))
    except Exception as error:
        if len(sent) == 1:
            recorded[sent[0].delivery_id] = error
        else:
            log.exception("recording %d outcomes at once failed; recording each alone",
                          len(sent))
            for item in sent:
                try:
                    recorded.update(await deliverer.database.run_transaction(
                        lambda session, item=item: _record(session, deliverer, [item],
                                                           trigger, actor)))
                except Exception as single_error:
                    recorded[item.delivery_id] = single_error
    for item in sent:  # counted once the attempt row is committed, whatever its outcome
        if not isinstance(recorded[item.delivery_id], BaseException):
            count_delivery_attempt(item.prepared.config.name, item.classification.value,
                                   item.result.latency_ms)
    return [recorded.get(delivery_id) or DeliveryResult(delivery_id, prepared[delivery_id])
            for delivery_id in delivery_ids]


async def _lock_deliveries(session: AsyncSession, delivery_ids: Sequence[int]) -> dict[
        int, Delivery]:
    """Lock the deliveries in id order (like every statement that locks several)."""
    rows = (await session.execute(
        select(Delivery).where(Delivery.id.in_(sorted(set(delivery_ids))))
        .order_by(Delivery.id).with_for_update().execution_options(populate_existing=True)
    )).scalars()
    locked = {delivery.id: delivery for delivery in rows}
    for delivery_id in delivery_ids:
        if delivery_id not in locked:
            raise NotFound(f"delivery {delivery_id} does not exist")
    return locked


async def _prepare(session: AsyncSession, deliverer: Deliverer,
                   delivery_ids: Sequence[int]) -> dict[int, _Prepared | Outcome]:
    """Which claims are still ours, which are superseded, and what to send for the rest."""
    if not delivery_ids:
        return {}
    locked = await _lock_deliveries(session, delivery_ids)
    ours = [delivery for delivery in locked.values()
            if delivery.status == "in_flight" and delivery.claimed_by == deliverer.worker_id]
    out: dict[int, _Prepared | Outcome] = dict.fromkeys(locked, Outcome.NOT_CLAIMED)
    if not ours:
        return out
    sibling = aliased(Delivery)
    newer = dict((await session.execute(
        select(Delivery.id, func.max(sibling.version))
        .join(sibling, and_(
            sibling.system == Delivery.system,
            sibling.idempotency_key == Delivery.idempotency_key,
            or_(sibling.version > Delivery.version,
                and_(sibling.version == Delivery.version, sibling.id > Delivery.id)),
            sibling.status.in_(LIVE_STATUSES)))
        .where(Delivery.id.in_([delivery.id for delivery in ours]))
        .group_by(Delivery.id)
    )).all())
    systems = {system.name: system for system in (await session.execute(
        select(DownstreamSystem).where(
            DownstreamSystem.name.in_({delivery.system for delivery in ours}))
    )).scalars()}
    for delivery in ours:
        if delivery.id in newer:
            await _supersede(session, delivery, newer[delivery.id], deliverer.clock())
            out[delivery.id] = Outcome.SUPERSEDED
            continue
        system = systems[delivery.system]
        out[delivery.id] = _Prepared(
            system_config(system), build_request(delivery, delivery.attempts + 1),
            system.classification_overrides, system.max_attempts, system.failure_threshold,
            (system.backoff_base_s, system.backoff_max_s))
    return out


def _leaves_circuit_alone(circuit: Circuit, sent: Sequence[_Sent]) -> bool:
    """Whether these outcomes cannot change the circuit: it is closed with no failures and
    no trial, and every outcome is healthy. Then the circuit row is not locked, so that
    workers recording successes do not queue behind one another. (Had the row changed
    meanwhile, recording before that change is an order the serial history allows.)"""
    return (circuit.state == "closed" and circuit.consecutive_failures == 0
            and circuit.trial_delivery_id is None
            and all(breaker_event(item.classification) is CircuitEvent.HEALTHY
                    for item in sent))


async def _record(session: AsyncSession, deliverer: Deliverer, sent: Sequence[_Sent],
                  trigger: str, actor: str) -> dict[int, DeliveryResult]:
    """One transaction for a batch of outcomes: the attempt rows, each delivery's next
    state, dead letters and ambiguous outcomes, the circuits' transitions, the audit."""
    if not sent:
        return {}
    now = deliverer.clock()
    circuits: dict[str, Circuit | None] = {}
    for name in sorted({item.prepared.config.name for item in sent}):  # circuits first
        circuit = await session.get(Circuit, name, populate_existing=True)
        if circuit is None or not _leaves_circuit_alone(
                circuit, [item for item in sent if item.prepared.config.name == name]):
            circuit = await lock_circuit(session, name)
        else:
            circuit = None  # read, not locked: nothing to change
        circuits[name] = circuit
    locked = await _lock_deliveries(session, [item.delivery_id for item in sent])
    ids = await allocate_ids(session, DeliveryAttempt.__table__, len(sent))
    attempts = [DeliveryAttempt(
        id=attempt_id, delivery_id=item.delivery_id, system=item.prepared.config.name,
        attempt_number=item.prepared.request.attempt_number, trigger=trigger, actor=actor,
        started_at=item.started_at, latency_ms=item.result.latency_ms,
        request=item.prepared.request.summary(item.prepared.config),
        response_status=item.result.status, response_body=item.result.body or None,
        classification=item.classification.value, rule=item.rule, error=item.result.error,
    ) for attempt_id, item in zip(ids, sent, strict=True)]
    session.add_all(attempts)
    await session.flush()
    audit: list[AuditEntry] = []
    closing: list[int] = []
    recorded: dict[int, DeliveryResult] = {}
    for item, attempt in zip(sent, attempts, strict=True):
        delivery, circuit = locked[item.delivery_id], circuits[item.prepared.config.name]
        ours = delivery.status == "in_flight" and delivery.claimed_by == deliverer.worker_id
        late = None if ours else await _late_answer_to(session, delivery, deliverer.worker_id,
                                                       item.classification)
        if not ours and late is None:
            # Another process recovered this delivery meanwhile; the attempt row tells what
            # happened, and the circuit already counted the recovery.
            if circuit is not None:
                await free_trial(session, circuit, delivery.id, now)
            recorded[delivery.id] = DeliveryResult(delivery.id, Outcome.NOT_CLAIMED,
                                                   attempt.id, item.classification.value)
            continue
        delivery.attempts = max(delivery.attempts, item.prepared.request.attempt_number)
        step = next_step(item.classification, delivery.attempts, item.prepared.max_attempts)
        outcome = await _apply_step(session, delivery, step, attempt, item.result,
                                    item.prepared.backoff, deliverer.rng, now, audit,
                                    closing=closing)
        if late is not None:
            audit.append(await _settle_late(session, late, delivery, item.classification, now))
        elif circuit is not None:
            audit += await apply_event(
                session, circuit, breaker_event(item.classification),
                threshold=item.prepared.threshold, now=now,
                reason=f"delivery {delivery.id}: {item.classification.value} ({item.rule})",
                actor=actor)
        if circuit is not None:
            await free_trial(session, circuit, delivery.id, now)
        recorded[delivery.id] = DeliveryResult(delivery.id, outcome, attempt.id,
                                               item.classification.value)
    if closing:  # before the new dead letters are flushed: they replace the open ones
        await session.execute(
            update(DeadLetter.__table__)
            .where(DeadLetter.__table__.c.delivery_id.in_(closing),
                   DeadLetter.__table__.c.status == "open")
            .values(status="closed", closed_at=now))
    await session.flush()
    await append_audit(session, audit, actor=actor, now=now)
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
    audit: list[AuditEntry], *, closing: list[int] | None = None,
) -> Outcome:
    """The delivery's next state. Its open dead letters are closed at once, or, when the
    caller passes `closing`, listed there for the caller to close in one statement before
    it flushes."""

    async def close_dead_letters() -> None:
        if closing is None:
            await _close_dead_letters(session, delivery.id, now)
        else:
            closing.append(delivery.id)

    delivery.claimed_by = None
    delivery.lease_expires_at = None
    delivery.updated_at = now
    delivery.last_error = result.error or (
        f"HTTP {result.status}" if attempt.classification != "success" else None)
    key = delivery.idempotency_key
    if step is Step.DELIVERED:
        delivery.status = "delivered"
        delivery.delivered_at = now
        await close_dead_letters()
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
        await close_dead_letters()  # the new entry replaces them
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
                      actor: str | None = None, recover: bool = True) -> dict[str, int]:
    """One pass of the worker: recover expired leases, claim what is due, send it.

    It claims no more than it sends at once, so that no claim waits for a free slot while its
    lease runs, and sends them with deliver_many. `recover=False` skips looking for expired
    leases (the worker looks only every few seconds: leases last longer). Attempts name the
    worker (or the person who ran the pass) as their actor."""
    actor = actor or deliverer.worker_id
    recovered = await recover_expired_leases(deliverer) if recover else 0
    results = await deliver_many(
        deliverer, trigger="scheduled", actor=actor,
        claim=lambda session: claim_due_in(session, deliverer, min(limit, concurrency)))
    counts = {"recovered_as_ambiguous": recovered, "claimed": len(results)}
    for result in results:
        if isinstance(result, BaseException):
            # The delivery stays claimed; its lease expires and it is recovered as ambiguous.
            log.error("delivery failed unexpectedly", exc_info=result)
            counts["errors"] = counts.get("errors", 0) + 1
        else:
            counts[result.outcome.value] = counts.get(result.outcome.value, 0) + 1
    return counts
