"""The fence and the workers, in one process on both databases: a claim is never sent once
its lease (on the monotonic clock) or its worker's heartbeat may have run out; a lost
worker's claims become ambiguous as worker_lost and never move a circuit; a late answer is
never a reason to send; one slow system never holds up another (the pipeline)."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta

import pytest

from pipeline_console.delivery.base import Deliverer, Outcome
from pipeline_console.delivery.claims import claim_due, recover_lost_claims
from pipeline_console.delivery.pipeline import Pipeline, share_of
from pipeline_console.delivery.service import deliver, deliver_many
from pipeline_console.delivery.transports import Transports
from pipeline_console.delivery.workers import Identity, Liveness, heartbeat
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


class Monotonic:
    """A monotonic clock the test moves: a process frozen for `jump` seconds."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def transports():
    async with Transports.open() as opened:
        yield opened


def a_worker(client, transports, monotonic, *, liveness=None, worker_id="worker:test"):
    return Deliverer(client.app.state.database, transports, client.app.state.clock,
                     worker_id=worker_id, monotonic=monotonic, liveness=liveness)


class TestTheFence:
    async def test_a_claim_frozen_past_its_lease_is_released_never_sent(
            self, client, sink, clock, transports):
        await add_system(client, sink, timeout_s=2)  # lease: 2 x 2 + 1 + 30 = 35 s
        await ingest(client, message(1))
        monotonic = Monotonic()
        worker = a_worker(client, transports, monotonic)
        [delivery_id] = await claim_due(worker, 10)

        frozen = monotonic.now + 31  # 4 s left: less than one exchange (5 s) + the margin

        def after_the_check_of_the_claim() -> float:
            # the first reading is taken before the preparing transaction; every later one
            # (the fence) comes after the "freeze"
            monotonic.now, value = frozen, monotonic.now
            return value

        worker.monotonic = after_the_check_of_the_claim
        [result] = await deliver_many(worker, [delivery_id], trigger="scheduled",
                                      actor=worker.worker_id)
        assert result.outcome is Outcome.RELEASED
        assert sink.received == []
        [delivery] = await deliveries(client)
        assert (delivery["status"], delivery["attempts"], delivery["claimed_by"]) == (
            "pending", 0, None)  # nothing left: back to the queue, no attempt

    async def test_a_claim_with_time_to_spare_is_sent(self, client, sink, clock, transports):
        await add_system(client, sink, timeout_s=2)
        await ingest(client, message(1))
        monotonic = Monotonic()
        worker = a_worker(client, transports, monotonic)
        [delivery_id] = await claim_due(worker, 10)
        monotonic.now += 24  # 11 s left: one exchange (5 s) and the margin (5 s) fit
        result = await deliver(worker, delivery_id, trigger="scheduled", actor=worker.worker_id)
        assert result.outcome is Outcome.DELIVERED
        assert len(sink.received) == 1

    async def test_a_lease_run_out_on_the_wall_clock_is_not_sent(self, client, sink, clock,
                                                                 transports):
        await add_system(client, sink, timeout_s=2)
        await ingest(client, message(1))
        worker = a_worker(client, transports, Monotonic())
        [delivery_id] = await claim_due(worker, 10)
        clock.advance(seconds=40)  # frozen before it checked the claim: nobody recovered it
        result = await deliver(worker, delivery_id, trigger="scheduled", actor=worker.worker_id)
        assert result.outcome is Outcome.RELEASED
        assert sink.received == []

    async def test_a_heartbeat_gap_voids_the_claims_made_before_it(self, client, sink, clock,
                                                                   transports):
        await add_system(client, sink, timeout_s=2)
        await ingest(client, message(1, entity_id="A"), message(1, entity_id="B"))
        monotonic = Monotonic()
        liveness = Liveness(lost_after_s=30, safety_s=5, monotonic=monotonic)
        identity = Identity("worker:test")
        worker = a_worker(client, transports, monotonic, liveness=liveness,
                          worker_id=identity.id)
        worker.lease_margin_s = 600  # a lease long enough that only the epoch can refuse
        await heartbeat(worker.database, identity, liveness, clock)
        [first] = await claim_due(worker, 1)
        monotonic.now += 26  # frozen: the heartbeat is older than lost-after less the margin
        clock.advance(seconds=26)
        await heartbeat(worker.database, identity, liveness, clock)  # alive again, but...
        result = await deliver(worker, first, trigger="scheduled", actor=worker.worker_id)
        assert result.outcome is Outcome.RELEASED  # ...the claim predates the gap
        assert sink.received == []
        [second] = await claim_due(worker, 1)  # a claim after the gap is sent
        result = await deliver(worker, second, trigger="scheduled", actor=worker.worker_id)
        assert result.outcome is Outcome.DELIVERED
        assert len(sink.received) == 1

    def test_liveness_moves_its_epoch_on_after_a_gap_near_lost_after(self):
        monotonic = Monotonic()
        liveness = Liveness(lost_after_s=30, safety_s=5, monotonic=monotonic)
        assert liveness.limit_s == 25
        assert not liveness.holds(0, monotonic.now)  # no heartbeat yet
        liveness.beat(monotonic.now, monotonic.now + 0.1)
        epoch = liveness.epoch
        assert liveness.holds(epoch, monotonic.now + 24.9)
        assert not liveness.holds(epoch, monotonic.now + 25)  # stale: may look lost soon
        monotonic.now += 10
        liveness.beat(monotonic.now, monotonic.now + 0.1)  # a gap of 10 s: the same epoch
        assert liveness.epoch == epoch and liveness.holds(epoch, monotonic.now + 1)
        started = monotonic.now
        monotonic.now += 26
        liveness.beat(started, monotonic.now)  # began in time, committed 26 s later
        assert liveness.epoch == epoch + 1
        assert not liveness.holds(epoch + 1, monotonic.now)  # its row is 26 s old already
        liveness.beat(monotonic.now, monotonic.now + 0.1)  # the row was stale till now
        assert liveness.epoch == epoch + 2
        assert liveness.holds(epoch + 2, monotonic.now + 1)
        assert not liveness.holds(epoch, monotonic.now + 1)
        assert Liveness(lost_after_s=3, safety_s=5).limit_s == 2  # a third when shorter

    def test_the_share_leaves_a_slot_for_other_systems(self):
        assert share_of(10, 1) == 10
        assert share_of(10, 2) == 8
        assert share_of(2, 3) == 1
        assert share_of(1, 3) == 1


