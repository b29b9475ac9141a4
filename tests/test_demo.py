"""The demo scenario leaves something in every area of the dashboard, every branch, every
queue and every state, the same on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import re
from collections import Counter

import pytest

from pipeline_console.demo import CONNECTED, DEMO_SECRETS, load_demo
from pipeline_console.errors import Conflict
from tests.console.test_sessions import browser_for, sign_in
from tests.test_operations import run_cli

# The scenario is deterministic: the same steps and seeds give these counts on both databases.
EXPECTED_ATTENTION = (
    "open_anomalies 1, dead_letters (crm-sync) 1, dead_letters (ledger) 2, "
    "ambiguous_outcomes 6, open_circuits 1, half_open_circuits 1, stale_partials 1, "
    "delivery_backlog (crm-sync) 11, delivery_backlog (ledger) 1, "
    "delivery_backlog (warehouse) 2, unsuccessful_replays 1, lost_workers 1")


@pytest.fixture
async def demo(database, client, clock, settings):
    return await load_demo(database, now=clock.now, settings=settings)


async def items(client, path):
    response = await client.get(path)
    assert response.status_code == 200, response.text
    return response.json()["items"]


async def test_the_dashboard_shows_every_area_non_zero(client, demo):
    dashboard = (await client.get("/api/v1/dashboard")).json()
    counts = Counter()
    for item in dashboard["items"]:
        counts[item["name"]] += item["count"]
    assert set(counts) == {"open_anomalies", "dead_letters", "ambiguous_outcomes",
                           "open_circuits", "half_open_circuits", "stale_partials",
                           "delivery_backlog", "unsuccessful_replays", "lost_workers"}
    assert all(counts.values()), counts
    for window in ("last_5_min", "last_hour"):
        assert sum(dashboard["rates"][window]["ingestion"].values()), window
    assert sum(dashboard["rates"]["last_hour"]["delivery"].values())
    assert demo[-2].endswith("the dashboard now: " + EXPECTED_ATTENTION)


async def test_every_branch_queue_and_state_is_there(client, demo):
    decisions = {a["decision"] for a in await items(client, "/api/v1/attempts?limit=500")}
    assert decisions == {"accept_new", "accept_supersede", "skip_duplicate", "quarantine",
                         "skip_stale", "rejected"}
    staging = {s["status"] for s in await items(client, "/api/v1/staging?limit=500")}
    assert staging == {"partial", "promoted", "superseded"}
    deliveries = {d["status"] for d in await items(client, "/api/v1/deliveries?limit=500")}
    assert {"delivered", "dead_lettered", "ambiguous", "held", "pending",
            "superseded"} <= deliveries
    attempts = Counter()
    for delivery in await items(client, "/api/v1/deliveries?limit=500"):
        for attempt in await items(client, f"/api/v1/deliveries/{delivery['id']}/attempts"):
            attempts[attempt["classification"]] += 1
    assert set(attempts) == {"success", "transient", "permanent", "ambiguous"}
    circuits = {c["system"]: c["state"] for c in await items(client, "/api/v1/circuits")}
    connected = {system["name"]: "closed" for system in CONNECTED}
    assert circuits == {"warehouse": "closed", "crm-sync": "open", "ledger": "half_open",
                        **connected}
    anomalies = {a["status"] for a in await items(client, "/api/v1/anomalies")}
    assert anomalies == {"open", "resolved"}
    replays = {r["status"] for r in await items(client, "/api/v1/replays")}
    assert replays == {"rejected", "completed"}
    ambiguous = await items(client, "/api/v1/ambiguous?status=open")
    assert {a["last_query_result"] for a in ambiguous} == {"no answer"}
    jobs = {r["job"] for r in await items(client, "/api/v1/jobs/runs")}
    assert jobs == {"query_ambiguous", "promote_staging", "stale_partial_sweep"}
    assert (await client.get("/api/v1/audit/verify")).json()["ok"] is True


async def test_the_inspector_tells_the_conflict_and_the_business_event(client, demo):
    conflict = (await client.get("/api/v1/inspect/customer:C-1004")).json()
    kinds = [entry["kind"] for entry in conflict["timeline"]]
    assert kinds.count("ingestion.quarantine") == 2 and "ingestion.accept_new" in kinds
    assert [a["status"] for a in conflict["anomalies"]] == ["open"]
    stamps = [entry["at"] for entry in conflict["timeline"]]
    assert stamps == sorted(stamps)
    event = (await client.get("/api/v1/inspect?correlation_id=evt-5002")).json()
    keys = {record["idempotency_key"] for record in event["records"]}
    assert keys == {"order:O-5002", "invoice:INV-9002"}


async def test_every_report_has_rows(client, demo):
    for name in ("ingestion", "delivery", "anomalies", "replays"):
        report = (await client.get(f"/api/v1/reports/{name}")).json()
        assert report["rows"], name


async def test_last_nights_batch_arrives_twice_and_the_second_time_changes_nothing(
        database, demo):
    from sqlalchemy import select

    from pipeline_console.demo import LAST_NIGHT
    from pipeline_console.models import IngestionAttempt

    async with database.read() as session:
        rows = (await session.execute(
            select(IngestionAttempt.decision, IngestionAttempt.entity_id)
            .where(IngestionAttempt.actor == "cli:ingest:last-night.ndjson")
            .order_by(IngestionAttempt.id))).all()
    ids = [body["entity_id"] for body in LAST_NIGHT]
    assert rows == [("accept_new", key) for key in ids] + [("skip_duplicate", key)
                                                           for key in ids]
    told = "\n".join(demo)
    assert (f"last night's batch from the ERP's catalog queue ({len(LAST_NIGHT)} products; "
            "`pipeline-console ingest` of last-night.ndjson) → 40 accept_new") in told
    assert ("the catalog consumer restarts and last night's batch arrives again "
            "(`pipeline-console ingest` of last-night.ndjson, once more): nothing changes "
            "→ 40 skip_duplicate") in told


async def test_the_demo_refuses_a_database_that_is_not_empty(database, clock, settings, demo):
    with pytest.raises(Conflict, match="empty database"):
        await load_demo(database, now=clock.now, settings=settings)


async def test_the_demo_prints_a_one_time_login_link_never_a_token_in_a_link(database_url,
                                                                              client):
    result = await asyncio.to_thread(run_cli, database_url, "demo")
    assert result.returncode == 0, result.stderr
    links = re.findall(r"https?://\S+", result.stdout)
    assert links and not [link for link in links if "pc_" in link]
    [login] = [link for link in links if "/login" in link]
    assert re.fullmatch(r"http://127\.0\.0\.1:8000/login#code=lc_[\w-]+", login)
    token = re.findall(r"Bearer (pc_[\w-]+)", result.stdout)[0]  # the admin's, for curl
    async with browser_for(client.app) as browser:
        await sign_in(browser, code=login.partition("#code=")[2])
        assert "demo-admin (admin)" in (await browser.get("/")).text
        api = await browser.get("/api/v1/dashboard", headers={"Authorization": f"Bearer {token}"})
        assert api.status_code == 200


async def test_each_demo_source_has_its_own_scoped_ingest_token(client, database, clock, demo):
    from pipeline_console.demo import DEMO_SOURCES, create_source_tokens
    from tests.support import message

    async with database.transaction() as session:
        tokens = await create_source_tokens(session, actor="cli", now=clock.now)
    assert sorted(tokens) == sorted(f"{source}-ingest" for source in DEMO_SOURCES)
    listed = {item["name"]: item for item in await items(client, "/api/v1/tokens")}
    assert all(listed[name]["sources"] == [name.removesuffix("-ingest")] for name in tokens)
    assert not any(item["unscoped"] for item in listed.values())
    shop = {"Authorization": f"Bearer {tokens['shop-ingest']}"}
    forged = await client.post("/api/v1/messages", headers=shop,
                               json=message(99, entity_id="C-1003"))
    assert forged.status_code == 403
    own = await client.post("/api/v1/messages", headers=shop, json=message(
        1, {"total": 10}, source_system="shop", entity_type="order", entity_id="O-6001"))
    assert own.status_code == 200, own.text
    async with database.transaction() as session:  # a second run replaces them
        again = await create_source_tokens(session, actor="cli", now=clock.now)
    assert set(again.values()).isdisjoint(tokens.values())
    clock.advance(seconds=6)  # past TOKEN_CACHE_S, which this process remembered it for
    refused = await client.post("/api/v1/messages", headers=shop, json=message(
        2, source_system="shop", entity_type="order", entity_id="O-6001"))
    assert refused.status_code == 401


async def test_the_demo_command_prints_the_source_tokens(database_url, tmp_path):
    import asyncio

    from tests.test_operations import run_cli

    batch = tmp_path / "demo-last-night.ndjson"
    result = await asyncio.to_thread(run_cli, database_url, "demo", "--batch-file", str(batch))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(batch.read_bytes().splitlines()) == 40  # kept, to try `ingest` on
    assert any(line.endswith(f"the batch is kept in {batch}: `pipeline-console ingest "
                             f"--dry-run {batch}` reports 40 skip_duplicate")
               for line in lines)
    again = await asyncio.to_thread(run_cli, database_url, "ingest", "--dry-run", str(batch))
    assert again.returncode == 0 and "skip_duplicate   40" in again.stdout.splitlines()
    for source in ("erp", "crm", "shop"):
        assert any(line.split()[:1] == [f"{source}-ingest"] and "pc_" in line
                   for line in lines), source
    assert "Authorization: Bearer pc_" in lines[-1] and '"source_system": "shop"' in lines[-1]


async def test_the_demo_connects_a_system_of_each_kind_with_its_secrets_write_only(client,
                                                                                  demo):
    systems = {s["name"]: s for s in await items(client, "/api/v1/systems?limit=100")}
    connected = [systems[system["name"]] for system in CONNECTED]
    assert {s["transport"] for s in connected} == {"simulated"}
    assert {s["auth"]["type"] for s in connected} == {
        "none", "bearer", "basic", "header", "oauth2_client_credentials"}
    for system in connected:
        secret = {"bearer": "token", "basic": "password", "header": "value",
                  "oauth2_client_credentials": "client_secret"}.get(system["auth"]["type"])
        if secret:
            assert system["auth"][secret]["secret_set"] is True
            assert len(system["auth"][secret]["fingerprint"]) == 12
    [signed] = [s for s in connected if s["signing"]]
    assert signed["signing"]["secret"]["secret_set"] is True
    [mapped] = [s for s in connected if s["body_template"]]
    assert mapped["method"] == "PUT" and "{entity_id}" in mapped["url"]
    [limited] = [s for s in connected if s["max_in_flight"]]
    assert limited["max_in_flight"] == 2 and limited["max_per_second"] == 5
    shown = "".join([(await client.get("/api/v1/systems?limit=100")).text,
                     (await client.get("/api/v1/audit?limit=500")).text]
                    + [(await client.get(f"/systems/{s['name']}")).text for s in connected])
    assert "fingerprint" in shown
    for value in DEMO_SECRETS.values():
        assert value not in shown
    assert "an admin connects erp-api (bearer, PUT, jq body)" in "\n".join(demo)
    for system in connected:  # every one can be previewed on the demo's records
        key = "customer:C-1001" if "customer" in system["entity_types"] else "order:O-5001"
        answer = await client.post(f"/api/v1/systems/{system['name']}/preview",
                                   json={"key": key})
        assert answer.status_code == 200, (system["name"], answer.text)
    erp = (await client.post("/api/v1/systems/erp-api/preview",
                             json={"key": "customer:C-1001"})).json()
    # a simulated system's request goes nowhere: its URL reads simulated:NAME (the template
    # is on the system's page)
    assert (erp["method"], erp["url"]) == ("PUT", "simulated:erp-api")
    assert erp["body"] == {"customerNumber": "C-1001", "displayName": "Acme GmbH",
                           "countryCode": "DE", "revision": 1}
    assert erp["headers"]["Authorization"] == "Bearer ***"
    signed = (await client.post("/api/v1/systems/partner-webhook/preview",
                                json={"key": "customer:C-1001"})).json()
    assert signed["headers"]["webhook-signature"] == "v1,***"
