"""Limits shared by every worker, and Retry-After back-pressure: the claim never takes more
than a system's max_in_flight or max_per_second allow, whoever claims; a 429 or 503 with
Retry-After throttles the whole system (no claim, no send before then) without moving its
circuit or using up a delivery's tries. Real HTTP servers on 127.0.0.1; both databases,
and three real worker processes on PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import signal
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, text

from pipeline_console.delivery.base import Deliverer
from pipeline_console.delivery.claims import claim_due
from pipeline_console.delivery.pipeline import Pipeline
from pipeline_console.delivery.policy import (
    Breaker,
    CircuitEvent,
    CircuitState,
    Classification,
    SendResult,
    Step,
    breaker_event,
    classify,
    next_step,
    rate_burst,
    refill,
    throttle_s,
    transition,
)
from pipeline_console.delivery.service import deliver_many
from pipeline_console.delivery.transports import Transports
from tests.conftest import TEST_SECRET_KEY
from tests.delivery.test_delivery import (
    add_system,
    attempts,
    circuit,
    deliveries,
    ingest,
    run_pass,
)
from tests.delivery.test_worker import start_worker
from tests.sink import Answer, ScriptedServer
from tests.support import message, wait_for

pytestmark = pytest.mark.backends


def customers(count: int, prefix: str = "L") -> list[dict]:
    return [message(1, entity_id=f"{prefix}-{n:04}") for n in range(count)]


class TestThePolicy:
    def test_a_429_or_503_with_retry_after_is_a_throttle_and_without_it_a_failure(self):
        assert classify(SendResult(status=429, retry_after_s=2), []) == (
            Classification.TRANSIENT, "throttled:429")
        assert classify(SendResult(status=503, retry_after_s=2), []) == (
            Classification.TRANSIENT, "throttled:503")
        assert classify(SendResult(status=429), []) == (Classification.TRANSIENT,
                                                        "transient:429")
        # the system's own rule for the status wins: no throttle then
        overridden = classify(SendResult(status=429, retry_after_s=2),
                              [{"status": 429, "classification": "permanent"}])
        assert overridden == (Classification.PERMANENT, "override:429")
        assert throttle_s(SendResult(status=429, retry_after_s=2), "throttled:429") == 2
        assert throttle_s(SendResult(status=429, retry_after_s=86_400), "throttled:429") == 900
        assert throttle_s(SendResult(status=429, retry_after_s=2), "override:429") is None

    def test_a_throttle_moves_no_circuit_and_exhausts_no_delivery(self):
        assert breaker_event(Classification.TRANSIENT, "throttled:429") is CircuitEvent.NONE
        assert breaker_event(Classification.TRANSIENT, "transient:429") is CircuitEvent.FAILURE
        closed = Breaker(CircuitState.CLOSED, 2)
        assert transition(closed, CircuitEvent.NONE, threshold=3) == closed
        assert next_step(Classification.TRANSIENT, 99, 3, "throttled:429") is Step.RETRY
        assert next_step(Classification.TRANSIENT, 3, 3, "transient:503") is Step.DEAD_LETTER

    def test_the_bucket_refills_at_the_rate_up_to_a_fifth_of_a_second(self):
        assert rate_burst(100) == 20 and rate_burst(0.5) == 1
        assert refill(None, 0, 100) == 20  # a bucket never used starts full
        assert refill(0.0, 0.05, 100) == pytest.approx(5)
        assert refill(3.0, 60, 100) == 20
        assert refill(-2.0, 0.01, 100) == pytest.approx(-1)  # an operator's debt is repaid
        assert refill(4.0, -5, 100) == 4  # another machine's clock behind adds nothing


def another_worker(deliverer: Deliverer, name: str = "worker:other") -> Deliverer:
    return dataclasses.replace(deliverer, worker_id=name)


class TestTheClaim:
    async def test_no_claim_goes_beyond_max_in_flight_whichever_worker_claims(
            self, client, sink):
        await add_system(client, sink, max_in_flight=3)
        await ingest(client, *customers(10))
        deliverer = client.app.state.deliverer
        claimed = await claim_due(deliverer, 10)
        assert len(claimed) == 3  # claimed and not sent yet: they count
        assert await claim_due(another_worker(deliverer), 10) == []
        await deliver_many(deliverer, claimed[:1], trigger="scheduled", actor="tester")
        assert len(await claim_due(another_worker(deliverer), 10)) == 1  # one slot freed

    async def test_max_per_second_claims_the_whole_tokens_there_are(self, client, sink, clock):
        await add_system(client, sink, max_per_second=10)  # a bucket of 2
        await ingest(client, *customers(10))
        deliverer = client.app.state.deliverer
        assert len(await claim_due(deliverer, 10)) == 2
        assert await claim_due(another_worker(deliverer), 10) == []
        clock.advance(seconds=0.15)  # 1.5 tokens
        assert len(await claim_due(another_worker(deliverer), 10)) == 1
        clock.advance(seconds=0.06)  # 0.5 left + 0.6: one whole token again
        assert len(await claim_due(deliverer, 10)) == 1
        clock.advance(seconds=60)  # the bucket holds no more than its burst
        assert len(await claim_due(deliverer, 10)) == 2

    async def test_a_limited_backlog_does_not_keep_other_systems_waiting(
            self, client, sink, clock):
        await add_system(client, sink, name="paced", max_per_second=1)
        await add_system(client, sink, name="orders", entity_types=["order"])
        await ingest(client, *customers(60))  # older than every order: first in the queue
        clock.advance(seconds=1)
        await ingest(client, *[message(1, entity_type="order", entity_id=f"O-{n}")
                               for n in range(5)])
        claimed = await claim_due(client.app.state.deliverer, 10)
        systems = [d["system"] for d in await deliveries(client, status="in_flight")]
        assert len(claimed) == 6
        assert sorted(systems) == ["orders"] * 5 + ["paced"]

    async def test_an_operator_send_keeps_max_in_flight_and_the_throttle(self, client, sink,
                                                                         clock):
        await add_system(client, sink, max_in_flight=1, backoff_base_s=0.01)
        await ingest(client, *customers(3))
        [held] = await claim_due(client.app.state.deliverer, 10)
        waiting = [d for d in await deliveries(client, status="pending")]
        response = await client.post(f"/api/v1/deliveries/{waiting[0]['id']}/deliver")
        assert response.status_code == 409
        assert "max_in_flight" in response.json()["detail"]

        sink.answer(Answer(429, headers={"Retry-After": "30"}), Answer(200))
        await deliver_many(client.app.state.deliverer, [held], trigger="scheduled",
                           actor="tester")
        response = await client.post(f"/api/v1/deliveries/{waiting[0]['id']}/deliver")
        assert response.status_code == 409
        assert "Retry-After" in response.json()["detail"]
        clock.advance(seconds=31)
        response = await client.post(f"/api/v1/deliveries/{waiting[0]['id']}/deliver")
        assert response.status_code == 200, response.text

    async def test_a_system_without_limits_is_claimed_as_before(self, client, sink, database):
        """No lock of its row and no count of its sends: the claim costs what it cost."""
        await add_system(client, sink)
        await ingest(client, *customers(5))
        statements: list[str] = []

        def seen(_conn, _cursor, statement, *_args) -> None:
            statements.append(statement)

        event.listen(database.engine.sync_engine, "before_cursor_execute", seen)
        try:
            assert len(await claim_due(client.app.state.deliverer, 10)) == 5
        finally:
            event.remove(database.engine.sync_engine, "before_cursor_execute", seen)
        touching_systems = [s for s in statements if "downstream_systems" in s
                            and ("FOR UPDATE" in s or s.lstrip().startswith("UPDATE"))]
        assert touching_systems == []
        assert not [s for s in statements if "count(" in s.lower()]


class TestThrottling:
    async def test_retry_after_throttles_the_system_without_moving_its_circuit(
            self, client, sink, clock):
        """A real pipeline on the real clock, one send at a time: the first answer is 429
        with Retry-After: 2. The claims it holds for that system are released unsent, and
        nothing reaches the sink before the two seconds are over."""
        clock.now = datetime.now(UTC)  # the deliveries are due for the real clock
        sink.answer(Answer(429, body="slow down", headers={"Retry-After": "2"}), Answer(200))
        await add_system(client, sink, failure_threshold=1, max_attempts=1,
                         backoff_base_s=0.01)
        await ingest(client, *customers(5))
        async with Transports.open() as transports:
            worker = Deliverer(client.app.state.database, transports,
                               lambda: datetime.now(UTC), worker_id="worker:throttle",
                               rng=random.Random(1))
            stop = asyncio.Event()
            pipeline = Pipeline(worker, concurrency=1, batch_size=10, stop=stop,
                                poll_interval_s=0.05)
            running = asyncio.create_task(pipeline.run())
            try:
                await wait_for(lambda: len(sink.received) >= 1, 30, "the first send")
                shown = await throttled_until(client)
                left = (shown - datetime.now(UTC)).total_seconds()
                assert 0 < left <= 2, left
                assert (await circuit(client))["state"] == "closed"
                await wait_for(lambda: len(sink.keys_received()) == 5, 30, "every record")
                await wait_for(lambda: len(sink.received) == 6, 10, "the retried one")
            finally:
                stop.set()
                await asyncio.wait_for(running, 30)
        first, *others = sink.received
        waited = [later.at - first.at for later in others]
        assert min(waited) >= 2.0, waited
        breaker = await circuit(client)
        assert (breaker["state"], breaker["consecutive_failures"]) == ("closed", 0)
        # max_attempts 1 and failure_threshold 1, yet nothing was dead-lettered or opened
        assert {d["status"] for d in await deliveries(client)} == {"delivered"}
        throttled = [d for d in await deliveries(client) if d["attempts"] == 2]
        [first_try, _] = await attempts(client, throttled[0]["id"])
        assert (first_try["classification"], first_try["rule"]) == ("transient",
                                                                    "throttled:429")

    async def test_throttled_tries_do_not_count_toward_max_attempts(self, client, sink, clock):
        sink.answer(Answer(429, headers={"Retry-After": "1"}),
                    Answer(503, headers={"Retry-After": "1"}), Answer(503), Answer(200))
        await add_system(client, sink, max_attempts=2, backoff_base_s=0.01,
                         backoff_max_s=0.01)
        await ingest(client, message(1))
        for _ in range(4):
            await run_pass(client)
            clock.advance(seconds=5)
        [delivery] = await deliveries(client)
        assert (delivery["status"], delivery["attempts"]) == ("delivered", 4)
        breaker = await circuit(client)
        assert breaker["consecutive_failures"] == 0  # the one 503 counted, then a success

    async def test_throttled_tries_do_not_grow_the_backoff(self, client, sink, clock):
        """Each throttled try waits what the system asked; the first real failure after
        them waits the first step of the backoff, as if they had not happened."""
        sink.answer(*[Answer(429, headers={"Retry-After": "1"})] * 6, Answer(503),
                    Answer(200))
        await add_system(client, sink, max_attempts=5, backoff_base_s=10,
                         backoff_max_s=3600)
        await ingest(client, message(1))
        waits = []
        for _ in range(7):
            await run_pass(client)
            [delivery] = await deliveries(client)
            due = datetime.fromisoformat(delivery["next_attempt_at"])
            waits.append((due - clock.now).total_seconds())
            clock.advance(seconds=max(waits[-1], 1) + 0.01)
        assert waits[:6] == [1.0] * 6, waits
        assert 5 <= waits[6] <= 10, waits  # 10 s x [1/2, 1]: the first step
        await run_pass(client)
        [delivery] = await deliveries(client)
        assert (delivery["status"], delivery["attempts"]) == ("delivered", 8)

    async def test_a_retry_after_of_zero_still_waits_a_second(self, client, sink, clock):
        """A throttled try never exhausts a delivery: without a floor, "Retry-After: 0" (or
        a date in the past) would send again at once, for ever."""
        sink.answer(Answer(429, headers={"Retry-After": "0"}), Answer(200))
        await add_system(client, sink)
        await ingest(client, message(1))
        await run_pass(client)
        [delivery] = await deliveries(client)
        due = datetime.fromisoformat(delivery["next_attempt_at"])
        assert (due - clock.now).total_seconds() == 1.0

    async def test_a_later_throttle_is_kept_over_a_shorter_one(self, client, sink, clock):
        sink.answer(Answer(429, headers={"Retry-After": "60"}),
                    Answer(429, headers={"Retry-After": "1"}))
        await add_system(client, sink)
        await ingest(client, *customers(2))
        deliverer = client.app.state.deliverer
        first, second = await claim_due(deliverer, 10)
        await deliver_many(deliverer, [first], trigger="scheduled", actor="tester")
        await deliver_many(deliverer, [second], trigger="scheduled", actor="tester")
        shown = (await client.get("/api/v1/systems/billing")).json()
        until = datetime.fromisoformat(shown["throttled_until"])
        assert until == clock.now + timedelta(seconds=60)
        clock.advance(seconds=30)
        assert await claim_due(deliverer, 10) == []  # the retries are due, the system is not
        clock.advance(seconds=31)
        assert len(await claim_due(deliverer, 10)) == 2


async def throttled_until(client) -> datetime:
    """throttled_until as GET /systems/billing shows it, once the answer is recorded."""
    deadline = time.monotonic() + 10
    while True:
        shown = (await client.get("/api/v1/systems/billing")).json()["throttled_until"]
        if shown is not None:
            return datetime.fromisoformat(shown)
        assert time.monotonic() < deadline, "throttled_until was never set"
        await asyncio.sleep(0.02)


@pytest.mark.postgresql_only
class TestThreeWorkerProcesses:
    async def test_three_workers_together_keep_max_in_flight_and_max_per_second(
            self, database_url, database, client, clock, tmp_path):
        """1,000 deliveries to each of two systems, drained by three `pipeline-console
        worker` processes: "capped" (max_in_flight 4, each answer takes 20 ms) never has
        more than 4 requests open at once; "paced" (max_per_second 100) receives them at
        100 per second, within 10 %. No key arrives twice."""
        clock.now = datetime.now(UTC)  # worker processes run on the real clock
        count = 1000
        capped, paced = ScriptedServer().start(), ScriptedServer().start()
        capped.answer(Answer(200, delay_s=0.02))
        try:
            await add_system(client, capped, name="capped", max_in_flight=4, timeout_s=20,
                             failure_threshold=1000, max_attempts=50, backoff_base_s=0.05,
                             backoff_max_s=0.5)
            await add_system(client, paced, name="paced", max_per_second=100, timeout_s=20,
                             failure_threshold=1000, max_attempts=50, backoff_base_s=0.05,
                             backoff_max_s=0.5)
            logs = [tmp_path / f"worker-{n}.log" for n in range(3)]
            processes = [start_worker(database_url, log, worker_batch_size=20,
                                      secret_key=TEST_SECRET_KEY) for log in logs]
            try:
                await wait_for(lambda: all("started" in log.read_text() for log in logs), 90,
                               "every worker to start")
                await ingest(client, *customers(count, "P"))
                async with database.transaction() as session:
                    # the statistics a running database has (a fresh one has none yet, and
                    # the planner then joins deliveries without their indexes)
                    await session.execute(text("ANALYZE deliveries"))
                started = time.monotonic()
                await wait_for(lambda: len(capped.keys_received()) >= count
                               and len(paced.keys_received()) >= count, 120,
                               "every delivery")
                took = time.monotonic() - started
                await asyncio.sleep(0.5)  # room for a duplicate to show up, if there were one
            finally:
                for process in processes:
                    process.send_signal(signal.SIGTERM)
                exit_codes = [process.wait(timeout=60) for process in processes]
        finally:
            capped.stop()
            paced.stop()
        assert exit_codes == [0, 0, 0]
        for server in (capped, paced):
            received = server.keys_received()
            assert len(received) == count
            assert set(received.values()) == {1}, [k for k, n in received.items() if n > 1]
        assert capped.most_in_flight <= 4
        assert capped.most_in_flight == 4  # the limit was reached, not only kept
        arrivals = sorted(r.at for r in paced.received)
        rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
        assert 90 <= rate <= 110, f"{rate:.1f} per second ({took:.1f} s in all)"
        senders = set()
        for delivery in (await deliveries(client, system="paced", limit=500))[:50]:
            senders.update(a["actor"] for a in await attempts(client, delivery["id"]))
        assert len(senders) > 1, "the work was not shared between the workers"
