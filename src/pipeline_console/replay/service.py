"""Replay: validate a request all-or-nothing, then execute it through the canonical delivery
function. Replay has no send of its own: it claims a delivery with trigger `replay` and calls
delivery.service.deliver(), and its execution log can only reference the attempt that
function wrote (a NOT NULL composite foreign key; see models/replay.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.audit.service import AuditEntry, append_audit
from pipeline_console.delivery.service import Deliverer, claim_in, deliver
from pipeline_console.errors import Conflict, NotFound
from pipeline_console.ingestion.policy import payload_hash
from pipeline_console.models import (
    Circuit,
    DeadLetter,
    Delivery,
    DeliveryAttempt,
    DownstreamSystem,
    ProductionRecord,
    ReplayExecution,
    ReplayItem,
    ReplayRequest,
)
from pipeline_console.pagination import matches
from pipeline_console.replay.policy import ItemFacts, eligibility

MAX_ITEMS = 500
log = logging.getLogger("pipeline_console.replay")


@dataclass(frozen=True)
class Target:
    dlq_id: int | None = None
    key: str | None = None
    system: str | None = None


def dead_letter_conditions(*, system: str | None = None,
                           status: str | tuple[str, ...] | None = None,
                           reason_contains: str | None = None, since: datetime | None = None,
                           until: datetime | None = None) -> list[Any]:
    """The WHERE of a dead-letter filter: the API's list, the console's list and a replay
    request's "all matching" select the same rows."""
    conditions: list[Any] = []
    if system is not None:
        conditions.append(DeadLetter.system == system)
    if status is not None:
        conditions.append(matches(DeadLetter.status, status))
    if reason_contains:
        # lower() on both sides: case-insensitive on SQLite and PostgreSQL alike
        conditions.append(func.lower(DeadLetter.reason).contains(reason_contains.lower(),
                                                                 autoescape=True))
    if since is not None:
        conditions.append(DeadLetter.created_at >= since)
    if until is not None:
        conditions.append(DeadLetter.created_at < until)
    return conditions


async def expand_filter(session: AsyncSession, system: str, reason_contains: str | None,
                        since: datetime | None, until: datetime | None) -> list[Target]:
    """Every open dead letter of the system that matches; more than MAX_ITEMS is refused."""
    query = (select(DeadLetter.id)
             .where(*dead_letter_conditions(system=system, status="open",
                                            reason_contains=reason_contains, since=since,
                                            until=until))
             .order_by(DeadLetter.id).limit(MAX_ITEMS + 1))
    targets = [Target(dlq_id=dlq_id) for dlq_id in (await session.execute(query)).scalars()]
    if len(targets) > MAX_ITEMS:
        raise Conflict(f"the filter matches more than {MAX_ITEMS} dead letters; narrow it "
                       "(from, to, reason_contains) and replay in several requests")
    return targets


