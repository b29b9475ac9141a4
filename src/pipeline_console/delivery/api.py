"""Downstream systems, deliveries, attempts, the DLQ, ambiguous outcomes and circuits."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from sqlalchemy import select

from pipeline_console.api.dependencies import (
    ActorDep,
    DatabaseDep,
    IdPage,
    KeyPage,
    NowDep,
    SettingsDep,
)
from pipeline_console.api.filters import (
    AMBIGUOUS_STATUS_WORDS,
    CIRCUIT_STATE_WORDS,
    DEAD_LETTER_STATUS_WORDS,
    DELIVERY_STATUS_WORDS,
    Statuses,
    status_filter,
)
from pipeline_console.api.problems import problem_responses
from pipeline_console.auth.dependencies import ADMIN, OPERATOR, VIEWER
from pipeline_console.delivery import schemas, systems
from pipeline_console.delivery.addresses import refuse_private_urls
from pipeline_console.delivery.ambiguous import query_ambiguous_status, resolve_ambiguous
from pipeline_console.delivery.circuits import operator_action
from pipeline_console.delivery.policy import CircuitEvent
from pipeline_console.delivery.preview import preview_request
from pipeline_console.delivery.service import Deliverer, deliver_now
from pipeline_console.delivery.signing import rotate_signing_secret
from pipeline_console.delivery.vault import Vault
from pipeline_console.errors import DomainError, NotFound
from pipeline_console.ingestion.schemas import Name, UtcDatetime
from pipeline_console.models import (
    AmbiguousOutcome,
    Circuit,
    DeadLetter,
    Delivery,
    DeliveryAttempt,
)
from pipeline_console.pagination import MAX_ID, fetch_page
from pipeline_console.replay.service import dead_letter_conditions

router = APIRouter(tags=["delivery"])

Id = Annotated[int, Path(ge=1, le=MAX_ID)]
SystemName = Annotated[Name, Path()]
DeliveryStatuses = Annotated[Statuses | None, status_filter(DELIVERY_STATUS_WORDS)]
DeadLetterStatuses = Annotated[Statuses | None, status_filter(DEAD_LETTER_STATUS_WORDS)]
AmbiguousStatuses = Annotated[Statuses | None, status_filter(AMBIGUOUS_STATUS_WORDS)]
CircuitStates = Annotated[Statuses | None, status_filter(CIRCUIT_STATE_WORDS, name="state",
                                                         what="circuit state")]


def get_deliverer(request: Request) -> Deliverer:
    return request.app.state.deliverer


DelivererDep = Annotated[Deliverer, Depends(get_deliverer)]


def _page(model: type, result: Any) -> dict[str, Any]:
    return {"items": [model.model_validate(row) for row in result.items],
            "next_cursor": result.next_cursor}


def get_vault(request: Request) -> Vault:
    return request.app.state.vault


VaultDep = Annotated[Vault, Depends(get_vault)]


@router.post("/systems", dependencies=[ADMIN], response_model=schemas.SystemRead, status_code=201,
             responses=problem_responses(409, 422), summary="Register a downstream system")
async def create_system(database: DatabaseDep, body: schemas.SystemCreate, now: NowDep,
                        actor: ActorDep, settings: SettingsDep, vault: VaultDep) -> Any:
    if settings.refuse_private_system_urls:
        await refuse_private_urls(body.model_dump(mode="json"))
    async with database.transaction() as session:
        system = await systems.create_system(session, body, actor=actor.label, now=now,
                                             vault=vault)
        return await systems.read_view(session, system, now=now)


@router.get("/systems", dependencies=[VIEWER], response_model=schemas.SystemPage)
async def list_systems(database: DatabaseDep, page: KeyPage, now: NowDep) -> Any:
    async with database.read() as session:
        result = await systems.list_systems(session, page)
        return {"items": await systems.read_views(session, list(result.items), now=now),
                "next_cursor": result.next_cursor}


@router.get("/systems/{name}", dependencies=[VIEWER], response_model=schemas.SystemRead,
            responses=problem_responses(404))
async def get_system(database: DatabaseDep, name: SystemName, now: NowDep) -> Any:
    async with database.read() as session:
        return await systems.read_view(session, await systems.get_system(session, name),
                                       now=now)


@router.patch("/systems/{name}", dependencies=[ADMIN], response_model=schemas.SystemRead,
              responses=problem_responses(404, 422), summary="Change some of a system's settings")
async def patch_system(database: DatabaseDep, name: SystemName, body: schemas.SystemPatch,
                       now: NowDep, actor: ActorDep, settings: SettingsDep,
                       vault: VaultDep) -> Any:
    if settings.refuse_private_system_urls:
        await refuse_private_urls(body.model_dump(mode="json", exclude_unset=True))
    async with database.transaction() as session:
        system = await systems.update_system(session, name, body, actor=actor.label, now=now,
                                             vault=vault)
        return await systems.read_view(session, system, now=now)


@router.post("/systems/{name}/signing/rotate", dependencies=[ADMIN],
             response_model=schemas.SigningSecretRead,
             responses=problem_responses(404, 422),
             summary="A new signing secret (shown once); the old one signs too during the "
                     "overlap")
async def rotate_signing(database: DatabaseDep, name: SystemName, body: schemas.SigningRotate,
                         now: NowDep, actor: ActorDep, vault: VaultDep) -> Any:
    async with database.transaction() as session:
        secret = await rotate_signing_secret(session, vault, name, overlap_s=body.overlap_s,
                                             actor=actor.label, now=now)
    return {"secret": secret}


@router.post("/systems/{name}/preview", dependencies=[OPERATOR],
             response_model=schemas.PreviewRead, responses=problem_responses(404, 422),
             summary="The request a record's production version would be sent as now "
                     "(secrets as ***)")
async def preview(database: DatabaseDep, name: SystemName, body: schemas.PreviewCreate,
                  now: NowDep, vault: VaultDep) -> Any:
    async with database.read() as session:
        return await preview_request(session, vault, name, body.key, now)


@router.get("/deliveries", dependencies=[VIEWER], response_model=schemas.DeliveryPage,
            summary="Deliveries, oldest first")
async def list_deliveries(database: DatabaseDep, page: IdPage, status: DeliveryStatuses,
                          system: Name | None = None,
                          key: Annotated[str | None, Query(max_length=321)] = None) -> Any:
    async with database.read() as session:
        result = await fetch_page(session, Delivery.id, page, equal=[
            (Delivery.system, system), (Delivery.status, status),
            (Delivery.idempotency_key, key)])
        return _page(schemas.DeliveryRead, result)


@router.get("/deliveries/{delivery_id}", dependencies=[VIEWER], response_model=schemas.DeliveryRead,
            responses=problem_responses(404))
async def get_delivery(database: DatabaseDep, delivery_id: Id) -> Any:
    async with database.read() as session:
        delivery = await session.get(Delivery, delivery_id)
        if delivery is None:
            raise NotFound(f"delivery {delivery_id} does not exist")
        return schemas.DeliveryRead.model_validate(delivery)


@router.get("/deliveries/{delivery_id}/attempts", dependencies=[VIEWER],
            response_model=schemas.AttemptPage,
            summary="Every try of one delivery, oldest first")
async def list_attempts(database: DatabaseDep, delivery_id: Id, page: IdPage) -> Any:
    async with database.read() as session:
        result = await fetch_page(session, DeliveryAttempt.id, page,
                                  equal=[(DeliveryAttempt.delivery_id, delivery_id)])
        return _page(schemas.AttemptRead, result)


@router.post("/deliveries/{delivery_id}/deliver", dependencies=[OPERATOR],
             response_model=schemas.AttemptRead,
             responses=problem_responses(404, 409),
             summary="Deliver a pending delivery now, through the canonical delivery path")
async def deliver_now_route(deliverer: DelivererDep, database: DatabaseDep, delivery_id: Id,
                            actor: ActorDep) -> Any:
    result = await deliver_now(deliverer, delivery_id, actor=actor.label)
    async with database.read() as session:
        return schemas.AttemptRead.model_validate(
            await session.get(DeliveryAttempt, result.attempt_id))


@router.get("/dlq", dependencies=[VIEWER],
            response_model=schemas.DeadLetterPage, summary="The dead-letter queue")
async def list_dead_letters(
    database: DatabaseDep, page: IdPage, status: DeadLetterStatuses,
    system: Name | None = None,
    reason_contains: Annotated[str | None, Query(max_length=200,
                                                 description="case-insensitive")] = None,
    since: Annotated[UtcDatetime | None, Query(alias="from")] = None,
    until: Annotated[UtcDatetime | None, Query(alias="to")] = None,
) -> Any:
    async with database.read() as session:
        result = await fetch_page(session, DeadLetter.id, page, where=dead_letter_conditions(
            system=system, status=status, reason_contains=reason_contains, since=since,
            until=until))
        return _page(schemas.DeadLetterRead, result)


@router.get("/ambiguous", dependencies=[VIEWER], response_model=schemas.AmbiguousPage,
            summary="Outcomes that may or may not have been applied")
async def list_ambiguous(database: DatabaseDep, page: IdPage, status: AmbiguousStatuses,
                         system: Name | None = None) -> Any:
    async with database.read() as session:
        result = await fetch_page(session, AmbiguousOutcome.id, page, equal=[
            (AmbiguousOutcome.system, system), (AmbiguousOutcome.status, status)])
        return _page(schemas.AmbiguousRead, result)


async def _ambiguous(database: Any, ambiguous_id: int) -> schemas.AmbiguousRead:
    async with database.read() as session:
        return schemas.AmbiguousRead.model_validate(
            await session.get(AmbiguousOutcome, ambiguous_id))


async def _bulk(database: Any, ids: list[int],
                act: Callable[[int], Awaitable[int | None]]) -> dict[str, Any]:
    """Each id in turn, as its one-id route would act on it (its own transactions and audit
    rows); a refusal of one (NotFound, Conflict) is its answer, not the call's."""
    items = []
    for ambiguous_id in ids:
        try:
            status, error, outcome = await act(ambiguous_id), None, "done"
        except DomainError as problem:
            status, error, outcome = None, problem.detail, "refused"
        items.append({"id": ambiguous_id, "outcome": outcome, "error": error,
                      "query_status": status, "item": None})
    async with database.read() as session:  # each as it is now, in one read
        rows = {row.id: row for row in (await session.execute(
            select(AmbiguousOutcome).where(AmbiguousOutcome.id.in_(ids)))).scalars()}
    for item in items:
        if item["id"] in rows:
            item["item"] = schemas.AmbiguousRead.model_validate(rows[item["id"]])
    done = sum(item["outcome"] == "done" for item in items)
    return {"items": items, "done": done, "refused": len(items) - done}


