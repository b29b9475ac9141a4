"""A worker's pass claims a batch, sends it at once and records every outcome in one
transaction (deliver_many): each delivery still gets exactly its own outcome, attempt row,
dead letter or ambiguous entry, and its system's circuit its own transitions. Real HTTP
servers on 127.0.0.1, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import text

from pipeline_console.delivery.service import (
    claim_due,
    claim_due_rows,
    deliver_due,
    deliver_many,
)
from pipeline_console.errors import NotFound
from tests.delivery.test_delivery import (
    add_system,
    attempts,
    circuit,
    deliveries,
    ingest,
    run_pass,
)
from tests.sink import Answer, ScriptedServer
from tests.support import message, wait_for


@pytest.fixture
def sinks() -> Iterator[dict[str, ScriptedServer]]:
    servers = {name: ScriptedServer().start() for name in ("ok", "rejects", "busy", "slow")}
    servers["rejects"].answer(Answer(422, body="bad customer"))
    servers["busy"].answer(Answer(503))
    servers["slow"].answer(Answer(200, delay_s=1.5))
    try:
        yield servers
    finally:
        for server in servers.values():
            server.stop()


async def test_one_pass_records_each_outcome_of_a_mixed_batch_as_its_own(client, sinks, clock):
    for name, server in sinks.items():
        await add_system(client, server, name=name, timeout_s=0.3 if name == "slow" else 5)
    await ingest(client, message(1))

    counts = await run_pass(client)

    assert counts["claimed"] == 4
    assert {k: counts.get(k) for k in ("delivered", "dead_lettered", "retry", "ambiguous")} == {
        "delivered": 1, "dead_lettered": 1, "retry": 1, "ambiguous": 1}
    status = {d["system"]: d["status"] for d in await deliveries(client)}
    assert status == {"ok": "delivered", "rejects": "dead_lettered", "busy": "pending",
                      "slow": "ambiguous"}
    for delivery in await deliveries(client):
        [attempt] = await attempts(client, delivery["id"])
        assert attempt["classification"] == {
            "ok": "success", "rejects": "permanent", "busy": "transient",
            "slow": "ambiguous"}[delivery["system"]]
    [dead] = (await client.get("/api/v1/dlq")).json()["items"]
    assert dead["classification"] == "permanent" and "bad customer" in dead["reason"]
    [outcome] = (await client.get("/api/v1/ambiguous")).json()["items"]
    assert outcome["reason"].startswith("maybe_sent")
    failures = {name: (await circuit(client, name))["consecutive_failures"] for name in sinks}
    assert failures == {"ok": 0, "rejects": 0, "busy": 1, "slow": 1}
    assert all(sum(server.keys_received().values()) == 1 for server in sinks.values())


async def test_a_success_after_failures_resets_the_circuits_count(client, sink, clock):
    sink.answer(Answer(503), Answer(200))
    await add_system(client, sink, failure_threshold=3, backoff_base_s=1, backoff_max_s=1)
    await ingest(client, message(1))
    await run_pass(client)
    assert (await circuit(client))["consecutive_failures"] == 1
    clock.advance(seconds=5)
    assert (await run_pass(client))["delivered"] == 1
    assert (await circuit(client))["consecutive_failures"] == 0


async def test_failures_in_one_batch_open_the_circuit_once(client, sink, clock):
    sink.answer(Answer(503))
    await add_system(client, sink, failure_threshold=2)
    await ingest(client, *[message(1, entity_id=f"B-{n}") for n in range(3)])
    counts = await run_pass(client)
    assert counts["retry"] == 3
    state = await circuit(client)
    # the third failure finds it open already: outcomes of sends under way change nothing
    assert (state["state"], state["consecutive_failures"]) == ("open", 2)
    events = (await client.get("/api/v1/audit?action=circuit.open")).json()["items"]
    assert len(events) == 1


async def test_a_batch_delivers_each_claimed_delivery_once_and_in_request_order(
        client, sink, clock):
    await add_system(client, sink)
    await ingest(client, *[message(1, entity_id=f"O-{n}") for n in range(5)])
    deliverer = client.app.state.deliverer
    claimed = await claim_due(deliverer, 3)
    assert len(claimed) == 3
    results = await deliver_many(deliverer, list(reversed(claimed)), trigger="scheduled",
                                 actor="tester")
    assert [result.delivery_id for result in results] == list(reversed(claimed))
    assert {result.outcome.value for result in results} == {"delivered"}
    # sending them again is refused: they are no longer claimed
    again = await deliver_many(deliverer, claimed, trigger="scheduled", actor="tester")
    assert {result.outcome.value for result in again} == {"not_claimed"}
    assert (await run_pass(client))["delivered"] == 2
    assert sorted(sink.keys_received().values()) == [1] * 5


async def test_an_outcome_that_cannot_be_recorded_does_not_strand_the_others(
        client, sink, clock):
    """When the batch's one transaction fails, each outcome is recorded on its own: here one
    delivery's row disappears while its request is under way (deleted by hand, a stand-in
    for any row the batch cannot record); the others are still recorded as delivered."""
    sink.answer(Answer(200, delay_s=0.5))
    await add_system(client, sink)
    await ingest(client, *[message(1, entity_id=f"S-{n}") for n in range(3)])
    deliverer = client.app.state.deliverer
    claimed = await claim_due(deliverer, 3)
    sending = asyncio.create_task(deliver_many(deliverer, claimed, trigger="scheduled",
                                               actor="tester"))
    await wait_for(lambda: len(sink.received) == 3, 5, "every request at the sink, waiting")
    gone = claimed[1]
    async with deliverer.database.transaction() as session:
        await session.execute(text("DELETE FROM deliveries WHERE id = :id"), {"id": gone})

    results = await sending

    assert isinstance(results[1], NotFound)
    assert [results[0].outcome.value, results[2].outcome.value] == ["delivered", "delivered"]
    assert {d["id"]: d["status"] for d in await deliveries(client)} == {
        claimed[0]: "delivered", claimed[2]: "delivered"}
    assert [len(await attempts(client, claimed[n])) for n in (0, 2)] == [1, 1]


async def test_a_pass_claims_its_batch_and_sends_it_a_few_at_a_time(client, sink, clock):
    """One claim for the whole batch, `concurrency` sends at once, and leases that last
    until the last wave has had its whole deadline: no claim expires while it waits."""
    sink.answer(Answer(200, delay_s=0.2))
    await add_system(client, sink, timeout_s=2)
    await ingest(client, *[message(1, entity_id=f"W-{n}") for n in range(5)])
    deliverer = client.app.state.deliverer
    now = clock()
    async with deliverer.database.transaction() as session:
        claimed = await claim_due_rows(session, deliverer, 5, concurrency=2)
    waves, deadline = 3, 2 * 2 + 1  # ceil(5 / 2); total_deadline_s(2)
    assert {row.lease_expires_at for row in claimed} == {
        now + timedelta(seconds=waves * deadline + deliverer.lease_margin_s)}
    results = await deliver_many(deliverer, [row.id for row in claimed], trigger="scheduled",
                                 actor="tester", concurrency=2)
    assert {result.outcome.value for result in results} == {"delivered"}
    assert sink.most_in_flight == 2 and len(sink.received) == 5

    await ingest(client, *[message(1, entity_id=f"V-{n}") for n in range(4)])
    counts = await deliver_due(deliverer, limit=50, concurrency=3)
    assert (counts["claimed"], counts["delivered"]) == (4, 4)
    assert sink.most_in_flight == 3


async def test_a_system_failing_in_a_pass_gets_no_more_of_it_than_its_threshold(
        client, sink, clock):
    """The rest of its claims are released unsent, so that the circuit can open after the
    pass as it would have had the deliveries been claimed a few at a time."""
    sink.answer(Answer(503))
    await add_system(client, sink, failure_threshold=2, max_attempts=10)
    await ingest(client, *[message(1, entity_id=f"F-{n}") for n in range(6)])
    deliverer = client.app.state.deliverer
    counts = await deliver_due(deliverer, limit=50, concurrency=1)
    assert (counts["claimed"], counts["retry"], counts["released"]) == (6, 2, 4)
    assert len(sink.received) == 2
    assert (await circuit(client))["state"] == "open"
    unsent = [d for d in await deliveries(client) if d["attempts"] == 0]
    assert len(unsent) == 4 and {d["status"] for d in unsent} == {"pending"}
    for delivery in unsent:
        assert await attempts(client, delivery["id"]) == []
    clock.advance(seconds=120)
    assert (await deliver_due(deliverer, limit=50, concurrency=1))["claimed"] == 0
    assert {d["status"] for d in await deliveries(client)} == {"held"}


async def test_a_stopping_worker_releases_the_claims_it_has_not_sent(client, sink, clock):
    sink.answer(Answer(200, delay_s=0.3))
    await add_system(client, sink)
    await ingest(client, *[message(1, entity_id=f"T-{n}") for n in range(4)])
    deliverer, stop = client.app.state.deliverer, asyncio.Event()
    passing = asyncio.create_task(deliver_due(deliverer, limit=50, concurrency=1, stop=stop))
    await wait_for(lambda: len(sink.received) == 1, 5, "the first send")
    stop.set()
    counts = await passing
    assert (counts["claimed"], counts["delivered"], counts["released"]) == (4, 1, 3)
    assert len(sink.received) == 1
    by_status = sorted(d["status"] for d in await deliveries(client))
    assert by_status == ["delivered", "pending", "pending", "pending"]
    assert (await deliver_due(deliverer, limit=50, concurrency=4))["delivered"] == 3


async def test_a_released_trial_hands_the_slot_to_the_next_held_delivery(client, sink, clock):
    sink.answer(Answer(503))
    await add_system(client, sink, failure_threshold=1, max_attempts=10)
    await ingest(client, message(1, entity_id="H-1"))
    await run_pass(client)
    await ingest(client, message(1, entity_id="H-2"))
    clock.advance(seconds=120)
    await run_pass(client)
    assert {d["status"] for d in await deliveries(client)} == {"held"}
    await client.post("/api/v1/circuits/billing/reset", json={"reason": "fixed"})
    sink.answer(Answer(200))
    deliverer, stop = client.app.state.deliverer, asyncio.Event()
    stop.set()  # the worker is stopping as the pass claims the circuit's one trial
    counts = await deliver_due(deliverer, limit=50, concurrency=1, stop=stop)
    assert (counts["claimed"], counts["released"]) == (1, 1)
    assert len(sink.received) == 1  # only the first pass's failure
    assert (await circuit(client))["state"] == "half_open"
    # the trial's slot was handed on, not left taken by a delivery that was never sent
    assert (await run_pass(client))["delivered"] == 1
    assert (await circuit(client))["state"] == "closed"
    assert (await run_pass(client))["delivered"] == 1


async def test_a_send_that_fails_unexpectedly_does_not_lose_the_rest_of_the_batch(
        client, sink, clock):
    await add_system(client, sink, name="ok")
    await client.post("/api/v1/systems", json={
        "name": "broken", "transport": "simulated", "entity_types": ["customer"],
        "simulation": {"seed": 1}})
    deliverer = client.app.state.deliverer
    async with deliverer.database.transaction() as session:  # a setting no API would take
        await session.execute(text(
            "UPDATE downstream_systems SET simulation = :bad WHERE name = 'broken'"),
            {"bad": '{"outcomes": {"success": "x"}}'})
    await ingest(client, message(1))
    counts = await deliver_due(deliverer, limit=50, concurrency=10)
    assert (counts["claimed"], counts["delivered"], counts["errors"]) == (2, 1, 1)
    status = {d["system"]: d["status"] for d in await deliveries(client)}
    assert status == {"ok": "delivered", "broken": "in_flight"}  # until its lease expires
