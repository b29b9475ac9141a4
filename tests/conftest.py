"""Test databases: every database test runs once on SQLite and once on PostgreSQL.

Each test gets a fresh database cloned from one migrated by Alembic (the schema is built
once per worker by running the migrations): a copied file on SQLite, CREATE DATABASE …
TEMPLATE on PostgreSQL. Tests therefore commit for real, which the concurrency and crash
tests need. PostgreSQL is 127.0.0.1:5432 unless PIPELINE_CONSOLE_TEST_POSTGRES_URL says
otherwise; when it is unreachable the PostgreSQL leg is skipped locally and FAILS under CI=true.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from pipeline_console.app import create_app
from pipeline_console.config import Settings
from pipeline_console.db import Database, create_engine
from pipeline_console.schema import upgrade_to_head
from tests.sink import ScriptedServer
from tests.support import FakeClock

BACKENDS = ("sqlite", "postgresql")
POSTGRES_URL = os.environ.get(
    "PIPELINE_CONSOLE_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# The in-process clients talk to http://test; real servers are on 127.0.0.1.
os.environ.setdefault("PIPELINE_CONSOLE_ALLOWED_HOSTS", "127.0.0.1,localhost,::1,test")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        only_sqlite = metafunc.definition.get_closest_marker("sqlite_only") is not None
        only_postgresql = metafunc.definition.get_closest_marker("postgresql_only") is not None
        metafunc.parametrize("backend", ["sqlite"] if only_sqlite else
                             ["postgresql"] if only_postgresql else BACKENDS)


def _admin_dsn() -> str:
    url = make_url(POSTGRES_URL)
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _url_for(database_name: str) -> str:
    return make_url(POSTGRES_URL).set(database=database_name).render_as_string(
        hide_password=False
    )


async def _admin(*statements: str) -> None:
    connection = await asyncpg.connect(_admin_dsn(), timeout=5)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def _migrate(url: str) -> None:
    engine = create_engine(Settings(database_url=url), null_pool=True)
    try:
        await upgrade_to_head(engine)
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    asyncio.run(_migrate(f"sqlite+aiosqlite:///{path}"))
    return path


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[str]:
    name = f"pc_template_{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError, TimeoutError) as error:
        message = f"PostgreSQL is unreachable at {POSTGRES_URL}: {error!r}"
        if IN_CI:
            pytest.fail(message + " (CI=true: the PostgreSQL leg must not be skipped)")
        pytest.skip(message)
    try:
        asyncio.run(_migrate(_url_for(name)))
        yield name
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated, empty database of the given backend."""
    if backend == "sqlite":
        path = tmp_path / "pipeline.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    template = request.getfixturevalue("postgres_template")
    name = f"pc_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY'))
    try:
        yield _url_for(name)
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# Encrypts the downstream systems' secrets of every test (a key made for the tests alone).
TEST_SECRET_KEY = "dGVzdC1rZXktb2YtcGlwZWxpbmUtY29uc29sZS10ZXM="


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url, secret_key=TEST_SECRET_KEY)


@pytest.fixture
async def database(settings: Settings) -> AsyncIterator[Database]:
    database = Database(create_engine(settings))
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
def sink() -> Iterator[ScriptedServer]:
    server = ScriptedServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


TEST_ACTOR = "tester"  # the admin token every `client` request carries: "tester (admin)"


async def make_token(database: Database, role: str, *, name: str | None = None,
                     now: datetime | None = None, sources: list[str] | None = None) -> str:
    """A real API token with `role`, created through the service (as the CLI does). An
    ingest token posts for `sources`, by default the ERP's (what tests.support.message
    sends)."""
    from pipeline_console.auth.tokens import create_token

    if role == "ingest" and sources is None:
        sources = ["erp"]
    async with database.transaction() as session:
        _, plain = await create_token(session, name=name or f"test-{role}", role=role,
                                      actor="test", now=now or datetime.now(UTC),
                                      sources=sources)
    return plain


@pytest.fixture
async def client(
    settings: Settings, database: Database, clock: FakeClock
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, database=database, clock=clock)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    token = await make_token(database, "admin", name=TEST_ACTOR, now=clock.now)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test",
                          headers={"Authorization": f"Bearer {token}"}) as client,
    ):
        client.app = app  # tests reach app.state (the deliverer) through it
        yield client
