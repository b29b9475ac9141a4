"""deliver_many(): the one canonical way anything is sent. First tries, retries, "deliver
now", ambiguous-outcome resolution and replay all claim a delivery and then call it (the
worker's pipeline, pipeline.py, calls its three steps). A send happens between two short
transactions, never inside one:

  claim    (transaction; claims.py) pending → in_flight, with a lease and the circuit's
           permission
  prepare  (the same or its own transaction) the claim is still ours, and no newer version
           of the record is live for that system (an older payload is never sent after a
           newer one: the older delivery is superseded instead)
  fence    (claims.may_send, right before the send) the lease still covers the whole
           exchange and the safety margin, and the worker's heartbeat has held
  send     (no transaction) through the transport
  record   (transaction; recording.py) an append-only attempt row, the delivery's next
           state and the circuit's transition

A worker that dies between claim and record leaves an in-flight delivery whose lease expires
(or whose heartbeat stops); claims.recover_lost_claims then makes it ambiguous (worker_lost):
it may have left, so it is never silently sent again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sqlalchemy import Row, and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.delivery.base import (
    Deliverer,
    DeliveryResult,
    Outcome,
    Prepared,
    Sent,
    needs_secrets,
    system_config,
)
from pipeline_console.delivery.claims import (
    claim_due,
    claim_due_in,
    claim_due_rows,
    claim_in,
    claim_one,
    lease_of,
    may_send,
    recover_expired_leases,
    recover_lost_claims,
    release_unsent,
)
from pipeline_console.delivery.policy import (
    CircuitEvent,
    Classification,
    Failure,
    SendResult,
    breaker_event,
    classify,
    throttle_s,
)
from pipeline_console.delivery.recording import (
    lock_rows,
    orm_deliveries,
    record_sent,
    supersede,
)
from pipeline_console.delivery.signing import sign
from pipeline_console.delivery.transports import SystemConfig, build_request, map_body
from pipeline_console.delivery.vault import KEY_VARIABLE, load_readable_secrets
from pipeline_console.errors import Conflict
from pipeline_console.models import Delivery, DownstreamSystem

__all__ = [
    "Deliverer", "DeliveryResult", "Outcome", "claim_due", "claim_due_in", "claim_due_rows",
    "claim_in", "claim_one", "deliver", "deliver_due", "deliver_many", "deliver_now",
    "prepare_batch", "recover_expired_leases", "recover_lost_claims", "send",
    "system_config",
]

LIVE_STATUSES = ("pending", "held", "in_flight", "delivered", "ambiguous")
_deliveries = Delivery.__table__
_systems = DownstreamSystem.__table__
log = logging.getLogger("pipeline_console.delivery")

Claim = Callable[[AsyncSession], Awaitable[list[Row]]]


async def deliver(deliverer: Deliverer, delivery_id: int, *, trigger: str,
                  actor: str) -> DeliveryResult:
    """Send one claimed delivery and record what happened (deliver_many of one)."""
    [result] = await deliver_many(deliverer, [delivery_id], trigger=trigger, actor=actor)
    if isinstance(result, BaseException):
        raise result
    return result


async def deliver_many(
    deliverer: Deliverer, delivery_ids: Sequence[int] = (), *, trigger: str, actor: str,
    claim: Claim | None = None, concurrency: int | None = None,
    stop: asyncio.Event | None = None,
) -> list[DeliveryResult | BaseException]:
    """Send claimed deliveries and record what happened; one result per id, in order.

    `claim`, instead of ids, claims them inside the preparing transaction. `concurrency`:
    at most that many sends at once. A claim is released unsent (back to pending) when its
    turn comes after `stop` is set, after its system failed as often as its circuit's
    threshold in this call or throttled us (429/503 with Retry-After), or when the fence
    refuses it. An outcome that cannot be
    recorded is returned as its exception: the delivery stays claimed until it is recovered
    as worker_lost."""
    delivery_ids, prepared = await prepare_batch(deliverer, delivery_ids, claim=claim)
    items = [item for item in prepared.values() if isinstance(item, Prepared)]
    slots = asyncio.Semaphore(concurrency or len(items) or 1)
    failures: dict[str, int] = {}  # consecutive failures per system in this call
    throttled: set[str] = set()  # systems that asked us to wait (429/503, Retry-After)

    async def send_in_turn(item: Prepared) -> Sent | None:
        async with slots:
            name = item.config.name
            if (stop is not None and stop.is_set()) or name in throttled or (
                    concurrency is not None and failures.get(name, 0) >= item.threshold):
                return None
            if not may_send(deliverer, item):
                log.warning("delivery %s not sent: its lease no longer covers a send",
                            item.delivery_id)
                return None
            sent = await send(deliverer, item)
            event = breaker_event(sent.classification, sent.rule)
            if event is CircuitEvent.FAILURE:
                failures[name] = failures.get(name, 0) + 1
            elif event is CircuitEvent.HEALTHY:
                failures[name] = 0
            if throttle_s(sent.result, sent.rule) is not None:
                throttled.add(name)
            return sent

    answers = await asyncio.gather(*(send_in_turn(item) for item in items),
                                   return_exceptions=True)
    results: dict[int, DeliveryResult | BaseException] = {}
    unsent: list[Prepared] = []
    for item, answer in zip(items, answers, strict=True):
        if answer is None:
            unsent.append(item)
        elif isinstance(answer, BaseException):
            # Not known whether it was sent: the claim stays until it is recovered as
            # worker_lost; the rest of the batch is recorded.
            log.error("sending delivery %s failed unexpectedly", item.delivery_id,
                      exc_info=answer)
            results[item.delivery_id] = answer
    results.update(await record_sent(deliverer, [answer for answer in answers
                                                 if isinstance(answer, Sent)],
                                     trigger=trigger, actor=actor))
    results.update(await release_unsent(deliverer, unsent))
    return [results.get(delivery_id) or DeliveryResult(delivery_id, prepared[delivery_id])
            for delivery_id in delivery_ids]


async def prepare_batch(
    deliverer: Deliverer, delivery_ids: Sequence[int] = (), *, claim: Claim | None = None,
) -> tuple[list[int], dict[int, Prepared | Outcome]]:
    """One transaction: claim (with `claim`) or check the claims of `delivery_ids`; returns
    the ids and, per id, what to send or why nothing is sent."""
    started = deliverer.monotonic()  # before the transaction: the lease, underestimated

    async def work(session: AsyncSession) -> tuple[list[int], dict[int, Prepared | Outcome]]:
        if claim is None:
            return list(delivery_ids), await _prepare(session, deliverer, delivery_ids,
                                                      started=started)
        claimed = await claim(session)
        return ([row.id for row in claimed],
                await _prepare(session, deliverer, [row.id for row in claimed], claimed,
                               started=started))

    return await deliverer.database.run_transaction(work)


async def send(deliverer: Deliverer, item: Prepared) -> Sent:
    """Outside any transaction, once the fence let it through: the request, and the
    classification of its answer. A send that may have arrived but timed out (maybe_sent)
    while this process stalled is worker_lost: the timer ran while we did not read."""
    started, started_at = deliverer.monotonic(), deliverer.clock()
    request = sign(item.config, map_body(item.request), int(deliverer.unix_time()))
    if item.config.unreadable:
        request, result = item.request, _unreadable_result(item.config)
    elif request.unsendable:
        result = SendResult(failure=Failure.UNSENDABLE, error=request.unsendable)
    else:
        result = await deliverer.transports.send(item.config, request)
    classification, rule = classify(result, item.overrides)
    if (result.failure is Failure.MAYBE_SENT and deliverer.stalls is not None
            and deliverer.stalls.overlapped(started, deliverer.monotonic())):
        classification, rule = Classification.WORKER_LOST, "worker_stalled"
    return Sent(item, started_at, result, classification, rule,
                None if request is item.request else request)


async def _prepare(session: AsyncSession, deliverer: Deliverer, delivery_ids: Sequence[int],
                   claimed: Sequence[Row] | None = None, *,
                   started: float) -> dict[int, Prepared | Outcome]:
    """Which claims are still ours, which are superseded, and what to send for the rest.
    `claimed`: rows this transaction has just claimed (ours, and locked); `started`: the
    monotonic clock before this transaction began (for the leases)."""
    out: dict[int, Prepared | Outcome] = {}
    if claimed is None:
        if not delivery_ids:
            return {}
        locked = await lock_rows(session, delivery_ids)
        ours = [row for row in locked.values()
                if row.status == "in_flight" and row.claimed_by == deliverer.worker_id]
        out = dict.fromkeys(locked, Outcome.NOT_CLAIMED)
    else:
        ours = list(claimed)
    if not ours:
        return out
    wall = deliverer.clock()
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
    held, unreadable = await _secrets_of(session, deliverer, systems, wall)
    configs = {name: system_config(system, held.get(name), unreadable.get(name, ()))
               for name, system in systems.items()}
    superseded = await orm_deliveries(session, [row.id for row in ours if row.id in newer])
    for row in ours:
        if row.id in newer:
            await supersede(session, superseded[row.id], newer[row.id], deliverer.clock())
            out[row.id] = Outcome.SUPERSEDED
            continue
        system = systems[row.system]
        out[row.id] = Prepared(
            configs[row.system], build_request(row, row.attempts + 1, configs[row.system],
                                               map_now=False),
            system.classification_overrides, system.max_attempts, system.failure_threshold,
            (system.backoff_base_s, system.backoff_max_s),
            lease_of(deliverer, row, started, wall))
    if superseded:
        await session.flush()
    return out


async def _secrets_of(
        session: AsyncSession, deliverer: Deliverer, systems: dict[str, Any], now: Any,
) -> tuple[dict[str, dict[str, str]], dict[str, tuple[str, ...]]]:
    """The secrets of the systems that have any, in the clear (none for a process without a
    key: its sends fail on the missing secret, and start-up refuses that case), and per
    system the slots this key cannot read (vault.load_readable_secrets)."""
    names = [name for name, system in systems.items() if needs_secrets(system)]
    if not names or deliverer.vault is None or deliverer.vault.key is None:
        return {}, {}
    held, unreadable = await load_readable_secrets(session, deliverer.vault, names, now=now)
    for name, slots in unreadable.items():
        if (name, slots) not in _UNREADABLE_LOGGED:
            _UNREADABLE_LOGGED.add((name, slots))
            log.warning("secrets of a downstream system cannot be read with this process's "
                        "key; its sends fail until the process runs with the key they were "
                        "stored with", extra={"system": name, "slots": list(slots)})
    return held, unreadable


async def config_of(session: AsyncSession, deliverer: Deliverer, system: Any) -> SystemConfig:
    """One system's settings with its secrets, as a send needs them (a status query too)."""
    held, unreadable = await _secrets_of(session, deliverer, {system.name: system},
                                         deliverer.clock())
    return system_config(system, held.get(system.name), unreadable.get(system.name, ()))


