"""What every broker shares: read a message's body the way POST /messages does, record it
through the group commit (one transaction for whatever arrived together, up to
CONSUMER_BATCH_SIZE), and only then acknowledge it.

- A message that is malformed or refused is recorded as `rejected`, then acknowledged: it is
  in the attempt log, and it is never redelivered for ever.
- A message that cannot be recorded because the database is away (unreachable, busy) is not
  acknowledged: it is tried again here with a growing pause (the broker keeps it; NATS is
  told it is still in progress), and on SIGTERM given back to the broker. One whose own
  transaction keeps failing otherwise (GIVE_BACK_AFTER times) is given back at once, so
  that it cannot hold the acknowledgements of the messages after it.
- Killed at any point, the process loses nothing: what was not acknowledged is redelivered,
  and what was committed but not yet acknowledged comes back as `skip_duplicate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from prometheus_client import Counter

from pipeline_console import failpoints
from pipeline_console.clock import system_clock
from pipeline_console.config import Settings
from pipeline_console.consumers.registry import ConsumerIdentity, Counts
from pipeline_console.db import Database, unavailability
from pipeline_console.ingestion.group_commit import GroupCommitClosed, GroupCommitter, Result
from pipeline_console.ingestion.intake import RejectedMessage, message_from_body
from pipeline_console.ingestion.planner import IncomingMessage
from pipeline_console.ingestion.service import Rejected
from pipeline_console.metrics import count_ingestion

log = logging.getLogger("pipeline_console.consume")

INTAKE_MESSAGES = Counter(
    "pipeline_intake_messages_total",
    "Broker messages this consumer took: acknowledged after their commit (rejected ones "
    "among them counted again as rejected), or given back to the broker unrecorded",
    ["kind", "queue", "outcome"])

RETRY_FIRST_S, RETRY_MAX_S = 0.5, 15.0
GIVE_BACK_AFTER = 5  # failures of a message's own transaction (not an outage) in a row


class BrokerError(Exception):
    """The broker cannot be used as asked (unreachable, no such stream): one line for the
    operator, without credentials."""


@dataclass(frozen=True)
class Received:
    """One broker message: its body, and how to acknowledge it, give it back, or tell the
    broker it is still being worked on (NATS; None for RabbitMQ, which waits)."""

    body: bytes
    ack: Callable[[], Awaitable[None]]
    release: Callable[[], Awaitable[None]]
    keep_alive: Callable[[], Awaitable[None]] | None = None


class Broker(Protocol):
    kind: str
    queue: str
    source: str  # without credentials

    async def connect(self) -> None: ...

    async def consume(self, intake: Intake, stop: asyncio.Event) -> None:
        """Hand every message to intake.take until `stop` is set; then stop the broker from
        sending more and return."""

    async def backlog(self) -> int | None:
        """What waits on the broker for this consumer now (None: it could not say)."""

    async def close(self) -> None: ...


class Intake:
    def __init__(self, database: Database, settings: Settings, identity: ConsumerIdentity,
                 stop: asyncio.Event, clock: Callable[[], datetime] = system_clock) -> None:
        self.settings, self.identity, self.stop, self.clock = settings, identity, stop, clock
        self.committer = GroupCommitter(database, max_messages=settings.consumer_batch_size)
        self.counts = Counts()
        self.actor = f"consumer:{identity.kind}:{identity.queue}"
        self._tasks: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        self._room.set()
        self._labels = (identity.kind, identity.queue)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def wait_for_room(self, limit: int) -> None:
        while len(self._tasks) >= limit and not self.stop.is_set():
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), 1.0)

    def take(self, message: Received) -> None:
        task = asyncio.create_task(self._handle(message))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._room.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("handling a broker message failed", exc_info=task.exception())

    async def drain(self) -> None:
        """Wait for the messages in hand (recorded and acknowledged, or given back), then
        close the group commit."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.committer.close()

    async def _handle(self, message: Received) -> None:
        self.counts.received += 1
        failpoints.hit("consume.received")
        settings = self.settings
        try:
            item = message_from_body(
                message.body, max_bytes=settings.max_message_bytes,
                excerpt_bytes=settings.rejected_body_excerpt_bytes,
                max_depth=settings.max_payload_depth,
                max_string_length=settings.max_payload_string_length)
            result = await self._record(item, message)
        except Exception:  # never leave a message unsettled: RabbitMQ's acks wait for it
            await _give_back(message)
            raise
        if result is None:
            INTAKE_MESSAGES.labels(*self._labels, "released").inc()
            return
        failpoints.hit("consume.committed")
        try:
            await message.ack()
        except Exception as error:  # the broker will send it again: skip_duplicate then
            log.warning("acknowledging a recorded message failed (%s: %s); the broker will "
                        "redeliver it and it will be recorded as skip_duplicate",
                        type(error).__name__, error)
            return
        self.counts.acknowledged += 1
        INTAKE_MESSAGES.labels(*self._labels, "acknowledged").inc()
        if isinstance(result, Rejected):
            self.counts.rejected += 1
            INTAKE_MESSAGES.labels(*self._labels, "rejected").inc()

    async def _record(self, item: IncomingMessage | RejectedMessage,
                      message: Received) -> Result | None:
        """The committed result, or None once the message was given back to the broker."""
        delay, failures = RETRY_FIRST_S, 0
        while True:
            try:
                result = await self.committer.ingest(item, actor=self.actor, now=self.clock())
            except GroupCommitClosed:
                await _give_back(message)
                return None
            except Exception as error:
                if self.stop.is_set():
                    await _give_back(message)
                    return None
                why = unavailability(error)
                if why is None:
                    failures += 1
                    if failures >= GIVE_BACK_AFTER:
                        # not an outage: this message's own transaction keeps failing. Held
                        # here it would hold every later acknowledgement (RabbitMQ's are
                        # cumulative) and, once prefetch is full, the whole consumer
                        log.error("a broker message failed to be recorded %d times (%s: %s); "
                                  "it is given back to the broker", failures,
                                  type(error).__name__, error)
                        await _give_back(message)
                        return None
                log.warning("a broker message could not be recorded (%s); it stays "
                            "unacknowledged and is tried again in %.1f s",
                            f"database {why}" if why else f"{type(error).__name__}: {error}",
                            delay)
                if message.keep_alive is not None:
                    with contextlib.suppress(Exception):
                        await message.keep_alive()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            count_ingestion([item], [result])
            return result


async def _give_back(message: Received) -> None:
    try:
        await message.release()
    except Exception as error:  # gone with the connection: the broker redelivers it anyway
        log.info("giving a message back failed (%s); the broker redelivers it", error)
