"""Reports over a time range, in JSON and CSV, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import io
import json

import pytest

from pipeline_console.reports.api import csv_cell
from tests.delivery.test_delivery import add_system, attempts, deliveries, ingest, run_pass
from tests.sink import Answer
from tests.support import message
from tests.test_operations import run_cli

DAY = "from=2026-11-23T10:00:00Z&to=2026-11-24T10:30:00Z"


async def report(client, name, query=DAY):
    response = await client.get(f"/api/v1/reports/{name}?{query}")
    assert response.status_code == 200, response.text
    return response.json()


async def report_csv(client, name, query=DAY):
    response = await client.get(f"/api/v1/reports/{name}?{query}&format=csv")
    assert response.status_code == 200, response.text
    return response, list(csv.DictReader(io.StringIO(response.text)))


def as_csv(value):
    if value is None:
        return ""
    if isinstance(value, dict):
        return "; ".join(f"{key}={count}" for key, count in value.items())
    return str(value)


async def assert_csv_matches_json(client, name):
    document = await report(client, name)
    response, rows = await report_csv(client, name)
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"] == (
        f'attachment; filename="{name}-report_20261123T100000Z_20261124T103000Z.csv"')
    assert response.text.splitlines()[0].split(",") == document["columns"]
    assert rows == [{column: as_csv(row[column]) for column in document["columns"]}
                    for row in document["rows"]]
    assert rows, "the scenario leaves rows in every report"


@pytest.fixture
async def history(client, sink, clock):
    """A morning of traffic: every decision, a delivery that succeeds, one that is
    dead-lettered, a conflict resolved a minute later, one still open, a refused replay and a
    completed one. One message arrives two days earlier, outside the reports' range."""
    clock.advance(days=-2)
    await ingest(client, message(1, {"n": "old"}, entity_id="OLD", source_system="crm"))
    clock.advance(days=2)
    await ingest(client, message(1, {"name": "A"}), message(1, {"name": "A"}),
                 message(2, {"name": "B"}))
    await ingest(client, message(1, {"name": "a"}, source_system="crm"),
                 message(2, {"name": "C"}, source_system="crm"))
    await ingest(client, message(1, {"total": 1}, entity_type="order", entity_id="O-1",
                                 source_system="shop"))
    await ingest(client, message(1, {"total": 2}, entity_type="order", entity_id="O-1",
                                 source_system="erp"))
    refused = await client.post("/api/v1/messages", json=message(-1, source_system="shop"))
    assert refused.status_code == 422

    sink.answer(Answer(200), Answer(400, body="unknown customer"))
    await add_system(client, sink, entity_types=["customer", "order"])
    await ingest(client, message(3, {"name": "D"}), message(2, {"total": 3}, entity_type="order",
                                                            entity_id="O-1", source_system="shop"))
    await run_pass(client)

    anomalies = (await client.get("/api/v1/anomalies?status=open")).json()["items"]
    customer_conflict = next(a for a in anomalies if a["idempotency_key"] == "customer:C-100")
    clock.advance(seconds=60)
    resolved = await client.post(f"/api/v1/anomalies/{customer_conflict['id']}/resolve",
                                 json={"resolution": "keep_current", "note": "ERP is master"})
    assert resolved.status_code == 200, resolved.text

    [entry] = (await client.get("/api/v1/dlq?status=open")).json()["items"]
    mixed = await client.post("/api/v1/replays", json={
        "reason": "try", "items": [{"dlq_id": entry["id"]}, {"dlq_id": 999}]})
    assert mixed.status_code == 409
    sink.answer(Answer(200))
    created = await client.post("/api/v1/replays", json={"reason": "fixed",
                                                         "items": [{"dlq_id": entry["id"]}]})
    assert created.status_code == 201, created.text
    done = await client.post(f"/api/v1/replays/{created.json()['id']}/execute")
    assert done.json()["status"] == "completed"
    return entry


