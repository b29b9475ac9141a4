"""pipeline-console worker: registers itself, heartbeats, keeps up to WORKER_CONCURRENCY
sends in flight (pipeline.py), runs the scheduled jobs and recovers lost claims, until
SIGTERM or SIGINT. On a signal it stops claiming, finishes the sends under way, releases
the claims it has not sent yet (back to pending), records that it stopped, and exits;
anything it could not finish is recovered as ambiguous (worker_lost) by the next worker.
Several workers (on several machines, on PostgreSQL) never send one delivery twice: claims
use FOR UPDATE SKIP LOCKED, and the fence (claims.may_send) stops a worker that was frozen
from sending what another worker may have recovered."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator

from prometheus_client import start_http_server

from pipeline_console.clock import system_clock
from pipeline_console.config import Settings
from pipeline_console.db import Database, create_engine, unavailability
from pipeline_console.delivery.base import StallWatch
from pipeline_console.delivery.claims import recover_lost_claims
from pipeline_console.delivery.pipeline import Pipeline
from pipeline_console.delivery.service import Deliverer
from pipeline_console.delivery.startup import check_connections
from pipeline_console.delivery.transports import Transports
from pipeline_console.delivery.vault import Vault
from pipeline_console.delivery.workers import Identity, Liveness, heartbeat, mark_stopped
from pipeline_console.jobs.registry import run_job
from pipeline_console.jobs.schedule import (
    RETRY_FAILED_AFTER,
    Scheduled,
    claim_scheduled_run,
    release_failed_run,
    worker_schedule,
)

log = logging.getLogger("pipeline_console.worker")


# However far off the shared schedule says a job is, look again at least this often (an
# operator may change the schedule, or another worker may have a shorter interval).
MAX_SCHEDULE_WAIT_S = 60.0
# Lost claims (expired leases, lost workers) are looked for this often (or every third of
# WORKER_LOST_AFTER_S, if that is shorter).
RECOVER_EVERY_S = 5.0
RECOVER_LIMIT = 100  # recovered per transaction


async def _run_if_due(deliverer: Deliverer, settings: Settings, scheduled: Scheduled) -> float:
    """Run the job if its shared schedule says so and this worker claimed the run; return
    when (time.time()) to look again. A failed run is tried again in a few minutes."""
    try:
        claim = await claim_scheduled_run(deliverer.database, scheduled,
                                          now=deliverer.clock, worker=deliverer.worker_id)
        due = claim.due
        if claim.claimed:
            record = await run_job(deliverer, settings, scheduled.job,
                                   actor=deliverer.worker_id, trigger="worker")
            if record.status == "failed":
                await release_failed_run(deliverer.database, scheduled, claim,
                                         now=deliverer.clock(), worker=deliverer.worker_id)
                due = deliverer.clock() + RETRY_FAILED_AFTER
    except Exception as error:
        if unavailability(error):  # the database is away: expected, one line
            log.warning("scheduled job %s could not start: %s", scheduled.job, error)
        else:
            log.exception("scheduled job %s could not start", scheduled.job)
        return time.time() + 5
    wait = (due - deliverer.clock()).total_seconds()
    return time.time() + min(max(wait, 0.0), MAX_SCHEDULE_WAIT_S)


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


async def run_worker(settings: Settings, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    with serve_metrics(settings):
        await _deliver_until_stopped(settings, stop)


@contextlib.contextmanager
def serve_metrics(settings: Settings) -> Iterator[None]:
    """With WORKER_METRICS_PORT set, serve this process's counters (its delivery attempts)
    for Prometheus; the shared gauges are on the API's GET /metrics."""
    if not settings.worker_metrics_port:
        yield
        return
    server, _ = start_http_server(settings.worker_metrics_port,
                                  addr=settings.worker_metrics_host)
    log.info("worker metrics on http://%s:%d/metrics", settings.worker_metrics_host,
             settings.worker_metrics_port)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


async def _deliver_until_stopped(settings: Settings, stop: asyncio.Event) -> None:
    """Three loops side by side: the heartbeat, the delivery pipeline, and housekeeping
    (scheduled jobs, recovering lost claims). The pipeline ends once `stop` is set and what
    was under way is recorded; then the worker says it stopped."""
    database = Database(create_engine(settings))
    vault = Vault.from_settings(settings)
    try:
        await check_connections(database, vault)
    except BaseException:
        await database.dispose()
        raise
    identity = Identity.new()
    liveness = Liveness(settings.worker_lost_after_s, settings.lease_safety_s)
    async with Transports.open(max_connections=settings.worker_concurrency * 2) as transports:
        deliverer = Deliverer(database, transports, system_clock, worker_id=identity.id,
                              lease_margin_s=settings.lease_margin_s,
                              lease_safety_s=settings.lease_safety_s, liveness=liveness,
                              stalls=StallWatch(), vault=vault)
        pipeline = Pipeline(deliverer, settings.worker_concurrency, settings.worker_batch_size,
                            stop, poll_interval_s=settings.worker_poll_interval_s)
        registered, drained = asyncio.Event(), asyncio.Event()
        # The heartbeat goes on until the pipeline has drained (its sends finished and
        # recorded): a stopping worker's claims must not look lost while it finishes them.
        background = [asyncio.create_task(_beat(deliverer, identity, settings, drained,
                                                registered)),
                      asyncio.create_task(_housekeeping(deliverer, settings, stop)),
                      asyncio.create_task(deliverer.stalls.run())]
        with contextlib.suppress(TimeoutError):  # claims made before it would be void
            await asyncio.wait_for(registered.wait(), settings.worker_lost_after_s)
        log.info("worker %s started", deliverer.worker_id)
        try:
            await pipeline.run()
        finally:
            drained.set()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            try:
                await mark_stopped(database, identity, system_clock())
            except Exception:
                log.exception("could not record that worker %s stopped", identity.id)
            await database.dispose()
            log.info("worker %s stopped", deliverer.worker_id)


async def _beat(deliverer: Deliverer, identity: Identity, settings: Settings,
                stop: asyncio.Event, registered: asyncio.Event) -> None:
    """Heartbeat every WORKER_HEARTBEAT_S; through a database outage, keep trying (until a
    heartbeat commits again, the fence lets nothing be sent). `registered` is set after the
    first try, whatever its result."""
    assert deliverer.liveness is not None
    while not stop.is_set():
        try:
            await heartbeat(deliverer.database, identity, deliverer.liveness, deliverer.clock)
        except Exception as error:
            log.warning("heartbeat failed: %s", error)
        registered.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.worker_heartbeat_s)


async def _housekeeping(deliverer: Deliverer, settings: Settings, stop: asyncio.Event) -> None:
    """Scheduled jobs when due, and lost claims recovered every RECOVER_EVERY_S."""
    schedule = worker_schedule(settings)
    next_check = dict.fromkeys((scheduled.job for scheduled in schedule), 0.0)
    while not stop.is_set():
        for scheduled in schedule:
            if time.time() >= next_check[scheduled.job]:
                next_check[scheduled.job] = await _run_if_due(deliverer, settings, scheduled)
        try:
            while await recover_lost_claims(
                    deliverer, lost_after_s=settings.worker_lost_after_s,
                    alive_since=deliverer.liveness.epoch_since) == RECOVER_LIMIT:
                pass
        except Exception as error:  # the database went away, say: keep going, loudly
            log.warning("recovering lost claims failed: %s", error)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(),
                                   min(RECOVER_EVERY_S, settings.worker_lost_after_s / 3))
