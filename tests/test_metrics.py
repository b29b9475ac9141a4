"""GET /metrics and the worker's metrics port: process counters and database gauges, parsed
as Prometheus parses them.

Counters belong to the process and tests share it (one after another per xdist worker), so
counter tests compare a scrape before with a scrape after, and use names of their own."""

from __future__ import annotations

import asyncio
import signal
import socket
import uuid
from datetime import UTC, datetime

import httpx
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event

from pipeline_console import metrics
from pipeline_console.app import create_app
from pipeline_console.config import Settings
from pipeline_console.consumers.registry import (
    ConsumerIdentity,
    Counts,
    heartbeat,
    mark_stopped,
)
from pipeline_console.db import Database, create_engine
from tests.delivery.test_delivery import add_system, deliveries, ingest, run_pass
from tests.delivery.test_worker import start_worker
from tests.inspector.test_dashboard import fill_every_queue
from tests.sink import Answer
from tests.support import message, wait_for
from tests.test_operations import run_cli

Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class TestIngestionDecisions:
    async def test_every_branch_is_counted_by_decision_and_source(self, client):
        erp, crm = unique("erp"), unique("crm")
        entity = unique("C")
        before = await scrape(client)
        first = message(1, {"name": "A"}, source_system=erp, entity_id=entity)
        assert (await client.post("/api/v1/messages", json=first)).json()["decision"] == (
            "accept_new")
        assert (await client.post("/api/v1/messages", json=first)).status_code == 200
        invalid_with_source = {"source_system": erp, "entity_type": "customer"}
        results = await ingest(
            client,
            message(2, {"name": "B"}, source_system=crm, entity_id=entity),
            message(1, {"name": "A"}, source_system=crm, entity_id=entity),
            message(2, {"name": "C"}, source_system=erp, entity_id=entity),
            invalid_with_source,
            {"version": 1},
        )
        assert [r.get("decision") for r in results] == [
            "accept_supersede", "skip_stale", "quarantine", None, None]
        broken = await client.post("/api/v1/messages", content=b"{not json",
                                   headers={"content-type": "application/json"})
        assert broken.status_code == 422
        after = await scrape(client)

        def delta(decision: str, source: str) -> float:
            name = "pipeline_ingestion_decisions_total"
            labels = {"decision": decision, "source_system": source}
            return value(after, name, **labels) - value(before, name, **labels)

        assert delta("accept_new", erp) == 1
        assert delta("skip_duplicate", erp) == 1
        assert delta("accept_supersede", crm) == 1
        assert delta("skip_stale", crm) == 1
        assert delta("quarantine", erp) == 1
        assert delta("rejected", erp) == 1
        assert delta("rejected", "unknown") == 2
        assert delta("accept_new", crm) == delta("skip_duplicate", crm) == 0

    async def test_a_failing_commit_counts_nothing(self, client, database):
        source = unique("erp")
        before = await scrape(client)

        def refuse_commit(_connection):
            raise RuntimeError("disk full (simulated at commit)")

        event.listen(database.engine.sync_engine, "commit", refuse_commit)
        try:
            response = await client.post("/api/v1/messages", json=message(
                1, source_system=source))
        finally:
            event.remove(database.engine.sync_engine, "commit", refuse_commit)
        assert response.status_code == 500
        after = await scrape(client)
        labels = {"decision": "accept_new", "source_system": source}
        assert value(after, "pipeline_ingestion_decisions_total", **labels) == value(
            before, "pipeline_ingestion_decisions_total", **labels) == 0


class TestSourceLabels:
    def test_long_names_are_cut_and_new_names_past_the_cap_become_other(self, monkeypatch):
        monkeypatch.setattr(metrics, "_source_labels", set())
        monkeypatch.setattr(metrics, "MAX_SOURCE_LABELS", 2)
        assert metrics.source_label("x" * 500) == "x" * metrics.SOURCE_LABEL_LENGTH
        assert metrics.source_label(None) == metrics.source_label("") == "unknown"
        assert metrics.source_label("erp") == "erp"
        assert metrics.source_label("crm") == "other"  # a third distinct name
        assert metrics.source_label("erp") == "erp"  # names already seen keep their label

    def test_a_rejected_messages_source_never_takes_a_label(self, monkeypatch):
        monkeypatch.setattr(metrics, "_source_labels", set())
        monkeypatch.setattr(metrics, "MAX_SOURCE_LABELS", 2)
        for n in range(10):  # garbage from rejected messages
            assert metrics.source_label(f"junk {n} !!", validated=False) == "unknown"
        assert metrics.source_label("erp") == "erp"
        assert metrics.source_label("erp", validated=False) == "erp"  # a known name is kept
        assert metrics.source_label("billing") == "billing"  # the cap is still free


