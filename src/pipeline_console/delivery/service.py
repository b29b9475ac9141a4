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
from typing import Any, NamedTuple

from sqlalchemy import Row, and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.audit.service import AuditEntry, append_audit
from pipeline_console.clock import Clock
from pipeline_console.db import Database, allocate_ids, bulk_insert, bulk_update
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
# The hot path (claim, check, record) uses the tables, not the ORM classes: per statement
# the ORM's loading and unit of work cost more than the database did (profile of
# benchmark 6). The rarer paths (supersession, dead letters, ambiguous outcomes, late
# answers, circuits that change) still work on ORM objects.
_deliveries = Delivery.__table__
_systems = DownstreamSystem.__table__
_circuits = Circuit.__table__
_attempts = DeliveryAttempt.__table__
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
    RELEASED = "released"  # claimed but not sent (the worker stopping, the system failing)


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


def _lease(now: datetime, timeout_s: float, margin_s: float, waves: int = 1) -> datetime:
    """When a claim expires: `waves` whole exchanges at this timeout's deadline, then the
    margin."""
    return now + timedelta(seconds=waves * total_deadline_s(timeout_s) + margin_s)


async def claim_due(deliverer: Deliverer, limit: int) -> list[int]:
    """Claim up to `limit` due deliveries for this worker, in a transaction of its own."""
    return await deliverer.database.run_transaction(
        lambda session: claim_due_in(session, deliverer, limit))


async def claim_due_in(session: AsyncSession, deliverer: Deliverer, limit: int) -> list[int]:
    """claim_due in the caller's transaction (the ids it claimed)."""
    return [row.id for row in await claim_due_rows(session, deliverer, limit)]


async def claim_due_rows(session: AsyncSession, deliverer: Deliverer, limit: int, *,
                         concurrency: int | None = None) -> list[Row]:
    """Claim up to `limit` due deliveries in the caller's transaction; returns the claimed
    rows as they are now (every column: what deliver_many needs to send them, so that it
    need not read them again). Deliveries of a system whose circuit is open are held
    instead; a half-open circuit lets exactly one trial through.

    The claims are sent `concurrency` at a time (all at once if None): each lease lasts
    as many whole exchanges, at the slowest claimed system's deadline, as there are waves
    of sends, so that no claim can expire while it waits for a free slot.

    Lock order, the same everywhere: circuits (by name), then deliveries."""
    now = deliverer.clock()
    circuits = await _circuits_for_claim(session)
    # Due rows in next_attempt_at order: the (status, next_attempt_at) index gives the order
    # and the scan stops after the window (ordering by id as well made both databases read
    # and sort the whole queue on every claim). Ties go in index order. The window is
    # wider than `limit` because rows waiting behind an older send of the same record are
    # left out below.
    query = (select(_deliveries.c.id, _deliveries.c.system, _deliveries.c.idempotency_key)
             .where(_deliveries.c.status == "pending", _deliveries.c.next_attempt_at <= now)
             .order_by(_deliveries.c.next_attempt_at).limit(2 * limit + 10))
    if not deliverer.database.is_sqlite:
        query = query.with_for_update(skip_locked=True)
    candidates = (await session.execute(query)).all()
    if not candidates:
        return []
    sending = await _records_being_sent(session, {row.idempotency_key for row in candidates})
    rows = [(row.id, row.system) for row in candidates
            if (row.system, row.idempotency_key) not in sending][:limit]
    systems = sorted({system for _, system in rows})
    timeouts = dict((await session.execute(
        select(_systems.c.name, _systems.c.timeout_s)
        .where(_systems.c.name.in_(systems)))).all())
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
    returned: dict[int, Row] = {}
    if claimed:
        waves = 1 if concurrency is None else -(-len(claimed) // concurrency)
        slowest = max(timeouts[system] for _, system in claimed)
        lease = _lease(now, slowest, deliverer.lease_margin_s, waves)
        result = await session.execute(
            update(_deliveries).where(_deliveries.c.id.in_([id_ for id_, _ in claimed]))
            .values(status="in_flight", claimed_by=deliverer.worker_id,
                    claim_trigger="scheduled", updated_at=now, lease_expires_at=lease)
            .returning(*_deliveries.c))
        returned.update((row.id, row) for row in result.all())
    if held:
        await session.execute(update(_deliveries).where(_deliveries.c.id.in_(held))
                              .values(status="held", updated_at=now))
    return [returned[delivery_id] for delivery_id, _ in claimed]


async def _circuits_for_claim(session: AsyncSession) -> dict[str, Any]:
    """Every circuit's state, read; the open and half-open ones locked (by name), as ORM
    objects that the claim may change. A closed circuit is only read: claiming under it
    changes nothing in it, and workers claiming at once need not queue on its row (a claim
    that commits just before an operator opens the circuit is sent, like any send already
    under way). Holding deliveries and picking the one trial of a half-open circuit must
    not race, hence the lock."""
    circuits: dict[str, Any] = {row.system: row for row in (await session.execute(
        select(_circuits.c.system, _circuits.c.state))).all()}
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
        select(_deliveries.c.system, _deliveries.c.idempotency_key)
        .where(_deliveries.c.idempotency_key.in_(sorted(keys)),
               func.coalesce(_deliveries.c.status, "") == "in_flight"))
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
class Prepared:
    """A claimed delivery that is ours to send, with its system's settings."""

    config: SystemConfig
    request: DeliveryRequest
    overrides: list[dict[str, Any]]
    max_attempts: int
    threshold: int
    backoff: tuple[float, float]


