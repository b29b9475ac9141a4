"""The database unreachable, busy or lost: every route answers 503 with Retry-After
(problem+json for the API, an HTML page for the console), never 500, and a genuine bug is
still a 500. In-process here, against real drivers and real sockets; the same with a real
server and a real worker process behind a proxy that is cut mid-load is in
tests/test_outage_process.py."""

from __future__ import annotations

import re
import sqlite3

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from pipeline_console.api.problems import install_problem_handlers
from pipeline_console.app import create_app
from pipeline_console.config import Settings
from pipeline_console.console.templating import html_error
from pipeline_console.db import Database, create_engine
from tests.support import message
from tests.test_db_unavailability import closed_port, error_of

PROBLEM = "application/problem+json"
# Routes that never read the database: they answer as usual during an outage.
# (/login/who with nothing to look up answers without asking the database)
WITHOUT_DATABASE = {("GET", "/healthz"), ("GET", "/login"), ("POST", "/logout"),
                    ("POST", "/login/who")}
TOKEN = "pc_" + "t" * 43  # looks like a token: the check looks it up


def every_route(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route, path parameters filled in with '1'."""
    routes = []
    for context in iter_route_contexts(app.routes):
        if isinstance(context.original_route, APIRoute):
            path = re.sub(r"\{[^}]+\}", "1", context.path)
            routes.extend((method, path) for method in sorted(context.original_route.methods))
    return routes


def unreachable_app(**settings: object) -> FastAPI:
    return create_app(Settings(
        database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port()}/none",
        **settings))


def assert_unavailable(response: httpx.Response, what: object) -> None:
    assert response.status_code == 503, (what, response.status_code, response.text[:300])
    assert int(response.headers["retry-after"]) > 0, what
    if response.request.url.path.startswith(("/api/", "/readyz", "/metrics")):
        assert response.headers["content-type"] == PROBLEM, what
        assert "the database is unreachable" in response.json()["detail"], what
    else:  # a console page saying so, not a 500 page
        assert response.headers["content-type"].startswith("text/html"), what
        assert "Try again in a moment" in response.text, what
        assert "the database is unreachable" in response.text, what


async def call(app: FastAPI, routes: list[tuple[str, str]], **headers: str) -> list:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=transport, base_url="http://test",
            headers={"Origin": "http://test", **headers}) as client:
        return [(route, await client.request(route[0], route[1], json={})
                 if route != ("POST", "/login") else
                 await client.post("/login", data={"token": TOKEN}))
                for route in routes]


class TestEveryRouteWhileTheDatabaseIsUnreachable:
    async def test_with_a_token_every_route_is_503_with_retry_after_from_the_token_check(self):
        """The token check is the first thing that reads the database, in a dependency,
        before the route runs: the API, the operations endpoints and every console page and
        form alike."""
        app = unreachable_app()
        routes = every_route(app)
        assert len(routes) > 70
        answers = await call(app, routes, Authorization=f"Bearer {TOKEN}")
        for route, response in answers:
            if route in WITHOUT_DATABASE:
                assert response.status_code < 500, route
            else:
                assert_unavailable(response, route)

    async def test_without_authentication_the_routes_own_reads_are_503_too(self):
        """Authentication off: the requests reach each route's own use of the database."""
        app = unreachable_app(auth="disabled")
        answers = await call(app, every_route(app))
        unavailable = 0
        for route, response in answers:
            assert response.status_code < 500 or response.status_code == 503, (
                route, response.status_code, response.text[:300])
            if response.status_code == 503:
                assert_unavailable(response, route)
                unavailable += 1
        # the rest refused the empty body or placeholder id first (422, 404), or never read
        # the database (/healthz, /login, /metrics renders its counters without it)
        assert unavailable > 40
        ingest = dict(answers)[("POST", "/api/v1/messages")]
        assert ingest.status_code == 503  # the message was valid enough to be decided

    async def test_a_valid_message_gets_503_and_the_readiness_probe_says_why(self):
        app = unreachable_app(auth="disabled")
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=transport, base_url="http://test") as client:
            ingested = await client.post("/api/v1/messages", json=message(1))
            batch = await client.post("/api/v1/messages/batch",
                                      json={"messages": [message(1), message(2)]})
            ready = await client.get("/readyz")
        for response in (ingested, batch, ready):
            assert_unavailable(response, response.request.url.path)
        assert ingested.headers["retry-after"] == "5"


