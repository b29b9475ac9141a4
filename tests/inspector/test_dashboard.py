"""GET /api/v1/dashboard: the attention items match the queues."""

from __future__ import annotations

from tests.delivery.test_delivery import add_system, ingest, run_pass
from tests.sink import Answer
from tests.support import message


async def dashboard(client):
    body = (await client.get("/api/v1/dashboard")).json()
    return body, {(item["name"], item["system"]): item for item in body["items"]}


async def test_a_quiet_pipeline_needs_no_attention(client):
    body, _ = await dashboard(client)
    assert {item["severity"] for item in body["items"]} == {"ok"}
    assert all(item["count"] == 0 for item in body["items"])


async def fill_every_queue(client, sink, *, more_systems=()) -> None:
    """A dead letter, an ambiguous outcome, a partial record, a conflict and an open circuit
    (billing); `more_systems` are added (by name) before anything is delivered."""
    await client.put("/api/v1/entity-types/customer",
                     json={"schema": {"required": ["country"]}})
    # the 400 must come back within the timeout even on a loaded machine (the sink's threads
    # share the test's GIL): a 0.3 s timeout once turned it into a second ambiguous outcome
    sink.answer(Answer(400), Answer(200, delay_s=3.0))
    await add_system(client, sink, timeout_s=1.0)
    for name, entity_types in more_systems:
        await add_system(client, sink, name=name, entity_types=entity_types)
    await ingest(client, message(1, {"name": "A", "country": "DE"}, entity_id="A"),
                 message(1, {"name": "B", "country": "DE"}, entity_id="B"))
    await run_pass(client)  # one 400 (dead letter), one timeout after sending (ambiguous)
    await ingest(client, message(1, {"name": "P"}, entity_id="P"))  # partial
    await ingest(client, message(1, {"name": "A", "country": "AT"}, entity_id="A",
                                 source_system="crm"))  # conflict
    await client.post("/api/v1/circuits/billing/open", json={"reason": "maintenance"})


async def test_the_counts_match_the_queues(client, sink, clock):
    await fill_every_queue(client, sink)
    await ingest(client, message(2, {"name": "B2", "country": "DE"}, entity_id="B"))
    clock.advance(hours=2)

    body, items = await dashboard(client)
    assert items[("open_anomalies", None)]["count"] == 1
    assert items[("dead_letters", "billing")]["count"] == 1
    assert items[("dead_letters", "billing")]["severity"] == "critical"
    assert items[("dead_letters", "billing")]["path"] == "/api/v1/dlq?system=billing&status=open"
    assert items[("ambiguous_outcomes", None)]["count"] == 1
    assert items[("open_circuits", None)]["count"] == 1
    assert items[("stale_partials", None)]["count"] == 1
    backlog = items[("delivery_backlog", "billing")]
    assert backlog["count"] == 1 and backlog["severity"] == "critical"
    assert backlog["oldest_age_s"] >= 7200
    for item in body["items"]:  # every path is a working list endpoint
        assert (await client.get(item["path"])).status_code == 200
    assert body["rates"]["last_hour"]["ingestion"] == {}  # two hours have passed
    clock.advance(hours=-2)
    body, _ = await dashboard(client)
    assert body["rates"]["last_hour"]["ingestion"]["accept_new"] == 3
    assert body["rates"]["last_hour"]["delivery"] == {"permanent": 1, "ambiguous": 1}
