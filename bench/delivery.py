"""Benchmarks 6 and 7 of issue 8: the delivery worker.

6. `pipeline-console worker` (a real process) drains BENCH_DELIVERIES deliveries to a local
   HTTP sink that answers 200 at once, against its floor: a bare httpx.AsyncClient loop
   posting the same bodies, with the same headers and the same concurrency, to the same sink.
   SQLite (file, WAL) and PostgreSQL. Then the same drain with Standard Webhooks signing and
   a jq body_template on (each run right after the plain one), which must keep 85 % of the
   plain drain's rate.
7. Scale-out on PostgreSQL: 1, 2 and 4 worker processes drain one queue to a sink that
   answers after 20 ms; 4 workers must reach 3 x the throughput of one, and the sink must
   receive every delivery exactly once.

The deliveries are made the way the product makes them: a downstream system subscribed to
the entity type, then messages ingested through the service function, whose promotion fills
the outbox. That database is filled once and cloned for every run; only the draining is
timed. The workers are started on a closed queue (every delivery due tomorrow) and timed
from the moment it opens (every delivery due now) until none is pending or in flight, so
that the processes' start-up (imports, connections) is not counted."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import httpx

from bench.common import (
    POSTGRES_ADMIN,
    Backend,
    BenchConfig,
    Figure,
    cpu_seconds,
    median,
    pg_dsn,
    sqlite_path,
)
from pipeline_console.config import Settings
from pipeline_console.db import Database, create_engine
from pipeline_console.delivery.schemas import SystemCreate
from pipeline_console.delivery.systems import create_system
from pipeline_console.delivery.transports import build_request
from pipeline_console.delivery.vault import Vault
from pipeline_console.entity_types.service import put_entity_type
from pipeline_console.ingestion.intake import parse_message
from pipeline_console.ingestion.service import ingest_messages
from pipeline_console.models import Delivery

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "sink"
FILL_BATCH = 1000
# The worker's own defaults, so that the figure is the product as shipped.
CONCURRENCY = int(os.environ.get("BENCH_DELIVERY_CONCURRENCY",
                                 str(Settings().worker_concurrency)))
SCALE_LATENCY_MS = 20
SCALE_WORKERS = (1, 2, 4)
SCALE_DELIVERIES = int(os.environ.get("BENCH_SCALE_DELIVERIES", "3000"))
# Benchmark 6 repeats its runs (up to BENCH_RUNS) only while a backend has used less than
# this, so that the module stays within about three minutes on a busy 2-core machine.
RUN_BUDGET_S = float(os.environ.get("BENCH_DELIVERY_BUDGET_S", "40"))
FILLER = "lorem ipsum dolor sit amet " * 36  # about 1 KB, like the ingestion workload
# The shaped variant of benchmark 6: a signing secret, kept encrypted under this key, and a
# mapping of the kind a real system asks for (renamed fields, a nested object, a constant).
SECRET_KEY = "YmVuY2gta2V5LW9mLXBpcGVsaW5lLWNvbnNvbGUtYmU="
SIGNING_SECRET = "whsec_YmVuY2gtc2lnbmluZy1zZWNyZXQtb2YtMzItYnl0ZXM="
BODY_TEMPLATE = ('{id: .entity_id, kind: .entity_type, revision: .version, '
                 'customer: {name: .payload.name, number: .payload.n, notes: .payload.notes}, '
                 'source: "pipeline-console", correlation: .correlation_id}')


class Sink:
    """bench/delivery_sink.py in its own process."""

    def __init__(self, folder: Path) -> None:
        port_file = folder / f"sink-{uuid.uuid4().hex[:6]}.port"
        self.process = subprocess.Popen([sys.executable, "-m", "bench.delivery_sink",
                                         str(port_file)], cwd=ROOT)
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the sink did not start")
            time.sleep(0.05)
        self.base = f"http://127.0.0.1:{port_file.read_text()}"

    def url(self, latency_ms: int = 0) -> str:
        return f"{self.base}/latency/{latency_ms}/deliver" if latency_ms else f"{self.base}/deliver"

    async def counts(self) -> Counter[str]:
        async with httpx.AsyncClient() as client:
            return Counter((await client.get(f"{self.base}/counts")).json())

    async def reset(self) -> None:
        async with httpx.AsyncClient() as client:
            (await client.post(f"{self.base}/reset")).raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def _messages(count: int) -> list[dict[str, Any]]:
    return [{"source_system": "erp", "entity_type": "customer", "entity_id": f"D-{n:08d}",
             "version": 1, "payload": {"name": f"customer {n}", "n": n, "notes": FILLER},
             **({"correlation_id": f"evt-{n // 3}"} if n % 10 == 0 else {})}
            for n in range(count)]


async def fill(url: str, count: int, system_url: str, *, shaped: bool = False) -> None:
    """A downstream system subscribed to customers, then `count` new customers ingested
    through the service function: promotion queues one delivery each (the outbox).
    `shaped`: the system signs its requests and maps its bodies with a jq program."""
    database = Database(create_engine(Settings(database_url=url)))
    now = datetime.now(UTC)
    shape: dict[str, Any] = {"signing": {"scheme": "standard-webhooks",
                                         "secret": SIGNING_SECRET},
                             "body_template": BODY_TEMPLATE} if shaped else {}
    try:
        async with database.transaction() as session:
            await put_entity_type(session, "customer", None, actor="bench", now=now)
            await create_system(session, SystemCreate(
                name=SYSTEM, transport="http", url=system_url, entity_types=["customer"],
                timeout_s=30, failure_threshold=10_000, **shape), actor="bench", now=now,
                vault=Vault(SECRET_KEY))
        bodies = _messages(count)
        for start in range(0, count, FILL_BATCH):
            items = [parse_message(body, "", max_depth=32)
                     for body in bodies[start:start + FILL_BATCH]]
            async with database.transaction() as session:
                await ingest_messages(session, items, now=now, actor="bench")
    finally:
        await database.dispose()


async def clone(backend: Backend, template: str) -> str:
    """A copy of a filled database (its file, or CREATE DATABASE … TEMPLATE)."""
    if backend.name == "sqlite":
        path = backend.folder / f"{uuid.uuid4().hex[:8]}.db"
        shutil.copyfile(sqlite_path(template), path)
        backend.created.append(path)
        return f"sqlite+aiosqlite:///{path}"
    name = f"pc_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(POSTGRES_ADMIN)
    await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template.rsplit("/", 1)[1]}"')
    await admin.close()
    backend.created.append(name)
    return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"


async def execute(url: str, sql: str) -> list[tuple]:
    """One statement through the raw driver (the harness's own reads and writes)."""
    if url.startswith("sqlite"):
        connection = sqlite3.connect(sqlite_path(url), isolation_level=None, timeout=30)
        try:
            return connection.execute(sql).fetchall()
        finally:
            connection.close()
    connection = await asyncpg.connect(pg_dsn(url))
    try:
        return [tuple(row) for row in await connection.fetch(sql)]
    finally:
        await connection.close()


async def set_due(url: str, moment: datetime) -> None:
    """Every delivery due at `moment` (closing or opening the queue)."""
    if url.startswith("sqlite"):
        connection = sqlite3.connect(sqlite_path(url), isolation_level=None, timeout=30)
        try:
            connection.execute("UPDATE deliveries SET next_attempt_at = ?",
                               (moment.replace(tzinfo=None).isoformat(" "),))
        finally:
            connection.close()
        return
    connection = await asyncpg.connect(pg_dsn(url))
    try:
        await connection.execute("UPDATE deliveries SET next_attempt_at = $1", moment)
    finally:
        await connection.close()


async def requests_of(url: str) -> list[tuple[bytes, dict[str, str]]]:
    """Exactly the bodies and headers the worker will send, built by the same function."""
    database = Database(create_engine(Settings(database_url=url)))
    try:
        async with database.read() as session:
            from sqlalchemy import select
            rows = (await session.execute(select(Delivery).order_by(Delivery.id))).scalars()
            return [(request.body, request.headers)
                    for request in (build_request(delivery, 1) for delivery in rows)]
    finally:
        await database.dispose()


async def run_aiohttp_loop(requests: list[tuple[bytes, dict[str, str]]], url: str,
                           concurrency: int) -> tuple[float, float]:
    """Not the floor, shown beside it: the same loop with the client the worker sends with
    (aiohttp, delivery/transports.py), so that the reader sees what HTTP itself costs."""
    pending = iter(requests)

    async def post(session: aiohttp.ClientSession) -> None:
        for body, headers in pending:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                response.raise_for_status()

    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=connector) as session:
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(post(session) for _ in range(concurrency)))
        return time.perf_counter() - started, time.process_time() - cpu


