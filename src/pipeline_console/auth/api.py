"""GET /api/v1/tokens: who holds a token, with what role and scope (admins only). Read-only:
tokens are made and revoked with `pipeline-console tokens`; a token's hash or plain text is
never shown."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from pipeline_console.api.dependencies import DatabaseDep, IdPage
from pipeline_console.api.problems import problem_responses
from pipeline_console.auth.dependencies import ADMIN
from pipeline_console.auth.roles import ROLES
from pipeline_console.auth.tokens import list_token_page, unscoped
from pipeline_console.models import ApiToken

router = APIRouter(tags=["tokens"])


class TokenRead(BaseModel):
    id: int
    name: str
    role: str
    sources: list[str] | None = Field(
        description="the source systems an ingest token may post for; null: any source")
    unscoped: bool = Field(description="an ingest token with no source scope (made before "
                           "scoping existed): it may post for any source; replace it")
    prefix: str = Field(description="the token's first characters, to recognise it")
    status: Literal["active", "revoked"]
    created_at: datetime
    created_by: str
    revoked_at: datetime | None
    revoked_by: str | None


class TokenPage(BaseModel):
    items: list[TokenRead]
    next_cursor: str | None


def token_read(row: ApiToken) -> TokenRead:
    return TokenRead(id=row.id, name=row.name, role=row.role, sources=row.sources,
                     unscoped=unscoped(row), prefix=row.prefix,
                     status="revoked" if row.revoked_at else "active",
                     created_at=row.created_at, created_by=row.created_by,
                     revoked_at=row.revoked_at, revoked_by=row.revoked_by)


@router.get("/tokens", dependencies=[ADMIN], response_model=TokenPage,
            responses=problem_responses(422),
            summary="API tokens, oldest first (never the token or its hash)",
            description="`unscoped=true`: only the active ingest tokens without a source "
            "scope, which the dashboard flags until they are replaced (revoke, then "
            "`pipeline-console tokens create --role ingest --source …`).")
async def get_tokens(
    database: DatabaseDep,
    page: IdPage,
    unscoped_only: Annotated[bool, Query(alias="unscoped")] = False,
    role: Annotated[Literal[ROLES] | None, Query()] = None,  # type: ignore[valid-type]
) -> TokenPage:
    async with database.read() as session:
        result = await list_token_page(session, page, unscoped_only=unscoped_only, role=role)
        return TokenPage(items=[token_read(row) for row in result.items],
                         next_cursor=result.next_cursor)