async def _facts(session: AsyncSession, target: Target, seen: set[tuple[str, str, int]],
                 validated_version: int | None = None,
                 ) -> tuple[ItemFacts, Delivery | None, dict[str, Any]]:
    """What is true about one item now; also the delivery it would resend, if one exists."""
    dead_letter = delivery = None
    key, system_name, version = target.key, target.system, None
    if target.dlq_id is not None:
        dead_letter = await session.get(DeadLetter, target.dlq_id, populate_existing=True)
        if dead_letter is not None:
            delivery = await session.get(Delivery, dead_letter.delivery_id,
                                         populate_existing=True)
            key, system_name, version = (delivery.idempotency_key, delivery.system,
                                         delivery.version)
    system = await session.get(DownstreamSystem, system_name) if system_name else None
    production = await session.get(ProductionRecord, key, populate_existing=True) if key else None
    if target.dlq_id is None and production is not None:
        version = production.version
    entity_type = (delivery.entity_type if delivery else
                   production.entity_type if production else
                   (key.split(":", 1)[0] if key else None))
    busy = latest = None
    if key and system_name:
        busy = await session.scalar(select(Delivery.status).where(
            Delivery.system == system_name, Delivery.idempotency_key == key,
            Delivery.status.in_(("in_flight", "ambiguous"))).limit(1))
        if delivery is None and version is not None:
            delivery = (await session.execute(
                select(Delivery).where(Delivery.system == system_name,
                                       Delivery.idempotency_key == key,
                                       Delivery.version == version)
                .order_by(Delivery.id.desc()).limit(1)
                .execution_options(populate_existing=True))).scalar_one_or_none()
        latest = delivery.status if delivery is not None else None
    circuit_state = (await session.scalar(select(Circuit.state).where(
        Circuit.system == system_name)) if system else None)
    signature = (system_name or "", key or "", version or -1)
    facts = ItemFacts(
        target=(f"dead letter {target.dlq_id}" if target.dlq_id is not None
                else f"{key} → {system_name}"),
        from_dead_letter=target.dlq_id is not None,
        dead_letter_status=dead_letter.status if dead_letter else None,
        system=system_name, system_exists=system is not None,
        subscribed=bool(system and entity_type in system.entity_types),
        entity_type=entity_type,
        production_version=production.version if production else None,
        version=version, circuit_state=circuit_state, busy_status=busy,
        latest_status=latest, repeated=signature in seen,
        payload_current=(delivery is None or production is None
                         or payload_hash(delivery.payload) == production.payload_hash),
        validated_version=validated_version,
    )
    seen.add(signature)
    where = {"idempotency_key": key, "system": system_name, "version": version}
    return facts, delivery, where


async def create_replay(session: AsyncSession, targets: list[Target], *, reason: str,
                        selection: dict[str, Any], allow_delivered: bool, actor: str,
                        now: datetime) -> tuple[ReplayRequest, list[ReplayItem]]:
    """Validate every item and store the request either way: `validated` when every item is
    eligible, otherwise `rejected` (all-or-nothing), with each item's reason."""
    if len(targets) > MAX_ITEMS:
        raise Conflict(f"at most {MAX_ITEMS} items per replay request")
    seen: set[tuple[str, str, int]] = set()
    verdicts = []
    for target in targets:
        facts, _, where = await _facts(session, target, seen)
        verdicts.append((target, where, eligibility(facts, allow_delivered=allow_delivered)))
    accepted = bool(verdicts) and all(verdict.eligible for _, _, verdict in verdicts)
    request = ReplayRequest(status="validated" if accepted else "rejected", reason=reason,
                            selection=selection, allow_delivered=allow_delivered,
                            requested_by=actor, created_at=now)
    session.add(request)
    await session.flush()
    items = [
        ReplayItem(request_id=request.id, position=position, dlq_id=target.dlq_id,
                   idempotency_key=where["idempotency_key"], system=where["system"],
                   version=where["version"], eligible=verdict.eligible, reason=verdict.reason,
                   status="pending" if accepted else "refused")
        for position, (target, where, verdict) in enumerate(verdicts)
    ]
    session.add_all(items)
    await session.flush()
    await append_audit(session, [AuditEntry(
        "replay.validated" if accepted else "replay.rejected", "replay", str(request.id),
        {"reason": reason, "items": len(items),
         "ineligible": sum(1 for item in items if not item.eligible)})],
        actor=actor, now=now)
    return request, items


