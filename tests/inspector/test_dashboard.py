"""GET /api/v1/dashboard: the attention items match the queues."""

from __future__ import annotations

import asyncio
import html
import re
import threading

from pipeline_console.delivery.workers import Identity, Liveness, heartbeat
from tests.delivery.test_delivery import add_system, deliveries, ingest, run_pass
from tests.sink import Answer, ScriptedServer
from tests.support import message, wait_for


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


async def listed(client, path: str) -> int:
    """How many items the API list at `path` holds, across its pages."""
    total, cursor = 0, None
    while True:
        url = f"{path}{'&' if '?' in path else '?'}limit=500"
        response = await client.get(url + (f"&cursor={cursor}" if cursor else ""))
        assert response.status_code == 200, (path, response.text)
        body = response.json()
        total += len(body["items"])
        if not (cursor := body["next_cursor"]):
            return total


def console_rows(page: str) -> int:
    """The rows of a console page's list (its table marked data-list), empty-state row aside."""
    [table] = re.findall(r"<table data-list[^>]*>(.*?)</table>", page, flags=re.S)
    return len(re.findall(r"<tr><td(?! colspan)", table))


class TestEveryItemLinksToExactlyWhatItCounts:
    async def test_following_each_items_path_lists_as_many_rows_as_its_count(
        self, client, sink, clock
    ):
        """Every attention item, in the API and on the console's dashboard, with a count above
        zero: the list its path opens has exactly that many rows. The delivery backlog of
        crm-sync holds one delivery of each waiting status: pending, held and in flight."""
        await fill_every_queue(client, sink)  # billing: dead letter, ambiguous, open circuit
        await ingest(client, message(2, {"name": "B2", "country": "DE"}, entity_id="B"))
        await add_system(client, sink, name="ledger", entity_types=["invoice"])
        await client.post("/api/v1/circuits/ledger/open", json={"reason": "maintenance"})
        await client.post("/api/v1/circuits/ledger/reset", json={"reason": "try one"})
        refused = await client.post("/api/v1/replays", json={
            "reason": "resend", "items": [{"key": "customer:P", "system": "billing"}]})
        assert refused.status_code == 409  # stored as rejected
        await heartbeat(client.app.state.database, Identity("worker:gone", "box-9", 9),
                        Liveness(30, 5), clock)  # a worker that is never seen again
        clock.advance(hours=2)  # the partial record P now waits too long; the worker is lost

        downstream, gate = ScriptedServer().start(), threading.Event()
        downstream.answer(Answer(200, hold=gate))
        await add_system(client, downstream, name="crm-sync", entity_types=["order"],
                         timeout_s=60)
        sending = None
        try:
            await ingest(client, message(1, {"total": 1}, entity_type="order", entity_id="O-1"))
            sending = asyncio.create_task(run_pass(client))
            await wait_for(lambda: len(downstream.received) == 1, 15, "O-1 to be in flight")
            await client.post("/api/v1/circuits/crm-sync/open", json={"reason": "maintenance"})
            await ingest(client, message(1, {"total": 2}, entity_type="order", entity_id="O-2"))
            await run_pass(client)  # O-2 is held behind the open circuit
            await ingest(client, message(1, {"total": 3}, entity_type="order", entity_id="O-3"))
            waiting = {d["status"] for d in await deliveries(client, system="crm-sync")}
            assert waiting == {"pending", "held", "in_flight"}

            body, items = await dashboard(client)
            assert {name for name, _ in items} == {
                "open_anomalies", "dead_letters", "ambiguous_outcomes", "open_circuits",
                "half_open_circuits", "stale_partials", "delivery_backlog",
                "unsuccessful_replays", "lost_workers"}
            assert items[("delivery_backlog", "crm-sync")]["count"] == 3
            mismatches = []
            for item in body["items"]:
                assert item["count"] > 0, item  # every item is exercised
                shown = await listed(client, item["path"])
                if shown != item["count"]:
                    mismatches.append((item["name"], item["system"], item["path"],
                                       item["count"], shown))
            assert mismatches == [], mismatches

            page = (await client.get("/")).text
            cards = re.findall(r'<a class="card \w+" href="([^"]+)" data-item="(\w+)"[^>]*>\s*'
                               r'<div class="count">(\d+)</div>', page)
            assert len(cards) == len(body["items"])
            for href, name, count in cards:
                href = html.unescape(href)
                listing = await client.get(f"{href}{'&' if '?' in href else '?'}limit=500")
                assert listing.status_code == 200, (href, listing.text[:300])
                if console_rows(listing.text) != int(count):
                    mismatches.append((name, href, int(count), console_rows(listing.text)))
            assert mismatches == [], mismatches
        finally:
            gate.set()
            if sending is not None:
                await sending
            downstream.stop()