class TestTheOpenApiDocument:
    async def test_every_api_operation_documents_503_with_retry_after(self, tmp_path):
        app = create_app(Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"))
        document = app.openapi()
        operations = 0
        for path, methods in document["paths"].items():
            for method, operation in methods.items():
                if not path.startswith("/api/v1/"):
                    continue
                operations += 1
                unavailable = operation["responses"].get("503")
                assert unavailable is not None, (method, path)
                assert PROBLEM in unavailable["content"], (method, path)
                assert "Retry-After" in unavailable["headers"], (method, path)
        assert operations > 40
        ready = document["paths"]["/readyz"]["get"]["responses"]["503"]
        assert {"application/json", PROBLEM} <= set(ready["content"])


@pytest.mark.sqlite_only
async def test_a_sqlite_file_locked_by_another_process_is_503_until_it_lets_go(database_url):
    """SQLite's outage: another process holds the write lock past the busy timeout."""
    settings = Settings(database_url=database_url, sqlite_busy_timeout_ms=50, auth="disabled")
    database = Database(create_engine(settings))
    app = create_app(settings, database=database)
    other = sqlite3.connect(make_url(database_url).database, isolation_level=None)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=transport, base_url="http://test") as client:
            other.execute("BEGIN IMMEDIATE")
            locked = await client.post("/api/v1/messages", json=message(1))
            other.execute("ROLLBACK")
            again = await client.post("/api/v1/messages", json=message(1))
    finally:
        other.close()
        await database.dispose()
    assert locked.status_code == 503 and locked.headers["retry-after"] == "1"
    assert locked.headers["content-type"] == PROBLEM
    assert "busy" in locked.json()["detail"]
    assert again.status_code == 200 and again.json()["decision"] == "accept_new"


def raising(error: BaseException):
    async def route() -> None:
        raise error

    return route


async def integrity_error(database_url: str) -> IntegrityError:
    database = Database(create_engine(Settings(database_url=database_url)))
    try:
        async with database.transaction() as session:
            await session.execute(text("CREATE TEMPORARY TABLE once (id INT PRIMARY KEY)"))
            await session.execute(text("INSERT INTO once VALUES (1), (1)"))
    except IntegrityError as error:
        return error
    finally:
        await database.dispose()
    raise AssertionError("the duplicate was accepted")


async def test_a_genuine_bug_is_still_500_and_groups_are_judged_by_every_member(database_url):
    """The handlers see real errors of the real drivers (a constraint violated, a refused
    connect), alone and in the exception groups that task groups raise."""
    duplicate = await integrity_error(database_url)
    refused = await error_of(f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port()}/x")
    raised = {
        "/api/bug": duplicate,
        "/api/outage": refused,
        "/api/outages": ExceptionGroup("task group", [refused, refused]),
        "/api/outage-and-bug": ExceptionGroup("task group", [refused, duplicate]),
        "/api/other-group": ExceptionGroup("task group", [ValueError("not the database")]),
        "/page/bug": duplicate,
        "/page/outage": ExceptionGroup("task group", [refused]),
    }
    app = FastAPI()
    install_problem_handlers(app, html=html_error)
    for path, error in raised.items():
        app.add_api_route(path, raising(error))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        status = {path: await client.get(path) for path in raised}
    assert {path: response.status_code for path, response in status.items()} == {
        "/api/bug": 500, "/api/outage": 503, "/api/outages": 503, "/api/outage-and-bug": 500,
        "/api/other-group": 500, "/page/bug": 500, "/page/outage": 503}
    for path in ("/api/outage", "/api/outages", "/page/outage"):
        assert status[path].headers["retry-after"] == "5", path
    assert status["/page/outage"].headers["content-type"].startswith("text/html")
    assert status["/page/bug"].headers["content-type"].startswith("text/html")
    assert "retry-after" not in status["/api/bug"].headers