async def request_eligible(session: AsyncSession, request_id: int, *, reason: str, actor: str,
                           now: datetime) -> tuple[ReplayRequest, list[ReplayItem]]:
    """A new request of the eligible items of a rejected one ("request again with only the
    eligible items"), validated afresh: all-or-nothing again, as any request."""
    source = await session.get(ReplayRequest, request_id)
    if source is None:
        raise NotFound(f"replay {request_id} does not exist")
    if source.status != "rejected":
        raise Conflict(f"replay {request_id} is {source.status}, not rejected: only a "
                       "rejected request is asked again with its eligible items")
    rows = (await session.execute(select(ReplayItem).where(
        ReplayItem.request_id == request_id, ReplayItem.eligible.is_(True))
        .order_by(ReplayItem.position))).scalars().all()
    if not rows:
        raise Conflict(f"none of the items of replay {request_id} was eligible")
    targets = [Target(dlq_id=row.dlq_id) if row.dlq_id is not None
               else Target(key=row.idempotency_key, system=row.system) for row in rows]
    selection = {"from_replay": request_id,
                 "items": [{"dlq_id": t.dlq_id} if t.dlq_id is not None
                           else {"key": t.key, "system": t.system} for t in targets]}
    return await create_replay(session, targets, reason=reason, selection=selection,
                               allow_delivered=source.allow_delivered, actor=actor, now=now)


async def execute_replay(deliverer: Deliverer, request_id: int, *, actor: str,
                         wait_s: float = 60.0) -> ReplayRequest:
    """Send every item through the canonical path, once. Executing again (also at the same
    time, from another process) sends nothing more: each item is checked and claimed in one
    transaction, and only a `pending` item can be taken. An execution interrupted by a crash
    is finished by the next one, from the delivery attempt log."""

    async def start(session: AsyncSession) -> str:
        request = await _lock_request(session, request_id)
        if request.status == "rejected":
            raise Conflict(f"replay {request_id} was rejected at validation; nothing is sent")
        if request.status in ("completed", "failed"):
            return "done"
        first = request.status == "validated"
        request.status = "executing"
        if first:
            request.executed_by, request.executed_at = actor, deliverer.clock()
            if not await _all_still_eligible(session, request):
                await session.flush()
                await append_audit(session, [AuditEntry(
                    "replay.failed", "replay", str(request_id),
                    {"refused_at_execution": True,
                     "reason": "an item became ineligible after validation; nothing was "
                               "sent"})], actor=actor, now=deliverer.clock())
                return "refused"
        return "run"

    mode = await deliverer.database.run_transaction(start)
    if mode == "run":
        for item_id in await _item_ids(deliverer, request_id):
            try:
                await _recover_interrupted(deliverer, request_id, item_id, actor)
                await _execute_item(deliverer, request_id, item_id, actor)
            except Exception:  # one item's trouble never stops the others; it is recoverable
                log.exception("replay %s: item %s failed; it will be finished later",
                              request_id, item_id)
    if mode != "done":
        await deliverer.database.run_transaction(
            lambda session: _finish(session, request_id, actor, deliverer.clock()))
    deadline = time.monotonic() + wait_s
    while True:  # another execution may still be sending some items: wait for its result
        async with deliverer.database.read() as session:
            request = await get_replay(session, request_id)
            sending = await session.scalar(
                select(func.count()).select_from(ReplayItem)
                .join(Delivery, Delivery.id == ReplayItem.delivery_id)
                .where(ReplayItem.request_id == request_id, ReplayItem.status == "executing",
                       Delivery.status == "in_flight"))
        if request.status != "executing" or not sending or time.monotonic() > deadline:
            return request
        await asyncio.sleep(0.1)


async def _all_still_eligible(session: AsyncSession, request: ReplayRequest) -> bool:
    """All-or-nothing holds at execution too: if any item became ineligible since
    validation, nothing is sent and every item says why."""
    items = list((await session.execute(select(ReplayItem).where(
        ReplayItem.request_id == request.id).order_by(ReplayItem.position)
        .with_for_update())).scalars())
    seen: set[tuple[str, str, int]] = set()
    verdicts = []
    for item in items:
        facts, _, _ = await _facts(session, _target(item), seen,
                                   None if item.dlq_id is not None else item.version)
        verdicts.append(eligibility(facts, allow_delivered=request.allow_delivered))
    if all(verdict.eligible for verdict in verdicts):
        return True
    for item, verdict in zip(items, verdicts, strict=True):
        item.status = "refused"
        item.reason = (f"at execution: {verdict.reason}" if not verdict.eligible else
                       "at execution: not sent, because another item became ineligible")
    request.status, request.finished_at = "failed", request.executed_at
    return False