async def run_floor(requests: list[tuple[bytes, dict[str, str]]], url: str,
                    concurrency: int) -> tuple[float, float]:
    """A bare httpx loop: `concurrency` tasks posting the same bodies to the same sink."""
    pending = iter(requests)

    async def post(client: httpx.AsyncClient) -> None:
        for body, headers in pending:
            response = await client.post(url, content=body, headers=headers)
            response.raise_for_status()

    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(post(client) for _ in range(concurrency)))
        return time.perf_counter() - started, time.process_time() - cpu


def start_worker(url: str, log: Path, concurrency: int) -> subprocess.Popen:
    env = {**os.environ, "PIPELINE_CONSOLE_DATABASE_URL": url,
           "PIPELINE_CONSOLE_SECRET_KEY": SECRET_KEY, "PIPELINE_CONSOLE_LOG_FORMAT": "text",
           "PIPELINE_CONSOLE_WORKER_CONCURRENCY": str(concurrency),
           "PIPELINE_CONSOLE_WORKER_POLL_INTERVAL_S": "0.05"}
    command = [sys.executable, "-m", "pipeline_console.cli", "worker"]
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


async def wait_until_drained(url: str, started: float) -> None:
    """Poll (one connection, every 50 ms) until no delivery is pending or in flight."""
    query = "SELECT count(*) FROM deliveries WHERE status IN ('pending', 'in_flight')"
    if url.startswith("sqlite"):
        connection = sqlite3.connect(sqlite_path(url), isolation_level=None, timeout=30)
        count = lambda: connection.execute(query).fetchone()[0]  # noqa: E731
    else:
        connection = await asyncpg.connect(pg_dsn(url))
        count = None
    try:
        while True:
            left = count() if count else await connection.fetchval(query)
            if left == 0:
                return
            if time.perf_counter() - started > 600:
                raise RuntimeError(f"{left} deliveries still waiting after 10 minutes")
            await asyncio.sleep(0.05)
    finally:
        result = connection.close()
        if result is not None:
            await result


