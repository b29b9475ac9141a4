"""Worker faults with real processes, on both databases: a worker frozen (SIGSTOP) past its
lease while a newer version arrives, and workers killed (SIGKILL) in a loop under load.

The workers run with short times (lost after 3 s, heartbeat every 0.5 s, a 2 s lease
margin) so that the faults play out in seconds; the rules are the same at any scale."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import threading
from collections import Counter, defaultdict
from datetime import UTC, datetime

import asyncpg
from sqlalchemy.engine import make_url

from tests.delivery.test_delivery import add_system, circuit, ingest
from tests.delivery.test_worker import start_worker
from tests.sink import Answer
from tests.support import message, wait_for

FAST = {"worker_lost_after_s": 3, "worker_heartbeat_s": 0.5, "lease_margin_s": 2,
        "lease_safety_s": 1}


async def until(condition, timeout_s: float, what: str) -> None:
    """Poll an async condition until it holds; fail after `timeout_s`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def all_deliveries(client) -> list[dict]:
    found, cursor = [], None
    while True:
        page = (await client.get("/api/v1/deliveries?limit=500"
                                 + (f"&cursor={cursor}" if cursor else ""))).json()
        found += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return found


async def worker_lost_attempts(client, items: list[dict], *, every: bool = False) -> int:
    """worker_lost attempts of the ambiguous deliveries among `items` (of all, if `every`)."""
    count = 0
    for delivery in items:
        if every or delivery["status"] == "ambiguous":
            rows = (await client.get(f"/api/v1/deliveries/{delivery['id']}/attempts")).json()
            count += sum(row["classification"] == "worker_lost" for row in rows["items"])
    return count


def _sqlite_is_free(database_url: str) -> bool:
    """Whether a write could start now (a process frozen inside a SQLite transaction would
    hold the only write lock: a different fault, and not this test's)."""
    path = make_url(database_url).database
    connection = sqlite3.connect(path, timeout=0.1)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.rollback()
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        connection.close()


async def _postgresql_is_free(database_url: str) -> bool:
    """Whether no session on this test's database is inside a transaction: a process frozen
    in one holds its row locks until the server ends the session, so the rows it locked
    could not be recovered — a different fault (see idle_in_transaction_session_timeout),
    and not this test's."""
    url = make_url(database_url).set(drivername="postgresql")
    connection = await asyncpg.connect(url.render_as_string(hide_password=False))
    # A statement the frozen worker sent just before it stopped may still be running (state
    # 'active') or on its way: the session counts as free only when no other session is in a
    # transaction or a statement now, and again a moment later.
    query = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
             "AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
             "AND (state <> 'idle' OR xact_start IS NOT NULL)")
    try:
        if await connection.fetchval(query):
            return False
        await asyncio.sleep(0.2)
        return not await connection.fetchval(query)
    finally:
        await connection.close()


async def freeze(process, database_url: str, backend: str) -> None:
    for _ in range(50):
        process.send_signal(signal.SIGSTOP)
        free = (_sqlite_is_free(database_url) if backend == "sqlite"
                else await _postgresql_is_free(database_url))
        if free:
            return
        process.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.02)
    raise AssertionError("the worker never stopped outside a transaction")


async def test_a_worker_frozen_past_its_lease_never_sends_what_was_recovered(
        database_url, client, sink, clock, tmp_path, backend):
    """W1 claims twenty v1 deliveries and has ten at the sink when it is frozen. While it
    is frozen past its leases, W2 recovers its claims (worker_lost) and delivers v2 of every
    key. W1 resumes: its ten answers are late, and the ten it had not sent yet stay unsent.
    The sink receives no key:version twice and never v1 after v2."""
    clock.now = datetime.now(UTC)  # worker processes run on the real clock
    # The sink holds W1's first ten sends until W1 is frozen (a fixed delay could run out
    # while the test waits for W1 to be outside a transaction, on a loaded machine).
    answers_go = threading.Event()
    sink.answer(*[Answer(200, hold=answers_go)] * 10, Answer(200))
    # lease 2 x 5 + 1 + 2 = 13 s. W1's ten sends may time out when it wakes (their timers ran
    # while it was frozen): that is W1's stall (worker_lost), not the system's failure, so
    # the circuit (threshold 3) must stay closed.
    await add_system(client, sink, timeout_s=5, failure_threshold=3)
    keys = [f"F-{n:02}" for n in range(20)]
    await ingest(client, *[message(1, {"v": 1}, entity_id=key) for key in keys])
    first = start_worker(database_url, tmp_path / "first.log", worker_concurrency=10,
                         worker_batch_size=20, **FAST)
    second = None
    try:
        await wait_for(lambda: sink.in_flight == 10, 60, "ten sends at the sink")
        await freeze(first, database_url, backend)
        frozen_at = asyncio.get_running_loop().time()
        answers_go.set()
        in_flight = [d for d in await all_deliveries(client) if d["status"] == "in_flight"]
        assert len(in_flight) == 20, "W1 was to hold twenty claims when it froze"

        await ingest(client, *[message(2, {"v": 2}, entity_id=key) for key in keys])
        second = start_worker(database_url, tmp_path / "second.log", **FAST)

        async def v2_delivered() -> bool:
            items = await all_deliveries(client)
            return sum(d["version"] == 2 and d["status"] == "delivered" for d in items) == 20

        await until(v2_delivered, 90, "W2 to deliver every v2")
        left = frozen_at + 14 - asyncio.get_running_loop().time()  # past W1's 13 s leases
        await asyncio.sleep(max(left, 0))
        first.send_signal(signal.SIGCONT)

        async def first_settled() -> bool:
            workers = (await client.get("/api/v1/workers")).json()["items"]
            mine = [w for w in workers if f":{first.pid}:" in w["id"]]
            return bool(mine) and mine[0]["status"] == "alive" and mine[0]["claims"] == 0

        await until(first_settled, 60, "W1 to wake up and hold nothing")
        await asyncio.sleep(2)  # room for a wrong send to show up, if there were one
    finally:
        answers_go.set()
        for process in (first, second):
            if process is not None:
                process.send_signal(signal.SIGCONT)
                process.send_signal(signal.SIGTERM)
        for process in (first, second):
            if process is not None:
                assert process.wait(timeout=60) == 0

    received = sink.keys_received()
    assert set(received.values()) == {1}, [k for k, n in received.items() if n > 1]
    versions = defaultdict(list)
    for request in sink.received:
        versions[request.body["idempotency_key"]].append(request.body["version"])
    assert all(seen == sorted(seen) for seen in versions.values()), dict(versions)
    by_version = Counter(request.body["version"] for request in sink.received)
    assert by_version == {1: 10, 2: 20}  # the ten W1 had not sent were never sent
    items = await all_deliveries(client)
    assert await worker_lost_attempts(client, items, every=True) >= 20  # all W1's claims
    v1 = Counter(d["status"] for d in items if d["version"] == 1)
    # The ten never sent: W1 knew, settled them as not delivered, and v2 then superseded
    # them. The ten sent: their late answers were a success (delivered) or timed out in
    # W1's stall (left ambiguous for the status query or a person).
    assert v1["superseded"] == 10, v1
    assert v1["delivered"] + v1["ambiguous"] == 10, v1
    state = await circuit(client)
    assert (state["state"], state["consecutive_failures"]) == ("closed", 0), state


