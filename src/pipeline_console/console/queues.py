"""Console pages for what needs a person: anomalies, dead letters and replays, ambiguous
outcomes, circuits. Every action calls the same service as the API, lands in the audit log,
and answers with a redirect to a page that shows its outcome."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError
from sqlalchemy import func, select

from pipeline_console.anomalies.service import get_anomaly, list_anomalies, resolve_anomaly
from pipeline_console.api.dependencies import ActorDep, DatabaseDep, IdPage, NowDep
from pipeline_console.api.filters import (
    AMBIGUOUS_STATUS_WORDS,
    ANOMALY_STATUS_WORDS,
    CIRCUIT_STATE_WORDS,
    DEAD_LETTER_STATUS_WORDS,
    REPLAY_STATUS_WORDS,
)
from pipeline_console.console.auth import CONSOLE_OPERATOR, CONSOLE_OPERATOR_PAGE, CONSOLE_VIEWER
from pipeline_console.console.forms import choice, form_of, ids, listed, required_text
from pipeline_console.console.templating import done, error_page, page
from pipeline_console.console.views import side_by_side
from pipeline_console.dashboard.service import UNSUCCESSFUL_REPLAYS
from pipeline_console.delivery.ambiguous import query_ambiguous_status, resolve_ambiguous
from pipeline_console.delivery.api import DelivererDep
from pipeline_console.delivery.circuits import operator_action
from pipeline_console.delivery.policy import CircuitEvent
from pipeline_console.errors import DomainError, FieldError, InvalidInput, NotFound
from pipeline_console.ingestion.schemas import UtcDatetime
from pipeline_console.models import (
    AmbiguousOutcome,
    AuditEvent,
    Circuit,
    DeadLetter,
    Delivery,
    DownstreamSystem,
    ReplayRequest,
)
from pipeline_console.pagination import MAX_ID, fetch_page
from pipeline_console.replay.api import FilterIn
from pipeline_console.replay.service import (
    Target,
    create_replay,
    dead_letter_conditions,
    execute_replay,
    expand_filter,
    get_replay,
    items_and_executions,
)

router = APIRouter(include_in_schema=False)
Text = Annotated[str | None, Query(max_length=200)]
# A list's status filter: `all`, or one or more status words separated by commas (as the API)
Filter = Annotated[str, Query(max_length=200)]


def _id(value: int, what: str) -> int:
    if not 1 <= value <= MAX_ID:
        raise NotFound(f"{what} {value} does not exist")
    return value


async def _system_names(database: Any) -> list[str]:
    async with database.read() as session:
        return list((await session.execute(
            select(DownstreamSystem.name).order_by(DownstreamSystem.name))).scalars())


# --- anomalies ---

@router.get("/anomalies", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def anomalies(request: Request, database: DatabaseDep, page_request: IdPage,
                    status: Filter = "open") -> Response:
    status, statuses = listed(status, ANOMALY_STATUS_WORDS)
    async with database.read() as session:
        found = await list_anomalies(session, page_request, status=statuses)
    return page(request, "anomalies.html", title="Anomalies", nav="/anomalies",
                anomalies=found.items, next_cursor=found.next_cursor, status=status,
                choices=[*ANOMALY_STATUS_WORDS, "all"])


@router.get("/anomalies/{anomaly_id}", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def anomaly(request: Request, anomaly_id: int, database: DatabaseDep) -> Response:
    try:
        async with database.read() as session:
            found = await get_anomaly(session, _id(anomaly_id, "anomaly"))
    except DomainError as error:
        return error_page(request, error)
    rows = side_by_side(found.current_payload, found.incoming_payload,
                        [entry["path"] for entry in found.diff])
    return page(request, "anomaly.html", title=f"Anomaly {anomaly_id}", nav="/anomalies",
                anomaly=found, rows=rows)


@router.post("/anomalies/{anomaly_id}/resolve", dependencies=[CONSOLE_OPERATOR])
async def resolve(request: Request, anomaly_id: int, database: DatabaseDep, now: NowDep,
                  actor: ActorDep) -> Response:
    try:
        form = await form_of(request)
        resolution = choice(form, "resolution", ("accept_incoming", "keep_current"))
        note = required_text(form, "note", "a note saying why")
        async with database.transaction() as session:
            await resolve_anomaly(session, _id(anomaly_id, "anomaly"), resolution, note,
                                  actor=actor.label, now=now)
    except DomainError as error:
        return error_page(request, error)
    return done(request, f"/anomalies/{anomaly_id}",
                f"Anomaly {anomaly_id} resolved: {resolution} (recorded in the audit log).")


# --- dead letters and replays ---

def _dlq_filter(system: str | None, reason: str | None, since: datetime | None,
                until: datetime | None, status: tuple[str, ...] | None) -> list[Any]:
    return dead_letter_conditions(system=system or None, status=status,
                                  reason_contains=reason or None, since=since, until=until)


@router.get("/dlq", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def dead_letters(
    request: Request, database: DatabaseDep, page_request: IdPage, system: Text = None,
    reason: Text = None, since: Annotated[UtcDatetime | None, Query(alias="from")] = None,
    until: Annotated[UtcDatetime | None, Query(alias="to")] = None,
    status: Filter = "open",
) -> Response:
    status, statuses = listed(status, DEAD_LETTER_STATUS_WORDS)
    conditions = _dlq_filter(system, reason, since, until, statuses)
    async with database.read() as session:
        found = await fetch_page(session, DeadLetter.id, page_request, where=conditions)
        matching = await session.scalar(
            select(func.count()).select_from(DeadLetter).where(*conditions))
    return page(request, "dlq.html", title="Dead letters", nav="/dlq", entries=found.items,
                next_cursor=found.next_cursor, matching=matching,
                systems=await _system_names(database), system=system or "",
                reason=reason or "", since=since, until=until, status=status,
                choices=[*DEAD_LETTER_STATUS_WORDS, "all"])


@router.post("/dlq/replay", dependencies=[CONSOLE_OPERATOR])
async def replay_dead_letters(request: Request, database: DatabaseDep, now: NowDep,
                              actor: ActorDep) -> Response:
    """Selected dead letters, or all open ones matching the filter, become one replay
    request: validated item by item, shown before anything is sent."""
    try:
        form = await form_of(request)
        reason = required_text(form, "reason", "a reason for the replay")
        allow_delivered = form.get("allow_delivered") == "on"
        async with database.transaction() as session:
            if form.get("scope") == "all_matching":
                chosen_filter = _filter_of(form)
                targets = await expand_filter(session, chosen_filter.system,
                                              chosen_filter.reason_contains,
                                              chosen_filter.since, chosen_filter.until)
                selection = {"filter": chosen_filter.model_dump(mode="json", by_alias=True)}
            else:
                chosen = ids(form, "dlq_id")
                targets = [Target(dlq_id=dlq_id) for dlq_id in chosen]
                selection = {"items": [{"dlq_id": dlq_id} for dlq_id in chosen]}
            if not targets:
                raise InvalidInput("nothing to replay: select dead letters, or a filter that "
                                   "matches open ones", [FieldError("dlq_id", "none", "form")])
            request_row, _ = await create_replay(
                session, targets, reason=reason, selection=selection,
                allow_delivered=allow_delivered, actor=actor.label, now=now)
    except DomainError as error:
        return error_page(request, error)
    verdict = ("validated: every item is eligible; execute it to send" if
               request_row.status == "validated" else
               "refused as a whole: see each item's reason; nothing was sent")
    return done(request, f"/replays/{request_row.id}", f"Replay {request_row.id} {verdict}.")


def _filter_of(form: Any) -> FilterIn:
    """The "all matching" filter, validated exactly as the API validates a replay's filter."""
    if not form.get("system"):
        raise InvalidInput("choose a system to replay all matching dead letters",
                           [FieldError("system", "required", "form")])
    values = {"system": form.get("system"),
              "reason_contains": form.get("reason_contains") or None,
              "from": form.get("from") or None, "to": form.get("to") or None}
    try:
        return FilterIn.model_validate(values)
    except ValidationError as error:
        raise InvalidInput("the filter of the replay is not valid", [
            FieldError(".".join(str(part) for part in problem["loc"]) or "filter",
                       problem["msg"], "form") for problem in error.errors()]) from error


