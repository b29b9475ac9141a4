"""Delivery cases found by review: each once failed (a 500, a stuck delivery, a deadlock,
an out-of-order or repeated send); on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import random

from pipeline_console.db import Database, create_engine
from pipeline_console.delivery.service import Deliverer, claim_due, deliver, deliver_due
from pipeline_console.delivery.transports import Transports
from tests.delivery.test_delivery import (
    add_system,
    circuit,
    deliveries,
    ingest,
    run_pass,
)
from tests.sink import Answer
from tests.support import message, wait_for


async def test_a_non_ascii_key_is_delivered_with_a_percent_encoded_header(client, sink):
    await add_system(client, sink)
    await ingest(client, message(1, entity_id="Müller"))
    assert (await run_pass(client))["delivered"] == 1
    assert sink.received[0].headers["Idempotency-Key"] == "customer:M%C3%BCller:1"
    assert sink.received[0].body["idempotency_key"] == "customer:Müller"


async def test_subscribing_twice_to_a_type_delivers_once(client, sink):
    await add_system(client, sink, entity_types=["customer", "customer"])
    await ingest(client, message(1))
    await run_pass(client)
    assert sink.keys_received() == {"customer:C-100:1": 1}


async def test_settings_that_once_gave_500s_are_422(client, sink):
    await add_system(client, sink)
    assert (await client.post("/api/v1/systems", json={
        "name": "x", "transport": "http", "url": "http://127.0.0.1:70000/"})).status_code == 422
    for field in ("timeout_s", "max_attempts", "entity_types", "classification_overrides"):
        response = await client.patch("/api/v1/systems/billing", json={field: None})
        assert response.status_code == 422, field
    nan = await client.post("/api/v1/systems", content=(
        b'{"name": "sim", "transport": "simulated", "simulation": {"outcomes": '
        b'{"success": NaN}}}'), headers={"content-type": "application/json"})
    assert nan.status_code == 422


async def test_a_corrected_payload_at_the_same_version_supersedes_the_unsent_one(client, sink,
                                                                                 clock):
    sink.answer(Answer(503), Answer(200))
    await add_system(client, sink, failure_threshold=10)
    await ingest(client, message(1, {"name": "A"}))
    await run_pass(client)  # A failed once and waits for its retry
    conflict = (await ingest(client, message(1, {"name": "B"}, source_system="crm")))[0]
    await client.post(f"/api/v1/anomalies/{conflict['anomaly_id']}/resolve",
                      json={"resolution": "accept_incoming", "note": "crm is right"})
    clock.advance(seconds=120)
    await run_pass(client)
    clock.advance(seconds=120)
    await run_pass(client)
    assert [r.body["payload"]["name"] for r in sink.received] == ["A", "B"]
    assert sorted(d["status"] for d in await deliveries(client)) == ["delivered", "superseded"]


async def test_an_answer_that_arrives_after_the_lease_expired_settles_the_outcome(
        client, sink, clock):
    sink.answer(Answer(200, delay_s=2.0))  # room to recover the claim while it is sent
    await add_system(client, sink, timeout_s=10)
    await ingest(client, message(1))
    deliverer = client.app.state.deliverer
    [delivery_id] = await claim_due(deliverer, 10)
    sending = asyncio.create_task(deliver(deliverer, delivery_id, trigger="scheduled",
                                          actor=deliverer.worker_id))
    await wait_for(lambda: sink.received, 10, "the request to arrive")
    clock.advance(minutes=10)  # the lease runs out while the request is on its way
    assert (await run_pass(client))["recovered_as_ambiguous"] == 1
    result = await sending
    assert result.classification == "success"
    [delivery] = await deliveries(client)
    assert delivery["status"] == "delivered"
    [outcome] = (await client.get("/api/v1/ambiguous")).json()["items"]
    assert (outcome["status"], outcome["resolution"]) == ("resolved", "delivered")


async def test_a_superseded_trial_hands_the_slot_to_the_next_held_delivery(client, sink, clock):
    sink.answer(Answer(503, delay_s=2.0), Answer(200))  # room to ingest v2 meanwhile
    await add_system(client, sink, failure_threshold=1, max_attempts=10, timeout_s=10)
    await ingest(client, message(1, {"v": 1}))
    first_pass = asyncio.create_task(run_pass(client))
    await wait_for(lambda: sink.received, 10, "the request to arrive")
    await ingest(client, message(2, {"v": 2}))  # v1 is in flight: not superseded yet
    await first_pass
    assert (await circuit(client))["state"] == "open"
    clock.advance(seconds=120)
    await run_pass(client)
    assert {d["status"] for d in await deliveries(client)} == {"held"}
    v1 = next(d for d in await deliveries(client) if d["version"] == 1)
    await client.post("/api/v1/circuits/billing/reset", json={"reason": "fixed"})
    assert (await run_pass(client))["superseded"] == 1  # v1 was the trial: superseded by v2
    assert (await client.post(f"/api/v1/deliveries/{v1['id']}/deliver")).status_code == 409
    assert (await run_pass(client))["delivered"] == 1  # v2 became the trial
    assert (await circuit(client))["state"] == "closed"
    assert [r.body["version"] for r in sink.received] == [1, 2]


async def test_forcing_open_during_a_trial_keeps_its_slot(client, sink, clock):
    sink.answer(Answer(503), Answer(200, delay_s=2.0))  # room for open and reset meanwhile
    await add_system(client, sink, failure_threshold=1, max_attempts=10, timeout_s=10)
    await ingest(client, message(1, entity_id="A"), message(1, entity_id="B"))
    await run_pass(client)
    assert (await circuit(client))["state"] == "open"
    await client.post("/api/v1/circuits/billing/reset", json={"reason": "try"})
    clock.advance(seconds=120)
    trial = asyncio.create_task(run_pass(client))
    await wait_for(lambda: len(sink.received) >= 3, 10, "the trial to be sent")
    await client.post("/api/v1/circuits/billing/open", json={"reason": "maintenance"})
    await client.post("/api/v1/circuits/billing/reset", json={"reason": "again"})
    assert (await run_pass(client))["claimed"] == 0  # the first trial still holds the slot
    await trial
    assert (await circuit(client))["state"] == "closed"


async def test_concurrent_workers_ingestion_and_operators_never_fail_or_reorder(
        settings, client, sink):
    await add_system(client, sink, failure_threshold=3, max_attempts=50, backoff_base_s=0,
                     backoff_max_s=0)
    keys = [f"K-{i}" for i in range(8)]
    stop = asyncio.Event()
    databases = [Database(create_engine(settings)) for _ in range(3)]
    errors: list[BaseException] = []

    async def worker(database: Database, number: int) -> None:
        async with Transports.open() as transports:
            deliverer = Deliverer(database, transports, client.app.state.clock,
                                  worker_id=f"stress-{number}")
            while not stop.is_set():
                counts = await deliver_due(deliverer, limit=5, concurrency=5)
                if counts.get("errors"):
                    errors.append(RuntimeError(f"worker {number}: {counts}"))
                await asyncio.sleep(0.01)

    async def ingester() -> None:
        version, rng = 1, random.Random(5)
        while not stop.is_set():
            version += 1
            await ingest(client, *[message(version, {"v": version}, entity_id=key)
                                   for key in rng.sample(keys, 3)])
            await asyncio.sleep(0.02)

    async def operator() -> None:
        while not stop.is_set():
            for action in ("open", "reset"):
                await client.post(f"/api/v1/circuits/billing/{action}", json={"reason": "t"})
                await asyncio.sleep(0.05)

    sink.answer(Answer(200))
    tasks = [asyncio.create_task(worker(db, n)) for n, db in enumerate(databases)]
    tasks += [asyncio.create_task(ingester()), asyncio.create_task(operator())]
    await asyncio.sleep(4)
    stop.set()
    try:
        for task in tasks:
            try:
                await task
            except Exception as error:  # every task must end cleanly
                errors.append(error)
    finally:
        for database in databases:
            await database.dispose()
    assert errors == []
    last_seen: dict[str, int] = {}
    for received in sink.received:
        key, version = received.body["idempotency_key"], received.body["version"]
        assert version >= last_seen.get(key, 0), f"{key}: {version} after {last_seen[key]}"
        last_seen[key] = version