async def test_workers_killed_in_a_loop_never_open_a_healthy_circuit(
        database_url, client, sink, clock, tmp_path, backend):
    """Two workers under load, one of them SIGKILLed every 1.5 s and restarted, six times.
    The sink is healthy throughout, so its circuit (threshold 2) stays closed; every
    delivery ends delivered or — where a worker died holding it — ambiguous as
    worker_lost; none is lost or left claimed."""
    clock.now = datetime.now(UTC)
    sink.answer(Answer(200, delay_s=0.2))
    await add_system(client, sink, timeout_s=2, failure_threshold=2, max_attempts=10)
    count = 400
    for start in range(0, count, 100):
        await ingest(client, *[message(1, entity_id=f"K-{n:03}")
                               for n in range(start, start + 100)])
    settings = {"worker_concurrency": 5, "worker_batch_size": 10, **FAST}
    workers = [start_worker(database_url, tmp_path / f"worker-{n}.log", **settings)
               for n in range(2)]
    kills = 0
    try:
        await wait_for(lambda: len(sink.received) >= 20, 60, "the workers to start sending")
        for round_ in range(6):
            await asyncio.sleep(1.5)
            victim = round_ % 2
            workers[victim].send_signal(signal.SIGKILL)
            workers[victim].wait(timeout=10)
            kills += 1
            workers[victim] = start_worker(database_url,
                                           tmp_path / f"worker-{victim}-{round_}.log",
                                           **settings)

        async def settled() -> bool:
            items = await all_deliveries(client)
            return all(d["status"] in ("delivered", "ambiguous") for d in items)

        await until(settled, 180, "every delivery to be delivered or ambiguous")
    finally:
        for process in workers:
            process.send_signal(signal.SIGTERM)
        for process in workers:
            process.wait(timeout=60)
    items = await all_deliveries(client)
    assert len(items) == count
    statuses = Counter(d["status"] for d in items)
    assert set(statuses) <= {"delivered", "ambiguous"}, statuses
    lost = await worker_lost_attempts(client, items)
    assert lost == statuses["ambiguous"] and kills == 6
    assert lost > 0, "no kill caught a worker holding claims: the test proved nothing"
    delivered = {f"customer:{d['entity_id']}:1" for d in items if d["status"] == "delivered"}
    assert delivered <= set(sink.keys_received())  # what is marked delivered arrived
    state = await circuit(client)
    assert (state["state"], state["consecutive_failures"]) == ("closed", 0), state
    opened = (await client.get("/api/v1/audit?action=circuit.open")).json()["items"]
    assert opened == [], opened


async def test_a_stopping_worker_heartbeats_until_its_last_send_is_recorded(
        database_url, client, sink, clock, tmp_path):
    """SIGTERM while a send is open: the worker finishes it, and keeps its heartbeat (it is
    alive, not lost) until the answer is recorded; then it says it stopped."""
    clock.now = datetime.now(UTC)
    release = threading.Event()
    sink.answer(Answer(200, hold=release))
    await add_system(client, sink, timeout_s=30)
    log = tmp_path / "worker.log"
    worker = start_worker(database_url, log, **FAST)
    try:
        await wait_for(lambda: "started" in log.read_text(), 60, "the worker to start")
        await ingest(client, message(1, entity_id="LAST"))
        await wait_for(lambda: sink.in_flight == 1, 30, "the send to reach the sink")
        worker.send_signal(signal.SIGTERM)
        await asyncio.sleep(FAST["worker_lost_after_s"] + 1)  # past lost-after, still open

        async def statuses() -> list[str]:
            clock.now = datetime.now(UTC)
            return [w["status"] for w in (await client.get("/api/v1/workers")).json()["items"]]

        assert await statuses() == ["alive"]
        assert worker.poll() is None  # still finishing its send
    finally:
        release.set()
        assert worker.wait(timeout=60) == 0
    assert await statuses() == ["stopped"]
    [delivery] = await all_deliveries(client)
    rows = (await client.get(f"/api/v1/deliveries/{delivery['id']}/attempts")).json()["items"]
    assert [row["classification"] for row in rows] == ["success"]