def _target(item: ReplayItem) -> Target:
    return Target(dlq_id=item.dlq_id, key=item.idempotency_key, system=item.system)


async def _item_ids(deliverer: Deliverer, request_id: int) -> list[int]:
    async with deliverer.database.read() as session:
        return list((await session.execute(
            select(ReplayItem.id).where(ReplayItem.request_id == request_id)
            .order_by(ReplayItem.position))).scalars())


async def _execute_item(deliverer: Deliverer, request_id: int, item_id: int, actor: str) -> None:
    async def take(session: AsyncSession) -> int | None:
        item = (await session.execute(select(ReplayItem).where(ReplayItem.id == item_id)
                                      .with_for_update()
                                      .execution_options(populate_existing=True))).scalar_one()
        if item.status != "pending":
            return None  # done, refused, or another execution has it
        request = await session.get(ReplayRequest, request_id)
        facts, delivery, _ = await _facts(session, _target(item), set(),
                                          None if item.dlq_id is not None else item.version)
        verdict = eligibility(facts, allow_delivered=request.allow_delivered)
        if not verdict.eligible:
            item.status, item.reason = "refused", f"at execution: {verdict.reason}"
            return None
        try:
            # Check and claim in one transaction: nothing can send it in between. A new
            # delivery lives in a savepoint, so a refused claim leaves no pending row behind.
            async with session.begin_nested():
                if delivery is None:
                    delivery = await _new_delivery(session, item, deliverer.clock())
                await claim_in(session, deliverer, delivery.id, trigger="replay",
                               allowed=(delivery.status,))
        except Conflict as refusal:
            item.status, item.reason = "refused", f"at execution: {refusal.detail}"
            return None
        item.status, item.delivery_id = "executing", delivery.id
        return delivery.id

    delivery_id = await deliverer.database.run_transaction(take)
    if delivery_id is None:
        return
    result = await deliver(deliverer, delivery_id, trigger="replay", actor=actor)
    await deliverer.database.run_transaction(
        lambda session: _log_execution(session, request_id, item_id, delivery_id,
                                       result.attempt_id, result.outcome.value, actor,
                                       deliverer.clock()))


async def _log_execution(session: AsyncSession, request_id: int, item_id: int,
                         delivery_id: int, attempt_id: int | None, outcome: str, actor: str,
                         now: datetime) -> None:
    item = await session.get(ReplayItem, item_id, with_for_update=True,
                             populate_existing=True)
    if item.status != "executing":
        return
    if attempt_id is None:
        item.status, item.reason = "refused", f"at execution: the delivery was {outcome}"
        return
    item.status = "executed"
    session.add(ReplayExecution(
        request_id=request_id, item_id=item_id, delivery_id=delivery_id,
        delivery_attempt_id=attempt_id, attempt_trigger="replay", outcome=outcome,
        executed_by=actor, executed_at=now))


async def _recover_interrupted(deliverer: Deliverer, request_id: int, item_id: int,
                               actor: str) -> None:
    """An item left `executing` by an execution that died: finish it from the attempt log."""

    async def work(session: AsyncSession) -> None:
        item = await session.get(ReplayItem, item_id, with_for_update=True,
                                 populate_existing=True)
        if item.status != "executing" or item.delivery_id is None:
            return
        delivery = await session.get(Delivery, item.delivery_id, populate_existing=True)
        if delivery.status == "in_flight":
            return  # still being sent (or its lease has not run out yet)
        used = select(ReplayExecution.delivery_attempt_id)
        attempt = (await session.execute(
            select(DeliveryAttempt).where(DeliveryAttempt.delivery_id == delivery.id,
                                          DeliveryAttempt.trigger == "replay",
                                          DeliveryAttempt.id.not_in(used))
            .order_by(DeliveryAttempt.id.desc()).limit(1))).scalar_one_or_none()
        outcome = {"delivered": "delivered", "dead_lettered": "dead_lettered",
                   "ambiguous": "ambiguous", "pending": "retry"}.get(delivery.status,
                                                                    delivery.status)
        await _log_execution(session, request_id, item_id, delivery.id,
                             attempt.id if attempt else None, outcome, actor,
                             deliverer.clock())

    await deliverer.database.run_transaction(work)


