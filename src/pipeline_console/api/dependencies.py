"""What routes receive: the database, settings, the clock and the acting person."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Query, Request

from pipeline_console.config import Settings
from pipeline_console.db import Database
from pipeline_console.pagination import DEFAULT_LIMIT, MAX_LIMIT, PageRequest, decode_cursor


# The dependencies are `async def` although they never wait: FastAPI runs a plain function
# dependency in its thread pool, a hop per request that cost about 7 % of a request in the
# HTTP ingestion benchmark (docs/benchmarks.md).
async def get_database(request: Request) -> Database:
    return request.app.state.database


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_now(request: Request) -> datetime:
    return request.app.state.clock()


@dataclass(frozen=True)
class Actor:
    name: str
    role: str
    # an ingest token's source systems: it may post only their messages (None: any source)
    sources: frozenset[str] | None = None

    @property
    def label(self) -> str:
        """How the audit log names the actor: the token's name and role."""
        return f"{self.name} ({self.role})"


def get_actor(request: Request) -> Actor:
    """The caller, as the route's role check (auth.dependencies.Requires) found it."""
    return getattr(request.state, "actor", None) or Actor(name="anonymous", role="none")


async def _current_actor(request: Request) -> Actor:
    return get_actor(request)


def page_request(kind: type) -> object:
    async def dependency(
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="page size")] = DEFAULT_LIMIT,
        cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    ) -> PageRequest:
        return PageRequest(limit=limit, after=decode_cursor(cursor, kind))

    return dependency


DatabaseDep = Annotated[Database, Depends(get_database)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
NowDep = Annotated[datetime, Depends(get_now)]
ActorDep = Annotated[Actor, Depends(_current_actor)]
IdPage = Annotated[PageRequest, Depends(page_request(int))]
KeyPage = Annotated[PageRequest, Depends(page_request(str))]