def profile(pid: int, log: Path) -> subprocess.Popen:
    """BENCH_PYSPY=folder: sample each worker with py-spy while it drains (collapsed stacks)."""
    out = Path(os.environ["BENCH_PYSPY"]) / f"{log.stem}.txt"
    return subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-r", "200",
                             "-f", "raw", "-o", str(out), "--pid", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def run_workers(url: str, workers: int, expected: int, folder: Path,
                      concurrency: int) -> tuple[float, float]:
    """Start `workers` worker processes on a closed queue, open it, and time until nothing
    is pending or in flight; returns the seconds and the workers' CPU seconds meanwhile."""
    await set_due(url, datetime.now(UTC) + timedelta(days=1))
    logs = [folder / f"worker-{uuid.uuid4().hex[:6]}.log" for _ in range(workers)]
    processes = [start_worker(url, log, concurrency) for log in logs]
    try:
        deadline = time.monotonic() + 120
        while not all("started" in log.read_text() for log in logs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise RuntimeError("a worker did not start: " + logs[0].read_text()[-2000:])
            await asyncio.sleep(0.05)
        profilers = [profile(process.pid, log) for process, log in zip(processes, logs,
                                                                        strict=True)
                     if os.environ.get("BENCH_PYSPY")]
        cpu_at_start = sum(cpu_seconds(process.pid) for process in processes)
        await set_due(url, datetime.now(UTC))
        started = time.perf_counter()
        await wait_until_drained(url, started)
        elapsed = time.perf_counter() - started
        cpu = sum(cpu_seconds(process.pid) for process in processes) - cpu_at_start
        for profiler in profilers:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(timeout=60)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=60)
    return elapsed, cpu


