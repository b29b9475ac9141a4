"""Recording outcomes: the third step of a delivery. One transaction for a batch of
answers writes the append-only attempt rows, each delivery's next state (delivered, retry
later, dead letter, ambiguous), the circuits' transitions and the audit.

An answer for a claim its worker no longer holds (another process recovered it as
worker_lost meanwhile) is a late answer: its attempt row is written, a success settles the
open ambiguous outcome as delivered, and nothing else follows from it — a late answer is
never a reason to send, and never moves a circuit.

A 429 or 503 with Retry-After throttles its whole system (throttled_until, the later of the
old and new moment, at most policy.MAX_THROTTLE_S ahead): it is back-pressure, so it moves
no circuit, and a throttled try does not count toward max_attempts (policy.next_step)."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Row, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.audit.service import AuditEntry, append_audit
from pipeline_console.db import allocate_ids, bulk_insert, bulk_update, unavailability
from pipeline_console.delivery.base import Deliverer, DeliveryResult, Outcome, Sent
from pipeline_console.delivery.circuits import apply_event, free_trial, lock_circuit
from pipeline_console.delivery.policy import (
    MAX_RETRY_AFTER_S,
    MIN_THROTTLE_WAIT_S,
    SECRET_UNREADABLE_RULE,
    THROTTLED_RULE_PREFIX,
    CircuitEvent,
    Classification,
    SendResult,
    Step,
    backoff_s,
    breaker_event,
    next_step,
    throttle_s,
)
from pipeline_console.errors import NotFound
from pipeline_console.metrics import count_delivery_attempt
from pipeline_console.models import (
    AmbiguousOutcome,
    Circuit,
    DeadLetter,
    Delivery,
    DeliveryAttempt,
    DownstreamSystem,
)

_deliveries = Delivery.__table__
_systems = DownstreamSystem.__table__
_circuits = Circuit.__table__
_attempts = DeliveryAttempt.__table__
log = logging.getLogger("pipeline_console.delivery")


async def record_sent(
    deliverer: Deliverer, sent: Sequence[Sent], *, trigger: str, actor: str,
) -> dict[int, DeliveryResult | BaseException]:
    """Step 3: every outcome in one transaction; if that fails, each alone (an outcome
    that still cannot be recorded is returned as its exception)."""
    recorded: dict[int, DeliveryResult | BaseException] = {}
    if not sent:
        return recorded
    try:
        recorded.update(await deliverer.database.run_transaction(
            lambda session: _record(session, deliverer, sent, trigger, actor)))
    except Exception as error:
        if len(sent) == 1 or unavailability(error):
            # one at a time would only meet the outage once per outcome
            recorded.update((item.delivery_id, error) for item in sent)
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
    return recorded


async def lock_rows(session: AsyncSession, delivery_ids: Sequence[int],
                     *columns: Any) -> dict[int, Row]:
    """Lock the deliveries in id order (like every statement that locks several) and read
    `columns` of them (every column if none is named)."""
    rows = (await session.execute(
        select(*(columns or _deliveries.c)).where(_deliveries.c.id.in_(sorted(set(delivery_ids))))
        .order_by(_deliveries.c.id).with_for_update())).all()
    locked = {row.id: row for row in rows}
    for delivery_id in delivery_ids:
        if delivery_id not in locked:
            raise NotFound(f"delivery {delivery_id} does not exist")
    return locked


async def orm_deliveries(session: AsyncSession, ids: Sequence[int]) -> dict[int, Delivery]:
    """ORM objects of deliveries this transaction has already locked (for the rare paths)."""
    if not ids:
        return {}
    return {delivery.id: delivery for delivery in (await session.execute(
        select(Delivery).where(Delivery.id.in_(ids))
        .execution_options(populate_existing=True))).scalars()}


def _leaves_circuit_alone(circuit: Any, sent: Sequence[Sent]) -> bool:
    """Whether these outcomes cannot change the circuit: it is closed with no failures and
    no trial, and every outcome is healthy. Then the circuit row is not locked, so that
    workers recording successes do not queue behind one another. (Had the row changed
    meanwhile, recording before that change is an order the serial history allows.)"""
    return (circuit.state == "closed" and circuit.consecutive_failures == 0
            and circuit.trial_delivery_id is None
            and all(breaker_event(item.classification, item.rule)
                    in (CircuitEvent.HEALTHY, CircuitEvent.NONE) for item in sent))


class _AttemptRef(NamedTuple):
    """What the next step needs of an attempt row written at the driver level."""

    id: int
    classification: str
    rule: str


async def _record(session: AsyncSession, deliverer: Deliverer, sent: Sequence[Sent],
                  trigger: str, actor: str) -> dict[int, DeliveryResult]:
    """One transaction for a batch of outcomes: the attempt rows, each delivery's next
    state, dead letters and ambiguous outcomes, the circuits' transitions, the audit.

    The usual outcomes (delivered, retry later) of deliveries still claimed by us are
    written as plain rows (one multi-row insert, one executemany per kind of update); a
    delivery whose claim was lost, or that goes to the dead-letter or ambiguous queue, is
    loaded as an ORM object and goes through apply_step."""
    if not sent:
        return {}
    now = deliverer.clock()
    circuits: dict[str, Circuit | None] = {}
    for name in sorted({item.prepared.config.name for item in sent}):  # circuits first
        circuit = (await session.execute(
            select(_circuits).where(_circuits.c.system == name))).first()
        if circuit is None or not _leaves_circuit_alone(
                circuit, [item for item in sent if item.prepared.config.name == name]):
            circuits[name] = await lock_circuit(session, name)
        else:
            circuits[name] = None  # read, not locked: nothing to change
    locked = await lock_rows(session, [item.delivery_id for item in sent], _deliveries.c.id,
                              _deliveries.c.status, _deliveries.c.claimed_by,
                              _deliveries.c.attempts)
    ids = await allocate_ids(session, _attempts, len(sent))
    await bulk_insert(session, _attempts, [{
        "id": attempt_id, "delivery_id": item.delivery_id, "system": item.prepared.config.name,
        "attempt_number": item.prepared.request.attempt_number, "trigger": trigger,
        "actor": actor, "started_at": item.started_at, "latency_ms": item.result.latency_ms,
        "request": item.summary(),
        "response_status": item.result.status, "response_body": item.result.body or None,
        "classification": item.classification.value, "rule": item.rule,
        "error": item.result.error,
    } for attempt_id, item in zip(ids, sent, strict=True)])

    def ours(delivery_id: int) -> bool:
        row = locked[delivery_id]
        return row.status == "in_flight" and row.claimed_by == deliverer.worker_id

    def attempts_of(item: Sent) -> int:
        return max(locked[item.delivery_id].attempts, item.prepared.request.attempt_number)

    uncounted_tries = await _uncounted_tries(session, [
        item.delivery_id for item in sent if item.classification is Classification.TRANSIENT])

    def counted_of(item: Sent) -> int:
        return attempts_of(item) - uncounted_tries.get(item.delivery_id, 0)

    def step_of(item: Sent) -> Step:
        return next_step(item.classification, counted_of(item), item.prepared.max_attempts,
                         item.rule)

    objects = await orm_deliveries(session, [
        item.delivery_id for item in sent if not ours(item.delivery_id)
        or step_of(item) in (Step.DEAD_LETTER, Step.AMBIGUOUS)])
    audit: list[AuditEntry] = []
    closing: list[int] = []
    plain: dict[Step, list[dict[str, Any]]] = {Step.DELIVERED: [], Step.RETRY: []}
    recorded: dict[int, DeliveryResult] = {}
    for item, attempt_id in zip(sent, ids, strict=True):
        attempt = _AttemptRef(attempt_id, item.classification.value, item.rule)
        circuit = circuits[item.prepared.config.name]
        delivery = objects.get(item.delivery_id)
        late = None
        if not ours(item.delivery_id):
            late = await _late_answer_to(session, delivery, deliverer.worker_id,
                                         item.classification)
            newer = late and await _newer_version_sent(session, delivery)
            if newer:
                # Delivered, but after a newer version went out: the system may now hold
                # the older one. Not for the pipeline to settle: said where a person looks.
                late.last_query_result = (
                    f"the original send answered {item.result.status} after its claim was "
                    f"recovered and after version {newer} was sent: the system may hold "
                    "this older version; check it and resolve by hand")
                late.last_query_at = now
                audit.append(AuditEntry(
                    "delivery.late_answer", "delivery", str(delivery.id),
                    {"system": delivery.system, "version": delivery.version,
                     "newer_version": newer, "note": late.last_query_result},
                    delivery.idempotency_key))
                late = None
            if late is None:
                # Recovered by another process meanwhile (worker_lost), and this answer
                # settles nothing: its attempt row tells what happened; the ambiguous
                # outcome stays for the status query or a person. Never a reason to send.
                # (The recovery freed its trial slot, if it was one; the slot may be another
                # claim's by now.)
                recorded[item.delivery_id] = DeliveryResult(
                    item.delivery_id, Outcome.NOT_CLAIMED, attempt_id, attempt.classification)
                continue
        attempts, step = attempts_of(item), step_of(item)
        if delivery is None:  # ours, delivered or retried: a plain row
            values = _next_state(step, attempts, attempt, item.result, item.prepared.backoff,
                                 deliverer.rng, now, counted=counted_of(item))
            plain[step].append({**values, "id": item.delivery_id})
            if step is Step.DELIVERED:
                closing.append(item.delivery_id)
            outcome = Outcome.DELIVERED if step is Step.DELIVERED else Outcome.RETRY
        else:
            delivery.attempts = attempts
            outcome = await apply_step(session, delivery, step, attempt, item.result,
                                        item.prepared.backoff, deliverer.rng, now, audit,
                                        closing=closing, counted=counted_of(item))
        if late is not None:
            audit.append(await _settle_late(session, late, delivery, item.classification, now))
        elif circuit is not None:
            audit += await apply_event(
                session, circuit, breaker_event(item.classification, item.rule),
                threshold=item.prepared.threshold, now=now,
                reason=f"delivery {item.delivery_id}: {attempt.classification} ({item.rule})",
                actor=actor)
        if circuit is not None:
            await free_trial(session, circuit, item.delivery_id, now)
        recorded[item.delivery_id] = DeliveryResult(item.delivery_id, outcome, attempt_id,
                                                    attempt.classification)
    if closing:  # before the new dead letters are flushed: they replace the open ones
        await session.execute(
            update(DeadLetter.__table__)
            .where(DeadLetter.__table__.c.delivery_id.in_(closing),
                   DeadLetter.__table__.c.status == "open")
            .values(status="closed", closed_at=now))
    for rows in plain.values():
        await bulk_update(session, _deliveries, "id", rows)
    await session.flush()
    await _throttle(session, sent, now)
    await append_audit(session, audit, actor=actor, now=now)
    return recorded


async def _uncounted_tries(session: AsyncSession, delivery_ids: list[int]) -> dict[int, int]:
    """How many of these deliveries' tries were throttled or not sent for an unreadable
    secret (policy.is_uncounted: they count toward neither max_attempts nor the backoff).
    Asked only of the deliveries whose try failed transiently, so the usual outcome costs
    nothing."""
    if not delivery_ids:
        return {}
    return dict((await session.execute(
        select(_attempts.c.delivery_id, func.count())
        .where(_attempts.c.delivery_id.in_(sorted(set(delivery_ids))),
               or_(_attempts.c.rule.like(f"{THROTTLED_RULE_PREFIX}%"),
                   _attempts.c.rule == SECRET_UNREADABLE_RULE))
        .group_by(_attempts.c.delivery_id))).all())


async def _throttle(session: AsyncSession, sent: Sequence[Sent], now: datetime) -> None:
    """A 429 or 503 with Retry-After pauses its whole system until then (throttled_until,
    which every claim reads): the later of the pause already set and this one, so that an
    earlier, shorter answer recorded late never shortens it. Last in the transaction's
    lock order (circuits, deliveries, then systems), and only when a system throttled."""
    until: dict[str, datetime] = {}
    for item in sent:
        seconds = throttle_s(item.result, item.rule)
        if seconds is not None:
            name, moment = item.prepared.config.name, now + timedelta(seconds=seconds)
            until[name] = max(until.get(name, moment), moment)
    for name, moment in sorted(until.items()):
        await session.execute(
            update(_systems).where(_systems.c.name == name, or_(
                _systems.c.throttled_until.is_(None), _systems.c.throttled_until < moment))
            .values(throttled_until=moment))
        log.warning("%s throttled us (429/503 with Retry-After): nothing is sent to it "
                    "before %s", name, moment.isoformat())


async def _late_answer_to(session: AsyncSession, delivery: Delivery, worker_id: str,
                          classification: Classification) -> AmbiguousOutcome | None:
    """The open ambiguous outcome that the recovery of *our* claim created, when our send
    has now answered with a success: the one late answer that settles something (it was
    delivered; nothing is to be sent). Any other late answer settles nothing."""
    if delivery.status != "ambiguous" or classification is not Classification.SUCCESS:
        return None
    return await _open_outcome_of_our_claim(session, delivery, worker_id)


async def _newer_version_sent(session: AsyncSession, delivery: Delivery) -> int | None:
    """The newest version of this record to this system that was sent or is being sent
    (in flight, delivered, ambiguous) and is newer than `delivery`'s, if any."""
    return await session.scalar(
        select(func.max(Delivery.version))
        .where(Delivery.system == delivery.system,
               Delivery.idempotency_key == delivery.idempotency_key,
               Delivery.version > delivery.version,
               Delivery.status.in_(("in_flight", "delivered", "ambiguous"))))