class TestLostWorkers:
    async def test_a_lost_workers_claims_are_worker_lost_and_the_circuit_stays_closed(
            self, client, sink, clock, transports):
        await add_system(client, sink, timeout_s=2, failure_threshold=1)
        await ingest(client, *[message(1, entity_id=f"L-{n}") for n in range(5)])
        monotonic = Monotonic()
        identity = Identity("worker:lost")
        liveness = Liveness(lost_after_s=30, safety_s=5, monotonic=monotonic)
        lost = a_worker(client, transports, monotonic, liveness=liveness,
                        worker_id=identity.id)
        await heartbeat(lost.database, identity, liveness, clock)
        claimed = await claim_due(lost, 10)
        assert len(claimed) == 5
        clock.advance(seconds=16)  # its heartbeat stopped; the leases (35 s) still run
        recovering = client.app.state.deliverer
        assert await recover_lost_claims(recovering, lost_after_s=20) == 0  # not lost yet
        # lost after 10 s, but a send begun just then could still be open for one exchange
        # (5 s): only after both
        assert await recover_lost_claims(recovering, lost_after_s=12) == 0
        # a recoverer whose own heartbeat only just came back (an outage of the database
        # silenced both) holds nothing against the other
        assert await recover_lost_claims(recovering, lost_after_s=10,
                                         alive_since=clock() - timedelta(seconds=5)) == 0
        assert await recover_lost_claims(recovering, lost_after_s=10,
                                         alive_since=clock() - timedelta(seconds=16)) == 5
        for delivery in await deliveries(client):
            assert delivery["status"] == "ambiguous"
            [attempt] = await attempts(client, delivery["id"])
            assert (attempt["classification"], attempt["rule"]) == ("worker_lost",
                                                                     "worker_lost")
        state = await circuit(client)  # five "failures" at a threshold of one: none counted
        assert (state["state"], state["consecutive_failures"]) == ("closed", 0)
        open_items = (await client.get("/api/v1/ambiguous?status=open")).json()["items"]
        assert len(open_items) == 5 and all("worker_lost" in item["reason"]
                                            for item in open_items)

        # The lost worker wakes up: nothing of what it held is sent.
        monotonic.now += 16
        results = await deliver_many(lost, claimed, trigger="scheduled", actor=identity.id)
        assert {result.outcome for result in results} == {Outcome.NOT_CLAIMED}
        assert sink.received == []

    async def test_a_late_failure_settles_nothing_and_sends_nothing(self, client, sink, clock,
                                                                   transports):
        release = threading.Event()
        sink.answer(Answer(503, hold=release), Answer(200))
        await add_system(client, sink, timeout_s=10)
        await ingest(client, message(1))
        worker = a_worker(client, transports, Monotonic())
        [delivery_id] = await claim_due(worker, 10)
        sending = asyncio.create_task(deliver(worker, delivery_id, trigger="scheduled",
                                              actor=worker.worker_id))
        await wait_for(lambda: sink.in_flight == 1, 10, "the request to arrive")
        clock.advance(minutes=10)  # its lease runs out while the request is on its way
        assert (await run_pass(client))["recovered_as_ambiguous"] == 1
        release.set()
        result = await sending
        assert (result.outcome, result.classification) == (Outcome.NOT_CLAIMED, "transient")
        [delivery] = await deliveries(client)
        assert delivery["status"] == "ambiguous"  # for the status query or a person
        [outcome] = (await client.get("/api/v1/ambiguous")).json()["items"]
        assert outcome["status"] == "open"
        clock.advance(minutes=10)
        await run_pass(client)
        assert len(sink.received) == 1  # the late 503 was no reason to send it again
        rows = await attempts(client, delivery["id"])
        assert [row["classification"] for row in rows] == ["worker_lost", "transient"]


    async def test_a_late_success_after_a_newer_version_is_left_for_a_person(
            self, client, sink, clock, transports):
        """v1's send hangs; its claim is recovered; v2 is delivered; then v1 answers 200.
        The system may now hold v1 over v2: the outcome stays open, and says so."""
        release = threading.Event()
        sink.answer(Answer(200, hold=release), Answer(200))
        await add_system(client, sink, timeout_s=10)
        await ingest(client, message(1, {"v": 1}))
        worker = a_worker(client, transports, Monotonic())
        [v1] = await claim_due(worker, 10)
        sending = asyncio.create_task(deliver(worker, v1, trigger="scheduled",
                                              actor=worker.worker_id))
        await wait_for(lambda: sink.in_flight == 1, 10, "v1 to reach the sink")
        clock.advance(minutes=10)
        assert (await run_pass(client))["recovered_as_ambiguous"] == 1
        await ingest(client, message(2, {"v": 2}))
        assert (await run_pass(client))["delivered"] == 1  # v2
        release.set()
        result = await sending
        assert (result.outcome, result.classification) == (Outcome.NOT_CLAIMED, "success")
        [outcome] = (await client.get("/api/v1/ambiguous")).json()["items"]
        assert outcome["status"] == "open"
        assert "after version 2 was sent" in outcome["last_query_result"]
        events = (await client.get("/api/v1/audit?action=delivery.late_answer")).json()
        assert [e["details"]["newer_version"] for e in events["items"]] == [2]


