"""The audit log and its verification."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline_console.api.dependencies import DatabaseDep, IdPage
from pipeline_console.api.problems import problem_responses
from pipeline_console.audit.chain import ANCHOR_FORMAT, parse_anchor
from pipeline_console.audit.service import verify_audit_chain
from pipeline_console.auth.dependencies import VIEWER
from pipeline_console.errors import FieldError, InvalidInput
from pipeline_console.models import AuditEvent
from pipeline_console.pagination import fetch_page
from pipeline_console.redaction import redact

router = APIRouter(tags=["audit"])


class AuditEventRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    occurred_at: datetime
    actor: str
    action: str
    subject_type: str
    subject_id: str
    idempotency_key: str | None
    details: dict[str, Any] = Field(description="any URL's user:password@ (from before "
                                    "systems had an auth) is shown as ***@; row_hash is "
                                    "over the details as stored")
    prev_hash: str
    row_hash: str

    @field_validator("details")
    @classmethod
    def without_credentials(cls, details: dict[str, Any]) -> dict[str, Any]:
        return redact(details)


class AuditPage(BaseModel):
    items: list[AuditEventRead]
    next_cursor: str | None


class BrokenRow(BaseModel):
    id: int
    reason: str


class ChainHeadRead(BaseModel):
    id: int
    hash: str


class AnchorRead(BaseModel):
    id: int
    hash: str
    ok: bool
    reason: str | None  # why the log does not extend it


class AuditVerifyRead(BaseModel):
    ok: bool
    checked: int
    first_broken: BrokenRow | None
    head: ChainHeadRead | None  # None: the log is empty
    anchor: AnchorRead | None = None


@router.get("/audit", dependencies=[VIEWER],
            response_model=AuditPage, responses=problem_responses(422),
            summary="Audit events, oldest first")
async def list_audit(
    database: DatabaseDep,
    page: IdPage,
    key: Annotated[str | None, Query(max_length=321, description="an idempotency key")] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    subject_type: Annotated[str | None, Query(max_length=32)] = None,
    subject_id: Annotated[str | None, Query(max_length=321)] = None,
) -> AuditPage:
    async with database.read() as session:
        result = await fetch_page(
            session, AuditEvent.id, page,
            equal=[(AuditEvent.idempotency_key, key), (AuditEvent.action, action),
                   (AuditEvent.subject_type, subject_type),
                   (AuditEvent.subject_id, subject_id)],
        )
        return AuditPage(items=[AuditEventRead.model_validate(row) for row in result.items],
                         next_cursor=result.next_cursor)


@router.get("/audit/verify", dependencies=[VIEWER], response_model=AuditVerifyRead,
            responses=problem_responses(422),
            summary="Recompute the hash chain and report the first broken row and the head",
            description="`head` is the newest row's id and hash: keep it somewhere the "
            "database's owner cannot write (the `audit_anchor` job appends it to a file). "
            "Given back as `?anchor=ID:HASH`, the answer is `ok: false` unless that row still "
            "exists with that hash and the chain through it to the head verifies, which "
            "detects a cut-off tail and a rewritten, rehashed prefix.")
async def verify_audit(
    database: DatabaseDep,
    anchor: Annotated[str | None, Query(max_length=100, description=ANCHOR_FORMAT)] = None,
) -> AuditVerifyRead:
    try:
        kept = None if anchor is None else parse_anchor(anchor)
    except ValueError as error:
        raise InvalidInput(f"anchor: {error}",
                           [FieldError("anchor", str(error), "query", "anchor_format")]) \
            from error
    async with database.read() as session:
        report = await verify_audit_chain(session, anchor=kept)
    broken = report.first_broken
    return AuditVerifyRead(
        ok=report.ok, checked=report.checked,
        first_broken=BrokenRow(id=broken.id, reason=broken.reason) if broken else None,
        head=ChainHeadRead(id=report.head.id, hash=report.head.hash) if report.head else None,
        anchor=None if kept is None else AnchorRead(
            id=kept.id, hash=kept.hash, ok=report.anchor_problem is None and broken is None,
            reason=report.anchor_problem or (f"the chain is broken at row {broken.id}"
                                             if broken else None)),
    )