async def _open_outcome_of_our_claim(session: AsyncSession, delivery: Delivery,
                                     worker_id: str) -> AmbiguousOutcome | None:
    return (await session.execute(
        select(AmbiguousOutcome)
        .join(DeliveryAttempt, DeliveryAttempt.id == AmbiguousOutcome.attempt_id)
        .where(AmbiguousOutcome.delivery_id == delivery.id, AmbiguousOutcome.status == "open",
               DeliveryAttempt.classification == Classification.WORKER_LOST.value,
               DeliveryAttempt.actor == worker_id)
        .with_for_update(of=AmbiguousOutcome)
    )).scalars().first()


async def _settle_late(session: AsyncSession, outcome: AmbiguousOutcome, delivery: Delivery,
                       classification: Classification, now: datetime) -> AuditEntry:
    outcome.status = "resolved"
    outcome.resolution = "delivered"
    outcome.resolution_note = (f"the original send answered after its claim was recovered: "
                               f"{classification.value}")
    outcome.resolved_by = "system"
    outcome.resolved_at = now
    return AuditEntry("ambiguous.resolved", "ambiguous", str(outcome.id),
                      {"resolution": outcome.resolution, "note": outcome.resolution_note,
                       "delivery_id": delivery.id, "system": delivery.system},
                      delivery.idempotency_key)


