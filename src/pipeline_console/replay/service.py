"""Replay: validate a request all-or-nothing, then execute it through the canonical delivery
function. Replay has no send of its own: it claims a delivery with trigger `replay` and calls
delivery.service.deliver(), and its execution log can only reference the attempt that
function wrote (a NOT NULL composite foreign key; see models/replay.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.audit.service import AuditEntry, append_audit
from pipeline_console.delivery.service import Deliverer, claim_one, deliver
from pipeline_console.errors import Conflict, NotFound
from pipeline_console.models import (
    Circuit,
    DeadLetter,
    Delivery,
    DownstreamSystem,
    ProductionRecord,
    ReplayExecution,
    ReplayItem,
    ReplayRequest,
)
from pipeline_console.replay.policy import ItemFacts, eligibility

MAX_ITEMS = 500


@dataclass(frozen=True)
class Target:
    dlq_id: int | None = None
    key: str | None = None
    system: str | None = None


async def expand_filter(session: AsyncSession, system: str, reason_contains: str | None,
                        since: datetime | None, until: datetime | None) -> list[Target]:
    query = (select(DeadLetter.id).where(DeadLetter.system == system,
                                         DeadLetter.status == "open")
             .order_by(DeadLetter.id).limit(MAX_ITEMS))
    if reason_contains:
        query = query.where(DeadLetter.reason.contains(reason_contains, autoescape=True))
    if since is not None:
        query = query.where(DeadLetter.created_at >= since)
    if until is not None:
        query = query.where(DeadLetter.created_at < until)
    return [Target(dlq_id=dlq_id) for dlq_id in (await session.execute(query)).scalars()]


async def _facts(session: AsyncSession, target: Target, seen: set[tuple[str, str, int]],
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
    )
    seen.add(signature)
    where = {"idempotency_key": key, "system": system_name, "version": version}
    return facts, delivery, where


async def create_replay(session: AsyncSession, targets: list[Target], *, reason: str,
                        selection: dict[str, Any], allow_delivered: bool, actor: str,
                        now: datetime) -> tuple[ReplayRequest, list[ReplayItem]]:
    """Validate every item and store the request either way: `validated` when every item is
    eligible, otherwise `rejected` (all-or-nothing), with each item's reason."""
    if not targets:
        raise Conflict("the request selects nothing to replay")
    if len(targets) > MAX_ITEMS:
        raise Conflict(f"at most {MAX_ITEMS} items per replay request")
    seen: set[tuple[str, str, int]] = set()
    verdicts = []
    for target in targets:
        facts, _, where = await _facts(session, target, seen)
        verdicts.append((target, where, eligibility(facts, allow_delivered=allow_delivered)))
    accepted = all(verdict.eligible for _, _, verdict in verdicts)
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


async def execute_replay(deliverer: Deliverer, request_id: int, *, actor: str) -> ReplayRequest:
    """Send every item through the canonical path, once. Executing again (also at the same
    time, from another process) sends nothing more: each item is claimed before it is sent."""

    async def start(session: AsyncSession) -> bool:
        request = await _lock_request(session, request_id)
        if request.status == "rejected":
            raise Conflict(f"replay {request_id} was rejected at validation; nothing is sent")
        if request.status in ("completed", "failed"):
            return False
        if request.status == "validated":
            request.status, request.executed_by = "executing", actor
            request.executed_at = deliverer.clock()
        return True

    if await deliverer.database.run_transaction(start):
        item_ids = await _item_ids(deliverer, request_id)
        for item_id in item_ids:
            await _execute_item(deliverer, request_id, item_id, actor)
        await deliverer.database.run_transaction(
            lambda session: _finish(session, request_id, actor, deliverer.clock()))
    async with deliverer.database.read() as session:
        return await get_replay(session, request_id)


async def _item_ids(deliverer: Deliverer, request_id: int) -> list[int]:
    async with deliverer.database.read() as session:
        return list((await session.execute(
            select(ReplayItem.id).where(ReplayItem.request_id == request_id)
            .order_by(ReplayItem.position))).scalars())


async def _execute_item(deliverer: Deliverer, request_id: int, item_id: int, actor: str) -> None:
    async def take(session: AsyncSession) -> int | None:
        item = (await session.execute(select(ReplayItem).where(ReplayItem.id == item_id)
                                      .with_for_update())).scalar_one()
        if item.status != "pending":
            return None  # another execution has it
        request = await session.get(ReplayRequest, request_id)
        target = Target(dlq_id=item.dlq_id, key=item.idempotency_key, system=item.system)
        facts, delivery, _ = await _facts(session, target, set())
        verdict = eligibility(facts, allow_delivered=request.allow_delivered)
        if not verdict.eligible:
            item.status, item.reason = "refused", f"at execution: {verdict.reason}"
            return None
        if delivery is None:
            delivery = await _new_delivery(session, item, deliverer.clock())
        item.status = "executing"
        return delivery.id

    delivery_id = await deliverer.database.run_transaction(take)
    if delivery_id is None:
        return
    try:
        await claim_one(deliverer, delivery_id, trigger="replay",
                        allowed=("pending", "dead_lettered", "delivered"))
    except Conflict as refusal:
        await _refuse(deliverer, item_id, f"at execution: {refusal.detail}")
        return
    result = await deliver(deliverer, delivery_id, trigger="replay", actor=actor)
    if result.attempt_id is None:
        await _refuse(deliverer, item_id, f"at execution: the delivery was {result.outcome}")
        return

    async def log(session: AsyncSession) -> None:
        item = await session.get(ReplayItem, item_id, with_for_update=True)
        item.status = "executed"
        session.add(ReplayExecution(
            request_id=request_id, item_id=item_id, delivery_id=delivery_id,
            delivery_attempt_id=result.attempt_id, attempt_trigger="replay",
            outcome=result.outcome.value, executed_by=actor, executed_at=deliverer.clock()))

    await deliverer.database.run_transaction(log)


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
        return  # another execution is still working on it; it will finish the request
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
    items = list((await session.execute(select(ReplayItem).where(
        ReplayItem.request_id == request_id).order_by(ReplayItem.position))).scalars())
    executions = list((await session.execute(select(ReplayExecution).where(
        ReplayExecution.request_id == request_id).order_by(ReplayExecution.id))).scalars())
    return items, executions