class TestIngestionReport:
    async def test_decisions_by_source_and_entity_type(self, client, history):
        document = await report(client, "ingestion")
        rows = {(row["source_system"], row["entity_type"]): row for row in document["rows"]}
        assert set(rows) == {("erp", "customer"), ("crm", "customer"), ("shop", "order"),
                             ("erp", "order"), ("shop", "customer")}
        erp = rows[("erp", "customer")]
        assert (erp["accept_new"], erp["skip_duplicate"], erp["accept_supersede"],
                erp["total"]) == (1, 1, 2, 4)
        crm = rows[("crm", "customer")]  # the message two days earlier is outside the range
        assert (crm["skip_stale"], crm["quarantine"], crm["total"]) == (1, 1, 2)
        assert rows[("erp", "order")]["quarantine"] == 1
        assert rows[("shop", "order")]["accept_supersede"] == 1
        assert rows[("shop", "customer")]["rejected"] == 1
        assert document["totals"]["total"] == 10
        assert document["from"] == "2026-11-23T10:00:00Z"

    async def test_the_range_decides_what_counts(self, client, history):
        wide = await report(client, "ingestion", "from=2026-11-20T00:00:00Z")
        assert wide["totals"]["total"] == 11
        default = await report(client, "ingestion", "")  # the 24 hours up to now
        assert default["totals"]["total"] == 10
        empty = await report(client, "ingestion", "from=2026-01-01T00:00:00Z"
                             "&to=2026-01-02T00:00:00Z")
        assert empty["rows"] == [] and empty["totals"]["total"] == 0

    async def test_csv(self, client, history):
        await assert_csv_matches_json(client, "ingestion")


class TestDeliveryReport:
    async def test_attempts_success_rate_latency_and_dead_letter_reasons(self, client,
                                                                         history):
        [row] = (await report(client, "delivery"))["rows"]
        assert row["system"] == "billing"
        assert (row["attempts"], row["success"], row["permanent"], row["transient"]) == (
            3, 2, 1, 0)
        assert row["success_rate"] == round(2 / 3, 4)
        assert row["delivered"] == 2 and row["dead_lettered"] == 1
        assert row["dlq_reasons"] == {"permanent: HTTP 400 (4xx)": 1}
        latencies = sorted([attempt["latency_ms"] for delivery in await deliveries(client)
                            for attempt in await attempts(client, delivery["id"])])
        assert len(latencies) == 3
        # nearest rank: p50 of three is the second, p95 the third
        assert (row["p50_latency_ms"], row["p95_latency_ms"]) == (latencies[1], latencies[2])

    async def test_a_worker_lost_claim_is_not_held_against_the_system(self, client, history,
                                                                      clock):
        from pipeline_console.delivery.claims import claim_due, recover_lost_claims

        answer = await client.post("/api/v1/messages", json=message(1, entity_id="LOST-1"))
        assert answer.status_code == 200, answer.text
        deliverer = client.app.state.deliverer
        assert len(await claim_due(deliverer, 10)) == 1  # claimed; the process dies
        clock.advance(minutes=5)
        assert await recover_lost_claims(deliverer) == 1
        [row] = (await report(client, "delivery"))["rows"]
        assert (row["attempts"], row["success"], row["worker_lost"]) == (4, 2, 1)
        assert row["success_rate"] == round(2 / 3, 4)  # as before the worker was lost

    async def test_csv(self, client, history):
        await assert_csv_matches_json(client, "delivery")


class TestAnomaliesReport:
    async def test_by_entity_type_and_the_two_systems_with_resolution_time(self, client,
                                                                            history):
        rows = {(row["entity_type"], row["current_source_system"],
                 row["incoming_source_system"]): row
                for row in (await report(client, "anomalies"))["rows"]}
        assert rows[("customer", "erp", "crm")] | {} == {
            "entity_type": "customer", "current_source_system": "erp",
            "incoming_source_system": "crm", "opened": 1, "open": 0, "accept_incoming": 0,
            "keep_current": 1, "mean_resolution_s": 60.0}
        order = rows[("order", "shop", "erp")]
        assert (order["opened"], order["open"], order["mean_resolution_s"]) == (1, 1, None)

    async def test_csv(self, client, history):
        await assert_csv_matches_json(client, "anomalies")