_STATUS_AFTER = {Step.DELIVERED: "delivered", Step.RETRY: "pending",
                 Step.DEAD_LETTER: "dead_lettered", Step.AMBIGUOUS: "ambiguous"}


def _next_state(step: Step, attempts: int, attempt: Any, result: SendResult,
                backoff: tuple[float, float], rng: random.Random, now: datetime, *,
                counted: int | None = None) -> dict[str, Any]:
    """The delivery's columns after an attempt: released, with its next status. `counted`:
    the tries that were not throttled (all of them when not given). A throttled try waits
    what the system asked; the backoff grows with the counted tries only, so a long
    throttle does not make the next failure wait as if it had failed every time."""
    values: dict[str, Any] = {
        "status": _STATUS_AFTER[step], "attempts": attempts, "claimed_by": None,
        "lease_expires_at": None, "updated_at": now,
        "last_error": result.error or (
            f"HTTP {result.status}" if attempt.classification != "success" else None)}
    if step is Step.DELIVERED:
        values["delivered_at"] = now
    elif step is Step.RETRY:
        if (attempt.rule or "").startswith(THROTTLED_RULE_PREFIX) \
                and result.retry_after_s is not None:
            delay = max(min(result.retry_after_s, MAX_RETRY_AFTER_S), MIN_THROTTLE_WAIT_S)
        else:
            delay = backoff_s(attempts if counted is None else counted, *backoff, rng,
                              retry_after_s=result.retry_after_s)
        values["next_attempt_at"] = now + timedelta(seconds=delay)
    return values


