"""Benchmarks 4, 5 and the ingestion half of 8 of issue 8, on SQLite and PostgreSQL.

4: the inspector at BENCH_LARGE_MESSAGES messages over 100,000 keys (bench/large_data.py), for
   a key with 200 events (200 versions, deliveries, delivery attempts, audit events) and for
   ordinary keys: p95 in-process (the service function) and over HTTP (a real
   `pipeline-console serve`, a viewer token), and the SQL statements one inspection runs.
5: the dashboard on the same database with every attention queue non-empty (added through the
   service functions): p95 in-process and over HTTP.
8: peak RSS of a subprocess ingesting BENCH_LARGE_INGEST messages through the service function
   in batches of 1,000 (bench/large_ingest.py), after 10 % and at the end."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import event, func, select

from bench.common import BACKENDS, Backend, BenchConfig, Figure, percentile
from bench.large_data import FILLER, SYSTEM, bulk_load, phase
from pipeline_console.auth.tokens import create_token
from pipeline_console.clock import system_clock
from pipeline_console.config import Settings
from pipeline_console.dashboard.service import attention, rates
from pipeline_console.db import Database, create_engine
from pipeline_console.delivery.circuits import operator_action
from pipeline_console.delivery.policy import CircuitEvent
from pipeline_console.delivery.schemas import SystemCreate
from pipeline_console.delivery.service import Deliverer, claim_due, deliver_now
from pipeline_console.delivery.systems import create_system
from pipeline_console.delivery.transports import Transports
from pipeline_console.entity_types.service import put_entity_type
from pipeline_console.ingestion.intake import parse_message
from pipeline_console.ingestion.service import ingest_messages
from pipeline_console.inspector.service import inspect_record
from pipeline_console.models import DeadLetter, Delivery
from pipeline_console.replay.service import Target, create_replay, execute_replay

KEYS = 100_000
HOT_KEY = "customer:HOT-200"
HOT_EVENTS = 200
RUNS = int(os.environ.get("BENCH_LATENCY_RUNS", "100"))  # timed calls per kind, after warm-up
WARM_UP = 10
INGEST = int(os.environ.get("BENCH_LARGE_INGEST", "50000"))  # benchmark 8's messages
ROOT = Path(__file__).resolve().parents[1]


def _body(entity_type: str, entity_id: str, version: int, payload: dict[str, Any],
          source: str = "erp") -> dict[str, Any]:
    return {"source_system": source, "entity_type": entity_type, "entity_id": entity_id,
            "version": version, "payload": payload}


async def _ingest(database: Database, bodies: list[dict[str, Any]], now: datetime) -> None:
    items = [parse_message(body, "", max_depth=32) for body in bodies]
    async with database.transaction() as session:
        await ingest_messages(session, items, now=now, actor="bench")


async def _prepare(database: Database, url: str, messages: int, now: datetime) -> None:
    """The schema's entity types and systems, the bulk rows, then through the services: the
    key with 200 events and something in every attention queue."""
    async with database.transaction() as session:
        await put_entity_type(session, "customer", None, actor="bench", now=now)
        await put_entity_type(session, "order", {"required": ["total"]}, actor="bench", now=now)
        await create_system(session, SystemCreate(
            name=SYSTEM, transport="simulated", entity_types=["customer"]),
            actor="bench", now=now)
        await create_system(session, SystemCreate(
            name="shop", transport="simulated", entity_types=["order"], max_attempts=1,
            failure_threshold=1000,
            simulation={"seed": 3, "outcomes": {"permanent": 1.0, "ambiguous": 1.0}}),
            actor="bench", now=now)
    await database.dispose()  # the bulk load wants the file (or database) to itself
    with phase(f"{database.engine.dialect.name}: bulk load (total)"):
        await bulk_load(url, messages=messages, keys=min(KEYS, messages), now=now)
    async with Transports.open() as transports:
        deliverer = Deliverer(database, transports, system_clock, "bench-worker")
        with phase(f"{database.engine.dialect.name}: hot key through the services"):
            await _hot_key(database, deliverer, now)
        with phase(f"{database.engine.dialect.name}: attention queues through the services"):
            await _fill_queues(database, deliverer, messages, now)


async def _hot_key(database: Database, deliverer: Deliverer, now: datetime) -> None:
    """200 versions of one key, each promoted, delivered and audited."""
    entity_id = HOT_KEY.split(":", 1)[1]
    for version in range(1, HOT_EVENTS + 1):
        await _ingest(database, [_body("customer", entity_id, version, {
            "name": "hot", "version": version, "notes": FILLER})], now)
        async with database.read() as session:
            delivery_id = await session.scalar(select(func.max(Delivery.id)).where(
                Delivery.idempotency_key == HOT_KEY))
        await deliver_now(deliverer, delivery_id, actor="bench")


async def _fill_queues(database: Database, deliverer: Deliverer, messages: int,
                       now: datetime) -> None:
    """Dead letters and ambiguous outcomes (shop answers 422 or times out), a validated and
    executed replay and a rejected one, open anomalies, stale partial records, held and
    pending deliveries behind shop's open circuit; billing's backlog is in the bulk rows."""
    await _ingest(database, [_body("order", f"O-{n}", 1, {"total": n}) for n in range(40)], now)
    async with database.read() as session:
        shop = list((await session.execute(select(Delivery.id).where(
            Delivery.system == "shop").order_by(Delivery.id))).scalars())
    for delivery_id in shop[:30]:
        await deliver_now(deliverer, delivery_id, actor="bench")
    async with database.transaction() as session:
        dead = await session.scalar(select(func.min(DeadLetter.id)))
        request, _ = await create_replay(session, [Target(dlq_id=dead)], reason="bench",
                                         selection={}, allow_delivered=False, actor="bench",
                                         now=now)
        await create_replay(session, [Target(key="customer:NOPE", system="shop")],
                            reason="bench", selection={}, allow_delivered=False,
                            actor="bench", now=now)
    await execute_replay(deliverer, request.id, actor="bench")
    keys = min(KEYS, messages)
    await _ingest(database, [  # the same version as the current one, another payload
        _body("customer", f"C-{k:06d}", (messages - 1 - k) // keys + 1, {"other": k}, "crm")
        for k in range(20)], now)
    await _ingest(database, [_body("order", f"P-{n}", 1, {"draft": n}) for n in range(20)],
                  now - timedelta(hours=2))
    async with database.transaction() as session:
        await operator_action(session, "shop", CircuitEvent.FORCE_OPEN, "bench: maintenance",
                              actor="bench", now=now)
    await claim_due(deliverer, 5)  # shop's due deliveries are held behind its open circuit


@dataclass
class Timings:
    ms: list[float]

    @property
    def p50(self) -> float:
        return percentile(self.ms, 0.5)

    @property
    def p95(self) -> float:
        return percentile(self.ms, 0.95)


async def _time(call: Callable[[], Awaitable[Any]], runs: int = RUNS) -> Timings:
    for _ in range(WARM_UP):
        await call()
    out = []
    for _ in range(runs):
        began = time.perf_counter()
        await call()
        out.append((time.perf_counter() - began) * 1000)
    return Timings(out)


def _ordinary_keys(messages: int) -> list[str]:
    rng = random.Random(45)
    return [f"customer:C-{rng.randrange(min(KEYS, messages)):06d}" for _ in range(50)]


class StatementCounter:
    def __init__(self, database: Database) -> None:
        self.count = 0
        event.listen(database.engine.sync_engine, "before_cursor_execute", self._seen)

    def _seen(self, *args: Any) -> None:
        self.count += 1


async def _inspect_in_process(database: Database, messages: int) -> dict[str, Any]:
    counter = StatementCounter(database)
    ordinary = _ordinary_keys(messages)
    statements = {}
    for kind, key in (("hot", HOT_KEY), ("ordinary", ordinary[0])):
        counter.count = 0
        async with database.read() as session:
            found = await inspect_record(session, key, limit=200)
        statements[kind] = counter.count
        statements[f"{kind}_events"] = found.totals["audit"]
    keys = iter(ordinary * (RUNS + WARM_UP))

    async def inspect(key: str | None = None) -> None:
        async with database.read() as session:
            await inspect_record(session, key or next(keys), limit=200)

    hot = await _time(lambda: inspect(HOT_KEY))
    plain = await _time(inspect)
    return {"hot": hot, "ordinary": plain, "statements": statements}


async def _dashboard_in_process(database: Database) -> Timings:
    settings = Settings(database_url="sqlite://")

    async def dashboard() -> None:
        now = datetime.now(UTC)
        async with database.read() as session:
            await attention(session, now=now,
                            stale_partial_after_s=settings.stale_partial_after_s,
                            worker_lost_after_s=settings.worker_lost_after_s,
                            consumer_lost_after_s=settings.consumer_lost_after_s,
                            consumer_backlog_alert_s=settings.consumer_backlog_alert_s)
            await rates(session, now=now)

    return await _time(dashboard)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def _over_http(url: str, database: Database, messages: int) -> dict[str, Timings]:
    async with database.transaction() as session:
        _, token = await create_token(session, name="bench-viewer", role="viewer",
                                      actor="bench", now=datetime.now(UTC))
    port = _free_port()
    server = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "pipeline-console"), "serve", "--host",
        "127.0.0.1", "--port", str(port),
        env={**os.environ, "PIPELINE_CONSOLE_DATABASE_URL": url,
             "PIPELINE_CONSOLE_LOG_FORMAT": "json"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30,
                                     headers={"Authorization": f"Bearer {token}"}) as client:
            for _ in range(300):
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            keys = iter(_ordinary_keys(messages) * (RUNS + WARM_UP))

            async def get(path: str) -> None:
                response = await client.get(path)
                response.raise_for_status()

            return {
                "hot": await _time(lambda: get(f"/api/v1/inspect/{HOT_KEY}")),
                "ordinary": await _time(lambda: get(f"/api/v1/inspect/{next(keys)}")),
                "dashboard": await _time(lambda: get("/api/v1/dashboard")),
            }
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 30)


async def _ingest_subprocess(url: str, count: int) -> dict[str, Any]:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.large_ingest", url, str(count), cwd=ROOT,
        stdout=subprocess.PIPE)
    output, _ = await child.communicate()
    if child.returncode:
        raise RuntimeError(f"bench.large_ingest failed ({child.returncode})")
    return json.loads(output.decode().strip().splitlines()[-1])


async def _measure(name: str, database: Database, url: str, config: BenchConfig,
                   out: dict[str, Any]) -> None:
    with phase(f"{name}: inspector in-process"):
        out["inspect"] = await _inspect_in_process(database, config.large)
    with phase(f"{name}: dashboard in-process"):
        out["dashboard"] = await _dashboard_in_process(database)
    with phase(f"{name}: over HTTP (serve, inspector + dashboard)"):
        out["http"] = await _over_http(url, database, config.large)


async def measure(names: list[str], config: BenchConfig) -> dict[str, dict[str, Any]]:
    """The large databases are built at the same time (on 2 cores: SQLite's generation in a
    thread of this process, PostgreSQL's in its server), then measured one after the other
    with nothing else of this module running. Benchmark 8's ingestion subprocesses (peak RSS,
    which does not depend on what else runs) use the build phase's spare core: they start,
    one after the other on fresh databases, as soon as one of the large databases is ready,
    and the timings wait for them."""
    backends = {name: Backend(name, config.folder) for name in names}
    ingest_backends = {name: Backend(name, config.folder) for name in names}
    out: dict[str, dict[str, Any]] = {name: {} for name in names}
    databases: dict[str, Database] = {}
    try:
        urls = {name: await backends[name].fresh() for name in names}
        now = datetime.now(UTC)

        async def prepare(name: str) -> None:
            databases[name] = Database(create_engine(Settings(database_url=urls[name])))
            began = time.perf_counter()
            await _prepare(databases[name], urls[name], config.large, now)
            out[name]["load_s"] = time.perf_counter() - began

        async def ingest(name: str) -> None:
            with phase(f"{name}: benchmark 8 ingestion subprocess"):
                out[name]["ingest"] = await _ingest_subprocess(
                    await ingest_backends[name].fresh(), INGEST)
            await ingest_backends[name].drop_all()

        async def ingest_all(prepared: list[asyncio.Task[None]]) -> None:
            # on the core the first finished database frees
            await asyncio.wait(prepared, return_when=asyncio.FIRST_COMPLETED)
            for name in names if INGEST else ():
                await ingest(name)

        with phase(f"{' and '.join(names)}: prepared at the same time, and benchmark 8"):
            prepared = [asyncio.create_task(prepare(name)) for name in names]
            everything = [*prepared, asyncio.create_task(ingest_all(prepared))]
            try:
                await asyncio.gather(*everything)
            except BaseException:
                for task in everything:
                    task.cancel()
                await asyncio.gather(*everything, return_exceptions=True)
                raise
        for name in names:
            await _measure(name, databases[name], urls[name], config, out[name])
            await databases.pop(name).dispose()
            with phase(f"{name}: drop the large database"):
                await backends[name].drop_all()
    finally:
        for database in databases.values():
            await database.dispose()
        for backend in (*backends.values(), *ingest_backends.values()):
            await backend.drop_all()
    return out


def _ms(timings: Timings) -> str:
    return f"p50 {timings.p50:.1f} ms, p95 {timings.p95:.1f} ms"


def figures_of(backend: str, result: dict[str, Any], config: BenchConfig) -> list[Figure]:
    inspect, http, statements = result["inspect"], result["http"], result["inspect"]["statements"]
    versions = -(-config.large // KEYS)
    at = (f"{config.large:,} messages over {min(KEYS, config.large):,} keys "
          f"(loaded in {result['load_s']:.0f} s, bulk SQL + services, both databases at "
          "the same time; see notes)")
    out = [
        Figure("4", f"inspector in-process, key with {HOT_EVENTS} events, {at}", backend,
               _ms(inspect["hot"]), "target p95", inspect["hot"].p95, 25, at_most=True,
               unit="ms", detail=(
                   f"inspector in-process: {HOT_EVENTS}-event key {_ms(inspect['hot'])}; "
                   f"ordinary keys ({versions} versions each) {_ms(inspect['ordinary'])}; "
                   f"{statements['hot']} SQL statements per inspection of the "
                   f"{HOT_EVENTS}-event key ({statements['hot_events']} audit events), "
                   f"{statements['ordinary']} for an ordinary key "
                   f"({statements['ordinary_events']} audit events)")),
        Figure("4", "inspector SQL statements: 200-event key ÷ ordinary key", backend,
               f"{statements['hot']} vs {statements['ordinary']} statements",
               "independent of history length", statements["hot"] / statements["ordinary"],
               1, at_most=True),
        Figure("4", f"inspector over HTTP (serve, viewer token), key with {HOT_EVENTS} events",
               backend, _ms(http["hot"]), "target p95", http["hot"].p95, 40, at_most=True,
               unit="ms", detail=f"inspector over HTTP: {HOT_EVENTS}-event key "
               f"{_ms(http['hot'])}; ordinary keys {_ms(http['ordinary'])}"),
        Figure("4", "inspector over HTTP, ordinary keys", backend, _ms(http["ordinary"]),
               "target p95", http["ordinary"].p95, 40, at_most=True, unit="ms"),
        Figure("5", f"dashboard in-process, every queue non-empty, {at}", backend,
               _ms(result["dashboard"]), "target p95", result["dashboard"].p95, 50,
               at_most=True, unit="ms"),
        Figure("5", "dashboard over HTTP", backend, _ms(http["dashboard"]), "target p95",
               http["dashboard"].p95, 50, at_most=True, unit="ms"),
    ]
    if "ingest" in result:
        ingest = result["ingest"]
        out += [
            Figure("8", f"peak RSS ingesting {ingest['messages']:,} messages in-process "
                   "(subprocess, batches of 1,000)", backend, f"{ingest['end_mb']:.0f} MB",
                   "target", ingest["end_mb"], 250, at_most=True, unit="MB",
                   detail=f"ingestion subprocess: {ingest['msgs_per_s']:,} msg/s over "
                   f"{ingest['messages']:,} messages (run while the large databases were "
                   "being generated: the rate is not a benchmark figure); peak RSS "
                   f"{ingest['start_mb']} MB before "
                   f"the first batch, {ingest['tenth_mb']} MB after 10 %, "
                   f"{ingest['end_mb']} MB at the end"),
            Figure("8", "peak RSS flat: at the end ÷ after 10 % of the messages", backend,
                   f"{ingest['end_mb']:.0f} MB vs {ingest['tenth_mb']:.0f} MB",
                   "flat in the number of messages", ingest["end_mb"] / ingest["tenth_mb"],
                   1.2, at_most=True),
        ]
    return out


async def figures(config: BenchConfig, earlier: list[Figure]) -> list[Figure]:
    with phase("bench.large: whole module"):
        results = await measure(list(BACKENDS), config)
    return [figure for backend in BACKENDS
            for figure in figures_of(backend, results[backend], config)]


if __name__ == "__main__":  # python -m bench.large [sqlite|postgresql]: print, write nothing
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        settings = BenchConfig(folder=Path(folder))
        names = sys.argv[1:] or list(BACKENDS)
        with phase("bench.large: whole module"):
            results = asyncio.run(measure(names, settings))
        for name in names:
            for f in figures_of(name, results[name], settings):
                print(f"{f.number} {f.benchmark} [{f.backend}]: {f.measured} vs {f.floor} = "
                      f"{f.ratio_text} (target {f.target_text}) {f.verdict}"
                      + (f"\n    {f.detail}" if f.detail else ""), flush=True)