@dataclass(frozen=True)
class Sent:
    """A send's answer and what policy.classify made of it, waiting to be recorded."""

    prepared: Prepared
    started_at: datetime
    result: SendResult
    classification: Classification
    rule: str

    @property
    def delivery_id(self) -> int:
        return self.prepared.request.delivery_id


Claim = Callable[[AsyncSession], Awaitable[list[Row]]]


async def deliver_many(
    deliverer: Deliverer, delivery_ids: Sequence[int] = (), *, trigger: str, actor: str,
    claim: Claim | None = None, concurrency: int | None = None,
    stop: asyncio.Event | None = None,
) -> list[DeliveryResult | BaseException]:
    """Send claimed deliveries and record what happened. THE way anything is sent.

    Three steps, each its own function (so that a caller could overlap the steps of
    successive batches without a path of its own): prepare_batch checks in one transaction
    that the claims are still ours (and that no newer version supersedes one), send runs
    outside any transaction, record_sent records every outcome in one transaction. One
    result per id, in order; if recording the batch fails, each outcome is recorded on its
    own, so that one bad row cannot strand the others (an outcome that still cannot be
    recorded is returned as its exception: the delivery stays claimed until its lease
    expires and it becomes ambiguous).

    `claim`, instead of ids, claims them inside the checking transaction (the worker's pass:
    one transaction fewer per batch). `concurrency`: at most that many sends at once; a
    claim whose turn comes after `stop` is set, or after its system failed as often as its
    circuit's threshold in this pass, is not sent but released (back to pending: nothing
    was sent), so that a stopping worker stops soon and a failing system does not take the
    rest of the batch before its circuit can open."""
    delivery_ids, prepared = await prepare_batch(deliverer, delivery_ids, claim=claim)
    slots = asyncio.Semaphore(concurrency or len(prepared) or 1)
    failures: dict[str, int] = {}  # consecutive failures per system in this pass

    async def send_in_turn(item: Prepared) -> Sent | None:
        async with slots:
            name = item.config.name
            if (stop is not None and stop.is_set()) or (
                    concurrency is not None and failures.get(name, 0) >= item.threshold):
                return None
            sent = await send(deliverer, item)
            failing = breaker_event(sent.classification) is CircuitEvent.FAILURE
            failures[name] = failures.get(name, 0) + 1 if failing else 0
            return sent

    items = [item for item in prepared.values() if isinstance(item, Prepared)]
    answers = await asyncio.gather(*(send_in_turn(item) for item in items),
                                   return_exceptions=True)
    results: dict[int, DeliveryResult | BaseException] = {}
    unsent: list[Prepared] = []
    for item, answer in zip(items, answers, strict=True):
        if answer is None:
            unsent.append(item)
        elif isinstance(answer, BaseException):
            # Not known whether it was sent: the claim stays until its lease expires and the
            # delivery becomes ambiguous; the rest of the batch is recorded.
            log.error("sending delivery %s failed unexpectedly", item.request.delivery_id,
                      exc_info=answer)
            results[item.request.delivery_id] = answer
    results.update(await record_sent(deliverer, [answer for answer in answers
                                                 if isinstance(answer, Sent)],
                                     trigger=trigger, actor=actor))
    if unsent:
        results.update(await release_unsent(deliverer, unsent))
    return [results.get(delivery_id) or DeliveryResult(delivery_id, prepared[delivery_id])
            for delivery_id in delivery_ids]


