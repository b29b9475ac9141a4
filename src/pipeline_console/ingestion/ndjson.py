"""pipeline-console ingest: NDJSON, one `POST /messages` body per line, from a file or stdin.

Each line is read the way every entrypoint reads a message (intake.message_from_body: the
same limits, the same rejections with a body excerpt) and recorded through ingest_messages,
the batch route's path: a batch of lines is one transaction. A malformed line is recorded as
`rejected` and counted; the run goes on. Running the same input twice changes nothing: the
second run is all `skip_duplicate` (or `skip_stale` where a key has moved on since).

A dry run decides every batch in one transaction that is rolled back at the end: a line sees
the lines before it in the same run (a file holding versions 1 and 2 of a key reports
`accept_new` then `accept_supersede`), and nothing is written.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import BinaryIO, NamedTuple, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console import failpoints
from pipeline_console.config import Settings
from pipeline_console.db import Database
from pipeline_console.ingestion.intake import RejectedMessage, message_from_body
from pipeline_console.ingestion.planner import IncomingMessage
from pipeline_console.ingestion.policy import REJECTED
from pipeline_console.ingestion.service import Accepted, Rejected, ingest_messages

# The summary's order: the five branches, then the rejections.
DECISIONS = ("accept_new", "accept_supersede", "skip_duplicate", "quarantine", "skip_stale",
             str(REJECTED))
REJECTIONS_KEPT = 20  # the first rejected lines are named; the rest only counted
_DRAIN_CHUNK = 65_536
T = TypeVar("T")


class Line(NamedTuple):
    number: int  # 1-based, blank lines included (as an editor numbers them)
    body: bytes  # without its line ending; the first max_bytes + 1 bytes of a longer line
    too_large: bool
    end: int  # bytes of the input read up to the end of this line


@dataclass(frozen=True)
class RejectedLine:
    number: int
    detail: str
    attempt_id: int | None  # None in a dry run: the attempt was rolled back


@dataclass
class Tally:
    """What a run has decided so far."""

    lines: int = 0  # non-blank lines decided
    batches: int = 0
    last_line: int = 0  # the number of the last line decided (committed, unless a dry run)
    bytes_read: int = 0
    decisions: Counter[str] = field(default_factory=Counter)
    rejections: list[RejectedLine] = field(default_factory=list)  # the first REJECTIONS_KEPT

    @property
    def rejected(self) -> int:
        return self.decisions[REJECTED]


def ingest_actor(name: str) -> str:
    """Who the attempt log says recorded a line: `cli:ingest:` and the file's name (`stdin`
    for standard input)."""
    return f"cli:ingest:{name[:64]}"


class _RollBack(Exception):
    """Ends a dry run's transaction."""


def read_lines(stream: BinaryIO, max_bytes: int) -> Iterator[Line]:
    """The non-blank lines of `stream`. A line longer than `max_bytes` is never held whole:
    its first max_bytes + 1 bytes come with too_large (the rest is skipped), the way POST
    /messages reads an oversized body."""
    limit = max_bytes + 2  # the line, its newline, and one byte more tells it is too long
    number = end = 0
    while chunk := stream.readline(limit):
        number += 1
        end += len(chunk)
        too_large = len(chunk) == limit and not chunk.endswith(b"\n")
        if too_large:
            while (rest := stream.readline(_DRAIN_CHUNK)) and not rest.endswith(b"\n"):
                end += len(rest)
            end += len(rest)
            body = chunk[: max_bytes + 1]
        else:
            body = chunk[:-1] if chunk.endswith(b"\n") else chunk
            if body.endswith(b"\r"):
                body = body[:-1]
            if number == 1 and body.startswith(b"\xef\xbb\xbf"):
                body = body[3:]  # a byte order mark, as some editors write: not the message's
            if not body.strip():
                continue
        yield Line(number, body, too_large, end)


async def ingest_ndjson(
    database: Database,
    lines: Iterable[Line],
    *,
    settings: Settings,
    actor: str,
    clock: Callable[[], datetime],
    batch_size: int,
    dry_run: bool = False,
    on_batch: Callable[[Tally], None] | None = None,
    tally: Tally | None = None,
) -> Tally:
    """Decide and record every line, `batch_size` lines per transaction (each retried from
    its start if PostgreSQL picks it as a deadlock victim). `on_batch` is told after each
    batch. A failure ends the run with the exception, the batches before it committed: the
    caller's `tally`, if it passed one, says how far the run got."""
    tally = tally if tally is not None else Tally()
    if not dry_run:
        await _ingest_batches(database.run_transaction, lines, tally, settings, actor, clock,
                              batch_size, on_batch, dry_run)
        return tally
    try:
        async with database.transaction() as session:

            async def in_the_one_transaction(work: Callable[[AsyncSession], Awaitable[T]]) -> T:
                return await work(session)

            await _ingest_batches(in_the_one_transaction, lines, tally, settings, actor,
                                  clock, batch_size, on_batch, dry_run)
            raise _RollBack
    except _RollBack:
        pass
    return tally


async def _ingest_batches(
    run: Callable[[Callable[[AsyncSession], Awaitable[list[Accepted | Rejected]]]],
                  Awaitable[list[Accepted | Rejected]]],
    lines: Iterable[Line],
    tally: Tally,
    settings: Settings,
    actor: str,
    clock: Callable[[], datetime],
    batch_size: int,
    on_batch: Callable[[Tally], None] | None,
    dry_run: bool,
) -> None:
    batch: list[Line] = []
    items: list[IncomingMessage | RejectedMessage] = []

    async def record() -> None:
        now = clock()
        results = await run(lambda session: ingest_messages(session, items, now=now,
                                                            actor=actor))
        if not dry_run:
            failpoints.hit("ingest.batch_committed")
        for line, result in zip(batch, results, strict=True):
            if isinstance(result, Rejected):
                tally.decisions[REJECTED] += 1
                if len(tally.rejections) < REJECTIONS_KEPT:
                    tally.rejections.append(RejectedLine(
                        line.number, result.rejection.detail,
                        None if dry_run else result.attempt_id))
            else:
                tally.decisions[result.decision] += 1
        tally.lines += len(batch)
        tally.batches += 1
        tally.last_line, tally.bytes_read = batch[-1].number, batch[-1].end
        batch.clear()
        items.clear()
        if on_batch is not None:
            on_batch(tally)

    for line in lines:
        batch.append(line)
        items.append(message_from_body(
            line.body, max_bytes=settings.max_message_bytes,
            excerpt_bytes=settings.rejected_body_excerpt_bytes,
            max_depth=settings.max_payload_depth,
            max_string_length=settings.max_payload_string_length, too_large=line.too_large))
        if len(batch) >= batch_size:
            await record()
    if batch:
        await record()
