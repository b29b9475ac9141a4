"""pipeline-console consume against the real RabbitMQ and NATS JetStream on 127.0.0.1, on
SQLite and PostgreSQL, with real consumer processes killed (SIGKILL), stopped (SIGTERM) and
cut off from their database.

The stream: new records, exact repeats (a source sending a message again), supersedes, a
stale version and malformed bodies, each valid message with its own message_id and each
malformed one with a marker, so that every published message can be found in the attempt
log afterwards."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from pipeline_console.config import Settings
from pipeline_console.db import Database, create_engine
from pipeline_console.models import IngestionAttempt, IntakeConsumer, RecordState
from tests.conftest import _admin, _url_for
from tests.consumers.brokers import BROKERS, NatsStream, RabbitQueue, start_consumer
from tests.fault_proxy import FaultProxy

pytestmark = pytest.mark.backends


@pytest.fixture(params=sorted(BROKERS))
async def broker(request: pytest.FixtureRequest) -> Any:
    broker = BROKERS[request.param]()
    await broker.open()
    try:
        yield broker
    finally:
        await broker.close()


def _body(n: int, entity: int, version: int, note: str = "") -> bytes:
    return json.dumps({"source_system": "erp", "entity_type": "customer",
                       "entity_id": f"C-{entity}", "version": version,
                       "message_id": f"m-{n}",
                       "payload": {"name": f"Customer {entity}", "v": version,
                                   "note": note}}).encode()


def stream(entities: int) -> tuple[list[bytes], dict[str, int]]:
    """The bodies in publishing order, and how often each message_id / marker is in it. Per
    entity: v1; every third, v1 again (an exact repeat, skip_duplicate); every second, v2
    (accept_supersede) and every sixth, v1 once more after it (skip_stale); one in fifty
    entities, a malformed body."""
    bodies: list[bytes] = []
    published: Counter[str] = Counter()

    def add(body: bytes, label: str) -> None:
        bodies.append(body)
        published[label] += 1

    for entity in range(entities):
        add(_body(entity * 10, entity, 1), f"m-{entity * 10}")
        if entity % 50 == 7:
            add(b'{"marker": "bad-%d", "version": ' % entity, f"bad-{entity}")
    for entity in range(0, entities, 3):
        add(_body(entity * 10, entity, 1), f"m-{entity * 10}")
    for entity in range(0, entities, 2):
        add(_body(entity * 10 + 1, entity, 2), f"m-{entity * 10 + 1}")
    for entity in range(0, entities, 6):
        add(_body(entity * 10 + 2, entity, 1), f"m-{entity * 10 + 2}")
    return bodies, dict(published)


async def _attempts(database: Database) -> list[Any]:
    async with database.read() as session:
        return list((await session.execute(select(
            IngestionAttempt.decision, IngestionAttempt.message_id,
            IngestionAttempt.idempotency_key, IngestionAttempt.version,
            IngestionAttempt.raw_body, IngestionAttempt.actor))).all())


async def _count(database: Database) -> int:
    async with database.read() as session:
        return (await session.execute(select(func.count()).select_from(IngestionAttempt))
                ).scalar_one()


async def _versions(database: Database) -> dict[str, int]:
    async with database.read() as session:
        return dict((await session.execute(select(RecordState.idempotency_key,
                                                  RecordState.current_version))).all())


def _label(row: Any) -> str:
    if row.message_id is not None:
        return row.message_id
    assert row.decision == "rejected", row
    return json.loads(row.raw_body.split('"marker": ')[1].split(",")[0])


def _text(log: Path) -> str:
    return log.read_text(errors="replace")


async def _until(condition: Any, what: str, timeout_s: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def _killed(process: subprocess.Popen[bytes], log: Path) -> None:
    await _until(lambda: asyncio.sleep(0, process.poll() is not None), "the failpoint's kill")
    assert process.returncode == -signal.SIGKILL, _text(log)


async def _drained(broker: Any, database: Database, published: int) -> None:
    """The broker holds nothing unacknowledged and the attempt log holds at least one attempt
    per published message."""
    async def done() -> bool:
        return await _count(database) >= published and await _held(broker) == 0
    await _until(done, "the stream to be consumed")


async def _held(broker: Any) -> int:
    if isinstance(broker, RabbitQueue):
        waiting, _ = await broker.held()
        return waiting
    return await broker.unacknowledged()


async def _stop(process: subprocess.Popen[bytes], log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    await _until(lambda: asyncio.sleep(0, process.poll() is not None), "the consumer to stop",
                 timeout_s=30)
    assert process.returncode == 0, _text(log)


def _expected_versions(bodies: list[bytes]) -> dict[str, int]:
    versions: dict[str, int] = {}
    for body in bodies:
        try:
            message = json.loads(body)
        except ValueError:
            continue
        key = f"customer:{message['entity_id']}"
        versions[key] = max(versions.get(key, 0), message["version"])
    return versions


async def test_a_consumer_killed_after_a_commit_and_before_one_loses_nothing(
        broker, database, database_url, tmp_path):
    entities = 1000  # 2,021 messages
    bodies, published = stream(entities)
    await broker.publish(bodies)
    log = tmp_path / "consumer.log"
    # Killed right after the 500th commit (before its acknowledgement), then right as the
    # 300th message of the second run arrives (before its commit), then run to the end.
    first = start_consumer(broker, database_url, log, failpoints="consume.committed=500",
                           consumer_prefetch=50)
    await _killed(first, log)
    committed = await _count(database)
    unacknowledged = await broker.unacknowledged()
    # Nothing acknowledged that was not committed: at most the committed left the broker.
    assert len(bodies) - unacknowledged <= committed
    assert committed >= 500

    second = start_consumer(broker, database_url, log, failpoints="consume.received=300",
                            consumer_prefetch=50)
    await _killed(second, log)
    committed_again = await _count(database)
    assert len(bodies) - await broker.unacknowledged() <= committed_again

    third = start_consumer(broker, database_url, log, consumer_prefetch=50)
    await _drained(broker, database, len(bodies))
    await _stop(third, log)

    attempts = await _attempts(database)
    seen = Counter(_label(row) for row in attempts)
    # every published message is in the attempt log, at least as often as it was published
    assert {label: count for label, count in seen.items()
            if count < published.get(label, 0)} == {}
    assert set(seen) == set(published)
    # one accept per (key, version); everything more is a redelivery or a repeat
    accepts = Counter((row.idempotency_key, row.version) for row in attempts
                      if row.decision.startswith("accept_"))
    assert set(accepts.values()) == {1}
    assert await _versions(database) == _expected_versions(bodies)
    redelivered = len(attempts) - len(bodies)
    assert redelivered >= 1  # the message committed and not acknowledged came back
    by_decision = Counter(row.decision for row in attempts)
    # one accept per key (its first version to arrive), and a supersede per v2 but where a
    # v2 arrived before its key's redelivered v1 (NATS redelivers after later messages:
    # that v2 is the key's accept_new, and the v1 is stale)
    assert by_decision["accept_new"] == entities
    assert entities // 2 - redelivered <= by_decision["accept_supersede"] <= entities // 2
    # a repeat of v1 is skip_duplicate, or skip_stale once v2 is in (NATS redelivers a killed
    # consumer's messages after later ones); the v1 sent after v2 is always stale
    assert set(by_decision) <= {"accept_new", "accept_supersede", "skip_duplicate",
                                "skip_stale", "rejected"}
    assert by_decision["skip_stale"] >= entities // 6
    assert by_decision["skip_duplicate"] + by_decision["skip_stale"] >= entities // 2
    # entities 7, 57, …: once each, or again if redelivered
    assert by_decision["rejected"] >= entities // 50
    # a malformed message does not loop: recorded once per delivery, and delivered at most
    # once per run
    rejected = Counter(_label(row) for row in attempts if row.decision == "rejected")
    assert max(rejected.values()) <= 3
    assert {row.actor for row in attempts} == {f"consumer:{broker.kind}:{_queue(broker)}"}


def _queue(broker: Any) -> str:
    return broker.name if isinstance(broker, RabbitQueue) else f"{broker.name}/pc"


@pytest.mark.postgresql_only  # the outage: a TCP proxy in front of PostgreSQL, cut
async def test_a_message_is_not_acknowledged_while_the_database_is_down(
        broker, database, database_url, tmp_path):
    url = make_url(database_url)
    proxy = FaultProxy(url.host or "127.0.0.1", url.port or 5432).start()
    through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    log = tmp_path / "consumer.log"
    try:
        bodies = [_body(n, n, 1) for n in range(40)]
        consumer = start_consumer(broker, through, log)
        # started on a reachable database (at start-up an outage is waited out before the
        # broker is even asked for messages), then cut off from it
        await _until(lambda: asyncio.sleep(0, "started" in _text(log)), "the consumer to start")
        proxy.cut()
        await broker.publish(bodies)
        # the consumer has taken them (RabbitMQ: none waiting; NATS: all delivered) and
        # tries to record them
        await _until(lambda: _taken(broker, len(bodies)), "the consumer to take them")
        await _until(lambda: asyncio.sleep(0, "could not be recorded" in _text(log)),
                     "the consumer to report the outage")
        consumer.send_signal(signal.SIGKILL)
        consumer.wait(timeout=10)
        assert await broker.unacknowledged() == len(bodies)  # none acknowledged
        # started while the database is still away: it waits for it, taking nothing
        again = start_consumer(broker, through, log)
        await _until(lambda: asyncio.sleep(0, "the consumer waits for it" in _text(log)),
                     "the new consumer to wait for the database")
        assert await broker.unacknowledged() == len(bodies)
        proxy.restore()
        await _drained(broker, database, len(bodies))
        await _stop(again, log)
    finally:
        proxy.stop()
    attempts = await _attempts(database)
    assert Counter(row.decision for row in attempts) == {"accept_new": 40}


async def _taken(broker: Any, count: int) -> bool:
    if isinstance(broker, RabbitQueue):
        waiting, consumers = await broker.held()
        return consumers == 1 and waiting == 0
    nc_info = await _nats_consumer(broker)
    return nc_info is not None and nc_info.num_ack_pending == count


async def _nats_consumer(broker: NatsStream) -> Any:
    import nats

    nc = await nats.connect(broker.url)
    try:
        try:
            return await nc.jetstream().consumer_info(broker.name, broker.consumer)
        except nats.js.errors.NotFoundError:
            return None
    finally:
        await nc.close()


async def test_sigterm_finishes_what_is_in_hand_and_registers_the_stop(
        broker, database, database_url, tmp_path):
    bodies, published = stream(150)
    log = tmp_path / "consumer.log"
    consumer = start_consumer(broker, database_url, log, consumer_prefetch=20)
    await broker.publish(bodies)
    await _until(lambda: _some(database), "the first commit")
    await _stop(consumer, log)
    # everything the broker let go of was recorded; the rest is still on the broker
    assert len(bodies) - await broker.unacknowledged() <= await _count(database)
    again = start_consumer(broker, database_url, log)
    await _drained(broker, database, len(bodies))
    await _stop(again, log)
    attempts = await _attempts(database)
    assert Counter(_label(row) for row in attempts) == Counter(published)  # exactly once
    async with database.read() as session:
        consumers = list((await session.execute(select(IntakeConsumer))).scalars())
    assert len(consumers) == 2 and all(c.stopped_at is not None for c in consumers)
    assert sum(c.acknowledged for c in consumers) == len(bodies)
    assert sum(c.rejected for c in consumers) == 3
    assert {c.queue for c in consumers} == {_queue(broker)}
    text = _text(log)
    for consumer_row in consumers:
        assert "guest:guest" not in consumer_row.source and "@" not in consumer_row.source
    assert "guest:guest" not in text and ":guest@" not in text


async def _some(database: Database) -> bool:
    return await _count(database) > 0


def _phases(entities: int) -> tuple[list[bytes], ...]:
    """Three phases, each published once the one before is consumed: within a phase no key
    has two versions, so the decisions do not depend on which consumer takes which message.
    The last: a late v1, with other content, of keys that are at v2 (skip_stale)."""
    first = [_body(entity * 10, entity, 1) for entity in range(entities)]
    first += [_body(entity * 10, entity, 1) for entity in range(0, entities, 4)]  # repeats
    first += [b'{"marker": "bad-%d", ' % entity for entity in range(0, entities, 40)]
    second = [_body(entity * 10 + 1, entity, 2) for entity in range(0, entities, 2)]
    third = [_body(entity * 10 + 2, entity, 1, "late") for entity in range(0, entities, 6)]
    return first, second, third


async def _decide(broker: Any, database: Database, database_url: str, log: Path,
                  consumers: int) -> tuple[Counter[tuple[str, str]], dict[str, int]]:
    processes = [start_consumer(broker, database_url, log, consumer_prefetch=25,
                                consumer_batch_size=40) for _ in range(consumers)]
    published = 0
    for phase in _phases(400):
        await broker.publish(phase)
        published += len(phase)
        await _drained(broker, database, published)
    for process in processes:
        await _stop(process, log)
    attempts = await _attempts(database)
    return Counter((_label(row), row.decision) for row in attempts), await _versions(database)


@pytest.mark.postgresql_only  # several consumers on one queue are for PostgreSQL
async def test_two_consumers_on_one_queue_decide_as_one_does(
        broker, database, database_url, tmp_path, postgres_template):
    one = await _decide(broker, database, database_url, tmp_path / "one.log", consumers=1)
    name = f"pc_test_{uuid.uuid4().hex[:12]}"
    await _admin(f'CREATE DATABASE "{name}" TEMPLATE "{postgres_template}" STRATEGY FILE_COPY')
    other = Database(create_engine(Settings(database_url=_url_for(name))))
    try:
        two = await _decide(broker, other, _url_for(name), tmp_path / "two.log", consumers=2)
    finally:
        await other.dispose()
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert two == one
    decisions = Counter(decision for _, decision in one[0].elements())
    assert decisions == {"accept_new": 400, "skip_duplicate": 100, "rejected": 10,
                         "accept_supersede": 200, "skip_stale": 67}
