"""Health, readiness, the OpenAPI document, problem+json for HTTP errors, and the CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx

from pipeline_console.app import create_app
from pipeline_console.config import Settings
from pipeline_console.db import Database, create_engine

CONTRACT_PATHS = [
    ("post", "/api/v1/messages"), ("post", "/api/v1/messages/batch"),
    ("get", "/api/v1/records"), ("get", "/api/v1/records/{key}"), ("get", "/api/v1/staging"),
    ("get", "/api/v1/anomalies"), ("post", "/api/v1/anomalies/{anomaly_id}/resolve"),
    ("get", "/api/v1/correlations/{correlation_id}"), ("get", "/api/v1/entity-types"),
    ("put", "/api/v1/entity-types/{name}"), ("get", "/api/v1/audit"),
    ("get", "/api/v1/audit/verify"), ("get", "/api/v1/jobs"),
    ("post", "/api/v1/jobs/{name}/run"), ("get", "/healthz"), ("get", "/readyz"),
    ("post", "/api/v1/systems"), ("get", "/api/v1/systems"), ("get", "/api/v1/systems/{name}"),
    ("patch", "/api/v1/systems/{name}"), ("get", "/api/v1/deliveries"),
    ("get", "/api/v1/deliveries/{delivery_id}/attempts"), ("get", "/api/v1/dlq"),
    ("get", "/api/v1/ambiguous"), ("post", "/api/v1/ambiguous/{ambiguous_id}/query-status"),
    ("post", "/api/v1/ambiguous/{ambiguous_id}/resolve"), ("post", "/api/v1/ambiguous/resolve"),
    ("post", "/api/v1/ambiguous/query-status"), ("get", "/api/v1/circuits"),
    ("post", "/api/v1/circuits/{system}/reset"), ("post", "/api/v1/circuits/{system}/open"),
    ("post", "/api/v1/replays"), ("get", "/api/v1/replays"),
    ("get", "/api/v1/replays/{replay_id}"), ("post", "/api/v1/replays/{replay_id}/execute"),
    ("post", "/api/v1/replays/{replay_id}/eligible"),
    ("get", "/api/v1/inspect/{key}"), ("get", "/api/v1/inspect"), ("get", "/api/v1/dashboard"),
    ("get", "/api/v1/jobs/runs"), ("get", "/api/v1/reports"), ("get", "/api/v1/reports/{name}"),
    ("get", "/metrics"),
]


async def test_healthz_and_readyz_on_a_migrated_database(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


async def test_readyz_is_503_while_migrations_are_pending(tmp_path):
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    database = Database(create_engine(settings))
    app = create_app(settings, database=database)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        response = await client.get("/readyz")
    await database.dispose()
    assert response.status_code == 503
    assert response.json()["status"] == "migrations pending"


async def test_readyz_is_503_when_the_database_is_unreachable():
    settings = Settings(database_url="postgresql+asyncpg://nobody@127.0.0.1:1/none")
    database = Database(create_engine(settings))
    app = create_app(settings, database=database)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        response = await client.get("/readyz")
    await database.dispose()
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"


async def test_the_openapi_document_describes_every_endpoint_and_body(client):
    document = (await client.get("/openapi.json")).json()
    for method, path in CONTRACT_PATHS:
        assert method in document["paths"].get(path, {}), (method, path)
    schemas = document["components"]["schemas"]
    assert {"MessageIn", "BatchIn", "IngestResult", "ProblemDetails"} <= set(schemas)
    assert schemas["MessageIn"]["properties"]["version"]["minimum"] == 0
    message_op = document["paths"]["/api/v1/messages"]["post"]
    assert message_op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/MessageIn")
    # every 422 in the document is problem+json, as the server answers
    for path, operations in document["paths"].items():
        for operation in operations.values():
            if "422" in operation.get("responses", {}):
                assert "application/problem+json" in operation["responses"]["422"]["content"], path


async def test_unknown_paths_and_methods_are_problem_json(client):
    missing = await client.get("/api/v1/nothing")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    wrong = await client.delete("/api/v1/records")
    assert wrong.status_code == 405 and wrong.json()["status"] == 405


def run_cli(database_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline_console.cli", *args],
        env={**os.environ, "PIPELINE_CONSOLE_DATABASE_URL": database_url},
        capture_output=True, text=True, timeout=120,
    )


async def test_the_cli_migrates_loads_the_demo_and_runs_jobs(database_url, client):
    for args in (["migrate"], ["demo"], ["jobs", "run", "promote_staging"], ["audit", "verify"]):
        result = await asyncio.to_thread(run_cli, database_url, *args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    decisions = {
        item["decision"]
        for item in (await client.get("/api/v1/attempts?limit=500")).json()["items"]
    }
    assert decisions == {"accept_new", "accept_supersede", "skip_duplicate", "quarantine",
                         "skip_stale", "rejected"}
    assert (await client.get("/api/v1/staging?status=partial")).json()["items"]
    assert (await client.get("/api/v1/anomalies?status=open")).json()["items"]
    unknown = await asyncio.to_thread(run_cli, database_url, "jobs", "run", "nope")
    assert unknown.returncode == 2 and "no job is named" in unknown.stderr
