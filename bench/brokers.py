"""Benchmark 9 of issue 21: broker intake. `pipeline-console consume` (the real process, its
default settings) takes BENCH_BROKER_MESSAGES messages (benchmark 2's workload, one message
per broker message) from the real RabbitMQ (a durable queue, persistent messages) and,
separately, from a NATS JetStream stream, against benchmark 2 (HTTP batch ingestion through
`pipeline-console serve`) measured in the same run on the same database: each run measures
benchmark 2 once, then RabbitMQ, then NATS, so that a change in the machine's load falls on
all three alike; a run's ratio is the broker's rate over that run's benchmark 2 rate.

What is timed: every message is published (and confirmed by the broker) before the consumer
starts, so publishing is not timed. The consumer is started on the full queue; the clock
starts when its log says "started" (the broker connection is made, the queue or the durable
consumer declared, the database engine made: the next thing it does is subscribe) and stops
when the attempt log holds every message (one connection polling `count(*)` every 20 ms).
Process start-up (interpreter, imports, connections) is not in the window; messages the
consumer had already recorded when the harness saw the log line (polled every 10 ms) are
taken off the count. The rate from the process's start is reported as a detail.
Afterwards the consumer is stopped with SIGTERM and must have acknowledged every message
exactly once (its registry row), the attempt log must hold exactly one attempt per message
(no redelivery), and the broker must hold nothing; otherwise the benchmark fails."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import nats
import orjson

from bench import http
from bench.common import BACKENDS, Backend, BenchConfig, Figure, median, pg_dsn, sqlite_path
from bench.delivery import cpu_seconds, profile
from bench.workload import messages

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = int(os.environ.get("BENCH_BROKER_MESSAGES", str(http.BATCH_MESSAGES)))
RABBITMQ_URL = os.environ.get("BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("BENCH_NATS_URL", "nats://127.0.0.1:4222")
PUBLISH_AT_ONCE = 500
TARGET = 0.8


class RabbitQueue:
    kind, title = "rabbitmq", "RabbitMQ"

    def __init__(self) -> None:
        self.name = f"pc-bench-{uuid.uuid4().hex[:10]}"

    def arguments(self) -> list[str]:
        return [RABBITMQ_URL, "--queue", self.name]

    async def fill(self, bodies: list[bytes]) -> None:
        """Declare the queue (durable) and publish every body persistent, confirmed."""
        async with await aio_pika.connect(RABBITMQ_URL, timeout=10) as connection:
            channel = await connection.channel(publisher_confirms=True)
            await channel.declare_queue(self.name, durable=True)
            for start in range(0, len(bodies), PUBLISH_AT_ONCE):
                await asyncio.gather(*(channel.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=self.name) for body in bodies[start:start + PUBLISH_AT_ONCE]))

    async def held(self) -> int:
        async with await aio_pika.connect(RABBITMQ_URL) as connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(self.name, passive=True)
            return int(queue.declaration_result.message_count)

    async def close(self) -> None:
        async with await aio_pika.connect(RABBITMQ_URL) as connection:
            channel = await connection.channel()
            await channel.queue_delete(self.name)


class NatsStream:
    kind, title = "nats", "NATS JetStream"

    def __init__(self) -> None:
        suffix = uuid.uuid4().hex[:10]
        self.name, self.subject, self.consumer = f"PCBENCH{suffix}", f"pcbench.{suffix}", "pc"

    def arguments(self) -> list[str]:
        return [NATS_URL, "--stream", self.name, "--consumer", self.consumer]

    async def fill(self, bodies: list[bytes]) -> None:
        """Create the stream (file storage, the default) and publish every body, each
        acknowledged by JetStream."""
        nc = await nats.connect(NATS_URL, connect_timeout=5)
        try:
            js = nc.jetstream()
            await js.add_stream(name=self.name, subjects=[self.subject])
            for start in range(0, len(bodies), PUBLISH_AT_ONCE):
                await asyncio.gather(*(js.publish(self.subject, body)
                                       for body in bodies[start:start + PUBLISH_AT_ONCE]))
        finally:
            await nc.close()

    async def held(self) -> int:
        """Not yet delivered, or delivered and not acknowledged."""
        nc = await nats.connect(NATS_URL)
        try:
            info = await nc.jetstream().consumer_info(self.name, self.consumer)
            return int(info.num_pending + info.num_ack_pending)
        finally:
            await nc.close()

    async def close(self) -> None:
        nc = await nats.connect(NATS_URL)
        try:
            await nc.jetstream().delete_stream(self.name)
        finally:
            await nc.close()


BROKERS = (RabbitQueue, NatsStream)


def start_consumer(broker: RabbitQueue | NatsStream, url: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PIPELINE_CONSOLE_DATABASE_URL": url,
           "PIPELINE_CONSOLE_LOG_FORMAT": "text"}
    command = [sys.executable, "-m", "pipeline_console.cli", "consume", *broker.arguments()]
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


class Counter:
    """`count(*)` of the attempt log over one connection of the harness's own."""

    QUERY = "SELECT count(*) FROM ingestion_attempts"

    def __init__(self, url: str) -> None:
        self.url = url
        self._sqlite: sqlite3.Connection | None = None
        self._pg: Any = None

    async def open(self) -> None:
        if self.url.startswith("sqlite"):
            self._sqlite = sqlite3.connect(sqlite_path(self.url), isolation_level=None,
                                           timeout=30)
        else:
            self._pg = await asyncpg.connect(pg_dsn(self.url))

    async def count(self) -> int:
        if self._sqlite is not None:
            return self._sqlite.execute(self.QUERY).fetchone()[0]
        return await self._pg.fetchval(self.QUERY)

    async def row(self, query: str) -> tuple:
        if self._sqlite is not None:
            return tuple(self._sqlite.execute(query).fetchone())
        return tuple(await self._pg.fetchrow(query))

    async def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._pg is not None:
            await self._pg.close()


