"""POST /api/v1/messages and /messages/batch.

These routes read the body themselves (bounded by the size limits) instead of letting
FastAPI parse it, because a malformed or oversized message, or one sent as something other
than JSON, must still be written to the attempt log as `rejected` before the error goes back.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from pipeline_console.api.dependencies import (
    ActorDep,
    DatabaseDep,
    NowDep,
    SettingsDep,
    get_actor,
)
from pipeline_console.api.problems import problem, problem_responses
from pipeline_console.auth.dependencies import INGEST
from pipeline_console.config import Settings
from pipeline_console.errors import FieldError
from pipeline_console.ingestion.group_commit import GroupCommitClosed, GroupCommitter
from pipeline_console.ingestion.intake import (
    BodyError,
    RejectedMessage,
    decode_json,
    excerpt,
    excerpt_of,
    message_from_body,
    parse_message,
    refuse_foreign_source,
)
from pipeline_console.ingestion.planner import IncomingMessage
from pipeline_console.ingestion.policy import reason_for_ingest_token
from pipeline_console.ingestion.schemas import BatchOut, IngestResult
from pipeline_console.ingestion.service import Accepted, Rejected, ingest_messages
from pipeline_console.metrics import count_ingestion

router = APIRouter(tags=["ingestion"])


def _body_schema(name: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
        }
    }


def _intake_responses() -> dict[int | str, dict[str, Any]]:
    responses = problem_responses(403, 413, 415, 422)
    responses[415]["headers"] = {"Accept": {
        "description": "the one media type these routes take", "schema": {"type": "string"}}}
    return responses


def is_json_media_type(content_type: str | None) -> bool:
    """`application/json`, with parameters allowed, but no charset other than UTF-8 (the
    body is always read as UTF-8, RFC 8259). Structured-syntax types such as
    `application/merge-patch+json` are refused: they promise another meaning."""
    if content_type == "application/json":  # what nearly every client sends
        return True
    if content_type is None:
        return False
    media_type, _, parameters = content_type.partition(";")
    if media_type.strip().lower() != "application/json":
        return False
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
                "utf-8", "utf8"):
            return False
    return True


def _unsupported_media_type(body: bytes, content_type: str | None,
                            excerpt_bytes: int) -> RejectedMessage:
    sent = "no Content-Type" if content_type is None else f"Content-Type {content_type[:100]!r}"
    return RejectedMessage(
        detail=f"the body must be sent as application/json, not with {sent}",
        errors=[FieldError(field="content-type", location="header",
                           message="must be application/json", type="unsupported_media_type")],
        raw_body=excerpt(body, excerpt_bytes),
        kind="unsupported_media_type",
    )


async def read_bounded(request: Request, limit: int) -> tuple[bytes, bool]:
    """The body, or its first limit + 1 bytes and True when it is larger than `limit`."""
    declared = request.headers.get("content-length", "")
    chunks, size = [], 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[: limit + 1], True
    too_large = declared.isdigit() and int(declared) > limit
    return b"".join(chunks), too_large


def _too_large(body: bytes, limit: int, excerpt_bytes: int, what: str) -> RejectedMessage:
    return RejectedMessage(
        detail=f"the {what} is larger than the limit of {limit} bytes",
        errors=[FieldError(field="body", message=f"larger than {limit} bytes",
                           type="too_large")],
        raw_body=excerpt(body, excerpt_bytes),
        kind="too_large",
    )


_STATUS_OF = {"invalid": 422, "too_large": 413, "unsupported_media_type": 415,
              "forbidden": 403}
# a batch item's error, as the problem its message alone would have got
_ITEM_PROBLEM = {"invalid": ("/problems/invalid-input", "Invalid input"),
                 "forbidden": ("/problems/forbidden", "Forbidden")}


def _rejection_problem(result: Rejected) -> JSONResponse:
    response = problem(
        _STATUS_OF[result.rejection.kind],
        result.rejection.detail,
        errors=result.rejection.errors,
        attempt_id=result.attempt_id,
    )
    if result.rejection.kind == "unsupported_media_type":
        response.headers["Accept"] = "application/json"  # RFC 9110, 15.5.16
    return response


def _json(body: dict[str, Any]) -> Response:
    """The answer as JSON bytes (orjson), already in the shape of the route's response_model,
    which stays for the OpenAPI document: FastAPI's validation of a 500-result batch against
    it was a tenth of the batch route's time in the issue 8 profile."""
    return Response(orjson.dumps(body), media_type="application/json")


def _result_dict(result: Accepted, sources: frozenset[str] | None) -> dict[str, Any]:
    """`sources`: the caller's scope; a scoped ingest token is not told which other source
    holds a key (the attempt log keeps the whole reason)."""
    return {
        "decision": result.decision,
        "idempotency_key": result.idempotency_key,
        "version": result.version,
        "attempt_id": result.attempt_id,
        "staging_status": result.staging_status,
        "anomaly_id": result.anomaly_id,
        "reason": result.reason if sources is None else reason_for_ingest_token(result.reason,
                                                                                sources),
    }