class TestTheWorkersList:
    async def test_workers_are_listed_with_their_status_and_claims(self, client, sink, clock,
                                                                  transports):
        await add_system(client, sink)
        await ingest(client, message(1, entity_id="A"), message(1, entity_id="B"))
        database = client.app.state.database
        old, alive = Identity("worker:old", "box-1", 11), Identity("worker:alive", "box-2", 22)
        await heartbeat(database, old, Liveness(30, 5), clock)
        clock.advance(seconds=45)
        await heartbeat(database, alive, Liveness(30, 5), clock)
        assert len(await claim_due(a_worker(client, transports, Monotonic(),
                                            worker_id=alive.id), 10)) == 2
        items = (await client.get("/api/v1/workers")).json()["items"]
        assert [(w["id"], w["host"], w["pid"], w["status"], w["claims"]) for w in items] == [
            ("worker:alive", "box-2", 22, "alive", 2), ("worker:old", "box-1", 11, "lost", 0)]
        for query, ids in (("alive", ["worker:alive"]), ("lost", ["worker:old"]),
                           ("alive,lost", ["worker:alive", "worker:old"]), ("stopped", [])):
            page = (await client.get(f"/api/v1/workers?status={query}")).json()
            assert [w["id"] for w in page["items"]] == ids, query
        refused = await client.get("/api/v1/workers?status=alive,asleep")
        assert refused.status_code == 422
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert "status" in refused.text

        dashboard = (await client.get("/api/v1/dashboard")).json()["items"]
        [card] = [item for item in dashboard if item["name"] == "lost_workers"]
        listed = (await client.get(card["path"])).json()["items"]
        assert card["count"] == len(listed) == 1
        assert card["severity"] == "warning"

        page = await client.get("/workers?status=lost")  # the console page
        assert page.status_code == 200
        assert "worker:old" in page.text and "worker:alive" not in page.text
        for anything in ("", "all"):  # the form's "any", and "all" as on other pages
            page = await client.get(f"/workers?status={anything}")
            assert page.status_code == 200, anything
            assert "worker:old" in page.text and "worker:alive" in page.text

        clock.advance(hours=25)  # a day later the lost worker is history, not an alarm
        await heartbeat(database, alive, Liveness(30, 5), clock)
        dashboard = (await client.get("/api/v1/dashboard")).json()["items"]
        [card] = [item for item in dashboard if item["name"] == "lost_workers"]
        assert card["count"] == len((await client.get(card["path"])).json()["items"]) == 0
        lost = (await client.get("/api/v1/workers?status=lost")).json()["items"]
        assert [w["id"] for w in lost] == ["worker:old"]


