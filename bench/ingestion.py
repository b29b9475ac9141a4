"""Benchmark 1 of issue 8: in-process batch ingestion (the service function, batches of 1,000)
against its floor, a raw driver `executemany` of exactly the rows the pipeline wrote for the
same messages, one transaction per batch, on the same database in the same run."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import BACKENDS, Backend, BenchConfig, Figure, median, pg_dsn, sqlite_path
from bench.workload import messages
from pipeline_console.config import Settings
from pipeline_console.db import Database, create_engine
from pipeline_console.entity_types.service import put_entity_type
from pipeline_console.ingestion.intake import parse_message
from pipeline_console.ingestion.service import ingest_messages

BATCH = 1000
TABLES = ("record_states", "ingestion_attempts", "staging_records", "production_records",
          "correlations", "anomalies", "audit_events")


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
        for table in TABLES:
            cursor = connection.execute(f"SELECT * FROM {table}")
            rows[table] = ([c[0] for c in cursor.description], cursor.fetchall())
        connection.close()
    else:
        connection = await asyncpg.connect(pg_dsn(url))
        for table in TABLES:
            records = await connection.fetch(f"SELECT * FROM {table}")
            columns = list(records[0].keys()) if records else []
            rows[table] = (columns, [tuple(record) for record in records])
        await connection.close()
    return rows


async def run_floor(url: str, rows: dict[str, tuple[list[str], list[tuple]]],
                    batches: int) -> float:
    """The same rows, inserted with executemany, in `batches` transactions (each takes its
    share of every table, in the order of the foreign keys)."""
    def slices(index: int) -> list[tuple[str, list[str], list[tuple]]]:
        out = []
        for table in TABLES:
            columns, data = rows[table]
            size = -(-len(data) // batches)
            out.append((table, columns, data[index * size:(index + 1) * size]))
        return out

    if url.startswith("sqlite"):
        connection = sqlite3.connect(sqlite_path(url), isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA foreign_keys=OFF")  # the slices keep parents first per table
        started = time.perf_counter()
        for index in range(batches):
            connection.execute("BEGIN")
            for table, columns, data in slices(index):
                if data:
                    marks = ", ".join("?" * len(columns))
                    connection.executemany(
                        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", data)
            connection.execute("COMMIT")
        elapsed = time.perf_counter() - started
        connection.close()
        return elapsed
    connection = await asyncpg.connect(pg_dsn(url))
    await connection.execute("SET session_replication_role = replica")  # no FK triggers
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


async def measure(backend_name: str, count: int, runs: int, folder: Path) -> dict[str, Any]:
    bodies = messages(count)
    backend = Backend(backend_name, folder)
    pipeline, floor = [], []
    try:
        for _ in range(runs):
            url = await backend.fresh()
            pipeline.append(await run_pipeline(url, bodies))
            rows = await written_rows(url)
            floor.append(await run_floor(await backend.fresh(), rows, -(-count // BATCH)))
            await backend.drop_all()
    finally:
        await backend.drop_all()
    pipeline_rate = count / median(pipeline)
    floor_rate = count / median(floor)
    return {"backend": backend_name, "messages": count, "runs": runs,
            "rows_per_message": round(sum(len(r[1]) for r in rows.values()) / count, 2),
            "pipeline_msgs_per_s": round(pipeline_rate), "floor_msgs_per_s": round(floor_rate),
            "ratio": round(pipeline_rate / floor_rate, 3)}


async def figures(config: BenchConfig, earlier: list[Figure]) -> list[Figure]:
    out = []
    for backend in BACKENDS:
        result = await measure(backend, config.messages, config.runs, config.folder)
        out.append(Figure(
            "1", f"in-process batch ingestion, {config.messages:,} messages in batches of "
            f"1,000 ({result['rows_per_message']} rows per message)", backend,
            f"{result['pipeline_msgs_per_s']:,} msg/s",
            f"{result['floor_msgs_per_s']:,} msg/s (raw executemany of the same rows)",
            result["ratio"], 0.5, extra={"msgs_per_s": result["pipeline_msgs_per_s"]}))
    return out


if __name__ == "__main__":
    import sys
    import tempfile

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    with tempfile.TemporaryDirectory() as folder:
        for name in BACKENDS:
            print(asyncio.run(measure(name, count, 3, Path(folder))))
