"""Small test helpers: a controllable clock and message factories."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline_console.db import Database
from pipeline_console.ingestion.intake import RejectedMessage, parse_message
from pipeline_console.ingestion.planner import IncomingMessage
from pipeline_console.ingestion.service import Accepted, Rejected, ingest_messages


@dataclass
class FakeClock:
    now: datetime = field(default_factory=lambda: datetime(2026, 11, 24, 10, 0, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


def message(
    version: int = 1,
    payload: dict[str, Any] | None = None,
    *,
    source_system: str = "erp",
    entity_type: str = "customer",
    entity_id: str = "C-100",
    **extra: Any,
) -> dict[str, Any]:
    """A message as a source system would POST it."""
    return {
        "source_system": source_system,
        "entity_type": entity_type,
        "entity_id": entity_id,
        "version": version,
        "payload": {"name": "Acme", "country": "DE"} if payload is None else payload,
        **extra,
    }


def parsed(body: dict[str, Any]) -> IncomingMessage:
    item = parse_message(body, "", max_depth=32)
    assert not isinstance(item, RejectedMessage), item
    return item


async def ingest(
    database: Database, *bodies: dict[str, Any], now: datetime | None = None,
    actor: str = "test",
) -> list[Accepted | Rejected]:
    """Ingest bodies as one batch in one transaction, through the real service."""
    items = [parse_message(body, "", max_depth=32) for body in bodies]
    async with database.transaction() as session:
        return await ingest_messages(
            session, items, now=now or datetime(2026, 11, 24, 10, 0, tzinfo=UTC), actor=actor
        )


async def ingest_one(database: Database, body: dict[str, Any], **kwargs: Any) -> Accepted:
    [result] = await ingest(database, body, **kwargs)
    assert isinstance(result, Accepted), result
    return result


async def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    """Poll `condition` until it holds; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)
