"""The tokens page (admins): who holds a token, with which role and source scope. Read-only:
tokens are made and revoked with `pipeline-console tokens`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response

from pipeline_console.api.dependencies import DatabaseDep, IdPage
from pipeline_console.auth.api import token_read
from pipeline_console.auth.dependencies import Requires
from pipeline_console.auth.tokens import list_token_page
from pipeline_console.console.templating import page

router = APIRouter(include_in_schema=False)

CONSOLE_ADMIN_PAGE = Depends(Requires("admin", cookie=True))


@router.get("/tokens", response_class=HTMLResponse, dependencies=[CONSOLE_ADMIN_PAGE])
async def tokens(request: Request, database: DatabaseDep, page_request: IdPage,
                 unscoped: Annotated[str | None, Query(max_length=10)] = None) -> Response:
    only_unscoped = unscoped in ("true", "1", "yes", "on")
    async with database.read() as session:
        result = await list_token_page(session, page_request, unscoped_only=only_unscoped)
    return page(request, "tokens.html", title="Tokens", nav="/tokens",
                tokens=[token_read(row) for row in result.items],
                next_cursor=result.next_cursor, unscoped=only_unscoped)
