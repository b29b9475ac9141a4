"""Structured logs from a real server process: JSON lines with the request id, and for a
message the idempotency key and correlation id."""

from __future__ import annotations

import json

import httpx

from tests.conftest import make_token
from tests.ingestion.test_concurrency import start_server
from tests.support import message


async def test_each_request_is_one_json_line_with_its_request_id_and_key(
        database_url, database, tmp_path):
    token = await make_token(database, "ingest", name="erp-logs")
    process, base = start_server(database_url, tmp_path)
    try:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as client:
            response = await client.post(f"{base}/api/v1/messages", json=message(
                1, entity_id="LOG-1", correlation_id="evt-log"))
            refused = await client.get(f"{base}/api/v1/records")
    finally:
        process.terminate()
        # uvicorn shuts down gracefully, then re-raises SIGTERM (so the exit code says it)
        assert process.wait(timeout=30) in (0, -15)
    assert response.status_code == 200 and refused.status_code == 403
    request_id = response.headers["x-request-id"]
    lines = [json.loads(line) for line in
             (tmp_path / f"server-{base.rsplit(':', 1)[1]}.log").read_text().splitlines()
             if line.startswith("{")]
    [access] = [line for line in lines if line.get("request_id") == request_id
                and line["event"] == "request"]
    assert access["path"] == "/api/v1/messages" and access["status"] == 200
    assert (access["idempotency_key"], access["correlation_id"], access["decision"]) == (
        "customer:LOG-1", "evt-log", "accept_new")
    assert access["level"] == "info" and access["timestamp"].endswith("Z")
    assert any(line["status"] == 403 for line in lines if line["event"] == "request")
    assert any("Application startup complete" in line["event"] for line in lines)
    assert any("Application shutdown complete" in line["event"] for line in lines)