class TestReplaysReport:
    async def test_requests_by_status_with_items_and_outcomes(self, client, history):
        rows = {row["status"]: row for row in (await report(client, "replays"))["rows"]}
        assert set(rows) == {"rejected", "completed"}
        assert (rows["rejected"]["requests"], rows["rejected"]["items"],
                rows["rejected"]["eligible_items"], rows["rejected"]["executions"]) == (
            1, 2, 1, 0)
        assert rows["completed"]["outcomes"] == {"delivered": 1}

    async def test_csv(self, client, history):
        await assert_csv_matches_json(client, "replays")


async def test_the_cli_prints_the_same_report(client, history, database_url):
    document = await report(client, "ingestion")
    args = ["reports", "show", "ingestion", "--from", "2026-11-23T10:00:00Z",
            "--to", "2026-11-24T10:30:00Z"]
    result = await asyncio.to_thread(run_cli, database_url, *args)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == document
    result = await asyncio.to_thread(run_cli, database_url, *args, "--format", "csv")
    assert result.returncode == 0, result.stderr
    _, rows = await report_csv(client, "ingestion")
    assert list(csv.DictReader(io.StringIO(result.stdout))) == rows
    refused = await asyncio.to_thread(run_cli, database_url, "reports", "show", "nope")
    assert refused.returncode == 2 and "ingestion" in refused.stderr
    offset = await asyncio.to_thread(run_cli, database_url, "reports", "show", "ingestion",
                                     "--from", "2026-11-23T12:00:00+02:00",
                                     "--to", "2026-11-24T12:30:00+02:00")
    assert json.loads(offset.stdout)["from"] == "2026-11-23T10:00:00Z"  # UTC, as the API
    early = await asyncio.to_thread(run_cli, database_url, "reports", "show", "ingestion",
                                    "--to", "0001-01-01T00:00:00Z")
    assert early.returncode == 2 and "--from" in early.stderr


class TestErrors:
    async def test_an_unknown_report_is_404(self, client):
        response = await client.get("/api/v1/reports/nope")
        assert response.status_code == 404
        assert "ingestion" in response.json()["detail"]

    async def test_an_empty_range_names_the_field(self, client):
        response = await client.get("/api/v1/reports/ingestion?from=2026-11-24T10:00:00Z"
                                    "&to=2026-11-24T09:00:00Z")
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == "from"

    async def test_a_time_without_a_zone_is_refused(self, client):
        response = await client.get("/api/v1/reports/ingestion?from=2026-11-24T10:00:00")
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"

    async def test_so_early_a_to_without_a_from_names_the_field(self, client):
        response = await client.get("/api/v1/reports/ingestion?to=0001-01-01T00:00:00Z")
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == "from"

    async def test_an_unknown_format_is_refused(self, client):
        assert (await client.get("/api/v1/reports/ingestion?format=xml")).status_code == 422

    async def test_the_list(self, client):
        assert (await client.get("/api/v1/reports")).json()["items"] == [
            "ingestion", "delivery", "anomalies", "replays"]


@pytest.mark.parametrize(("value", "cell"), [
    ("=HYPERLINK(1)", "'=HYPERLINK(1)"), ("+1", "'+1"), ("-1", "'-1"), ("@x", "'@x"),
    ("erp", "erp"), (None, ""), (3, 3), ({"a": 1, "b": 2}, "a=1; b=2"),
    # after blanks or a ";" (a list separator in some locales) a spreadsheet still reads a
    # formula (issue 19, point 7)
    (" =1+1", "' =1+1"), (";=cmd", "';=cmd"), ("\t=x", "'\t=x"), ("\r\n@SUM(A1)", "'\r\n@SUM(A1)"),
    (" ; -1", "' ; -1"), ({";=cmd": 1}, "';=cmd=1"),
    # every ';' may end a cell: what follows one is a cell's start too
    ("x;=cmd|' /C calc'!A0", "'x;=cmd|' /C calc'!A0"), ("a; b", "a; b"),
    # a negative number written as text is neutralised (it is a name here; the apostrophe
    # keeps it text); a number is a number
    ("-2", "'-2"), (-2, -2), (-0.5, -0.5),
    (" erp", " erp")])
def test_csv_cells_never_start_a_formula(value, cell):
    assert csv_cell(value) == cell
