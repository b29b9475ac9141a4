"""Ambiguous outcomes: never retried blindly. Ask the system first (query-before-retry), or
let a person decide; a resend goes through the canonical delivery function."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.audit.service import AuditEntry, append_audit
from pipeline_console.delivery.service import (
    Deliverer,
    DeliveryResult,
    claim_one,
    config_of,
    deliver,
    system_config,
)
from pipeline_console.errors import Conflict, NotFound
from pipeline_console.models import AmbiguousOutcome, Delivery, DownstreamSystem


@dataclass(frozen=True)
class AmbiguousAction:
    ambiguous_id: int
    status: str  # open, or resolved
    resolution: str | None
    query_status: int | None = None
    resend: DeliveryResult | None = None


async def _lock_open(session: AsyncSession, ambiguous_id: int) -> AmbiguousOutcome:
    outcome = (await session.execute(
        select(AmbiguousOutcome).where(AmbiguousOutcome.id == ambiguous_id).with_for_update()
        .execution_options(populate_existing=True))).scalar_one_or_none()
    if outcome is None:
        raise NotFound(f"ambiguous outcome {ambiguous_id} does not exist")
    if outcome.status != "open":
        raise Conflict(f"ambiguous outcome {ambiguous_id} was already resolved "
                       f"({outcome.resolution}) by {outcome.resolved_by}")
    return outcome


async def _settle(deliverer: Deliverer, outcome_id: int, resolution: str, note: str,
                  actor: str) -> None:
    """Close the outcome; `delivered` marks the delivery delivered, `not_delivered` makes it
    pending again so that it can be sent through the canonical path."""
    async with deliverer.database.transaction() as session:
        now = deliverer.clock()
        outcome = await _lock_open(session, outcome_id)
        delivery = await session.get(Delivery, outcome.delivery_id, with_for_update=True)
        outcome.status, outcome.resolution = "resolved", resolution
        outcome.resolution_note, outcome.resolved_by, outcome.resolved_at = note, actor, now
        if delivery.status == "ambiguous":
            if resolution == "delivered":
                delivery.status, delivery.delivered_at = "delivered", now
            else:
                delivery.status, delivery.next_attempt_at = "pending", now
            delivery.updated_at = now
        await session.flush()
        await append_audit(session, [AuditEntry(
            "ambiguous.resolved", "ambiguous", str(outcome.id),
            {"resolution": resolution, "note": note, "delivery_id": delivery.id,
             "system": delivery.system}, delivery.idempotency_key)], actor=actor, now=now)


async def _resend(deliverer: Deliverer, delivery_id: int, actor: str) -> DeliveryResult | None:
    """Send again through the canonical path; if the circuit does not allow it now, the
    delivery stays pending and the worker sends (or holds) it."""
    try:
        await claim_one(deliverer, delivery_id, trigger="resolution", allowed=("pending",))
    except Conflict:
        return None
    return await deliver(deliverer, delivery_id, trigger="resolution", actor=actor)


async def resolve_ambiguous(deliverer: Deliverer, ambiguous_id: int, resolution: str, note: str,
                            *, actor: str) -> AmbiguousAction:
    await _settle(deliverer, ambiguous_id, resolution, note, actor)
    resend = None
    if resolution == "not_delivered":
        async with deliverer.database.read() as session:
            delivery_id = await session.scalar(select(AmbiguousOutcome.delivery_id).where(
                AmbiguousOutcome.id == ambiguous_id))
        resend = await _resend(deliverer, delivery_id, actor)
    return AmbiguousAction(ambiguous_id, "resolved", resolution, resend=resend)


async def query_ambiguous_status(deliverer: Deliverer, ambiguous_id: int, *,
                                 actor: str) -> AmbiguousAction:
    """Query-before-retry: 200 → delivered, no resend; 404 → safe to send again through the
    canonical path; anything else, or no answer → still ambiguous."""
    async with deliverer.database.read() as session:
        outcome = await session.get(AmbiguousOutcome, ambiguous_id)
        if outcome is None:
            raise NotFound(f"ambiguous outcome {ambiguous_id} does not exist")
        if outcome.status != "open":
            raise Conflict(f"ambiguous outcome {ambiguous_id} was already resolved")
        delivery = await session.get(Delivery, outcome.delivery_id)
        # with its secrets: the status query authenticates as the deliveries do
        config = await config_of(session, deliverer,
                                 await session.get(DownstreamSystem, delivery.system))
    if not deliverer.transports.has_status_query(config):
        raise Conflict(f"{config.name} has no status query; an operator resolves this outcome "
                       "(POST /api/v1/ambiguous/{id}/resolve)")
    status = await deliverer.transports.query_status(config, delivery.idempotency_key,
                                                     delivery.version)
    if status == 200:
        await _settle(deliverer, ambiguous_id, "delivered",
                      "status query answered 200: the system has this version", actor)
        return AmbiguousAction(ambiguous_id, "resolved", "delivered", status)
    if status == 404:
        await _settle(deliverer, ambiguous_id, "not_delivered",
                      "status query answered 404: the system does not have this version", actor)
        resend = await _resend(deliverer, delivery.id, actor)
        return AmbiguousAction(ambiguous_id, "resolved", "not_delivered", status, resend)
    async with deliverer.database.transaction() as session:
        now = deliverer.clock()
        outcome = await _lock_open(session, ambiguous_id)
        outcome.queries += 1
        outcome.last_query_at = now
        outcome.last_query_result = ("no answer" if status is None
                                     else f"HTTP {status}: still unknown")
        await session.flush()
        await append_audit(session, [AuditEntry(
            "ambiguous.queried", "ambiguous", str(ambiguous_id),
            {"system": outcome.system, "result": outcome.last_query_result,
             "queries": outcome.queries}, outcome.idempotency_key)], actor=actor, now=now)
    return AmbiguousAction(ambiguous_id, "open", None, status)


async def query_open_ambiguous(deliverer: Deliverer, *, actor: str,
                               limit: int = 100) -> dict[str, int]:
    """The query_ambiguous job: ask every system that can answer about its open outcomes."""
    async with deliverer.database.read() as session:
        rows = (await session.execute(
            select(AmbiguousOutcome.id, DownstreamSystem)
            .join(DownstreamSystem, DownstreamSystem.name == AmbiguousOutcome.system)
            .where(AmbiguousOutcome.status == "open").order_by(AmbiguousOutcome.id)
            .limit(limit))).all()
    counts = {"queried": 0, "delivered": 0, "resent": 0, "still_ambiguous": 0,
              "no_status_query": 0}
    for ambiguous_id, system in rows:
        if not deliverer.transports.has_status_query(system_config(system)):
            counts["no_status_query"] += 1
            continue
        try:
            action = await query_ambiguous_status(deliverer, ambiguous_id, actor=actor)
        except Conflict:  # resolved meanwhile by someone else
            continue
        counts["queried"] += 1
        if action.resolution == "delivered":
            counts["delivered"] += 1
        elif action.resolution == "not_delivered":
            counts["resent"] += 1
        else:
            counts["still_ambiguous"] += 1
    return counts
