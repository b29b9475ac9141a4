"""Claims and their leases: who may send a delivery, until when, and what happens to claims
whose holder went away. The fence — the one check that stands between a claim and a send —
is `may_send`, at the end of this module.

A claim is a delivery moved to in_flight with `claimed_by` and `lease_expires_at` (wall
clock, for other processes). Its holder also keeps the lease on its own monotonic clock
(base.Lease), read before the transaction that confirmed the claim, so that a process frozen
(SIGSTOP, a VM paused, a long GC) finds out when it wakes that the time has gone. A claim
ends in one of three ways: its send is recorded (recording.py), it is released unsent (back
to pending: nothing left), or another process recovers it — its lease ran out, or its
worker's heartbeat stopped — and makes it ambiguous with the classification worker_lost:
it may have been sent, so it is never simply sent again, and it says nothing about the
downstream system, so it never moves a circuit.

Lock order: circuits (by name), then deliveries (by id), then downstream systems (by name:
the limited ones, in the claim; a throttled one, when its answer is recorded). A claim's
deliveries are taken with SKIP LOCKED, so it never waits for them; it waits for the limited
systems' rows, which is what makes the limits hold across workers (limits.py). A claim
that supersedes a delivery locks its circuit last (a deadlock with a recording is then a
retried transaction). Ambiguous outcomes are locked
before their deliveries here, as an operator's resolution does; recording a late answer
locks them after (a deadlock between the two is a retried transaction, not a wrong state)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, and_, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.audit.service import AuditEntry, append_audit
from pipeline_console.delivery.base import (
    Deliverer,
    DeliveryResult,
    Lease,
    Outcome,
    Prepared,
    system_config,
)
from pipeline_console.delivery.circuits import free_trial, lock_circuit
from pipeline_console.delivery.limits import (
    LIMIT_COLUMNS,
    Allowance,
    ClaimNotes,
    Limits,
    allowances,
    note_held_back,
    spend,
)
from pipeline_console.delivery.policy import Classification, SendResult, Step
from pipeline_console.delivery.recording import apply_step
from pipeline_console.delivery.transports import request_summary, total_deadline_s
from pipeline_console.errors import Conflict, NotFound
from pipeline_console.metrics import count_delivery_attempt
from pipeline_console.models import (
    AmbiguousOutcome,
    Circuit,
    Delivery,
    DeliveryAttempt,
    DownstreamSystem,
    Worker,
)

_deliveries = Delivery.__table__
_systems = DownstreamSystem.__table__
_circuits = Circuit.__table__
_workers = Worker.__table__


def lease_until(now: datetime, timeout_s: float, margin_s: float, waves: int = 1) -> datetime:
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
                         concurrency: int | None = None,
                         budgets: Mapping[str, int] | None = None,
                         waiting: int = 0, notes: ClaimNotes | None = None) -> list[Row]:
    """Claim up to `limit` due deliveries in the caller's transaction; returns the claimed
    rows as they are now (every column: what a send needs, so that it need not read them
    again). Deliveries of a system whose circuit is open are held instead; a half-open
    circuit lets exactly one trial through. A throttled system's deliveries are left
    alone, and a system with limits gets no more than they allow (limits.py).

    `concurrency`: the claims are sent that many at a time, behind `waiting` claims the
    worker already holds, so each lease lasts as many whole exchanges as there are waves
    (all at once if None). `budgets`: at most that many claims of the named systems (0:
    none) — the worker's per-system share of its slots. `notes`: filled with what the
    limits held back, and when to look again (limits.ClaimNotes)."""
    now = deliverer.clock()
    notes = notes if notes is not None else ClaimNotes()
    circuits, limits = await _circuits_for_claim(session)
    budgets = dict(budgets or {})
    for name, limit_of in limits.items():
        if limit_of.throttled(now):
            assert limit_of.throttled_until is not None
            notes.throttled[name] = limit_of.throttled_until
            notes.retry_in((limit_of.throttled_until - now).total_seconds())
            budgets[name] = 0
    limited = sorted(name for name, limit_of in limits.items()
                     if limit_of.limited and budgets.get(name, 1) > 0)
    # Due rows in next_attempt_at order: the (status, next_attempt_at) index gives the order
    # and the scan stops after the window (ordering by id as well made both databases read
    # and sort the whole queue on every claim). The window is wider than `limit` because
    # rows waiting behind an older send of the same record are left out below. Limited
    # systems are looked for apart (below), so that their backlog cannot fill the window.
    skipped = sorted({name for name, budget in budgets.items() if budget <= 0} | set(limited))
    candidates = await _due(session, deliverer, now, 2 * limit + 10, skipped=skipped)
    allowed = await allowances(session, limited, now, at_most={
        name: min(limit, budgets.get(name, limit)) for name in limited})
    for name, allowance in allowed.items():
        budgets[name] = allowance.count
        if allowance.count > 0:
            candidates += await _due(session, deliverer, now, 2 * allowance.count + 10,
                                     system=name)
    if limited:
        candidates.sort(key=lambda row: (row.next_attempt_at, row.id))
    if not deliverer.database.is_sqlite:  # the lock first, then the check it protects
        candidates = await _lock_records(session, candidates)
    if not candidates:
        _note_limits(notes, allowed, {}, limit)
        return []
    sending = await _records_being_sent(session, {row.idempotency_key for row in candidates})
    left = dict(budgets)
    rows = []
    for row in candidates:
        if len(rows) == limit:
            break
        if (row.system, row.idempotency_key) in sending or left.get(row.system, 1) <= 0:
            continue
        if row.system in left:
            left[row.system] -= 1
        rows.append((row.id, row.system, row.idempotency_key))
    timeouts = dict((await session.execute(
        select(_systems.c.name, _systems.c.timeout_s)
        .where(_systems.c.name.in_(sorted({system for _, system, _ in rows}))))).all())
    claimed, held = [], []
    for delivery_id, system, _ in rows:
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
        waves = 1 if concurrency is None else -(-(waiting + len(claimed)) // concurrency)
        slowest = max(timeouts[system] for _, system in claimed)
        lease = lease_until(now, slowest, deliverer.lease_margin_s, waves)
        result = await session.execute(
            update(_deliveries).where(_deliveries.c.id.in_([id_ for id_, _ in claimed]))
            .values(status="in_flight", claimed_by=deliverer.worker_id,
                    claim_trigger="scheduled", updated_at=now, lease_expires_at=lease)
            .returning(*_deliveries.c))
        returned.update((row.id, row) for row in result.all())
    if held:
        await session.execute(update(_deliveries).where(_deliveries.c.id.in_(held))
                              .values(status="held", updated_at=now))
    if allowed:
        per_system = Counter(system for _, system in claimed)
        for name, allowance in allowed.items():
            await spend(session, allowance, per_system[name], now)
        _note_limits(notes, allowed, per_system, limit)
    return [returned[delivery_id] for delivery_id, _ in claimed]


def _note_limits(notes: ClaimNotes, allowed: Mapping[str, Allowance],
                 claimed: Mapping[str, int], limit: int) -> None:
    for name, allowance in allowed.items():
        note_held_back(notes, allowance, claimed.get(name, 0), limit)


async def _due(session: AsyncSession, deliverer: Deliverer, now: datetime, window: int, *,
               skipped: Sequence[str] = (), system: str | None = None) -> list[Any]:
    """Due pending deliveries in next_attempt_at order, locked (SKIP LOCKED: never waits
    for another claim) on PostgreSQL: of one system, or of all but the `skipped`."""
    query = (select(_deliveries.c.id, _deliveries.c.system, _deliveries.c.idempotency_key,
                    _deliveries.c.next_attempt_at)
             .where(_deliveries.c.status == "pending", _deliveries.c.next_attempt_at <= now)
             .order_by(_deliveries.c.next_attempt_at).limit(window))
    if system is not None:
        query = query.where(_deliveries.c.system == system)
    elif skipped:
        query = query.where(_deliveries.c.system.not_in(skipped))
    if not deliverer.database.is_sqlite:
        query = query.with_for_update(skip_locked=True)
    return list((await session.execute(query)).all())


async def _circuits_for_claim(session: AsyncSession) -> tuple[dict[str, Any],
                                                              dict[str, Limits]]:
    """Every circuit's state, read; the open and half-open ones locked (by name), as ORM
    objects that the claim may change. A closed circuit is only read: claiming under it
    changes nothing in it, and workers claiming at once need not queue on its row (a claim
    that commits just before an operator opens the circuit is sent, like any send already
    under way). Holding deliveries and picking the one trial of a half-open circuit must
    not race, hence the lock. With them, in the same query, the systems' limits and
    throttles (only those that have any)."""
    rows = (await session.execute(
        select(_circuits.c.system, _circuits.c.state, *LIMIT_COLUMNS)
        .join(_systems, _systems.c.name == _circuits.c.system))).all()
    circuits: dict[str, Any] = {row.system: row for row in rows}
    limits = {row.system: Limits.of(row) for row in rows
              if row.max_in_flight is not None or row.max_per_second is not None
              or row.throttled_until is not None}
    for name in sorted(name for name, circuit in circuits.items() if circuit.state != "closed"):
        circuits[name] = await lock_circuit(session, name)
    return circuits, limits


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


async def _lock_records(session: AsyncSession, rows: list[Any]) -> list[Any]:
    """PostgreSQL: keep only the rows whose (system, record) this transaction could take a
    transaction-scoped advisory lock on. _records_being_sent sees only committed claims; two
    workers claiming two versions of one record at the same moment would each miss the
    other's and send both at once, in any order. The lock makes the second one wait for
    the next pass instead (by then the first claim is committed and visible)."""
    if not rows:
        return rows
    keys = sorted({f"{row[1]}\x1f{row[2]}" for row in rows})  # (id, system, key, …)
    taken = set((await session.execute(
        text("SELECT k FROM unnest(CAST(:keys AS text[])) AS k "
             "WHERE pg_try_advisory_xact_lock(hashtextextended(k, 7))"),
        {"keys": keys})).scalars())
    return [row for row in rows if f"{row[1]}\x1f{row[2]}" in taken]


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
    delivery = await lock_delivery(session, delivery_id)
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
    in_flight: int | str | None = None
    if not deliverer.database.is_sqlite and not await _lock_records(  # the lock first
            session, [(delivery_id, system, delivery.idempotency_key)]):
        in_flight = "being claimed"
    if in_flight is None:
        in_flight = await session.scalar(
            select(Delivery.id).where(Delivery.system == system,
                                      Delivery.idempotency_key == delivery.idempotency_key,
                                      Delivery.status == "in_flight").limit(1))
    if in_flight is not None:
        raise Conflict(f"delivery {in_flight} of the same record to {system} is being "
                       "sent; try again when it has an outcome")
    timeout = await _check_limits(session, system, now)
    delivery.status = "in_flight"
    delivery.claimed_by = deliverer.worker_id
    delivery.claim_trigger = trigger
    delivery.lease_expires_at = lease_until(now, timeout, deliverer.lease_margin_s)
    delivery.updated_at = now
    await session.flush()


async def _check_limits(session: AsyncSession, system: str, now: datetime) -> float:
    """An operator's claim keeps the system's limits too (and returns its timeout): a
    throttled system is sent nothing before its time (it said when; it would only answer
    429 again), and max_in_flight is a promise to the system (its own connection slots, a
    licence), which one more send would break: both refuse, saying why. max_per_second
    takes a token, even one the bucket does not have: a person's one send is not refused
    because the workers emptied the bucket a moment ago, and the workers' next claims
    repay the debt (limits.spend), so the rate holds over time."""
    row = (await session.execute(select(_systems.c.timeout_s, *LIMIT_COLUMNS)
                                 .where(_systems.c.name == system))).one()
    limit = Limits.of(row)
    if limit.throttled(now):
        assert limit.throttled_until is not None
        raise Conflict(f"{system} asked us to wait (429 or 503 with Retry-After): nothing is "
                       f"sent to it before {limit.throttled_until.isoformat()}")
    if limit.limited:
        [allowance] = (await allowances(session, [system], now, at_most={system: 1})).values()
        if allowance.room is not None and allowance.room <= 0:
            raise Conflict(f"{system} has {row.max_in_flight} sends under way, its "
                           "max_in_flight; try again when one has an outcome")
        await spend(session, allowance, 1, now)
    return row.timeout_s


async def lock_delivery(session: AsyncSession, delivery_id: int) -> Delivery:
    delivery = (
        await session.execute(
            select(Delivery).where(Delivery.id == delivery_id).with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if delivery is None:
        raise NotFound(f"delivery {delivery_id} does not exist")
    return delivery


def lease_of(deliverer: Deliverer, row: Any, started: float, wall: datetime) -> Lease:
    """The claim's lease on this process's monotonic clock. `started`: the monotonic clock
    read before the transaction that confirmed the claim; `wall`: the wall clock read after
    it (so the remaining time is, if anything, underestimated)."""
    left = (row.lease_expires_at - wall).total_seconds() if row.lease_expires_at else 0.0
    liveness = deliverer.liveness
    epoch = None if liveness is None else liveness.epoch_of_claim(row.updated_at)
    return Lease(started + left, epoch)


def may_send(deliverer: Deliverer, item: Prepared) -> bool:
    """THE FENCE, checked right before every send: the whole exchange and the safety margin
    must still fit in the claim's lease, and (for a worker) its heartbeat must have held
    since the claim, so that no other process can have recovered the claim yet. A claim
    that fails it is released unsent, or — if it was recovered meanwhile — left as it is."""
    now = deliverer.monotonic()
    if now + item.exchange_s + deliverer.lease_safety_s > item.lease.deadline:
        return False
    liveness = deliverer.liveness
    return liveness is None or liveness.holds(item.lease.epoch, now)


async def release_unsent(deliverer: Deliverer,
                         unsent: Sequence[Prepared]) -> dict[int, DeliveryResult]:
    """Claims of this worker that were not sent, back to pending in one transaction (a
    half-open circuit whose trial this was lets the next held delivery be the trial). A
    claim no longer ours (recovered meanwhile) is left alone: NOT_CLAIMED."""

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
        unsent_after_all = await _settle_recovered_unsent(
            session, deliverer, [item for item in unsent
                                 if item.request.delivery_id not in released], now)
        return {delivery_id: DeliveryResult(
            delivery_id, Outcome.RELEASED if delivery_id in released | unsent_after_all
            else Outcome.NOT_CLAIMED) for delivery_id in ids}

    if not unsent:
        return {}
    return await deliverer.database.run_transaction(work)


async def _settle_recovered_unsent(session: AsyncSession, deliverer: Deliverer,
                                   items: Sequence[Prepared], now: datetime) -> set[int]:
    """Claims of ours that another process recovered as worker_lost, though we never sent
    them (the fence, a stop): we know what nobody else could, so the open outcome is
    resolved as not delivered and the delivery waits to be sent again, instead of leaving a
    person to find out. Only the outcome of that very claim (our worker, its attempt
    number) and only while it is still open; the ids settled so."""
    if not items:
        return set()
    numbers = {item.request.delivery_id: item.request.attempt_number for item in items}
    rows = (await session.execute(
        select(AmbiguousOutcome, DeliveryAttempt.attempt_number)
        .join(DeliveryAttempt, DeliveryAttempt.id == AmbiguousOutcome.attempt_id)
        .where(AmbiguousOutcome.delivery_id.in_(sorted(numbers)),
               AmbiguousOutcome.status == "open",
               DeliveryAttempt.classification == Classification.WORKER_LOST.value,
               DeliveryAttempt.actor == deliverer.worker_id)
        .order_by(AmbiguousOutcome.delivery_id)
        .with_for_update(of=AmbiguousOutcome))).all()
    mine = [outcome for outcome, number in rows if numbers[outcome.delivery_id] == number]
    if not mine:
        return set()
    deliveries = {delivery.id: delivery for delivery in (await session.execute(
        select(Delivery).where(Delivery.id.in_([o.delivery_id for o in mine]),
                               Delivery.status == "ambiguous")
        .order_by(Delivery.id).with_for_update())).scalars()}
    audit = []
    for outcome in mine:
        delivery = deliveries.get(outcome.delivery_id)
        if delivery is None:
            continue
        note = ("the worker that held the claim never sent it (its lease or heartbeat no "
                "longer covered a send, or it was stopping); it waits to be sent again")
        outcome.status, outcome.resolution, outcome.resolution_note = (
            "resolved", "not_delivered", note)
        outcome.resolved_by, outcome.resolved_at = "system", now
        delivery.status, delivery.next_attempt_at, delivery.updated_at = "pending", now, now
        audit.append(AuditEntry("ambiguous.resolved", "ambiguous", str(outcome.id),
                                {"resolution": "not_delivered", "note": note,
                                 "delivery_id": delivery.id, "system": delivery.system},
                                delivery.idempotency_key))
    await session.flush()
    await append_audit(session, audit, actor="system", now=now)
    return set(deliveries)


async def _lost_worker_conditions(session: AsyncSession, now: datetime, lost_after_s: float,
                                  alive_since: datetime | None = None) -> list[Any]:
    """Claims of stopped workers, and of workers silent for lost_after_s plus one whole
    exchange of the claim's system: a worker whose heartbeats stopped committing may still
    have a send open that began while its heartbeat held (the fence lets it start one until
    then), and that send must be over before its claim is taken for lost."""
    timeouts = (await session.execute(select(_systems.c.name, _systems.c.timeout_s))).all()
    stopped = select(_workers.c.id).where(_workers.c.stopped_at.is_not(None))
    conditions = [Delivery.claimed_by.in_(stopped)]
    for name, timeout_s in timeouts:
        cutoff = now - timedelta(seconds=lost_after_s + total_deadline_s(timeout_s))
        if alive_since is not None and alive_since > cutoff:
            # the recovering worker was not itself alive all through that silence (a
            # database outage silences every worker at once): the other's silence proves
            # nothing yet; the leases still apply
            continue
        conditions.append(and_(Delivery.system == name, Delivery.claimed_by.in_(
            select(_workers.c.id).where(_workers.c.last_seen_at < cutoff))))
    return conditions


async def recover_lost_claims(deliverer: Deliverer, *, lost_after_s: float | None = None,
                              limit: int = 100, alive_since: datetime | None = None) -> int:
    """In-flight deliveries whose lease ran out, or whose worker stopped or has been lost
    for longer than one exchange of the delivery's system, become ambiguous with the
    classification worker_lost: the request may have reached the system,
    so it is never simply sent again; the status query (or a person) finds out.
    `alive_since`: when the recovering worker's own heartbeat epoch began; a silence that
    overlaps its own (an outage of the database, not of the other worker) is not held
    against anyone. The circuit
    is left alone: a worker's trouble is not the system's. (If the worker was only slow
    and its answer arrives after all, the answer settles the outcome: recording.py.)"""
    async def work(session: AsyncSession) -> list[str]:
        now = deliverer.clock()
        conditions = [Delivery.lease_expires_at < now]
        if lost_after_s is not None:
            conditions += await _lost_worker_conditions(session, now, lost_after_s,
                                                        alive_since)
        lost = (Delivery.status == "in_flight", or_(*conditions))
        names = sorted((await session.execute(
            select(Delivery.system).where(*lost).group_by(Delivery.system))).scalars())
        if not names:
            return []
        circuits = {name: await lock_circuit(session, name) for name in names}  # circuits first
        query = (select(Delivery).where(*lost, Delivery.system.in_(names))
                 .order_by(Delivery.id).limit(limit))
        if not deliverer.database.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        expired = list((await session.execute(query)).scalars())
        systems = {name: await session.get(DownstreamSystem, name)
                   for name in sorted({delivery.system for delivery in expired})}
        audit: list[AuditEntry] = []
        for delivery in expired:
            worker = delivery.claimed_by or "unknown"
            lease_over = delivery.lease_expires_at is not None and delivery.lease_expires_at < now
            why = ("its lease ran out" if lease_over
                   else "its heartbeat stopped (lost) or it stopped")
            attempt = DeliveryAttempt(
                delivery_id=delivery.id, system=delivery.system,
                attempt_number=delivery.attempts + 1,
                trigger=delivery.claim_trigger or "scheduled", actor=worker,
                started_at=delivery.updated_at,
                request=request_summary(delivery, delivery.attempts + 1,
                                        system_config(systems[delivery.system])),
                classification=Classification.WORKER_LOST.value,
                rule="lease_expired" if lease_over else "worker_lost",
                error=f"worker {worker} held this claim, but {why} before it recorded an "
                      "outcome; the request may have been sent",
            )
            session.add(attempt)
            await session.flush()
            delivery.attempts += 1
            await apply_step(session, delivery, Step.AMBIGUOUS, attempt,
                             SendResult(error=attempt.error), (0, 0), random.Random(0), now,
                             audit)
            await free_trial(session, circuits[delivery.system], delivery.id, now)
        await session.flush()
        await append_audit(session, audit, actor="system", now=now)
        return [delivery.system for delivery in expired]

    recovered = await deliverer.database.run_transaction(work)
    for system in recovered:  # attempt rows too, though nothing was timed
        count_delivery_attempt(system, Classification.WORKER_LOST.value)
    return len(recovered)


async def recover_expired_leases(deliverer: Deliverer, limit: int = 100) -> int:
    """recover_lost_claims by lease expiry alone (processes that know no heartbeats)."""
    return await recover_lost_claims(deliverer, limit=limit)