async def apply_step(
    session: AsyncSession, delivery: Delivery, step: Step, attempt: Any,
    result: SendResult, backoff: tuple[float, float], rng: random.Random, now: datetime,
    audit: list[AuditEntry], *, closing: list[int] | None = None,
    counted: int | None = None,
) -> Outcome:
    """The next state of a delivery loaded as an ORM object (`attempt`: the attempt row, or
    anything with its id, classification and rule). Its open dead letters are closed at
    once, or, when the caller passes `closing`, listed there for the caller to close in one
    statement before it flushes."""

    async def close_dead_letters() -> None:
        if closing is None:
            await close_dead_letters(session, delivery.id, now)
        else:
            closing.append(delivery.id)

    for name, value in _next_state(step, delivery.attempts, attempt, result, backoff, rng,
                                   now, counted=counted).items():
        setattr(delivery, name, value)
    key = delivery.idempotency_key
    if step is Step.DELIVERED:
        await close_dead_letters()
        return Outcome.DELIVERED
    if step is Step.RETRY:
        return Outcome.RETRY
    if step is Step.DEAD_LETTER:
        if attempt.classification == Classification.PERMANENT and result.status is None:
            reason = f"permanent ({attempt.rule}): {(result.error or '')[:500]}"
        elif attempt.classification == Classification.PERMANENT:
            reason = (f"permanent: HTTP {result.status} ({attempt.rule}): "
                      f"{(result.body or '')[:300]}")
        else:
            reason = f"retries_exhausted: {delivery.attempts} attempts, last {attempt.rule}"
        await close_dead_letters()  # the new entry replaces them
        session.add(DeadLetter(delivery_id=delivery.id, system=delivery.system,
                               idempotency_key=key, reason=reason,
                               classification=attempt.classification, attempt_id=attempt.id,
                               status="open", created_at=now))
        audit.append(AuditEntry("delivery.dead_lettered", "delivery", str(delivery.id),
                                {"system": delivery.system, "version": delivery.version,
                                 "reason": reason}, key))
        return Outcome.DEAD_LETTERED
    reason = f"{attempt.rule}: {result.error or 'no answer'}"
    session.add(AmbiguousOutcome(delivery_id=delivery.id, system=delivery.system,
                                 idempotency_key=key, reason=reason, attempt_id=attempt.id,
                                 status="open", queries=0, created_at=now))
    audit.append(AuditEntry("delivery.ambiguous", "delivery", str(delivery.id),
                            {"system": delivery.system, "version": delivery.version,
                             "reason": reason}, key))
    return Outcome.AMBIGUOUS


async def close_dead_letters(session: AsyncSession, delivery_id: int, now: datetime) -> None:
    await session.execute(
        update(DeadLetter).where(DeadLetter.delivery_id == delivery_id,
                                 DeadLetter.status == "open")
        .values(status="closed", closed_at=now))


async def supersede(session: AsyncSession, delivery: Delivery, newer: int,
                     now: datetime) -> None:
    delivery.status = "superseded"
    delivery.claimed_by = None
    delivery.lease_expires_at = None
    delivery.updated_at = now
    delivery.last_error = (f"superseded by a newer delivery (version {newer}); an older "
                           "payload is never sent after a newer one")
    await close_dead_letters(session, delivery.id, now)
    circuit = (await session.execute(select(Circuit).where(Circuit.system == delivery.system)
                                     .with_for_update())).scalar_one()
    await free_trial(session, circuit, delivery.id, now)


