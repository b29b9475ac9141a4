"""The query plans behind bench/notes/45-large.md: run the dashboard, one inspection, the four
reports over one day and the worker's claim against a database (`python -m bench.large_explain
URL [filter]`), capture every SQL statement they send (the cursor event) and print each with
its plan: EXPLAIN QUERY PLAN on SQLite, EXPLAIN (ANALYZE, BUFFERS) on PostgreSQL, and the time
the statement took."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy import event

from bench.common import pg_dsn, sqlite_path
from pipeline_console.config import Settings
from pipeline_console.dashboard.service import attention, rates
from pipeline_console.db import Database, create_engine
from pipeline_console.delivery.service import Deliverer, claim_due
from pipeline_console.delivery.transports import Transports
from pipeline_console.inspector.service import inspect_record
from pipeline_console.reports.service import REPORTS


async def capture(url: str, key: str) -> list[tuple[str, str, Any]]:
    database = Database(create_engine(Settings(database_url=url)))
    seen: list[tuple[str, str, Any]] = []
    label = ["?"]

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *rest: Any) -> None:
        seen.append((label[0], statement, parameters))

    event.listen(database.engine.sync_engine, "before_cursor_execute", record)
    now = datetime.now(UTC)
    async with database.read() as session:
        label[0] = "dashboard"
        await attention(session, now=now, stale_partial_after_s=3600, worker_lost_after_s=30,
                        consumer_lost_after_s=30, consumer_backlog_alert_s=300)
        await rates(session, now=now)
        label[0] = "inspector"
        await inspect_record(session, key, limit=200)
        for name, build in REPORTS.items():
            label[0] = f"report {name}"
            await build(session, now - timedelta(days=1), now)
    label[0] = "worker claim"
    async with Transports.open() as transports:
        # two hours on, billing's backlog is due: this claims (and leaves in flight) ten
        # deliveries, so run it on a database made for looking at plans
        deliverer = Deliverer(database, transports, lambda: now + timedelta(hours=2),
                              "explain")
        await claim_due(deliverer, 10)
    await database.dispose()
    return [(what, sql, params) for what, sql, params in seen
            if sql.lstrip().upper().startswith(("SELECT", "WITH", "UPDATE"))]


async def explain(url: str, statements: list[tuple[str, str, Any]], only: str) -> None:
    if url.startswith("sqlite"):
        connection = sqlite3.connect(sqlite_path(url))
        for what, sql, params in statements:
            if only not in what:
                continue
            began = time.perf_counter()
            connection.execute(sql, params).fetchall()
            took = (time.perf_counter() - began) * 1000
            plan = connection.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
            print(f"--- {what} ({took:.1f} ms)\n{' '.join(sql.split())}")
            for row in plan:
                print(f"    {row[-1]}")
        connection.close()
        return
    connection = await asyncpg.connect(pg_dsn(url))
    for what, sql, params in statements:
        if only not in what or sql.upper().startswith("UPDATE"):
            continue
        plan = await connection.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *params)
        print(f"--- {what}\n{' '.join(sql.split())}")
        for row in plan:
            print(f"    {row[0]}")
    await connection.close()


async def main(url: str, only: str, key: str) -> None:
    await explain(url, await capture(url, key), only)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "",
                     sys.argv[3] if len(sys.argv) > 3 else "customer:HOT-200"))
