"""Entity types and their JSON Schemas (partial vs complete)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from pipeline_console.api.dependencies import ActorDep, DatabaseDep, KeyPage, NowDep
from pipeline_console.api.problems import problem_responses
from pipeline_console.auth.dependencies import ADMIN, VIEWER
from pipeline_console.entity_types import service
from pipeline_console.ingestion.schemas import Name

router = APIRouter(tags=["entity types"])


class EntityTypeRead(BaseModel):
    model_config = ConfigDict(from_attributes=True, populate_by_name=True)

    name: str
    json_schema: dict[str, Any] | None = Field(serialization_alias="schema",
                                               validation_alias="json_schema")
    created_at: datetime
    updated_at: datetime


class EntityTypePage(BaseModel):
    items: list[EntityTypeRead]
    next_cursor: str | None


class EntityTypePut(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_schema: dict[str, Any] | None = Field(
        alias="schema",
        description="a JSON Schema (draft 2020-12 unless it says otherwise); null removes it",
    )


@router.get("/entity-types", dependencies=[VIEWER],
            response_model=EntityTypePage, response_model_by_alias=True,
            responses=problem_responses(422))
async def list_entity_types(database: DatabaseDep, page: KeyPage) -> Any:
    async with database.read() as session:
        result = await service.list_entity_types(session, page)
        return EntityTypePage(items=[EntityTypeRead.model_validate(row) for row in result.items],
                              next_cursor=result.next_cursor)


@router.get("/entity-types/{name}", dependencies=[VIEWER],
            response_model=EntityTypeRead, response_model_by_alias=True,
            responses=problem_responses(404))
async def get_entity_type(database: DatabaseDep, name: str) -> Any:
    async with database.read() as session:
        return EntityTypeRead.model_validate(await service.get_entity_type(session, name))


@router.put(
    "/entity-types/{name}", dependencies=[ADMIN],
    response_model=EntityTypeRead,
    response_model_by_alias=True,
    responses={**problem_responses(422), 201: {"model": EntityTypeRead,
                                              "description": "Created"}},
    summary="Create an entity type or replace its JSON Schema",
    description="Records already staged are re-checked by the promote_staging job "
    "(POST /api/v1/jobs/promote_staging/run); records already promoted stay promoted.",
)
async def put_entity_type(
    database: DatabaseDep,
    name: Annotated[Name, Path()],
    body: EntityTypePut,
    now: NowDep,
    actor: ActorDep,
    response: Response,
) -> Any:
    async with database.transaction() as session:
        entity_type, created = await service.put_entity_type(
            session, name, body.json_schema, actor=actor.label, now=now
        )
        read = EntityTypeRead.model_validate(entity_type)
    if created:
        response.status_code = 201
    return read