_UNREADABLE_LOGGED: set[tuple[str, tuple[str, ...]]] = set()  # said once per process


def _unreadable_result(config: SystemConfig) -> SendResult:
    """Not sent: a secret of the system is stored with another key than this process's.
    Retried (a process with the right key, or this one restarted, sends it), but neither a
    failure of the system (its circuit) nor one of the delivery's tries."""
    return SendResult(failure=Failure.SECRET_UNREADABLE, error=(
        f"this process's {KEY_VARIABLE} cannot read the system's "
        f"{', '.join(config.unreadable)} secret (stored with another key: after `secrets "
        "rotate-key`, restart every process with the new key); nothing was sent"))


async def deliver_now(deliverer: Deliverer, delivery_id: int, *, actor: str) -> DeliveryResult:
    """An operator's "send this pending delivery now", through the canonical path."""
    await claim_one(deliverer, delivery_id, trigger="manual", allowed=("pending",))
    result = await deliver(deliverer, delivery_id, trigger="manual", actor=actor)
    if result.attempt_id is None:
        raise Conflict(f"delivery {delivery_id} was not sent: {result.outcome.value}")
    return result


async def deliver_due(deliverer: Deliverer, *, limit: int, concurrency: int,
                      actor: str | None = None, recover: bool = True,
                      stop: asyncio.Event | None = None,
                      lost_after_s: float | None = None) -> dict[str, int]:
    """One pass (the deliver_due job; the worker itself runs pipeline.py): recover lost
    claims (expired leases, and with `lost_after_s` the claims of lost workers), claim what
    is due, send it.

    It claims up to `limit` and sends them with deliver_many, `concurrency` at a time (the
    claims' leases cover the waits: claim_due_rows); one claim and one record transaction per
    pass, whatever the concurrency. Once `stop` is set, or a system has failed as often as
    its circuit's threshold in this pass, the claims not yet sent are released instead.
    `recover=False` skips looking for lost claims. Attempts name the worker (or the person
    who ran the pass) as their actor."""
    actor = actor or deliverer.worker_id
    recovered = (await recover_lost_claims(deliverer, lost_after_s=lost_after_s)
                 if recover else 0)
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