@router.post("/ambiguous/query-status", dependencies=[OPERATOR],
             response_model=schemas.AmbiguousBulkResult,
             summary="Ask the systems about several ambiguous outcomes; an answer per id")
async def query_status_of_many(deliverer: DelivererDep, database: DatabaseDep,
                               body: schemas.AmbiguousIds, actor: ActorDep) -> Any:
    async def act(ambiguous_id: int) -> int | None:
        action = await query_ambiguous_status(deliverer, ambiguous_id, actor=actor.label)
        return action.query_status

    return await _bulk(database, body.ids, act)


@router.post("/ambiguous/resolve", dependencies=[OPERATOR],
             response_model=schemas.AmbiguousBulkResult,
             summary="Decide several ambiguous outcomes with one reason; an answer per id")
async def resolve_many(deliverer: DelivererDep, database: DatabaseDep,
                       body: schemas.AmbiguousBulkResolve, actor: ActorDep) -> Any:
    async def act(ambiguous_id: int) -> None:
        await resolve_ambiguous(deliverer, ambiguous_id, body.resolution, body.note,
                                actor=actor.label)

    return await _bulk(database, body.ids, act)


@router.post("/ambiguous/{ambiguous_id}/query-status", dependencies=[OPERATOR],
             response_model=schemas.AmbiguousRead,
             responses=problem_responses(404, 409),
             summary="Ask the system whether it applied the version (query-before-retry)")