@router.get("/replays", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def replays(request: Request, database: DatabaseDep, page_request: IdPage,
                  status: Filter = "all",
                  since: Annotated[UtcDatetime | None, Query(alias="from")] = None) -> Response:
    status, statuses = listed(status, REPLAY_STATUS_WORDS)
    conditions = [ReplayRequest.created_at >= since] if since is not None else []
    async with database.read() as session:
        found = await fetch_page(session, ReplayRequest.id, page_request,
                                 equal=[(ReplayRequest.status, statuses)], where=conditions)
    return page(request, "replays.html", title="Replays", nav="/replays",
                replays=found.items, next_cursor=found.next_cursor, status=status,
                since=since, choices=["all", *REPLAY_STATUS_WORDS,
                                      ",".join(UNSUCCESSFUL_REPLAYS)])


@router.get("/replays/{replay_id}", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def replay(request: Request, replay_id: int, database: DatabaseDep) -> Response:
    try:
        async with database.read() as session:
            found = await get_replay(session, _id(replay_id, "replay"))
            items, executions = await items_and_executions(session, replay_id)
    except DomainError as error:
        return error_page(request, error)
    by_item = {execution.item_id: execution for execution in executions}
    return page(request, "replay.html", title=f"Replay {replay_id}", nav="/replays",
                replay=found, items=items, executions=by_item)


@router.post("/replays/{replay_id}/execute", dependencies=[CONSOLE_OPERATOR])
async def execute(request: Request, replay_id: int, deliverer: DelivererDep,
                  actor: ActorDep) -> Response:
    try:
        finished = await execute_replay(deliverer, _id(replay_id, "replay"), actor=actor.label)
    except DomainError as error:
        return error_page(request, error)
    return done(request, f"/replays/{replay_id}",
                f"Replay {replay_id} executed: {finished.status}.")


# --- ambiguous outcomes ---

@router.get("/ambiguous", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def ambiguous(request: Request, database: DatabaseDep, page_request: IdPage,
                    system: Text = None, status: Filter = "open") -> Response:
    status, statuses = listed(status, AMBIGUOUS_STATUS_WORDS)
    async with database.read() as session:
        found = await fetch_page(session, AmbiguousOutcome.id, page_request, equal=[
            (AmbiguousOutcome.system, system or None), (AmbiguousOutcome.status, statuses)])
    return page(request, "ambiguous.html", title="Ambiguous outcomes", nav="/ambiguous",
                outcomes=found.items, next_cursor=found.next_cursor, status=status,
                system=system or "", systems=await _system_names(database),
                choices=[*AMBIGUOUS_STATUS_WORDS, "all"])


@router.post("/ambiguous/{ambiguous_id}/query-status", dependencies=[CONSOLE_OPERATOR])
async def query_status(request: Request, ambiguous_id: int, deliverer: DelivererDep,
                       actor: ActorDep) -> Response:
    try:
        action = await query_ambiguous_status(deliverer, _id(ambiguous_id, "ambiguous outcome"),
                                              actor=actor.label)
    except DomainError as error:
        return error_page(request, error)
    answer = ("no answer" if action.query_status is None else f"HTTP {action.query_status}")
    return done(request, "/ambiguous", f"Ambiguous outcome {ambiguous_id}: the status query gave "
                f"{answer}; it is {action.status}.")


@router.post("/ambiguous/{ambiguous_id}/resolve", dependencies=[CONSOLE_OPERATOR])
async def resolve_outcome(request: Request, ambiguous_id: int, deliverer: DelivererDep,
                          actor: ActorDep) -> Response:
    try:
        form = await form_of(request)
        resolution = choice(form, "resolution", ("delivered", "not_delivered"))
        note = required_text(form, "note", "a note saying how you know")
        action = await resolve_ambiguous(deliverer, _id(ambiguous_id, "ambiguous outcome"),
                                         resolution, note, actor=actor.label)
    except DomainError as error:
        return error_page(request, error)
    then = ""
    if resolution == "not_delivered":
        resend = action.resend
        then = (f"; sent again through the canonical delivery path: {resend.outcome} "
                f"(delivery {resend.delivery_id}, attempt {resend.attempt_id})"
                if resend is not None and resend.attempt_id is not None else
                "; it waits to be sent again (the worker sends it when its circuit allows)")
    return done(request, "/ambiguous", f"Ambiguous outcome {ambiguous_id} resolved as "
                f"{resolution}{then}.")


# --- circuits ---

@router.get("/circuits", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def circuits(request: Request, database: DatabaseDep, state: Filter = "all") -> Response:
    state, states = listed(state, CIRCUIT_STATE_WORDS, name="state")
    async with database.read() as session:
        rows = list((await session.execute(
            select(Circuit).where(*([Circuit.state.in_(states)] if states else []))
            .order_by(Circuit.system))).scalars())
        held = dict((await session.execute(
            select(Delivery.system, func.count()).where(Delivery.status == "held")
            .group_by(Delivery.system))).all())
        history = list((await session.execute(
            select(AuditEvent).where(AuditEvent.subject_type == "circuit")
            .order_by(AuditEvent.id.desc()).limit(50))).scalars())
    return page(request, "circuits.html", title="Circuits", nav="/circuits", circuits=rows,
                held=held, history=history, state=state,
                choices=["all", *CIRCUIT_STATE_WORDS])


ACTIONS = {"reset": (CircuitEvent.RESET, "Reset to half-open: one trial delivery decides"),
           "open": (CircuitEvent.FORCE_OPEN, "Force open: stop every delivery to the system")}


@router.get("/circuits/{system}/{action}", response_class=HTMLResponse,
            dependencies=[CONSOLE_OPERATOR_PAGE])
async def confirm_circuit(request: Request, system: str,
                          action: Literal["reset", "open"], database: DatabaseDep) -> Response:
    """The confirmation step: what will happen, and the reason to record."""
    async with database.read() as session:
        circuit = await session.get(Circuit, system)
        held = await session.scalar(select(func.count()).select_from(Delivery).where(
            Delivery.system == system, Delivery.status == "held"))
    if circuit is None:
        return error_page(request, NotFound(f"no system is named {system!r}"))
    return page(request, "circuit_confirm.html", title=f"{ACTIONS[action][1]}",
                nav="/circuits", circuit=circuit, action=action, what=ACTIONS[action][1],
                held=held)


@router.post("/circuits/{system}/{action}", dependencies=[CONSOLE_OPERATOR])
async def circuit_action(request: Request, system: str, action: Literal["reset", "open"],
                         database: DatabaseDep, now: NowDep, actor: ActorDep) -> Response:
    try:
        form = await form_of(request)
        reason = required_text(form, "reason", "a reason")
        if form.get("confirm") != "yes":
            raise InvalidInput("confirm the action", [FieldError("confirm", "tick to confirm",
                                                                 "form")])
        async with database.transaction() as session:
            circuit = await operator_action(session, system, ACTIONS[action][0], reason,
                                            actor=actor.label, now=now)
            state = circuit.state
    except DomainError as error:
        return error_page(request, error)
    return done(request, "/circuits", f"The circuit of {system} is now {state.replace('_', '-')} "
                f"(reason recorded: {reason}).")