class TestNoHeadOfLineBlocking:
    async def test_a_system_whose_answers_hang_holds_up_no_other(self, client, sink, clock,
                                                                 transports):
        """System A's sink holds every request open until the test lets go; every delivery
        to B completes meanwhile. No timing: the order of events is the assertion."""
        release = threading.Event()
        sink.answer(Answer(200, hold=release))
        other = ScriptedServer().start()
        try:
            await add_system(client, sink, name="a-slow", timeout_s=60)
            await add_system(client, other, name="b-fast", timeout_s=60)
            await ingest(client, *[message(1, entity_id=f"H-{n:02}") for n in range(30)])
            worker = a_worker(client, transports, Monotonic())
            stop = asyncio.Event()
            pipeline = Pipeline(worker, concurrency=4, batch_size=10, stop=stop,
                                poll_interval_s=0.05)
            running = asyncio.create_task(pipeline.run())
            try:
                await wait_for(lambda: len(other.keys_received()) == 30, 60,
                               "every delivery to b-fast")
                assert 1 <= sink.in_flight <= share_of(4, 2)  # a-slow's are still held
                await wait_for_status(client, "b-fast", "delivered", 30)
                assert not await deliveries(client, system="a-slow", status="delivered")
            finally:
                release.set()
            await wait_for_status(client, "a-slow", "delivered", 30)
            stop.set()
            await asyncio.wait_for(running, 30)
        finally:
            release.set()
            other.stop()
        assert set(sink.keys_received().values()) == {1}
        assert set(other.keys_received().values()) == {1}


async def wait_for_status(client, system: str, status: str, count: int) -> None:
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        found = await deliveries(client, system=system, status=status, limit=100)
        if len(found) == count:
            return
        assert asyncio.get_running_loop().time() < deadline, (
            f"{len(found)} of {count} deliveries to {system} {status}")
        await asyncio.sleep(0.05)


class TestSharingTheSlots:
    async def test_a_system_alone_may_use_every_slot(self, client, sink, clock, transports):
        """Another system exists but has nothing to send: the busy one is not capped."""
        release = threading.Event()
        sink.answer(Answer(200, hold=release))
        idle = ScriptedServer().start()
        try:
            await add_system(client, sink, name="busy", timeout_s=60)
            await add_system(client, idle, name="idle", entity_types=["order"])
            await ingest(client, *[message(1, entity_id=f"S-{n}") for n in range(4)])
            stop = asyncio.Event()
            pipeline = Pipeline(a_worker(client, transports, Monotonic()), concurrency=2,
                                batch_size=10, stop=stop, poll_interval_s=0.05)
            running = asyncio.create_task(pipeline.run())
            try:
                await wait_for(lambda: sink.in_flight == 2, 30, "both slots to be busy")
            finally:
                release.set()
            await wait_for_status(client, "busy", "delivered", 4)
            stop.set()
            await asyncio.wait_for(running, 30)
        finally:
            release.set()
            idle.stop()
        assert idle.received == []
