"""A database outage in the middle of the work, with real processes: a `pipeline-console
serve` and a `pipeline-console worker` reach PostgreSQL through a TCP proxy
(tests/fault_proxy.py) that the test cuts — every connection reset, new ones refused — and
later restores. Neither process is restarted.

The server, under load, answers every request 2xx or 503 with Retry-After (problem+json;
an HTML page for the console), every message it accepted is in PostgreSQL (read directly,
not through the proxy), and after the restore it accepts messages again by itself. The
worker keeps polling through the cut, waiting between tries, and delivers what was queued
meanwhile once the database is back."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import make_token
from tests.delivery.test_delivery import add_system, deliveries, ingest
from tests.delivery.test_worker import start_worker
from tests.fault_proxy import FaultProxy
from tests.ingestion.test_concurrency import start_server
from tests.sink import Answer
from tests.support import message, wait_for

pytestmark = pytest.mark.postgresql_only
PROBLEM = "application/problem+json"
TOKEN_CACHE_S = 1


@pytest.fixture
def proxy(database_url: str) -> Iterator[FaultProxy]:
    url = make_url(database_url)
    proxy = FaultProxy(url.host or "127.0.0.1", url.port or 5432).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def through(proxy: FaultProxy, database_url: str) -> str:
    return make_url(database_url).set(host="127.0.0.1", port=proxy.port).render_as_string(
        hide_password=False)


@dataclass(frozen=True)
class Seen:
    kind: str  # ingest, records, dashboard, console
    phase: str  # what the database was when the request was sent: up, cut, restored
    status: int | None  # None: no HTTP answer at all
    retry_after: str | None
    content_type: str
    body: Any


class Load:
    """Clients that send requests one after another until stopped, and note every answer."""

    def __init__(self) -> None:
        self.phase = "up"
        self.seen: list[Seen] = []
        self.stopping = asyncio.Event()

    def count(self, kind: str, phase: str, *, ok: bool) -> int:
        return sum(1 for seen in self.seen if seen.kind == kind and seen.phase == phase
                   and (seen.status is not None and 200 <= seen.status < 300) == ok)

    async def ingest(self, client: httpx.AsyncClient, sender: int) -> None:
        number = 0
        while not self.stopping.is_set():
            number += 1
            body = message(1, {"n": number}, entity_id=f"OUT-{sender}-{number}")
            await self._send("ingest", client.post("/api/v1/messages", json=body))

    async def read(self, client: httpx.AsyncClient, kind: str, path: str) -> None:
        while not self.stopping.is_set():
            await self._send(kind, client.get(path))

    async def _send(self, kind: str, request: Any) -> None:
        phase = self.phase
        try:
            response = await request
        except httpx.HTTPError as error:
            self.seen.append(Seen(kind, phase, None, None, "", repr(error)))
            return
        content_type = response.headers.get("content-type", "")
        body = response.json() if "json" in content_type else response.text
        self.seen.append(Seen(kind, phase, response.status_code,
                              response.headers.get("retry-after"), content_type, body))
        if response.status_code == 503:
            await asyncio.sleep(0.05)  # a client that retries soon, not one that waits


async def test_the_server_answers_2xx_or_503_through_a_cut_and_recovers_by_itself(
        database_url, database, proxy, tmp_path):
    ingest_token = await make_token(database, "ingest", name="outage-sender")
    viewer_token = await make_token(database, "viewer", name="outage-reader")
    # Tokens are remembered for 1 s: during the cut the token check itself, a dependency
    # that runs before the route, meets the outage too (and must answer 503 as well).
    process, base = await asyncio.to_thread(start_server, through(proxy, database_url),
                                            tmp_path, token_cache_s=TOKEN_CACHE_S)
    server_log = next(tmp_path.glob("server-*.log"))
    async with httpx.AsyncClient(base_url=base, timeout=30) as signer:  # a console session
        signed = await signer.post("/login", data={"token": viewer_token},
                                   headers={"origin": base})
        assert signed.status_code == 303, signed.text
        console_session = signed.cookies["console_session"]
    load = Load()
    limits = httpx.Limits(max_connections=20)
    try:
        async with (
            httpx.AsyncClient(base_url=base, timeout=30, limits=limits, headers={
                "Authorization": f"Bearer {ingest_token}"}) as sender,
            httpx.AsyncClient(base_url=base, timeout=30, headers={
                "Authorization": f"Bearer {viewer_token}"}) as reader,
            httpx.AsyncClient(base_url=base, timeout=30,
                              cookies={"console_session": console_session}) as browser,
        ):
            clients = [asyncio.create_task(load.ingest(sender, n)) for n in range(6)]
            clients += [
                asyncio.create_task(load.read(reader, "records", "/api/v1/records?limit=5")),
                asyncio.create_task(load.read(reader, "dashboard", "/api/v1/dashboard")),
                asyncio.create_task(load.read(browser, "console", "/")),
            ]
            kinds = ("ingest", "records", "dashboard", "console")
            try:
                await wait_for(lambda: load.count("ingest", "up", ok=True) >= 40, 60,
                               "messages accepted under load")
                load.phase = "cut"
                proxy.cut()
                cut_at = time.monotonic()
                await wait_for(lambda: all(load.count(kind, "cut", ok=False) >= 10
                                           for kind in kinds)
                               and time.monotonic() - cut_at > 2 * TOKEN_CACHE_S, 60,
                               "503s of every kind, from the routes and the token check")
                not_ready = await reader.get("/readyz")
                load.phase = "restored"
                proxy.restore()
                await wait_for(lambda: all(load.count(kind, "restored", ok=True) >= 3
                                           for kind in kinds)
                               and load.count("ingest", "restored", ok=True) >= 40, 60,
                               "answers of every kind to be 2xx again")
            finally:
                load.stopping.set()
                await asyncio.gather(*clients)
        assert process.poll() is None, "the server was not supposed to stop"
    finally:
        process.terminate()
        process.wait(timeout=30)

    tally = Counter((seen.kind, seen.phase, seen.status) for seen in load.seen)
    context = f"{sorted(tally.items(), key=str)}\n{server_log.read_text()[-3000:]}"
    unexpected = [seen for seen in load.seen
                  if seen.status is None or not (200 <= seen.status < 300 or seen.status == 503)]
    assert unexpected == [], f"{unexpected[:5]}\n{context}"
    for seen in load.seen:
        if seen.status == 503:
            assert seen.retry_after is not None and int(seen.retry_after) > 0, seen
            expected = "text/html" if seen.kind == "console" else PROBLEM
            assert seen.content_type.startswith(expected), seen
    assert proxy.cut_connections > 0, "the cut found no connection to break"
    assert not_ready.status_code == 503 and not_ready.headers["retry-after"]

    # Every accepted message is in PostgreSQL, exactly as its answer said (read directly).
    accepted = [seen.body for seen in load.seen if seen.kind == "ingest" and seen.status == 200]
    assert {body["decision"] for body in accepted} == {"accept_new"}
    url = make_url(database_url).set(drivername="postgresql")
    connection = await asyncpg.connect(url.render_as_string(hide_password=False))
    try:
        stored = await connection.fetch(
            "SELECT id, idempotency_key, decision FROM ingestion_attempts "
            "WHERE id = ANY($1::bigint[])", [body["attempt_id"] for body in accepted])
        states = await connection.fetchval(
            "SELECT count(*) FROM record_states WHERE idempotency_key = ANY($1::text[])",
            [body["idempotency_key"] for body in accepted])
    finally:
        await connection.close()
    assert {tuple(row) for row in stored} == {
        (body["attempt_id"], body["idempotency_key"], "accept_new") for body in accepted}
    assert states == len(accepted)


async def wait_until_delivered(client: httpx.AsyncClient, count: int) -> None:
    deadline = time.monotonic() + 30
    while [d["status"] for d in await deliveries(client)] != ["delivered"] * count:
        assert time.monotonic() < deadline, "timed out waiting for the delivery's record"
        await asyncio.sleep(0.1)


async def test_a_worker_keeps_running_through_a_cut_and_delivers_once_the_database_is_back(
        database_url, client, sink, clock, proxy, tmp_path):
    clock.now = datetime.now(UTC)  # worker processes run on the real clock
    await add_system(client, sink, timeout_s=5)
    log = tmp_path / "worker.log"
    worker = start_worker(through(proxy, database_url), log)  # polls every 0.2 s

    def failed_passes() -> int:
        return log.read_text().count("claiming failed")

    try:
        await wait_for(lambda: "started" in log.read_text(), 60, "the worker to start")
        await ingest(client, message(1, entity_id="BEFORE"))
        # Sent and recorded first: a cut between a send and its record is retried by the
        # worker's pipeline (tests/delivery/test_faults.py has the cut worker cases).
        await wait_until_delivered(client, 1)

        proxy.cut()
        await wait_for(lambda: failed_passes() >= 1, 30, "the worker to meet the cut")
        # Queued meanwhile, straight into PostgreSQL (the test's client does not use the
        # proxy): the worker cannot see them yet.
        await ingest(client, *[message(1, entity_id=f"DURING-{n}") for n in range(5)])
        failed, since = failed_passes(), time.monotonic()
        await wait_for(lambda: failed_passes() >= failed + 3, 30, "the worker to keep trying")
        # ...backing off between tries (0.5 s, then twice as long each time, up to 10 s),
        # not spinning: three more failed claims span at least two waits
        assert time.monotonic() - since >= 0.5 + 1.0
        assert worker.poll() is None, log.read_text()[-3000:]
        assert len(sink.received) == 1

        proxy.restore()
        await wait_for(lambda: len(sink.keys_received()) == 6, 60,
                       "the deliveries queued during the cut")
        assert worker.poll() is None
    finally:
        worker.send_signal(signal.SIGTERM)
        exit_code = worker.wait(timeout=30)
    assert exit_code == 0  # still the same process, stopping gracefully
    assert set(sink.keys_received().values()) == {1}  # each sent once
    assert {delivery["status"] for delivery in await deliveries(client)} == {"delivered"}


async def test_an_outcome_that_could_not_be_recorded_is_recorded_once_the_database_is_back(
        database_url, client, sink, clock, proxy, tmp_path):
    """The cut falls between a send and its record: the sink has the request, the worker
    cannot write the answer. It keeps the answer and records it when the database returns:
    delivered, one attempt, nothing ambiguous, nothing sent twice."""
    clock.now = datetime.now(UTC)  # worker processes run on the real clock
    release = threading.Event()
    sink.answer(Answer(200, hold=release))
    await add_system(client, sink, timeout_s=10)
    log = tmp_path / "worker.log"
    worker = start_worker(through(proxy, database_url), log)
    try:
        await wait_for(lambda: "started" in log.read_text(), 60, "the worker to start")
        await ingest(client, message(1, entity_id="HELD"))
        await wait_for(lambda: sink.in_flight == 1, 30, "the send to reach the sink")
        proxy.cut()
        release.set()  # the answer arrives while the database is unreachable
        await wait_for(lambda: "could not be recorded" in log.read_text(), 30,
                       "the worker to fail to record the outcome")
        proxy.restore()
        await wait_until_delivered(client, 1)
    finally:
        release.set()
        worker.send_signal(signal.SIGTERM)
        exit_code = worker.wait(timeout=30)
    assert exit_code == 0
    [delivery] = await deliveries(client)
    rows = (await client.get(f"/api/v1/deliveries/{delivery['id']}/attempts")).json()["items"]
    assert [row["classification"] for row in rows] == ["success"]
    assert (await client.get("/api/v1/ambiguous")).json()["items"] == []
    assert sink.keys_received() == {"customer:HELD:1": 1}
