"""Downstream systems: create, change, read. Every change is audited with its actor."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.audit.service import AuditEntry, append_audit
from pipeline_console.db import insert_for
from pipeline_console.delivery.schemas import SystemCreate, SystemPatch
from pipeline_console.errors import Conflict, FieldError, InvalidInput, NotFound
from pipeline_console.models import Circuit, DownstreamSystem
from pipeline_console.pagination import Page, PageRequest, fetch_page


def _check_consistency(values: dict[str, Any]) -> None:
    errors = []
    if values["transport"] == "http" and not values.get("url"):
        errors.append(FieldError(field="url", message="a system with transport http needs a url",
                                 type="missing"))
    if values["backoff_max_s"] < values["backoff_base_s"]:
        errors.append(FieldError(field="backoff_max_s",
                                 message="must not be below backoff_base_s"))
    status_url = values.get("status_url")
    if status_url and "{key}" not in status_url and "{version}" not in status_url:
        errors.append(FieldError(field="status_url",
                                 message="must contain {key} or {version}"))
    if errors:
        raise InvalidInput("the system's settings do not fit together", errors)


async def create_system(session: AsyncSession, body: SystemCreate, *, actor: str,
                        now: datetime) -> DownstreamSystem:
    values = body.model_dump(mode="json")
    if values["transport"] == "simulated" and values.get("simulation") is None:
        values["simulation"] = {"seed": 0, "outcomes": {"success": 1.0}, "latency_ms": 1.0,
                                "status_query": None}
    _check_consistency(values)
    table = DownstreamSystem.__table__
    inserted = await session.execute(
        insert_for(session.bind.dialect.name)(table)
        .values(**values, created_at=now, updated_at=now)
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(table.c.name)
    )
    if inserted.scalar() is None:
        raise Conflict(f"a system named {body.name!r} already exists; PATCH it to change it")
    session.add(Circuit(system=body.name, state="closed", consecutive_failures=0,
                        changed_at=now, reason="created"))
    await session.flush()
    await append_audit(session, [AuditEntry("system.created", "system", body.name,
                                             {"settings": values})], actor=actor, now=now)
    return await get_system(session, body.name)


async def update_system(session: AsyncSession, name: str, patch: SystemPatch, *, actor: str,
                        now: datetime) -> DownstreamSystem:
    system = await session.get(DownstreamSystem, name, with_for_update=True)
    if system is None:
        raise NotFound(f"no downstream system is named {name!r}")
    changes = patch.model_dump(mode="json", exclude_unset=True)
    current = {column.name: getattr(system, column.key)
               for column in DownstreamSystem.__table__.columns}
    _check_consistency({**current, **changes})
    before = {field: current[field] for field in changes}
    for field, value in changes.items():
        setattr(system, field, value)
    system.updated_at = now
    await session.flush()
    await append_audit(session, [AuditEntry("system.updated", "system", name,
                                             {"before": before, "after": changes})],
                       actor=actor, now=now)
    return system


async def get_system(session: AsyncSession, name: str) -> DownstreamSystem:
    system = await session.get(DownstreamSystem, name, populate_existing=True)
    if system is None:
        raise NotFound(f"no downstream system is named {name!r}")
    return system


async def list_systems(session: AsyncSession, page: PageRequest) -> Page[DownstreamSystem]:
    return await fetch_page(session, DownstreamSystem.name, page)