async def release_unsent(deliverer: Deliverer,
                         unsent: Sequence[Prepared]) -> dict[int, DeliveryResult]:
    """Claims of this worker that were not sent, back to pending in one transaction (a
    half-open circuit whose trial this was lets the next held delivery be the trial)."""

    async def work(session: AsyncSession) -> dict[int, DeliveryResult]:
        now = deliverer.clock()
        ids = sorted(item.request.delivery_id for item in unsent)
        trials = []
        for name in sorted({item.config.name for item in unsent}):  # circuits first
            trial = await session.scalar(select(_circuits.c.trial_delivery_id)
                                         .where(_circuits.c.system == name))
            if trial in ids:
                trials.append((await lock_circuit(session, name), trial))
        released = set((await session.execute(
            update(_deliveries)
            .where(_deliveries.c.id.in_(ids), _deliveries.c.status == "in_flight",
                   _deliveries.c.claimed_by == deliverer.worker_id)
            .values(status="pending", claimed_by=None, lease_expires_at=None,
                    updated_at=now)
            .returning(_deliveries.c.id))).scalars())
        for circuit, trial in trials:
            if trial in released:
                await free_trial(session, circuit, trial, now)
        return {delivery_id: DeliveryResult(
            delivery_id, Outcome.RELEASED if delivery_id in released else Outcome.NOT_CLAIMED)
            for delivery_id in ids}

    return await deliverer.database.run_transaction(work)


async def prepare_batch(
    deliverer: Deliverer, delivery_ids: Sequence[int] = (), *, claim: Claim | None = None,
) -> tuple[list[int], dict[int, Prepared | Outcome]]:
    """Step 1, one transaction: claim (with `claim`) or check the claims of `delivery_ids`;
    returns the ids and, per id, what to send or why nothing is sent."""

    async def work(session: AsyncSession) -> tuple[list[int], dict[int, Prepared | Outcome]]:
        if claim is None:
            return list(delivery_ids), await _prepare(session, deliverer, delivery_ids)
        claimed = await claim(session)
        return ([row.id for row in claimed],
                await _prepare(session, deliverer, [row.id for row in claimed], claimed))

    return await deliverer.database.run_transaction(work)


async def send(deliverer: Deliverer, item: Prepared) -> Sent:
    """Step 2, outside any transaction: the request, and the classification of its answer."""
    started_at = deliverer.clock()
    result = await deliverer.transports.send(item.config, item.request)
    return Sent(item, started_at, result, *classify(result, item.overrides))


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
    return recorded