async def verify(url: str, sink: Sink, expected: int) -> int:
    """Every delivery delivered, with one attempt, received once by the sink; returns the
    number of keys the sink received more than once (it must be 0)."""
    statuses = dict(await execute(url, "SELECT status, count(*) FROM deliveries GROUP BY status"))
    [(attempts,)] = await execute(url, "SELECT count(*) FROM delivery_attempts")
    counts = await sink.counts()
    duplicates = sum(1 for n in counts.values() if n > 1)
    if statuses != {"delivered": expected} or attempts != expected or len(counts) != expected:
        raise RuntimeError(f"not every delivery succeeded exactly once: {statuses}, "
                           f"{attempts} attempts, the sink saw {len(counts)} keys, "
                           f"{duplicates} more than once")
    return duplicates


async def bench_drain(backend_name: str, config: BenchConfig, sink: Sink) -> list[Figure]:
    backend = Backend(backend_name, config.folder)
    count = config.deliveries
    floors, pipelines, loops, shaped = [], [], [], []
    try:
        began = time.monotonic()
        template = await backend.fresh()
        await fill(template, count, sink.url())
        shaped_template = await backend.fresh()
        await fill(shaped_template, count, sink.url(), shaped=True)
        requests = await requests_of(template)
        for run in range(config.runs):
            if run and time.monotonic() - began > RUN_BUDGET_S * 1.5:
                break  # the median of the runs that fit the time budget
            await sink.reset()
            floors.append(await run_floor(requests, sink.url(), CONCURRENCY))
            await sink.reset()
            loops.append(await run_aiohttp_loop(requests, sink.url(), CONCURRENCY))
            await sink.reset()
            url = await clone(backend, template)
            pipelines.append(await run_workers(url, 1, count, config.folder, CONCURRENCY))
            await verify(url, sink, count)
            await sink.reset()
            url = await clone(backend, shaped_template)
            shaped.append(await run_workers(url, 1, count, config.folder, CONCURRENCY))
            await verify(url, sink, count)
    finally:
        await backend.drop_all()
    pipeline_rate = count / median([t for t, _ in pipelines])
    floor_rate = count / median([t for t, _ in floors])
    worker_cpu = median([cpu for _, cpu in pipelines]) * 1000 / count
    floor_cpu = median([cpu for _, cpu in floors]) * 1000 / count
    loop_rate = count / median([t for t, _ in loops])
    loop_cpu = median([cpu for _, cpu in loops]) * 1000 / count
    shaped_rate = count / median([t for t, _ in shaped])
    shaped_cpu = median([cpu for _, cpu in shaped]) * 1000 / count
    plain = Figure(
        "6", f"delivery worker draining {count:,} deliveries to a local HTTP sink "
        f"(200 at once), concurrency {CONCURRENCY}", backend_name,
        f"{pipeline_rate:,.0f} deliveries/s", f"{floor_rate:,.0f} posts/s (bare httpx loop)",
        round(pipeline_rate / floor_rate, 3), 0.5,
        detail=f"median of {len(pipelines)} run(s); worker runs "
        f"{', '.join(f'{t:.1f}' for t, _ in pipelines)} s, floor runs "
        f"{', '.join(f'{t:.1f}' for t, _ in floors)} s; CPU per delivery: worker process "
        f"{worker_cpu:.2f} ms, floor loop {floor_cpu:.2f} ms; the same loop with aiohttp "
        f"(the worker's client, not the floor): {loop_rate:,.0f} posts/s, {loop_cpu:.2f} ms "
        f"CPU per post, the worker {pipeline_rate / loop_rate:.2f} of it; afterwards every "
        "delivery was delivered with one attempt and the sink received each key exactly once",
        extra={"deliveries_per_s": round(pipeline_rate), "worker_cpu_ms": worker_cpu,
               "floor_cpu_ms": floor_cpu, "aiohttp_loop_per_s": round(loop_rate)})
    signed = Figure(
        "6", "the same drain with Standard Webhooks signing and a jq body_template on",
        backend_name, f"{shaped_rate:,.0f} deliveries/s",
        f"{pipeline_rate:,.0f} deliveries/s (the plain drain)",
        round(shaped_rate / pipeline_rate, 3), 0.85,
        detail=f"signed and mapped: median of {len(shaped)} run(s), each right after a plain "
        f"one; worker runs {', '.join(f'{t:.1f}' for t, _ in shaped)} s; CPU per delivery "
        f"{shaped_cpu:.2f} ms against {worker_cpu:.2f} ms plain; every delivery delivered "
        "with one attempt, each key received exactly once",
        extra={"deliveries_per_s": round(shaped_rate), "worker_cpu_ms": shaped_cpu})
    return [plain, signed]


