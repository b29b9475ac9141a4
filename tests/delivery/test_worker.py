"""The worker as a real process: killed mid-send, and several draining one queue."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import pairwise

from tests.delivery.test_delivery import add_system, attempts, deliveries, ingest, run_pass
from tests.sink import Answer
from tests.support import message, wait_for


def start_worker(database_url: str, log_path, **settings: object) -> subprocess.Popen:
    env = {**os.environ, "PIPELINE_CONSOLE_DATABASE_URL": database_url,
           "PIPELINE_CONSOLE_WORKER_POLL_INTERVAL_S": "0.2",
           **{f"PIPELINE_CONSOLE_{name.upper()}": str(value)
              for name, value in settings.items()}}
    return subprocess.Popen([sys.executable, "-m", "pipeline_console.cli", "worker"], env=env,
                            stdout=log_path.open("a"), stderr=subprocess.STDOUT)


async def test_a_worker_killed_mid_send_leaves_the_delivery_ambiguous(
        database_url, client, sink, clock, tmp_path):
    clock.now = datetime.now(UTC)  # worker processes run on the real clock
    sink.answer(Answer(200, delay_s=20), Answer(200))
    await add_system(client, sink, timeout_s=30)
    await ingest(client, message(1))
    worker = start_worker(database_url, tmp_path / "worker.log")
    try:
        await wait_for(lambda: len(sink.received) == 1, 30, "the send to start")
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
    finally:
        worker.kill()
    [delivery] = await deliveries(client)
    assert delivery["status"] == "in_flight"  # nothing lost: still claimed, with a lease

    clock.now = datetime.now(UTC) + timedelta(hours=1)  # past the dead worker's lease
    result = await run_pass(client)
    assert result["recovered_as_ambiguous"] == 1
    [delivery] = await deliveries(client)
    assert delivery["status"] == "ambiguous"
    [attempt] = await attempts(client, delivery["id"])
    assert (attempt["classification"], attempt["rule"]) == ("worker_lost", "lease_expired")
    assert attempt["actor"].startswith("worker:")

    # A new worker never sends it blindly: the operator (or a status query) decides.
    restarted = start_worker(database_url, tmp_path / "restarted.log")
    try:
        # SIGTERM is graceful once the worker runs (before that the process is only importing)
        await wait_for(lambda: "started" in (tmp_path / "restarted.log").read_text(), 60,
                       "the worker to start")
        await asyncio.sleep(2)
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(timeout=30) == 0
    assert len(sink.received) == 1
    assert (await client.get("/api/v1/ambiguous?status=open")).json()["items"]


async def test_several_workers_deliver_every_delivery_exactly_once(
        database_url, client, sink, clock, tmp_path, backend):
    clock.now = datetime.now(UTC)  # worker processes run on the real clock
    count, workers = 300, (4 if backend == "postgresql" else 2)
    # Generous limits: on a loaded CI machine a refused or slow connection is retried, which
    # is fine; what must never happen is one key arriving twice.
    await add_system(client, sink, failure_threshold=1000, timeout_s=20, max_attempts=50,
                     backoff_base_s=0.05, backoff_max_s=0.5)
    sink.answer(Answer(200, delay_s=0.05))  # one worker alone would take seconds: they share
    processes = [start_worker(database_url, tmp_path / f"worker-{n}.log", worker_batch_size=10)
                 for n in range(workers)]
    try:
        # every worker running before there is work: one that started seconds earlier
        # would otherwise drain the whole queue alone
        await wait_for(lambda: all("started" in (tmp_path / f"worker-{n}.log").read_text()
                                   for n in range(workers)), 90, "every worker to start")
        await ingest(client, *[message(1, entity_id=f"W-{i:03}") for i in range(count)])
        try:
            await wait_for(lambda: len(sink.keys_received()) >= count, 180, "all deliveries")
        except AssertionError:
            statuses = Counter(d["status"] for d in await deliveries(client, limit=500))
            raise AssertionError(f"received {len(sink.keys_received())} of {count}; "
                                 f"delivery statuses: {dict(statuses)}") from None
        await asyncio.sleep(0.5)  # room for a duplicate to show up, if there were one
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        exit_codes = [process.wait(timeout=60) for process in processes]
    assert exit_codes == [0] * workers  # graceful shutdown on SIGTERM
    received = sink.keys_received()
    assert len(received) == count
    assert set(received.values()) == {1}, [k for k, n in received.items() if n > 1]
    statuses = {d["status"] for page in [await deliveries(client, limit=500)] for d in page}
    assert statuses == {"delivered"}
    senders = set()
    for delivery in (await deliveries(client, limit=500))[:count]:
        senders.update(a["actor"] for a in await attempts(client, delivery["id"]))
    assert len(senders) > 1, "the work was not shared between the workers"
    # The workers share one schedule: each scheduled job ran once per interval, not once
    # per worker (the intervals are 60 s and more; this test is shorter than that).
    for job in ("promote_staging", "query_ambiguous", "stale_partial_sweep"):
        runs = (await client.get(f"/api/v1/jobs/runs?job={job}")).json()["items"]
        starts = sorted(datetime.fromisoformat(run["started_at"]) for run in runs)
        assert starts and {run["trigger"] for run in runs} == {"worker"}, job
        gaps = [(later - earlier).total_seconds() for earlier, later in pairwise(starts)]
        assert all(gap >= 29 for gap in gaps), (job, gaps)


async def test_sigterm_mid_batch_releases_the_claims_not_yet_sent(
        database_url, client, sink, clock, tmp_path):
    """A real worker process with a batch of six, sending two at a time: SIGTERM while the
    first two are at the sink. They finish and are recorded; the four never sent go back to
    pending (no attempt, no lease), and the worker exits 0."""
    clock.now = datetime.now(UTC)  # worker processes run on the real clock
    sink.answer(Answer(200, delay_s=1.5))
    await add_system(client, sink, timeout_s=10)
    await ingest(client, *[message(1, entity_id=f"G-{n}") for n in range(6)])
    log = tmp_path / "worker.log"
    worker = start_worker(database_url, log, worker_concurrency=2, worker_batch_size=6)
    try:
        await wait_for(lambda: len(sink.received) == 2, 60, "the first two sends")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    finally:
        worker.kill()
    assert len(sink.received) == 2
    statuses = Counter(d["status"] for d in await deliveries(client))
    assert statuses == {"delivered": 2, "pending": 4}
    for delivery in await deliveries(client, status="pending"):
        assert delivery["attempts"] == 0 and delivery["claimed_by"] is None
        assert await attempts(client, delivery["id"]) == []