async def _lock_rows(session: AsyncSession, delivery_ids: Sequence[int],
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


async def _orm_deliveries(session: AsyncSession, ids: Sequence[int]) -> dict[int, Delivery]:
    """ORM objects of deliveries this transaction has already locked (for the rare paths)."""
    if not ids:
        return {}
    return {delivery.id: delivery for delivery in (await session.execute(
        select(Delivery).where(Delivery.id.in_(ids))
        .execution_options(populate_existing=True))).scalars()}


async def _prepare(session: AsyncSession, deliverer: Deliverer, delivery_ids: Sequence[int],
                   claimed: Sequence[Row] | None = None) -> dict[int, Prepared | Outcome]:
    """Which claims are still ours, which are superseded, and what to send for the rest.
    `claimed`: rows this transaction has just claimed (ours, and locked)."""
    out: dict[int, Prepared | Outcome] = {}
    if claimed is None:
        if not delivery_ids:
            return {}
        locked = await _lock_rows(session, delivery_ids)
        ours = [row for row in locked.values()
                if row.status == "in_flight" and row.claimed_by == deliverer.worker_id]
        out = dict.fromkeys(locked, Outcome.NOT_CLAIMED)
    else:
        ours = list(claimed)
    if not ours:
        return out
    delivery, sibling = _deliveries, _deliveries.alias("sibling")
    newer = dict((await session.execute(
        select(delivery.c.id, func.max(sibling.c.version))
        .join(sibling, and_(
            sibling.c.system == delivery.c.system,
            sibling.c.idempotency_key == delivery.c.idempotency_key,
            or_(sibling.c.version > delivery.c.version,
                and_(sibling.c.version == delivery.c.version, sibling.c.id > delivery.c.id)),
            sibling.c.status.in_(LIVE_STATUSES)))
        .where(delivery.c.id.in_([row.id for row in ours]))
        .group_by(delivery.c.id)
    )).all())
    systems = {system.name: system for system in (await session.execute(
        select(_systems).where(_systems.c.name.in_({row.system for row in ours})))).all()}
    configs = {name: system_config(system) for name, system in systems.items()}
    superseded = await _orm_deliveries(session, [row.id for row in ours if row.id in newer])
    for row in ours:
        if row.id in newer:
            await _supersede(session, superseded[row.id], newer[row.id], deliverer.clock())
            out[row.id] = Outcome.SUPERSEDED
            continue
        system = systems[row.system]
        out[row.id] = Prepared(
            configs[row.system], build_request(row, row.attempts + 1),
            system.classification_overrides, system.max_attempts, system.failure_threshold,
            (system.backoff_base_s, system.backoff_max_s))
    if superseded:
        await session.flush()
    return out


def _leaves_circuit_alone(circuit: Any, sent: Sequence[Sent]) -> bool:
    """Whether these outcomes cannot change the circuit: it is closed with no failures and
    no trial, and every outcome is healthy. Then the circuit row is not locked, so that
    workers recording successes do not queue behind one another. (Had the row changed
    meanwhile, recording before that change is an order the serial history allows.)"""
    return (circuit.state == "closed" and circuit.consecutive_failures == 0
            and circuit.trial_delivery_id is None
            and all(breaker_event(item.classification) is CircuitEvent.HEALTHY
                    for item in sent))


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
    loaded as an ORM object and goes through _apply_step."""
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
    locked = await _lock_rows(session, [item.delivery_id for item in sent], _deliveries.c.id,
                              _deliveries.c.status, _deliveries.c.claimed_by,
                              _deliveries.c.attempts)
    ids = await allocate_ids(session, _attempts, len(sent))
    await bulk_insert(session, _attempts, [{
        "id": attempt_id, "delivery_id": item.delivery_id, "system": item.prepared.config.name,
        "attempt_number": item.prepared.request.attempt_number, "trigger": trigger,
        "actor": actor, "started_at": item.started_at, "latency_ms": item.result.latency_ms,
        "request": item.prepared.request.summary(item.prepared.config),
        "response_status": item.result.status, "response_body": item.result.body or None,
        "classification": item.classification.value, "rule": item.rule,
        "error": item.result.error,
    } for attempt_id, item in zip(ids, sent, strict=True)])

    def ours(delivery_id: int) -> bool:
        row = locked[delivery_id]
        return row.status == "in_flight" and row.claimed_by == deliverer.worker_id

    def attempts_of(item: Sent) -> int:
        return max(locked[item.delivery_id].attempts, item.prepared.request.attempt_number)

    def step_of(item: Sent) -> Step:
        return next_step(item.classification, attempts_of(item), item.prepared.max_attempts)

    objects = await _orm_deliveries(session, [
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
            if late is None:
                # Another process recovered this delivery meanwhile; the attempt row tells
                # what happened, and the circuit already counted the recovery.
                if circuit is not None:
                    await free_trial(session, circuit, item.delivery_id, now)
                recorded[item.delivery_id] = DeliveryResult(
                    item.delivery_id, Outcome.NOT_CLAIMED, attempt_id, attempt.classification)
                continue
        attempts, step = attempts_of(item), step_of(item)
        if delivery is None:  # ours, delivered or retried: a plain row
            values = _next_state(step, attempts, attempt, item.result, item.prepared.backoff,
                                 deliverer.rng, now)
            plain[step].append({**values, "id": item.delivery_id})
            if step is Step.DELIVERED:
                closing.append(item.delivery_id)
            outcome = Outcome.DELIVERED if step is Step.DELIVERED else Outcome.RETRY
        else:
            delivery.attempts = attempts
            outcome = await _apply_step(session, delivery, step, attempt, item.result,
                                        item.prepared.backoff, deliverer.rng, now, audit,
                                        closing=closing)
        if late is not None:
            audit.append(await _settle_late(session, late, delivery, item.classification, now))
        elif circuit is not None:
            audit += await apply_event(
                session, circuit, breaker_event(item.classification),
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


_STATUS_AFTER = {Step.DELIVERED: "delivered", Step.RETRY: "pending",
                 Step.DEAD_LETTER: "dead_lettered", Step.AMBIGUOUS: "ambiguous"}


def _next_state(step: Step, attempts: int, attempt: Any, result: SendResult,
                backoff: tuple[float, float], rng: random.Random, now: datetime,
                ) -> dict[str, Any]:
    """The delivery's columns after an attempt: released, with its next status."""
    values: dict[str, Any] = {
        "status": _STATUS_AFTER[step], "attempts": attempts, "claimed_by": None,
        "lease_expires_at": None, "updated_at": now,
        "last_error": result.error or (
            f"HTTP {result.status}" if attempt.classification != "success" else None)}
    if step is Step.DELIVERED:
        values["delivered_at"] = now
    elif step is Step.RETRY:
        values["next_attempt_at"] = now + timedelta(seconds=backoff_s(
            attempts, *backoff, rng, retry_after_s=result.retry_after_s))
    return values


async def _apply_step(
    session: AsyncSession, delivery: Delivery, step: Step, attempt: Any,
    result: SendResult, backoff: tuple[float, float], rng: random.Random, now: datetime,
    audit: list[AuditEntry], *, closing: list[int] | None = None,
) -> Outcome:
    """The next state of a delivery loaded as an ORM object (`attempt`: the attempt row, or
    anything with its id, classification and rule). Its open dead letters are closed at
    once, or, when the caller passes `closing`, listed there for the caller to close in one
    statement before it flushes."""

    async def close_dead_letters() -> None:
        if closing is None:
            await _close_dead_letters(session, delivery.id, now)
        else:
            closing.append(delivery.id)

    for name, value in _next_state(step, delivery.attempts, attempt, result, backoff, rng,
                                   now).items():
        setattr(delivery, name, value)
    key = delivery.idempotency_key
    if step is Step.DELIVERED:
        await close_dead_letters()
        return Outcome.DELIVERED
    if step is Step.RETRY:
        return Outcome.RETRY
    if step is Step.DEAD_LETTER:
        if attempt.classification == Classification.PERMANENT:
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
                      actor: str | None = None, recover: bool = True,
                      stop: asyncio.Event | None = None) -> dict[str, int]:
    """One pass of the worker: recover expired leases, claim what is due, send it.

    It claims up to `limit` and sends them with deliver_many, `concurrency` at a time (the
    claims' leases cover the waits: claim_due_rows); one claim and one record transaction per
    pass, whatever the concurrency. Once `stop` is set, or a system has failed as often as
    its circuit's threshold in this pass, the claims not yet sent are released instead.
    `recover=False` skips looking for expired leases (the worker looks only every few
    seconds: leases last longer). Attempts name the worker (or the person who ran the
    pass) as their actor."""
    actor = actor or deliverer.worker_id
    recovered = await recover_expired_leases(deliverer) if recover else 0
    results = await deliver_many(
        deliverer, trigger="scheduled", actor=actor, concurrency=concurrency, stop=stop,
        claim=lambda session: claim_due_rows(session, deliverer, limit,
                                             concurrency=concurrency))
    counts = {"recovered_as_ambiguous": recovered, "claimed": len(results)}
    for result in results:
        if isinstance(result, BaseException):
            # The delivery stays claimed; its lease expires and it is recovered as ambiguous.
            log.error("delivery failed unexpectedly", exc_info=result)
            counts["errors"] = counts.get("errors", 0) + 1
        else:
            counts[result.outcome.value] = counts.get(result.outcome.value, 0) + 1
    return counts