async def _new_delivery(session: AsyncSession, item: ReplayItem, now: datetime) -> Delivery:
    """A replay by key of a version never queued for this system (subscribed later, say)."""
    production = await session.get(ProductionRecord, item.idempotency_key)
    delivery = Delivery(system=item.system, idempotency_key=item.idempotency_key,
                        entity_type=production.entity_type, entity_id=production.entity_id,
                        version=production.version, payload=production.payload,
                        correlation_id=production.correlation_id, status="pending",
                        attempts=0, next_attempt_at=now, created_at=now, updated_at=now)
    session.add(delivery)
    await session.flush()
    return delivery


async def _refuse(deliverer: Deliverer, item_id: int, reason: str) -> None:
    async def work(session: AsyncSession) -> None:
        item = await session.get(ReplayItem, item_id, with_for_update=True)
        item.status, item.reason = "refused", reason

    await deliverer.database.run_transaction(work)


async def _finish(session: AsyncSession, request_id: int, actor: str, now: datetime) -> None:
    request = await _lock_request(session, request_id)
    if request.status != "executing":
        return
    items = list((await session.execute(select(ReplayItem).where(
        ReplayItem.request_id == request_id))).scalars())
    if any(item.status in ("pending", "executing") for item in items):
        return  # still being sent (by this or another execution); the last one finishes it
    outcomes = {row.item_id: row.outcome for row in (await session.execute(
        select(ReplayExecution).where(ReplayExecution.request_id == request_id))).scalars()}
    succeeded = all(outcomes.get(item.id) == "delivered" for item in items)
    request.status = "completed" if succeeded else "failed"
    request.finished_at = now
    await session.flush()
    await append_audit(session, [AuditEntry(
        f"replay.{request.status}", "replay", str(request_id),
        {"items": len(items), "delivered": sum(1 for o in outcomes.values() if o == "delivered"),
         "outcomes": {str(item_id): outcome for item_id, outcome in outcomes.items()}})],
        actor=actor, now=now)


async def _lock_request(session: AsyncSession, request_id: int) -> ReplayRequest:
    request = (await session.execute(select(ReplayRequest).where(ReplayRequest.id == request_id)
                                      .with_for_update()
                                      .execution_options(populate_existing=True))
               ).scalar_one_or_none()
    if request is None:
        raise NotFound(f"replay {request_id} does not exist")
    return request


async def get_replay(session: AsyncSession, request_id: int) -> ReplayRequest:
    request = await session.get(ReplayRequest, request_id, populate_existing=True)
    if request is None:
        raise NotFound(f"replay {request_id} does not exist")
    return request


async def items_and_executions(session: AsyncSession, request_id: int,
                               ) -> tuple[list[ReplayItem], list[ReplayExecution]]:
    [(items, executions)] = (await items_and_executions_of(session, [request_id])).values()
    return items, executions


async def items_and_executions_of(
    session: AsyncSession, request_ids: list[int],
) -> dict[int, tuple[list[ReplayItem], list[ReplayExecution]]]:
    """Items and executions of several requests in two queries (for a page of replays)."""
    found: dict[int, tuple[list[ReplayItem], list[ReplayExecution]]] = {
        request_id: ([], []) for request_id in request_ids}
    for item in (await session.execute(select(ReplayItem).where(
            ReplayItem.request_id.in_(request_ids))
            .order_by(ReplayItem.request_id, ReplayItem.position))).scalars():
        found[item.request_id][0].append(item)
    for row in (await session.execute(select(ReplayExecution).where(
            ReplayExecution.request_id.in_(request_ids)).order_by(ReplayExecution.id))).scalars():
        found[row.request_id][1].append(row)
    return found
