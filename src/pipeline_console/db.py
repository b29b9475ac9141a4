"""Engine, sessions and the one place a transaction is opened.

The SQLite/PostgreSQL seam lives here too: SQLite write transactions start with
BEGIN IMMEDIATE (the write lock is taken up front, never upgraded mid-transaction) and are
serialized inside the process; PostgreSQL relies on row locks and unique constraints.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import operator
import random
import sqlite3
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar
from urllib.parse import quote as url_quote

import orjson
from sqlalchemy import JSON, String, Table, event, func, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import NullPool

from pipeline_console.config import Settings
from pipeline_console.models.base import UTCDateTime

_BEGIN_OPTION = "pipeline_console_sqlite_begin"
_CHECKPOINT_OPTION = "pipeline_console_sqlite_checkpoint"  # the file a checkpointer serves
# With the checkpointer running, a commit copies the log back itself only past this many
# pages (SQLite's default is 1,000): the safety net should the thread fall behind or die.
CHECKPOINT_FALLBACK_PAGES = 10_000
T = TypeVar("T")
log = logging.getLogger(__name__)


def create_engine(settings: Settings, *, null_pool: bool = False) -> AsyncEngine:
    url = make_url(settings.database_url)
    kwargs: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"timeout": settings.database_connect_timeout_s}
    if null_pool:
        kwargs["poolclass"] = NullPool
    elif url.get_backend_name() == "postgresql":
        kwargs.update(pool_size=settings.database_pool_size, max_overflow=0, pool_pre_ping=True)
    elif url.database not in (None, "", ":memory:"):
        # A file: keep DATABASE_POOL_SIZE connections open, no overflow. SQLAlchemy's default
        # (5, plus 10 overflow closed on return) made a busy server open and close an
        # aiosqlite connection — a thread, a connect, the PRAGMAs — for most requests.
        kwargs.update(pool_size=settings.database_pool_size, max_overflow=0)
    background = (url.get_backend_name() == "sqlite" and not null_pool
                  and settings.sqlite_checkpoint == "background"
                  and url.database not in (None, "", ":memory:") and "uri" not in url.query)
    if background:
        kwargs["execution_options"] = {_CHECKPOINT_OPTION: url.database}
    engine = create_async_engine(url, json_serializer=json_text, json_deserializer=json_value,
                                 **kwargs)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine, settings.sqlite_busy_timeout_ms,
                          CHECKPOINT_FALLBACK_PAGES if background else None)
    else:
        _report_failed_connects_as_database_errors(engine)
    return engine


# SQLSTATE 08001, sqlclient_unable_to_establish_sqlconnection: what a failed connect is.
CANNOT_CONNECT = "08001"


def _report_failed_connects_as_database_errors(engine: AsyncEngine) -> None:
    """asyncpg raises the socket's own error when it cannot connect (ConnectionRefusedError,
    socket.gaierror, TimeoutError, all OSErrors), and SQLAlchemy passes it on unwrapped:
    it would reach the edge as an OSError that nothing tells from any other. Here it becomes
    the driver's OperationalError with SQLSTATE 08001, so that every database error is a
    DBAPIError and `unavailability` reads one SQLSTATE. A TLS error is a configuration
    error, not an outage: it is left as it is."""

    @event.listens_for(engine.sync_engine, "do_connect")
    def connect(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        try:
            return dialect.connect(*cargs, **cparams)
        except ssl.SSLError:
            raise
        except OSError as error:
            failure = dialect.loaded_dbapi.OperationalError(
                f"cannot connect to the database: {error!r}", error)
            failure.sqlstate = failure.pgcode = CANNOT_CONNECT
            raise failure from error


def json_text(value: Any) -> str:
    """How JSON columns are written: orjson (several times faster than `json` on 1 KB
    payloads); the standard library only for what orjson refuses (integers beyond 64 bits,
    lone surrogates, non-string keys), so nothing that was storable before is refused now."""
    try:
        return orjson.dumps(value).decode()
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(value)


def json_value(text: str) -> Any:
    """How JSON columns are read: orjson (the inspector's rows are mostly JSON); the standard
    library for what orjson would misread or refuse: an integer literal beyond 64 bits (orjson
    reads it as a float of at least 2**63, so a value holding such a float is read again) and
    NaN or Infinity that `json` once wrote."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
    return json.loads(text) if _holds_huge_float(value) else value


def _holds_huge_float(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is float:
            if abs(item) >= 2**63:
                return True
        elif kind is dict:
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
    return False


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _configure_sqlite(engine: AsyncEngine, busy_timeout_ms: int,
                      autocheckpoint_pages: int | None) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver so that we emit BEGIN ourselves.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        if autocheckpoint_pages is not None:
            cursor.execute(f"PRAGMA wal_autocheckpoint={int(autocheckpoint_pages)}")
        cursor.close()
        # SQLite's own lower() folds ASCII only; PostgreSQL's folds every letter. The same
        # case-insensitive filter must find 'ÜBERZOGEN' on both.
        dbapi_connection.create_function("lower", 1, _lower, deterministic=True)

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


class WalCheckpointer:
    """Copies a SQLite file's write-ahead log back into the database in a thread of its own,
    woken after each commit of this process (and every `idle_s` in any case).

    SQLite's default does this inside the commit that takes the log past 1,000 pages: with
    batches of 1,000 messages that is nearly every commit, and it was about a quarter of a
    batch's time (bench/notes/01-ingestion.md). Here the commit only appends to the log, and
    the copy runs on another core while the next batch is decided. It is a PASSIVE
    checkpoint: it never waits for, and never blocks, readers or writers; what it cannot
    copy yet (frames a reader's snapshot still needs) it copies on a later round. Another
    process's checkpointer running at the same time makes this round a no-op. Durability is
    the log's, as before: a crash loses nothing that was committed.
    """

    def __init__(self, path: str, *, idle_s: float = 5.0) -> None:
        self.path = path
        self.idle_s = idle_s
        self.rounds = 0  # checkpoints completed, for tests and diagnostics
        self.last: tuple[int, int, int] | None = None  # SQLite's (busy, log, checkpointed)
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None  # the running thread's own stop signal
        self._failed_at = float("-inf")  # when the thread last could not open the file

    def notify(self) -> None:
        """A commit happened: copy the log back soon. Starts the thread on first use (by
        then the file exists: the thread never creates one), and again if it ended because
        it could not open the file (at most once per `idle_s`)."""
        with self._lock:
            if (self._thread is None or not self._thread.is_alive()) and \
                    time.monotonic() - self._failed_at >= self.idle_s:
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._run, args=(self._stop,),
                                                name="sqlite-wal-checkpoint", daemon=True)
                self._thread.start()
        self._wake.set()

    def stop(self) -> None:
        """Stop the thread and wait for it (at most one checkpoint round); its connection
        to the file is closed. The next commit's notify starts a new one."""
        with self._lock:
            thread, stop, self._thread, self._stop = self._thread, self._stop, None, None
        if stop is not None:
            stop.set()
            self._wake.set()
        if thread is not None:
            thread.join()

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _run(self, stop: threading.Event) -> None:
        try:
            connection = sqlite3.connect(f"file:{url_quote(self.path)}?mode=rw", uri=True,
                                         isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            self._failed_at = time.monotonic()
            log.exception("WAL checkpointer: cannot open %s; commits copy the log back "
                          "themselves past %d pages", self.path, CHECKPOINT_FALLBACK_PAGES)
            return
        try:
            while True:
                self._wake.wait(self.idle_s)
                self._wake.clear()
                if stop.is_set():
                    return
                try:
                    self.last = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error:  # the commit-time fallback still bounds the log
                    log.exception("WAL checkpoint of %s failed", self.path)
                else:
                    self.rounds += 1
        finally:
            connection.close()


class Database:
    """The engine plus the rules for opening a transaction. One per process."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._sessions = async_sessionmaker(engine, expire_on_commit=False, autoflush=False)
        if self.is_sqlite:
            write_engine = engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
            self._write_sessions = async_sessionmaker(
                write_engine, expire_on_commit=False, autoflush=False
            )
        else:
            self._write_sessions = self._sessions
        # SQLite allows one writer at a time; queueing writers here is far cheaper than
        # letting them spin in SQLite's busy handler.
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        checkpoint_path = engine.get_execution_options().get(_CHECKPOINT_OPTION)
        self.checkpointer = WalCheckpointer(checkpoint_path) if checkpoint_path else None

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A write transaction: committed when the block ends, rolled back on an exception."""
        lock = self._write_lock or contextlib.nullcontext()
        async with lock, self._write_sessions() as session, session.begin():
            yield session
        if self.checkpointer is not None:  # committed: the log has grown
            self.checkpointer.notify()

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A read-only transaction (never takes the SQLite write lock)."""
        async with self._sessions() as session, session.begin():
            yield session

    async def run_transaction(
        self, work: Callable[[AsyncSession], Awaitable[T]], *, attempts: int = 5
    ) -> T:
        """Run `work` in a write transaction; on PostgreSQL, run it again from the start if
        the database chose it as a deadlock or serialization victim (nothing of the failed
        try remains: it was rolled back)."""
        for attempt in range(attempts):
            try:
                async with self.transaction() as session:
                    return await work(session)
            except DBAPIError as error:
                if attempt == attempts - 1 or not is_retryable(error):
                    raise
                await asyncio.sleep(random.uniform(0.005, 0.02) * 2**attempt)
        raise AssertionError("unreachable")

    async def dispose(self) -> None:
        """Close every connection to the database, the checkpointer's too (the Database can
        still be used afterwards: connections are opened again as needed)."""
        if self.checkpointer is not None:
            await asyncio.to_thread(self.checkpointer.stop)
        await self.engine.dispose()


RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock detected, serialization failure


def is_retryable(error: DBAPIError) -> bool:
    return _sqlstate(error) in RETRYABLE_SQLSTATES


def _sqlstate(error: DBAPIError) -> str | None:
    original = getattr(error, "orig", None)
    return getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)


Unavailability = Literal["unreachable", "busy"]
# Class 08 is "connection exception" (refused, lost: 08001, 08003, 08006…); these say that the
# server is there but will not serve us now.
_UNREACHABLE_SQLSTATES = frozenset({
    "57P01",  # admin_shutdown: the server is shutting down
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now: starting up, shutting down, in recovery
    "57P05",  # idle_session_timeout: the server closed the session
})
_BUSY_SQLSTATES = frozenset({"53300"})  # too_many_connections
_SQLITE_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def unavailability(error: BaseException) -> Unavailability | None:
    """Whether `error` means the database cannot serve the request now, though the request
    itself is fine (the same request may succeed in a moment: an API answers 503 with
    Retry-After, a loop waits and tries again):

    - "unreachable": the connect was refused, timed out or named no host (SQLSTATE 08001,
      see _report_failed_connects_as_database_errors); the server is starting up or shutting
      down (57P01-57P03); the connection was lost mid-transaction (class 08, or SQLAlchemy
      saw the connection invalidated);
    - "busy": every pooled connection stayed in use past the pool timeout, the server has
      too many connections (53300), or another process held SQLite's lock past the busy
      timeout (SQLITE_BUSY, SQLITE_LOCKED);
    - None for everything else, a genuine bug or a configuration error among them: a
      constraint violated, bad SQL, a database or SQLite file that does not exist or cannot
      be opened, a wrong password, a TLS failure. Those stay 500 and are logged.

    An exception group is unavailable only if every exception in it is (unreachable if any
    is); one bug among them makes it a bug."""
    if isinstance(error, BaseExceptionGroup):
        kinds = {unavailability(member) for member in error.exceptions}
        if None in kinds or not kinds:
            return None
        return "unreachable" if "unreachable" in kinds else "busy"
    if isinstance(error, PoolTimeout):
        return "busy"
    if not isinstance(error, DBAPIError):
        return None
    state = _sqlstate(error)
    if error.connection_invalidated or (state is not None and (
            state.startswith("08") or state in _UNREACHABLE_SQLSTATES)):
        return "unreachable"
    if state in _BUSY_SQLSTATES:
        return "busy"
    code = getattr(error.orig, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in _SQLITE_BUSY_CODES:  # the primary result code
        return "busy"
    return None


def insert_for(dialect: str) -> Any:
    """The dialect's INSERT, which has on_conflict_do_nothing/on_conflict_do_update on both."""
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


_SEQUENCES: dict[tuple[str, str], str] = {}  # (database, table) → its id sequence


async def allocate_ids(session: AsyncSession, table: Any, count: int) -> list[int]:
    """Reserve `count` ids for rows about to be inserted, so that a batch is one multi-row
    INSERT without RETURNING (which SQLite would otherwise split into one INSERT per row).

    PostgreSQL draws them from the column's sequence. SQLite continues after the highest id;
    that is safe because every SQLite write transaction holds the database's write lock
    from its first statement (BEGIN IMMEDIATE).
    """
    if count == 0:
        return []
    if session.bind.dialect.name == "postgresql":
        # The sequence's name is a literal of the statement: looked up per id (a parameter
        # the planner cannot fold), it was 3.5 of the 4.5 ms that 1,000 ids took.
        place = (session.bind.url.render_as_string(hide_password=True), table.name)
        sequence = _SEQUENCES.get(place)
        if sequence is None:
            sequence = await session.scalar(text("SELECT pg_get_serial_sequence(:table, 'id')"),
                                            {"table": table.name})
            if sequence is None:
                raise RuntimeError(f"{table.name}.id has no sequence to draw ids from")
            _SEQUENCES[place] = sequence
        literal = sequence.replace("'", "''").replace(":", "\\:")  # text() reads :name
        result = await session.execute(
            text(f"SELECT nextval('{literal}'::regclass) FROM generate_series(1, :count)"),
            {"count": count},
        )
        return sorted(result.scalars())
    highest = await session.scalar(text(f"SELECT coalesce(max(id), 0) FROM {table.name}"))
    return list(range(highest + 1, highest + 1 + count))


def _converter(column: Any, dialect: Any) -> Callable[[Any], Any] | None:
    """The column type's own bind processing (UTCDateTime's checks, the JSON type's
    serializer and its None rule, SQLite's datetime text), so a driver-level write stores
    exactly what SQLAlchemy would. Timestamps are converted once per distinct value: a
    batch's rows share a handful."""
    process = column.type.dialect_impl(dialect).bind_processor(dialect)
    if process is None:
        return None
    if isinstance(column.type, JSON):
        # A JSON column's None is stored as its serialized form ('null', the type's
        # none_as_null=False): made once, not once per row (most attempts have no errors
        # and most staged rows no validation errors: two of every message's JSON values).
        none_form = process(None)

        def json_value(value: Any) -> Any:
            return none_form if value is None else process(value)

        return json_value
    if not isinstance(column.type, UTCDateTime):
        return process
    cache: dict[datetime, Any] = {}

    def datetime_value(value: datetime | None) -> Any:
        if value is None:
            return None
        if value not in cache:
            cache[value] = process(value)
        return cache[value]

    return datetime_value


@dataclass(frozen=True, slots=True)
class Same:
    """A value every row of a columnar write shares (the batch's timestamp, say): converted
    once, not once per row."""

    value: Any


@dataclass(frozen=True, slots=True)
class Stored:
    """A column's values already in the driver's form, made by `stored_form`: not converted
    again. A payload written to several tables is serialized once."""

    values: Sequence[Any]


# A plain sequence is always one value per row: a value shared by every row (a JSON list
# above all) must be wrapped in Same, or it would be spread over the rows.
Column = Sequence[Any] | Same | Stored


def stored_form(session: AsyncSession, table: Table, name: str) -> Callable[[Any], Any]:
    """What the column's type turns a value into for the driver (JSON text, SQLite datetime
    text), for values that several columnar writes share (see Stored)."""
    convert = _converter(table.c[name], session.bind.dialect)
    return convert if convert is not None else _unchanged


def _unchanged(value: Any) -> Any:
    return value


def _driver_columns(
    dialect: Any, table: Table, columns: dict[str, Column] | Sequence[tuple[str, Column]]
) -> list[tuple[Any, ...]]:
    """Rows as the tuples the driver takes, built from columns (name → values, or (name,
    values) pairs when a name recurs): each converted as the named column's type would
    convert it, by one map over the column (a Same value once), and the rows made by one
    zip. No object per row but the row's own tuple."""
    pairs = list(columns.items()) if isinstance(columns, dict) else columns
    lengths = {len(column.values) if isinstance(column, Stored) else len(column)
               for _, column in pairs if not isinstance(column, Same)}
    if len(lengths) != 1:
        raise ValueError(f"columns of different lengths, or none per row: {sorted(lengths)}")
    count = lengths.pop()
    parts: list[Any] = []
    for name, column in pairs:
        if isinstance(column, Stored):
            parts.append(column.values)
            continue
        convert = _converter(table.c[name], dialect)
        if isinstance(column, Same):
            parts.append(itertools.repeat(
                column.value if convert is None else convert(column.value), count))
        else:
            parts.append(column if convert is None else map(convert, column))
    return list(zip(*parts, strict=False))  # the lengths were checked above


def _driver_rows(
    dialect: Any, table: Table, names: list[str], rows: Sequence[dict[str, Any]]
) -> list[tuple[Any, ...]]:
    """Rows as the tuples the driver takes, converted as the column types would convert.
    Column by column (one map per converted column between two transpositions, instead of
    a Python loop over every value: a fifth of a batch's Python in the issue 8 profile)."""
    if len(names) > 1:
        columns = list(zip(*map(operator.itemgetter(*names), rows), strict=True))
    else:
        columns = [[row[names[0]] for row in rows]]
    return _driver_columns(dialect, table, dict(zip(names, columns, strict=True)))


def _marks(dialect: Any, count: int, start: int = 1) -> list[str]:
    if dialect.name == "sqlite":
        return ["?"] * count
    return [f"${n}" for n in range(start, start + count)]


async def bulk_insert(session: AsyncSession, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """A plain INSERT of many rows through the driver's executemany, without SQLAlchemy's
    per-row compile and bind processing (a third of a batch's cost in the issue 8 profile).
    Every row has the same keys; values are converted exactly as the column types would
    (JSON as text, UTC datetimes as SQLite text or aware on PostgreSQL). Errors are still
    SQLAlchemy's, and the statement runs in the session's transaction."""
    if rows:
        names = list(rows[0])
        await _insert(session, table, names,
                      _driver_rows(session.bind.dialect, table, names, rows))


async def insert_columns(session: AsyncSession, table: Table, columns: dict[str, Column]) -> None:
    """bulk_insert for rows given as columns (name → one value per row, a Same value or
    Stored values): a hot path builds no dict per row, and a value shared by every row or
    written to several tables is converted once."""
    if columns:
        rows = _driver_columns(session.bind.dialect, table, columns)
        if rows:
            await _insert(session, table, list(columns), rows)


async def _insert(session: AsyncSession, table: Table, names: list[str],
                  rows: list[tuple[Any, ...]]) -> None:
    dialect = session.bind.dialect
    quote = dialect.identifier_preparer.quote
    statement = (f"INSERT INTO {quote(table.name)} ({', '.join(quote(n) for n in names)}) "
                 f"VALUES ({', '.join(_marks(dialect, len(names)))})")
    connection = await session.connection()
    await connection.exec_driver_sql(statement, rows)


async def execute_columns(
    session: AsyncSession, table: Table, statement: str,
    parameters: Sequence[tuple[str, Column]],
) -> int:
    """`statement` (the caller's SQL, in the driver's parameter style) run once per row by
    the driver's executemany, with its parameters given in order as (column name, one value
    per row) pairs, each converted as that column of `table` converts. Returns the number
    of rows the statement changed (summed over the rows, as the driver counts them)."""
    rows = _driver_columns(session.bind.dialect, table, parameters)
    if not rows:
        return 0
    connection = await session.connection()
    result = await connection.exec_driver_sql(statement, rows)
    return result.rowcount


async def bulk_update(
    session: AsyncSession, table: Table, key: str, rows: Sequence[dict[str, Any]]
) -> None:
    """`UPDATE table SET <the other keys> WHERE key = …` for many rows, through the driver's
    executemany (as bulk_insert)."""
    if not rows:
        return
    dialect = session.bind.dialect
    names = [name for name in rows[0] if name != key]
    quote = dialect.identifier_preparer.quote
    marks = _marks(dialect, len(names) + 1)
    assignments = ", ".join(f"{quote(name)} = {mark}"
                            for name, mark in zip(names, marks, strict=False))
    statement = (f"UPDATE {quote(table.name)} SET {assignments} "
                 f"WHERE {quote(key)} = {marks[-1]}")
    connection = await session.connection()
    await connection.exec_driver_sql(statement, _driver_rows(dialect, table, [*names, key], rows))


def _array_element(column: Any, dialect: Any) -> str:
    """The element type of the array a column's values travel in through unnest. Strings go
    as text, so that the insert's own assignment to VARCHAR(n) refuses one too long (an
    explicit cast to VARCHAR(n) would cut it silently)."""
    if isinstance(column.type, String):
        return "TEXT"
    return column.type.compile(dialect=dialect)


_MAX_PARAMETERS = 30_000  # below SQLite's 32,766 per statement


async def insert_returning(
    session: AsyncSession, table: Table, rows: Sequence[dict[str, Any]] | dict[str, Column],
    *, conflict: str, returning: Sequence[str],
) -> list[Any]:
    """`INSERT … <conflict> RETURNING <returning>` for many rows (dicts with the same keys,
    or columns as insert_columns takes them), values converted as bulk_insert converts them
    (no per-row compile or bind processing). `conflict` is the ON CONFLICT clause, the same
    text on both databases. Returns the returned rows.

    PostgreSQL: one statement whose text never changes, `INSERT … SELECT * FROM unnest($1::
    type[], …)`, one array per column (a VALUES list of 1,000 rows took three times as long
    to plan and run, and was a new statement for every row count). SQLite: VALUES (…), (…),
    as few statements as its parameter limit allows."""
    if not rows:
        return []
    dialect = session.bind.dialect
    if isinstance(rows, dict):
        names = list(rows)
        values = _driver_columns(dialect, table, rows)
    else:
        names = list(rows[0])
        values = _driver_rows(dialect, table, names, rows)
    if not values:
        return []
    quote = dialect.identifier_preparer.quote
    head = f"INSERT INTO {quote(table.name)} ({', '.join(quote(n) for n in names)})"
    tail = f"{conflict} RETURNING {', '.join(quote(n) for n in returning)}"
    connection = await session.connection()
    if dialect.name == "postgresql":
        arrays = ", ".join(f"${n}::{_array_element(table.c[name], dialect)}[]"
                           for n, name in enumerate(names, 1))
        result = await connection.exec_driver_sql(
            f"{head} SELECT * FROM unnest({arrays}) {tail}",
            tuple(map(list, zip(*values, strict=True))))
        return list(result.all())
    per_statement = max(1, _MAX_PARAMETERS // len(names))
    returned: list[Any] = []
    for start in range(0, len(values), per_statement):
        chunk = values[start:start + per_statement]
        groups = ", ".join([f"({', '.join('?' * len(names))})"] * len(chunk))
        result = await connection.exec_driver_sql(
            f"{head} VALUES {groups} {tail}", tuple(itertools.chain.from_iterable(chunk)))
        returned.extend(result.all())
    return returned


def hour_bucket(column: Any, dialect: str) -> Any:
    """The UTC hour of a timestamp column as text, 'YYYY-MM-DD HH', on both databases
    (SQLite stores naive UTC text 'YYYY-MM-DD HH:MM:SS…')."""
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD HH24")
    return func.substr(column, 1, 13)
