"""The first-message race, run for real: separate connections, separate processes."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from pipeline_console.config import Settings
from pipeline_console.db import Database, create_engine
from pipeline_console.models import IngestionAttempt, RecordState
from tests.conftest import make_token
from tests.support import ingest, message

CONTENDERS = 12


async def separate_databases(settings: Settings, count: int) -> list[Database]:
    """Each Database has its own engine: its own connections and its own writer lock,
    exactly as separate processes would."""
    return [Database(create_engine(settings)) for _ in range(count)]


class TestSimultaneousMessagesForOneNewKey:
    async def test_exactly_one_is_accepted_new_and_none_fails(self, settings, database):
        databases = await separate_databases(settings, CONTENDERS)
        start = asyncio.Event()
        # Half send the same payload, half a different one: duplicates and conflicts both.
        bodies = [message(1, {"name": "Acme" if i % 2 else f"Acme-{i}"}) for i in
                  range(CONTENDERS)]

        async def contender(db: Database, body: dict) -> str:
            await start.wait()
            [result] = await ingest(db, body)
            return result.decision

        tasks = [asyncio.create_task(contender(db, body))
                 for db, body in zip(databases, bodies, strict=True)]
        await asyncio.sleep(0.05)
        start.set()
        try:
            decisions = Counter(await asyncio.gather(*tasks))
        finally:
            for db in databases:
                await db.dispose()
        assert decisions["accept_new"] == 1, decisions
        assert sum(decisions.values()) == CONTENDERS
        assert set(decisions) <= {"accept_new", "skip_duplicate", "quarantine"}
        async with database.read() as session:
            assert await session.scalar(select(func.count()).select_from(RecordState)) == 1
            assert await session.scalar(
                select(func.count()).select_from(IngestionAttempt)) == CONTENDERS

    async def test_overlapping_batches_in_any_order_never_deadlock(self, settings, database):
        databases = await separate_databases(settings, 6)
        keys = [f"K-{i}" for i in range(30)]

        async def contender(db: Database, seed: int) -> list[str]:
            order = keys[:]
            random.Random(seed).shuffle(order)
            results = await ingest(db, *[message(1, {"k": k}, entity_id=k) for k in order])
            return [result.decision for result in results]

        try:
            outcomes = await asyncio.gather(*(contender(db, seed)
                                              for seed, db in enumerate(databases)))
        finally:
            for db in databases:
                await db.dispose()
        decisions = Counter(d for outcome in outcomes for d in outcome)
        assert decisions == {"accept_new": 30, "skip_duplicate": 150}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(database_url: str, tmp_path: Path,
                 **settings: object) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = (tmp_path / f"server-{port}.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline_console.cli", "serve", "--port", str(port)],
        env={**os.environ, "PIPELINE_CONSOLE_DATABASE_URL": database_url,
             **{f"PIPELINE_CONSOLE_{name.upper()}": str(value)
                for name, value in settings.items()}},
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"server did not start: {(tmp_path / f'server-{port}.log').read_text()}")


async def test_two_server_processes_on_one_database_accept_a_new_key_once(
    database_url, database, tmp_path
):
    token = await make_token(database, "ingest", name="erp-connector")
    servers = [start_server(database_url, tmp_path) for _ in range(2)]
    try:
        async with httpx.AsyncClient(timeout=60,
                                     headers={"Authorization": f"Bearer {token}"}) as client:
            bodies = [message(1, {"name": "Acme"}, entity_id="RACE-1") for _ in range(40)]
            responses = await asyncio.gather(*(
                client.post(f"{servers[i % 2][1]}/api/v1/messages", json=body)
                for i, body in enumerate(bodies)
            ))
    finally:
        for process, _ in servers:
            process.terminate()
            process.wait(timeout=10)
    assert [r.status_code for r in responses] == [200] * 40
    decisions = Counter(r.json()["decision"] for r in responses)
    assert decisions == {"accept_new": 1, "skip_duplicate": 39}