@router.post(
    "/messages", dependencies=[INGEST],
    response_model=IngestResult,
    summary="Ingest one message",
    description="Decides the message (accept_new, accept_supersede, skip_duplicate, quarantine, "
    "skip_stale) and records the decision before anything else is written. The body must be "
    "sent as `Content-Type: application/json` (415 otherwise). A malformed message gets 422 "
    "(so does a body that repeats an object key anywhere, naming its path, and an "
    "`occurred_at` that is not an RFC 3339 string with a zone), an oversized one 413; a "
    "message whose `source_system` is not one of its ingest token's sources 403 (naming the "
    "field). Each is still recorded in the attempt log as rejected. An ingest token's "
    "reasons never name another source system.",
    responses=_intake_responses(),
    openapi_extra=_body_schema("MessageIn"),
)
async def post_message(request: Request) -> Any:
    # The hot path reads the app's state directly: FastAPI runs plain-function dependencies
    # (get_settings, get_now, get_actor) in its thread pool, a thread hop each per request.
    settings: Settings = request.app.state.settings
    now = request.app.state.clock()
    actor = get_actor(request)
    body, too_large = await read_bounded(request, settings.max_message_bytes)
    excerpt_bytes = settings.rejected_body_excerpt_bytes
    content_type = request.headers.get("content-type")
    item: Any
    if not is_json_media_type(content_type):
        item = _unsupported_media_type(body, content_type, excerpt_bytes)
    else:
        item = refuse_foreign_source(message_from_body(
            body, max_bytes=settings.max_message_bytes, excerpt_bytes=excerpt_bytes,
            max_depth=settings.max_payload_depth,
            max_string_length=settings.max_payload_string_length, too_large=too_large,
        ), actor.name, actor.sources, excerpt(body, excerpt_bytes))
    if isinstance(item, IncomingMessage):  # the request's log lines carry the message's key
        structlog.contextvars.bind_contextvars(idempotency_key=item.key,
                                               correlation_id=item.correlation_id)
    # Shared with concurrent requests (group commit); returns only after the commit.
    committer: GroupCommitter = request.app.state.group_commit
    try:
        result = await committer.ingest(item, actor=actor.label, now=now)
    except GroupCommitClosed:
        response = problem(503, "the server is shutting down; send the message again")
        response.headers["Retry-After"] = "1"
        return response
    count_ingestion([item], [result])  # committed: the group's transaction has returned
    structlog.contextvars.bind_contextvars(decision=getattr(result, "decision", "rejected"))
    if isinstance(result, Rejected):
        return _rejection_problem(result)
    return _json(_result_dict(result, actor.sources))


@router.post(
    "/messages/batch", dependencies=[INGEST],
    response_model=BatchOut,
    summary="Ingest many messages in one transaction",
    description="One result per message, in order: the single-message result plus `index`, or "
    "`{index, error}` for an invalid message. One bad message never fails the others. More "
    "messages than the batch limit, or a larger body, gets 413; a message whose `source_system` "
    "is not one of its ingest token's sources gets `{index, error}` with status 403 (the "
    "others go through); a body not sent as "
    "`Content-Type: application/json` 415; a body that is not JSON, or repeats an object key "
    "anywhere (the error names the path, such as `messages/3/payload/x`), 422.",
    responses=_intake_responses(),
    openapi_extra=_body_schema("BatchIn"),
)
async def post_batch(
    request: Request, database: DatabaseDep, settings: SettingsDep, now: NowDep, actor: ActorDep
) -> Any:
    limit, excerpt_bytes = settings.max_batch_bytes, settings.rejected_body_excerpt_bytes
    body, too_large = await read_bounded(request, limit)
    whole_body_rejection: RejectedMessage | None = None
    candidates: list[Any] = []
    content_type = request.headers.get("content-type")
    if not is_json_media_type(content_type):
        whole_body_rejection = _unsupported_media_type(body, content_type, excerpt_bytes)
    elif too_large:
        whole_body_rejection = _too_large(body, limit, excerpt_bytes, "batch")
    else:
        try:
            document = decode_json(body)
        except BodyError as error:
            document = None
            whole_body_rejection = RejectedMessage(
                error.detail, error.errors, excerpt(body, excerpt_bytes)
            )
        if whole_body_rejection is None:
            messages = document.get("messages") if isinstance(document, dict) else None
            if not isinstance(messages, list):
                whole_body_rejection = RejectedMessage(
                    "the body must be an object with a list of messages",
                    [FieldError(field="messages", message="must be a list of messages",
                                type="list_type")],
                    excerpt(body, excerpt_bytes),
                )
            elif len(messages) > settings.max_batch_messages:
                whole_body_rejection = RejectedMessage(
                    f"the batch has {len(messages)} messages; the limit is "
                    f"{settings.max_batch_messages}",
                    [FieldError(field="messages", message="too many messages",
                                type="too_long")],
                    excerpt(body, excerpt_bytes),
                    kind="too_large",
                )
            else:
                candidates = messages

    if whole_body_rejection is not None:
        [result] = await database.run_transaction(
            lambda session: ingest_messages(session, [whole_body_rejection], now=now,
                                            actor=actor.label))
        count_ingestion([whole_body_rejection], [result])
        assert isinstance(result, Rejected)
        return _rejection_problem(result)

    items = []
    for candidate in candidates:
        item = refuse_foreign_source(
            parse_message(candidate, "", max_depth=settings.max_payload_depth,
                          max_string_length=settings.max_payload_string_length),
            actor.name, actor.sources, "")
        if isinstance(item, RejectedMessage):
            item = replace(item, raw_body=excerpt_of(candidate, excerpt_bytes))
        items.append(item)
    results = await database.run_transaction(
        lambda session: ingest_messages(session, items, now=now, actor=actor.label))
    count_ingestion(items, results)
    out: list[dict[str, Any]] = []
    for index, result in enumerate(results):
        if isinstance(result, Rejected):
            rejection = result.rejection
            kind, title = _ITEM_PROBLEM[rejection.kind]
            out.append({"index": index, "error": {
                "type": kind, "title": title, "status": _STATUS_OF[rejection.kind],
                "detail": rejection.detail,
                "errors": [error.as_dict() for error in rejection.errors],
                "attempt_id": result.attempt_id,
            }})
        else:
            out.append({"index": index, **_result_dict(result, actor.sources)})
    return _json({"results": out})