class TestDeliveryAttempts:
    async def test_a_pass_and_deliver_now_are_counted_by_system_and_classification(
            self, client, sink):
        system = unique("billing")
        sink.answer(Answer(503), Answer(400), Answer(200))
        await add_system(client, sink, name=system, failure_threshold=10)
        before = await scrape(client)
        await ingest(client, *[message(1, entity_id=unique("D")) for _ in range(3)])
        result = await run_pass(client)
        assert (result["retry"], result["dead_lettered"], result["delivered"]) == (1, 1, 1)
        [waiting] = await deliveries(client, system=system, status="pending")
        manual = await client.post(f"/api/v1/deliveries/{waiting['id']}/deliver")
        assert manual.status_code == 200 and manual.json()["classification"] == "success"
        after = await scrape(client)

        def delta(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        attempts = "pipeline_delivery_attempts_total"
        assert delta(attempts, system=system, classification="success") == 2
        assert delta(attempts, system=system, classification="transient") == 1
        assert delta(attempts, system=system, classification="permanent") == 1
        assert delta(attempts, system=system, classification="ambiguous") == 0
        assert delta("pipeline_delivery_latency_seconds_count", system=system) == 4
        assert delta("pipeline_delivery_latency_seconds_sum", system=system) > 0


class TestDatabaseGauges:
    async def test_the_circuit_state_is_read_from_the_database(
            self, client, sink, clock, database_url):
        clock.now = datetime.now(UTC)  # the CLI runs on the real clock
        sink.answer(Answer(503))
        await add_system(client, sink, failure_threshold=1)
        samples = await scrape(client)
        states = {state: value(samples, "pipeline_circuit_state", system="billing", state=state)
                  for state in ("closed", "open", "half_open")}
        assert states == {"closed": 1, "open": 0, "half_open": 0}

        await ingest(client, message(1))
        # Another process sends and opens the circuit: this one learns it from the database.
        result = await asyncio.to_thread(run_cli, database_url, "jobs", "run", "deliver_due")
        assert result.returncode == 0, result.stderr
        samples = await scrape(client)
        states = {state: value(samples, "pipeline_circuit_state", system="billing", state=state)
                  for state in ("closed", "open", "half_open")}
        assert states == {"closed": 0, "open": 1, "half_open": 0}

        await client.post("/api/v1/circuits/billing/reset", json={"reason": "fixed"})
        samples = await scrape(client)
        assert value(samples, "pipeline_circuit_state", system="billing", state="half_open") == 1
        assert value(samples, "pipeline_circuit_state", system="billing", state="open") == 0

    async def test_the_queue_depths_match_the_dashboard(self, client, sink, clock):
        await fill_every_queue(client, sink, more_systems=[("archive", ["order"])])
        await ingest(client, message(1, {"name": "C", "country": "DE"}, entity_id="C"))
        await run_pass(client)  # the open circuit holds C
        await ingest(client, message(1, {"name": "D", "country": "DE"}, entity_id="D"))
        clock.advance(hours=2)  # every partial is now stale on the dashboard too

        samples = await scrape(client)
        items = {(item["name"], item["system"]): item["count"]
                 for item in (await client.get("/api/v1/dashboard")).json()["items"]}

        def depth(queue: str, system: str = "") -> float:
            return value(samples, "pipeline_queue_depth", queue=queue, system=system)

        assert depth("open_anomalies") == items[("open_anomalies", None)] == 1
        assert depth("partial_staging") == items[("stale_partials", None)] == 1
        assert depth("dead_letters", "billing") == items[("dead_letters", "billing")] == 1
        assert (depth("ambiguous_outcomes", "billing") + depth("ambiguous_outcomes", "archive")
                == items[("ambiguous_outcomes", None)] == 1)
        backlog = [depth(f"deliveries_{status}", "billing")
                   for status in ("pending", "held", "in_flight")]
        assert backlog == [1, 1, 0]
        assert sum(backlog) == items[("delivery_backlog", "billing")]
        # A system with nothing waiting still has its series, at 0.
        assert ("pipeline_queue_depth",
                frozenset({"queue": "dead_letters", "system": "archive"}.items())) in samples
        assert depth("dead_letters", "archive") == 0
        assert value(samples, "pipeline_database_up") == 1

    async def test_the_broker_consumers_by_kind_and_status_and_their_backlogs(
            self, client, clock):
        database = client.app.state.database
        samples = await scrape(client)
        consumers = {(dict(labels)["kind"], dict(labels)["status"]): count
                     for (name, labels), count in samples.items()
                     if name == "pipeline_intake_consumers"}
        assert consumers == {(kind, status): 0 for kind in ("rabbitmq", "nats")
                             for status in ("alive", "lost", "stopped")}

        def consumer(name: str, kind: str, queue: str) -> ConsumerIdentity:
            return ConsumerIdentity(kind, f"amqp://ops:pw-{name}@broker:5672/", queue,
                                    host="box", pid=1, id=f"consumer:{name}")

        lost, stopped = consumer("lost", "nats", "S/lost"), consumer("stop", "rabbitmq", "q")
        first, second = consumer("a", "rabbitmq", "orders"), consumer("b", "rabbitmq", "orders")
        await heartbeat(database, lost, Counts(), 70, clock.now)
        await heartbeat(database, stopped, Counts(), 0, clock.now)
        await mark_stopped(database, stopped, Counts(), clock.now)
        await heartbeat(database, first, Counts(), 100, clock.now)
        await heartbeat(database, second, Counts(), 100, clock.now)
        clock.advance(seconds=20)
        await heartbeat(database, first, Counts(), 150, clock.now)
        clock.advance(seconds=20)
        await heartbeat(database, second, Counts(), 180, clock.now)  # the latest report
        samples = await scrape(client)
        text = (await client.get("/metrics")).text

        assert value(samples, "pipeline_intake_consumers", kind="rabbitmq", status="alive") == 2
        assert value(samples, "pipeline_intake_consumers", kind="rabbitmq",
                     status="stopped") == 1
        assert value(samples, "pipeline_intake_consumers", kind="nats", status="lost") == 1
        assert value(samples, "pipeline_intake_consumers", kind="nats", status="alive") == 0
        backlogs = {dict(labels)["queue"]: count for (name, labels), count in samples.items()
                    if name == "pipeline_intake_backlog"}
        assert backlogs == {"orders": 180}  # one series per live queue: not lost, not stopped
        assert value(samples, "pipeline_intake_backlog_growing_seconds", kind="rabbitmq",
                     queue="orders") == 0  # b's first growth was at this very heartbeat
        clock.advance(seconds=15)
        samples = await scrape(client)
        assert value(samples, "pipeline_intake_backlog_growing_seconds", kind="rabbitmq",
                     queue="orders") == 15
        assert "pw-" not in text and "//ops" not in text and "consumer:" not in text

        clock.advance(hours=25)  # a day later, nobody is counted any more
        samples = await scrape(client)
        gauges = ("pipeline_intake_consumers", "pipeline_intake_backlog",
                  "pipeline_intake_backlog_growing_seconds")
        assert not any(count for (name, _), count in samples.items() if name in gauges)
        assert not any(name.startswith("pipeline_intake_backlog") for name, _ in samples)

    async def test_without_the_database_the_counters_are_still_served(self):
        # METRICS_AUTH=open: a scrape without a token, and no database to check one against
        settings = Settings(database_url="postgresql+asyncpg://nobody@127.0.0.1:1/none",
                            metrics_auth="open")
        database = Database(create_engine(settings))
        app = create_app(settings, database=database)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            await client.get("/healthz")
            samples = await scrape(client)
        await database.dispose()
        assert value(samples, "pipeline_database_up") == 0
        assert not any(name == "pipeline_queue_depth" for name, _ in samples)
        assert value(samples, "pipeline_http_request_duration_seconds_count",
                     method="GET", route="/healthz", status="200") >= 1


class TestRequestDurations:
    async def test_requests_are_labelled_by_route_template_never_by_raw_path(self, client):
        key, stray = f"customer:{unique('X')}", unique("no-such-path")
        before = await scrape(client)
        assert (await client.get(f"/api/v1/inspect/{key}")).status_code == 404
        assert (await client.get(f"/{stray}/42")).status_code == 404
        response = await client.get("/metrics")
        assert key not in response.text and key.split(":")[1] not in response.text
        assert stray not in response.text
        after = parse(response.text)

        def delta(route: str) -> float:
            labels = {"method": "GET", "route": route, "status": "404"}
            name = "pipeline_http_request_duration_seconds_count"
            return value(after, name, **labels) - value(before, name, **labels)

        assert delta("/api/v1/inspect/{key:path}") == 1
        assert delta("unmatched") == 1
        routes = {dict(labels).get("route") for name, labels in after
                  if name == "pipeline_http_request_duration_seconds_count"}
        assert "/metrics" in routes  # the earlier scrape, by its own template
        assert all(route == "unmatched" or route.startswith("/") for route in routes)
        errors = "pipeline_http_errors_total"
        assert value(after, errors, route="/api/v1/inspect/{key:path}", **{"class": "4xx"}) - (
            value(before, errors, route="/api/v1/inspect/{key:path}", **{"class": "4xx"})) == 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_the_worker_serves_its_counters_on_its_metrics_port(
        database_url, client, sink, clock, tmp_path):
    clock.now = datetime.now(UTC)  # worker processes run on the real clock
    await add_system(client, sink)
    await ingest(client, message(1))
    port = free_port()
    worker = start_worker(database_url, tmp_path / "worker.log", worker_metrics_port=port)
    url = f"http://127.0.0.1:{port}/metrics"
    labels = {"system": "billing", "classification": "success"}

    async def delivered_count() -> float:
        try:
            async with httpx.AsyncClient() as http:
                return value(parse((await http.get(url, timeout=5)).text),
                             "pipeline_delivery_attempts_total", **labels)
        except httpx.TransportError:
            return -1.0  # not listening yet

    try:
        await wait_for(lambda: len(sink.received) == 1, 30, "the worker's send")
        deadline = asyncio.get_running_loop().time() + 30
        while (count := await delivered_count()) != 1:
            assert asyncio.get_running_loop().time() < deadline, f"count is {count}"
            await asyncio.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, (tmp_path / "worker.log").read_text()
    [delivery] = await deliveries(client)
    assert delivery["status"] == "delivered"