async def run_consumer(backend: Backend, broker_type: type, bodies: list[bytes],
                       folder: Path) -> dict[str, float]:
    url = await backend.fresh()
    await http._prepare(url)  # the customer entity type, as benchmark 2 registers it
    broker = broker_type()
    await broker.fill(bodies)
    log = folder / f"consume-{broker.kind}-{backend.name}-{uuid.uuid4().hex[:6]}.log"
    counter = Counter(url)
    await counter.open()
    spawned = time.perf_counter()
    process = start_consumer(broker, url, log)
    try:
        deadline = time.monotonic() + 120
        while "started" not in log.read_text():
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the consumer did not start: " + log.read_text()[-2000:])
            await asyncio.sleep(0.01)
        started = time.perf_counter()
        already = await counter.count()
        cpu_at_start = cpu_seconds(process.pid)
        profiler = profile(process.pid, log) if os.environ.get("BENCH_PYSPY") else None
        while (recorded := await counter.count()) < len(bodies):
            if time.perf_counter() - started > 600:
                raise RuntimeError(f"{recorded} of {len(bodies)} messages recorded after 10 "
                                   f"minutes; see {log}")
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(process.pid) - cpu_at_start
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(timeout=60)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    try:
        attempts = await counter.count()
        acknowledged, received = await counter.row(
            "SELECT acknowledged, received FROM intake_consumers")
        held = await broker.held()
    finally:
        await counter.close()
        await broker.close()
    if (attempts, acknowledged, received, held) != (len(bodies), len(bodies), len(bodies), 0):
        raise RuntimeError(f"{broker.kind}: {attempts} attempts, {received} received and "
                           f"{acknowledged} acknowledged of {len(bodies)} messages, {held} "
                           f"still on the broker; see {log}")
    return {"rate": (len(bodies) - already) / elapsed,
            "rate_from_spawn": len(bodies) / (started - spawned + elapsed),
            "startup": started - spawned, "already": already,
            "cpu_ms": cpu * 1000 / (len(bodies) - already)}


async def measure(backend_name: str, config: BenchConfig) -> dict[str, Any]:
    workload = messages(MESSAGES)
    bodies = [orjson.dumps(body) for body in workload]
    backend = Backend(backend_name, config.folder)
    log = config.folder / f"http-{backend_name}.log"
    batch: list[float] = []
    runs: dict[str, list[dict[str, float]]] = {kind.kind: [] for kind in BROKERS}
    try:
        for _ in range(config.runs):
            batch.append((await http.run_batch(backend, workload, log))["rate"])
            for broker_type in BROKERS:
                runs[broker_type.kind].append(
                    await run_consumer(backend, broker_type, bodies, config.folder))
            await backend.drop_all()
    finally:
        await backend.drop_all()
    return {"batch": batch, "runs": runs}


def _figure(backend: str, broker_type: type, batch: list[float],
            runs: list[dict[str, float]]) -> Figure:
    rates = [run["rate"] for run in runs]
    ratios = [run["rate"] / rate for run, rate in zip(runs, batch, strict=True)]
    return Figure(
        "9", f"broker intake, {MESSAGES:,} messages (benchmark 2's workload) taken from "
        f"{broker_type.title} by pipeline-console consume (default prefetch and batch size)",
        backend, f"{median(rates):,.0f} msg/s",
        f"{median(batch):,.0f} msg/s (benchmark 2, HTTP batch, same run)",
        round(median(ratios), 3), TARGET,
        detail=f"{broker_type.title}: median of {len(runs)} run(s), each against the "
        "benchmark 2 run just before it; ratios " + ", ".join(f"{r:.2f}" for r in ratios)
        + "; consumer " + ", ".join(f"{r:,.0f}" for r in rates) + " msg/s, benchmark 2 "
        + ", ".join(f"{r:,.0f}" for r in batch) + " msg/s; consumer CPU per message "
        f"{median([run['cpu_ms'] for run in runs]):.2f} ms; counted from the process's "
        f"start (start-up {median([run['startup'] for run in runs]):.1f} s) "
        f"{median([run['rate_from_spawn'] for run in runs]):,.0f} msg/s; every message "
        "acknowledged once, one attempt each, nothing left on the broker",
        extra={"msgs_per_s": round(median(rates)), "ratios": ratios})


async def figures(config: BenchConfig, earlier: list[Figure]) -> list[Figure]:
    out = []
    for backend in BACKENDS:
        result = await measure(backend, config)
        for broker_type in BROKERS:
            out.append(_figure(backend, broker_type, result["batch"],
                               result["runs"][broker_type.kind]))
    return out


if __name__ == "__main__":  # python -m bench.brokers: these figures only, no docs written
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        for figure in asyncio.run(figures(BenchConfig(folder=Path(folder)), [])):
            print(figure.number, figure.backend, figure.measured, "vs", figure.floor,
                  figure.ratio_text, figure.verdict, figure.detail, flush=True)