async def query_status(deliverer: DelivererDep, database: DatabaseDep, ambiguous_id: Id,
                       actor: ActorDep) -> Any:
    await query_ambiguous_status(deliverer, ambiguous_id, actor=actor.label)
    return await _ambiguous(database, ambiguous_id)


@router.post("/ambiguous/{ambiguous_id}/resolve", dependencies=[OPERATOR],
             response_model=schemas.AmbiguousRead,
             responses=problem_responses(404, 409, 422),
             summary="Decide an ambiguous outcome; not_delivered sends again")
async def resolve(deliverer: DelivererDep, database: DatabaseDep, ambiguous_id: Id,
                  body: schemas.AmbiguousResolve, actor: ActorDep) -> Any:
    await resolve_ambiguous(deliverer, ambiguous_id, body.resolution, body.note,
                            actor=actor.label)
    return await _ambiguous(database, ambiguous_id)


@router.get("/circuits", dependencies=[VIEWER], response_model=schemas.CircuitPage,
            summary="Every system's circuit, by system name")
async def list_circuits(database: DatabaseDep, page: KeyPage, state: CircuitStates) -> Any:
    async with database.read() as session:
        return _page(schemas.CircuitRead, await fetch_page(session, Circuit.system, page,
                                                           equal=[(Circuit.state, state)]))


async def _operator(database: Any, system: str, event: CircuitEvent, reason: str, actor: str,
                    now: Any) -> schemas.CircuitRead:
    async with database.transaction() as session:
        circuit = await operator_action(session, system, event, reason, actor=actor, now=now)
        return schemas.CircuitRead.model_validate(circuit)


@router.post("/circuits/{system}/reset", dependencies=[OPERATOR],
             response_model=schemas.CircuitRead,
             responses=problem_responses(404, 409, 422),
             summary="Let one trial delivery through an open circuit (open → half_open)")
async def reset_circuit(database: DatabaseDep, system: SystemName, body: schemas.CircuitAction,
                        now: NowDep, actor: ActorDep) -> Any:
    return await _operator(database, system, CircuitEvent.RESET, body.reason, actor.label, now)


@router.post("/circuits/{system}/open", dependencies=[OPERATOR], response_model=schemas.CircuitRead,
             responses=problem_responses(404, 409, 422),
             summary="Stop deliveries to a system (for maintenance)")
async def open_circuit(database: DatabaseDep, system: SystemName, body: schemas.CircuitAction,
                       now: NowDep, actor: ActorDep) -> Any:
    return await _operator(database, system, CircuitEvent.FORCE_OPEN, body.reason, actor.label,
                           now)
