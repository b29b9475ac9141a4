"""Benchmark 8, ingestion half: run as a subprocess (`python -m bench.large_ingest URL COUNT`),
it ingests COUNT messages through the service function in batches of 1,000, generating them
lazily (message n is version n // 100,000 + 1 of key n % 100,000, about 1 KB of payload, every
tenth with a correlation id), with one downstream system subscribed so that every promotion
queues a delivery. It prints one JSON line: the process's peak RSS after 10 % of the messages
and at the end, and the rate."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from bench.common import peak_rss_mb
from pipeline_console.config import Settings
from pipeline_console.db import Database, create_engine
from pipeline_console.delivery.schemas import SystemCreate
from pipeline_console.delivery.systems import create_system
from pipeline_console.entity_types.service import put_entity_type
from pipeline_console.ingestion.intake import parse_message
from pipeline_console.ingestion.service import ingest_messages

BATCH = 1000
KEYS = 100_000
FILLER = "lorem ipsum dolor sit amet " * 36


def message(n: int) -> dict[str, Any]:
    key = n % KEYS
    body: dict[str, Any] = {
        "source_system": "erp", "entity_type": "customer", "entity_id": f"C-{key:06d}",
        "version": n // KEYS + 1, "message_id": f"erp-{n}",
        "payload": {"name": f"customer {key}", "n": n, "notes": FILLER}}
    if n % 10 == 0:
        body["correlation_id"] = f"evt-{n // 20}"
    return body


def batches(count: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, count, BATCH):
        yield [message(n) for n in range(start, min(count, start + BATCH))]


async def run(url: str, count: int) -> dict[str, Any]:
    database = Database(create_engine(Settings(database_url=url)))
    now = datetime.now(UTC)
    async with database.transaction() as session:
        await put_entity_type(session, "customer", None, actor="bench", now=now)
        await create_system(session, SystemCreate(
            name="billing", transport="simulated", entity_types=["customer"]),
            actor="bench", now=now)
    tenth = max(count // 10 // BATCH, 1)
    start_rss, at_tenth = peak_rss_mb(), None
    started = time.perf_counter()
    for number, bodies in enumerate(batches(count), start=1):
        items = [parse_message(body, "", max_depth=32) for body in bodies]
        async with database.transaction() as session:
            await ingest_messages(session, items, now=now, actor="bench")
        if number == tenth:
            at_tenth = peak_rss_mb()
    elapsed = time.perf_counter() - started
    await database.dispose()
    return {"messages": count, "start_mb": round(start_rss, 1),
            "tenth_mb": round(at_tenth or peak_rss_mb(), 1), "end_mb": round(peak_rss_mb(), 1),
            "msgs_per_s": round(count / elapsed), "seconds": round(elapsed, 1)}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run(sys.argv[1], int(sys.argv[2])))), flush=True)
