"""Group commit for POST /messages: concurrent single-message requests share transactions.

A transaction per message costs a commit (an fsync on SQLite, a round trip and a WAL flush on
PostgreSQL) per message, and on SQLite every writer waits for the one before it anyway. So a
request does not open its own transaction: it queues its parsed message and waits. One flusher
task takes everything queued (up to a cap), decides it with `ingest_messages` in one
transaction, and only after the commit resolves each caller's future with that caller's own
result. Requests that arrive while a group is being written form the next group, so the
group size follows the load by itself: one message when idle, many under load.

What each caller may rely on:
- No answer before its commit: a future is resolved only after `run_transaction` returned.
- A failing commit fails every caller of the group (each gets the exception, never a result).
- One message that makes the shared transaction fail does not fail the others: the group is
  then written again one message per transaction, and each caller gets its own outcome.
  The database being unreachable or busy (db.unavailability) fails the whole group at once.
- Order: messages are decided in the order they were queued, which is the order sequential
  requests would have had (the planner decides a batch in order, as if one at a time).
- Actors: a group may mix callers with different tokens. It is written as consecutive runs of
  the same actor, each run one `ingest_messages` call, all in the one transaction, so every
  audit event names its own caller and the order across runs is kept.
- A caller that went away before its message was taken is dropped (nothing was written, as
  a cancelled request's rolled-back transaction would leave it); once taken, it is written.
- `close()` drains: everything queued is written and answered before it returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import groupby

from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.db import Database, unavailability
from pipeline_console.ingestion.intake import RejectedMessage
from pipeline_console.ingestion.planner import IncomingMessage
from pipeline_console.ingestion.service import Accepted, Rejected, ingest_messages

log = logging.getLogger("pipeline_console.ingestion.group_commit")

Result = Accepted | Rejected


class GroupCommitClosed(RuntimeError):
    """The committer is shutting down and takes no new messages."""


@dataclass(frozen=True)
class _Pending:
    item: IncomingMessage | RejectedMessage
    actor: str
    now: datetime
    future: asyncio.Future[Result]


class GroupCommitter:
    """One per process (per event loop): queues messages and writes them in groups."""

    def __init__(self, database: Database, *, max_messages: int = 500) -> None:
        self._database = database
        self._max_messages = max_messages
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False

    async def ingest(self, item: IncomingMessage | RejectedMessage, *, actor: str,
                     now: datetime) -> Result:
        """Decide and record one message; returns after the transaction that holds it has
        committed, or raises what made that transaction fail."""
        if self._closing:
            raise GroupCommitClosed("the server is shutting down")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(item, actor, now, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._run(), name="group-commit flusher")
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        """Write and answer everything queued, then stop the flusher."""
        self._closing = True
        self._wakeup.set()
        if self._flusher is not None:
            await self._flusher

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            group = self._take()
            if not group:
                continue
            try:
                await self._flush(group)
            except BaseException as error:  # never leave a caller waiting forever
                for pending in group:
                    _fail(pending, error)
                if not isinstance(error, Exception):
                    raise
                log.exception("group commit: writing a group failed unexpectedly")

    def _take(self) -> list[_Pending]:
        group: list[_Pending] = []
        while self._queue and len(group) < self._max_messages:
            pending = self._queue.popleft()
            if not pending.future.cancelled():  # its caller went away before any write
                group.append(pending)
        return group

    async def _flush(self, group: list[_Pending]) -> None:
        try:
            results = await self._database.run_transaction(
                lambda session: _ingest_group(session, group))
        except Exception as error:
            if len(group) == 1 or unavailability(error) is not None:
                # The database is gone or busy, not one message's fault: writing the group
                # again one by one would only wait for it once per message.
                for pending in group:
                    _fail(pending, error)
                return
            log.warning("group commit: a group of %d failed (%s: %s); writing it again one "
                        "message per transaction", len(group), type(error).__name__, error)
            await self._flush_one_by_one(group)
            return
        for pending, result in zip(group, results, strict=True):
            _resolve(pending, result)

    async def _flush_one_by_one(self, group: list[_Pending]) -> None:
        for pending in group:
            try:
                [result] = await self._database.run_transaction(
                    lambda session, pending=pending: ingest_messages(
                        session, [pending.item], now=pending.now, actor=pending.actor))
            except Exception as error:
                _fail(pending, error)
            else:
                _resolve(pending, result)


async def _ingest_group(session: AsyncSession, group: Sequence[_Pending]) -> list[Result]:
    """The group in order, as consecutive runs of one actor in one transaction. A run's
    rows carry the time its first request was received."""
    results: list[Result] = []
    for actor, run in groupby(group, key=lambda pending: pending.actor):
        members = list(run)
        results.extend(await ingest_messages(
            session, [pending.item for pending in members], now=members[0].now, actor=actor))
    return results


def _resolve(pending: _Pending, result: Result) -> None:
    if not pending.future.done():
        pending.future.set_result(result)


def _fail(pending: _Pending, error: BaseException) -> None:
    if pending.future.done():
        return
    if isinstance(error, Exception):
        pending.future.set_exception(error)
    else:  # the flusher itself was cancelled: so is the wait
        pending.future.cancel()
