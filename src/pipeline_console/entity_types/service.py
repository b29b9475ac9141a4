"""Entity types and their JSON Schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.audit.service import AuditEntry, append_audit
from pipeline_console.db import insert_for
from pipeline_console.entity_types.completeness import check_schema
from pipeline_console.errors import NotFound
from pipeline_console.models import EntityType
from pipeline_console.pagination import Page, PageRequest, fetch_page


async def list_entity_types(session: AsyncSession, page: PageRequest) -> Page[EntityType]:
    return await fetch_page(session, EntityType.name, page)


async def get_entity_type(session: AsyncSession, name: str) -> EntityType:
    entity_type = await session.get(EntityType, name)
    if entity_type is None:
        raise NotFound(f"entity type {name!r} does not exist")
    return entity_type


async def put_entity_type(
    session: AsyncSession, name: str, schema: dict[str, Any] | None, *, actor: str,
    now: datetime,
) -> tuple[EntityType, bool]:
    """Create the entity type or replace its schema (None removes it). Returns (row, created).

    Staged records are not re-checked here; the promote_staging job does that.
    """
    if schema is not None:
        check_schema(schema)
    # Insert-or-nothing, then lock: two concurrent PUTs of a new name never collide.
    inserted = await session.execute(
        insert_for(session.bind.dialect.name)(EntityType.__table__)
        .values(name=name, schema=schema, created_at=now, updated_at=now)
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(EntityType.__table__.c.name)
    )
    created = inserted.scalar() is not None
    entity_type = (
        await session.execute(
            select(EntityType).where(EntityType.name == name).with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one()
    entity_type.json_schema = schema
    entity_type.updated_at = now
    await session.flush()
    await append_audit(
        session,
        [AuditEntry("entity_type.schema_set", "entity_type", name,
                    {"schema": schema, "created": created})],
        actor=actor, now=now,
    )
    return entity_type, created
