"""The audit log and its verification."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

from pipeline_console.api.dependencies import DatabaseDep, IdPage
from pipeline_console.api.problems import problem_responses
from pipeline_console.audit.service import verify_audit_chain
from pipeline_console.auth.dependencies import VIEWER
from pipeline_console.models import AuditEvent
from pipeline_console.pagination import fetch_page

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
    details: dict[str, Any]
    prev_hash: str
    row_hash: str


class AuditPage(BaseModel):
    items: list[AuditEventRead]
    next_cursor: str | None


class BrokenRow(BaseModel):
    id: int
    reason: str


class AuditVerifyRead(BaseModel):
    ok: bool
    checked: int
    first_broken: BrokenRow | None


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
            summary="Recompute the hash chain and report the first broken row")
async def verify_audit(database: DatabaseDep) -> AuditVerifyRead:
    async with database.read() as session:
        report = await verify_audit_chain(session)
    broken = report.first_broken
    return AuditVerifyRead(
        ok=report.ok, checked=report.checked,
        first_broken=BrokenRow(id=broken.id, reason=broken.reason) if broken else None,
    )