async def bench_scale(config: BenchConfig, sink: Sink) -> Figure:
    backend = Backend("postgresql", config.folder)
    count = SCALE_DELIVERIES
    runs = 1
    rates: dict[int, float] = {}
    cpu_ms: dict[int, float] = {}
    try:
        template = await backend.fresh()
        await fill(template, count, sink.url(SCALE_LATENCY_MS))
        for workers in SCALE_WORKERS:
            times = []
            for _ in range(runs):
                await sink.reset()
                url = await clone(backend, template)
                times.append(await run_workers(url, workers, count, config.folder,
                                               CONCURRENCY))
                await verify(url, sink, count)
            rates[workers] = count / median([t for t, _ in times])
            cpu_ms[workers] = median([cpu for _, cpu in times]) * 1000 / count
    finally:
        await backend.drop_all()
    ratio = rates[4] / rates[1]
    return Figure(
        "7", f"scale-out: 1, 2, 4 worker processes draining {count:,} deliveries to a sink "
        f"answering after {SCALE_LATENCY_MS} ms, concurrency {CONCURRENCY} each",
        "postgresql", " / ".join(f"{rates[n]:,.0f}" for n in SCALE_WORKERS) + " deliveries/s",
        f"{rates[1]:,.0f} deliveries/s (one worker)", round(ratio, 3), 3.0,
        detail=f"4 workers {ratio:.2f} x, 2 workers {rates[2] / rates[1]:.2f} x one worker; "
        "workers' CPU per delivery "
        + " / ".join(f"{cpu_ms[n]:.2f}" for n in SCALE_WORKERS) + " ms; "
        "zero duplicates: the sink received each of the deliveries exactly once in every run",
        extra={"rates": rates, "cpu_ms": cpu_ms})


async def figures(config: BenchConfig, earlier: list[Figure]) -> list[Figure]:
    only = {part.strip() for part in os.environ.get("BENCH_ONLY", "").split(",") if part.strip()}
    sink = Sink(config.folder)
    out = []
    try:
        if not only or "6" in only:
            for backend in ("sqlite", "postgresql"):
                out.extend(await bench_drain(backend, config, sink))
        if not only or "7" in only:
            out.append(await bench_scale(config, sink))
    finally:
        sink.stop()
    return out


if __name__ == "__main__":  # python -m bench.delivery: these figures only, no docs written
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        for figure in asyncio.run(figures(BenchConfig(folder=Path(folder)), [])):
            print(figure.number, figure.backend, figure.measured, "vs", figure.floor,
                  figure.ratio_text, figure.verdict, figure.detail, flush=True)
