"""pipeline-console consume: connect, register, take messages until SIGTERM or SIGINT, then
finish what is in hand (recorded and acknowledged), give back the rest, record that the
consumer stopped, and exit. A heartbeat carries the counts and the broker's backlog."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from prometheus_client import start_http_server

from pipeline_console.clock import system_clock
from pipeline_console.config import Settings
from pipeline_console.consumers.base import Broker, BrokerError, Intake
from pipeline_console.consumers.registry import ConsumerIdentity, heartbeat, mark_stopped
from pipeline_console.db import Database, create_engine, unavailability
from pipeline_console.schema import current_revision, head_revision

log = logging.getLogger("pipeline_console.consume")


async def _check_database(database: Database, stop: asyncio.Event) -> bool:
    """At start-up the database must exist and be migrated (BrokerError, one line, else: a
    consumer that cannot record anything would only take messages to give them back). An
    outage (unreachable, busy) is waited out, as once running (base.py). False: stopped
    while waiting."""
    delay = 0.5
    while True:
        try:
            revision = await current_revision(database.engine)
            break
        except Exception as error:
            why = unavailability(error)
            if why is None:
                raise BrokerError(f"the database cannot be used ({type(error).__name__}): "
                                  "check PIPELINE_CONSOLE_DATABASE_URL") from None
            log.warning("the database is %s; the consumer waits for it (next try in %.1f s)",
                        why, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return False
            delay = min(delay * 2, 15.0)
    expected = head_revision()
    if revision != expected:
        raise BrokerError(f"the database's schema is at {revision or 'nothing'}, not "
                          f"{expected}: run `pipeline-console migrate` first")
    return True


async def run_consumer(settings: Settings, broker: Broker,
                       stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    for noisy in ("aio_pika", "aiormq", "nats"):  # they may log URLs; ours never hold secrets
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    database = Database(create_engine(settings))
    try:
        if not await _check_database(database, stop):
            await database.dispose()
            return
        await broker.connect()
    except BaseException:
        await database.dispose()
        raise
    identity = ConsumerIdentity(broker.kind, broker.source, broker.queue)
    intake = Intake(database, settings, identity, stop)
    drained = asyncio.Event()
    beat = asyncio.create_task(_beat(database, identity, intake, broker, settings, drained))
    server = None
    if settings.consumer_metrics_port:
        server, _ = start_http_server(settings.consumer_metrics_port,
                                      addr=settings.worker_metrics_host)
    log.info("consumer %s started on %s %s", identity.id, broker.source, broker.queue)
    try:
        await broker.consume(intake, stop)
        await intake.drain()
    finally:
        drained.set()
        with contextlib.suppress(asyncio.CancelledError):
            await beat
        try:
            await mark_stopped(database, identity, intake.counts, system_clock())
        except Exception as error:
            log.warning("could not record that consumer %s stopped: %s", identity.id, error)
        with contextlib.suppress(Exception):
            await broker.close()
        await database.dispose()
        if server is not None:
            server.shutdown()
            server.server_close()
        counts = intake.counts
        log.info("consumer %s stopped: %d received, %d acknowledged (%d rejected)",
                 identity.id, counts.received, counts.acknowledged, counts.rejected)


async def _beat(database: Database, identity: ConsumerIdentity, intake: Intake,
                broker: Broker, settings: Settings, drained: asyncio.Event) -> None:
    """Every CONSUMER_HEARTBEAT_S until the messages in hand are finished; a failed heartbeat
    (the database or the broker away) is logged and tried again at the next."""
    while not drained.is_set():
        try:
            backlog = await asyncio.wait_for(broker.backlog(), settings.consumer_heartbeat_s)
        except Exception:
            backlog = None
        try:
            await heartbeat(database, identity, intake.counts, backlog, system_clock())
        except Exception as error:
            log.warning("consumer heartbeat failed: %s", error)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(drained.wait(), settings.consumer_heartbeat_s)
