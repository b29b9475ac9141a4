"""Benchmark 1 of issue 8: in-process batch ingestion (the service function, batches of 1,000)
against its floor, a raw driver `executemany` of exactly the rows the pipeline wrote for the
same messages, one transaction per batch, on the same database in the same run."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import BACKENDS, Backend, BenchConfig, Figure, median, pg_dsn, sqlite_path
from bench.workload import messages
from pipeline_console.config import Settings
from pipeline_console.db import CHECKPOINT_FALLBACK_PAGES, Database, WalCheckpointer, create_engine
from pipeline_console.entity_types.service import put_entity_type
from pipeline_console.ingestion.intake import parse_message
from pipeline_console.ingestion.service import ingest_messages

BATCH = 1000
# In the order of the foreign keys (parents first); entity_types is written before timing.
TABLES = ("record_states", "anomalies", "ingestion_attempts", "staging_records",
          "production_records", "correlations", "audit_events")


async def run_pipeline(url: str, bodies: list[dict[str, Any]]) -> float:
    database = Database(create_engine(Settings(database_url=url)))
    now = datetime.now(UTC)
    async with database.transaction() as session:
        await put_entity_type(session, "customer", None, actor="bench", now=now)
    started = time.perf_counter()
    for start in range(0, len(bodies), BATCH):
        items = [parse_message(body, "", max_depth=32) for body in bodies[start:start + BATCH]]
        async with database.transaction() as session:
            await ingest_messages(session, items, now=now, actor="bench")
    elapsed = time.perf_counter() - started
    await database.dispose()
    return elapsed


async def written_rows(url: str) -> dict[str, tuple[list[str], list[tuple]]]:
    """Every row the pipeline wrote, as the raw driver reads it back."""
    rows: dict[str, tuple[list[str], list[tuple]]] = {}
    if url.startswith("sqlite"):
        connection = sqlite3.connect(sqlite_path(url))
        for table in (*TABLES, "entity_types"):
            cursor = connection.execute(f"SELECT * FROM {table}")
            rows[table] = ([c[0] for c in cursor.description], cursor.fetchall())
        connection.close()
    else:
        connection = await asyncpg.connect(pg_dsn(url))
        for table in (*TABLES, "entity_types"):
            records = await connection.fetch(f"SELECT * FROM {table}")
            columns = list(records[0].keys()) if records else []
            rows[table] = (columns, [tuple(record) for record in records])
        await connection.close()
    return rows


def _by_batch(rows: dict[str, tuple[list[str], list[tuple]]],
              batches: int) -> dict[str, list[list[tuple]]]:
    """Each row goes to the transaction in which the pipeline first needed it, so that the
    floor's inserts satisfy the same foreign keys (checked, as the pipeline's are): an attempt
    to its message's batch, a key's state and an anomaly to the batch of their first attempt,
    staging rows and correlations to their attempt's, a production row to its staging row's.
    The audit log has no foreign keys: its rows are shared out in order."""
    def column(table: str, name: str) -> int:
        return rows[table][0].index(name)

    out = {table: [[] for _ in range(batches)] for table in TABLES}
    attempt_batch: dict[int, int] = {}
    first_of_key: dict[str, int] = {}
    first_of_anomaly: dict[int, int] = {}
    a_id, a_key, a_anomaly = (column("ingestion_attempts", name)
                              for name in ("id", "idempotency_key", "anomaly_id"))
    for row in sorted(rows["ingestion_attempts"][1], key=lambda row: row[a_id]):
        batch = min((len(attempt_batch)) // BATCH, batches - 1)
        attempt_batch[row[a_id]] = batch
        first_of_key.setdefault(row[a_key], batch)
        if row[a_anomaly] is not None:
            first_of_anomaly.setdefault(row[a_anomaly], batch)
        out["ingestion_attempts"][batch].append(row)
    for row in rows["record_states"][1]:
        out["record_states"][first_of_key[row[column("record_states", "idempotency_key")]]] \
            .append(row)
    for row in rows["anomalies"][1]:
        out["anomalies"][first_of_anomaly.get(row[column("anomalies", "id")], 0)].append(row)
    staging_batch: dict[int, int] = {}
    s_id, s_attempt = column("staging_records", "id"), column("staging_records", "attempt_id")
    for row in rows["staging_records"][1]:
        staging_batch[row[s_id]] = attempt_batch[row[s_attempt]]
        out["staging_records"][staging_batch[row[s_id]]].append(row)
    for row in rows["production_records"][1]:
        staging_id = row[column("production_records", "staging_id")]
        out["production_records"][staging_batch[staging_id]].append(row)
    for row in rows["correlations"][1]:
        out["correlations"][attempt_batch[row[column("correlations", "attempt_id")]]] \
            .append(row)
    audit = rows["audit_events"][1]
    size = -(-len(audit) // batches)
    for index in range(batches):
        out["audit_events"][index] = audit[index * size:(index + 1) * size]
    return out


async def run_floor(url: str, rows: dict[str, tuple[list[str], list[tuple]]],
                    batches: int, *, background_checkpoint: bool = False) -> float:
    """The same rows, inserted with executemany, in `batches` transactions, with the foreign
    keys checked as they are for the pipeline. `background_checkpoint` (SQLite): the WAL is
    copied back as the pipeline's processes copy it (db.WalCheckpointer, after each commit)
    instead of by SQLite inside the commits: the informational second floor."""
    split = _by_batch(rows, batches)

    def slices(index: int) -> list[tuple[str, list[str], list[tuple]]]:
        return [(table, rows[table][0], split[table][index]) for table in TABLES]

    if url.startswith("sqlite"):
        connection = sqlite3.connect(sqlite_path(url), isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA foreign_keys=ON")
        checkpointer = None
        if background_checkpoint:
            connection.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_FALLBACK_PAGES}")
            checkpointer = WalCheckpointer(sqlite_path(url))
        _copy_entity_types_sqlite(connection, rows)
        started = time.perf_counter()
        for index in range(batches):
            connection.execute("BEGIN")
            for table, columns, data in slices(index):
                if data:
                    marks = ", ".join("?" * len(columns))
                    connection.executemany(
                        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", data)
            connection.execute("COMMIT")
            if checkpointer is not None:
                checkpointer.notify()
        elapsed = time.perf_counter() - started
        if checkpointer is not None:
            checkpointer.stop()
        connection.close()
        return elapsed
    connection = await asyncpg.connect(pg_dsn(url))
    await _copy_entity_types_pg(connection, rows)
    started = time.perf_counter()
    for index in range(batches):
        async with connection.transaction():
            for table, columns, data in slices(index):
                if data:
                    marks = ", ".join(f"${n + 1}" for n in range(len(columns)))
                    await connection.executemany(
                        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", data)
    elapsed = time.perf_counter() - started
    await connection.close()
    return elapsed


def _copy_entity_types_sqlite(connection: sqlite3.Connection, rows: dict) -> None:
    columns, data = rows["entity_types"]
    connection.executemany(f"INSERT INTO entity_types ({', '.join(columns)}) "
                           f"VALUES ({', '.join('?' * len(columns))})", data)


async def _copy_entity_types_pg(connection: asyncpg.Connection, rows: dict) -> None:
    columns, data = rows["entity_types"]
    marks = ", ".join(f"${n + 1}" for n in range(len(columns)))
    await connection.executemany(
        f"INSERT INTO entity_types ({', '.join(columns)}) VALUES ({marks})", data)


async def measure(backend_name: str, count: int, runs: int, folder: Path) -> dict[str, Any]:
    bodies = messages(count)
    # Left to the collector, the pre-generated bodies (20,000 tracked objects, the harness's,
    # not the pipeline's: a server holds only the requests in hand) and the imported
    # modules' ~100,000 would be walked by every full collection during the timed runs.
    # Frozen (gc.freeze), they are out of its way: the main thread's CPU per message was
    # 103 µs without, 85 with it, 70 with no collector at all (bench/notes/01-ingestion.md).
    gc.collect()
    gc.freeze()
    backend = Backend(backend_name, folder)
    pipeline, floor, floor_checkpointed = [], [], []
    batches = -(-count // BATCH)
    try:
        for _ in range(runs):
            url = await backend.fresh()
            pipeline.append(await run_pipeline(url, bodies))
            rows = await written_rows(url)
            floor.append(await run_floor(await backend.fresh(), rows, batches))
            if backend_name == "sqlite":
                floor_checkpointed.append(await run_floor(
                    await backend.fresh(), rows, batches, background_checkpoint=True))
            await backend.drop_all()
    finally:
        await backend.drop_all()
        gc.unfreeze()
    pipeline_rate = count / median(pipeline)
    floor_rate = count / median(floor)
    out = {"backend": backend_name, "messages": count, "runs": runs,
           "rows_per_message": round(sum(len(rows[t][1]) for t in TABLES) / count, 2),
           "pipeline_msgs_per_s": round(pipeline_rate), "floor_msgs_per_s": round(floor_rate),
           "ratio": round(pipeline_rate / floor_rate, 3)}
    if floor_checkpointed:
        rate = count / median(floor_checkpointed)
        out["floor_checkpointed_msgs_per_s"] = round(rate)
        out["ratio_checkpointed"] = round(pipeline_rate / rate, 3)
    return out


async def figures(config: BenchConfig, earlier: list[Figure]) -> list[Figure]:
    out = []
    for backend in BACKENDS:
        result = await measure(backend, config.messages, config.runs, config.folder)
        out.append(Figure(
            "1", f"in-process batch ingestion, {config.messages:,} messages in batches of "
            f"1,000 ({result['rows_per_message']} rows per message)", backend,
            f"{result['pipeline_msgs_per_s']:,} msg/s",
            f"{result['floor_msgs_per_s']:,} msg/s (raw executemany of the same rows)",
            result["ratio"], 0.5, extra={"msgs_per_s": result["pipeline_msgs_per_s"]},
            detail=(f"the floor with the WAL copied back by a background thread, as the "
                    f"pipeline's processes do (SQLITE_CHECKPOINT=background): "
                    f"{result['floor_checkpointed_msgs_per_s']:,} msg/s; the pipeline is "
                    f"{result['ratio_checkpointed']:.3g} of that."
                    if "ratio_checkpointed" in result else "")))
    return out


if __name__ == "__main__":
    import sys
    import tempfile

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    with tempfile.TemporaryDirectory() as folder:
        for name in BACKENDS:
            print(asyncio.run(measure(name, count, 3, Path(folder))))
