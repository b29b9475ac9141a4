"""Benchmarks 2, 3 and the `serve` half of 8 of issue 8: ingestion over real HTTP.

The server is a separate process on 127.0.0.1 (so that it and the clients do not share one
event loop), with authentication on as in production: the clients carry an ingest token
created in the fresh database before the server starts. The clients are httpx.AsyncClient
coroutines in this process.

2. HTTP batch ingestion: `pipeline-console serve`, POST /api/v1/messages/batch with 500
   messages per request, 4 concurrent clients, against benchmark 1's in-process rate measured
   in the same run.
3. HTTP single-message ingestion: `python -m bench.app` (the product app plus two bare
   endpoints, bench/app.py), 32 concurrent clients, POST /api/v1/messages against
   (a) POST /bench/insert (parse the same body, insert one row in its own transaction) and
   (b) POST /bench/validate (parse only: the HTTP ceiling); and its p99 against its p50.
8. The peak RSS (VmHWM) of the server processes of benchmarks 2 and 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench import ingestion
from bench.common import (
    BACKENDS,
    Backend,
    BenchConfig,
    Figure,
    cpu_seconds,
    median,
    peak_rss_mb,
    percentile,
)
from bench.workload import messages
from pipeline_console.auth.tokens import create_token
from pipeline_console.config import Settings
from pipeline_console.db import Database, create_engine
from pipeline_console.entity_types.service import put_entity_type

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BATCH_MESSAGES = int(os.environ.get("BENCH_HTTP_BATCH_MESSAGES", "6000"))
BATCH_SIZE, BATCH_CLIENTS = 500, 4
SINGLE_REQUESTS = int(os.environ.get("BENCH_HTTP_SINGLE_REQUESTS", "4800"))
SINGLE_CLIENTS = 32
WARMUP_REQUESTS = 100
ROUNDS = 4
SLICE_SECONDS = float(os.environ.get("BENCH_HTTP_SLICE_SECONDS", "3"))


@dataclass
class Server:
    process: subprocess.Popen
    base_url: str
    token: str

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _prepare(url: str) -> str:
    """The customer entity type (as benchmark 1 registers it) and an ingest token."""
    database = Database(create_engine(Settings(database_url=url)))
    now = datetime.now(UTC)
    async with database.transaction() as session:
        await put_entity_type(session, "customer", None, actor="bench", now=now)
        _, token = await create_token(session, name="bench-source", role="ingest",
                                      actor="bench", now=now, sources=["crm", "erp"])
    await database.dispose()
    return token


def _spawn(command: list[str], url: str, log: Path) -> subprocess.Popen:
    environment = {**os.environ, "PIPELINE_CONSOLE_DATABASE_URL": url}
    with log.open("ab") as output:
        return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=output,
                                stderr=subprocess.STDOUT)


async def start_server(url: str, command: list[str], log: Path) -> Server:
    token = await _prepare(url)
    port = _free_port()
    process = _spawn([*command, "--host", "127.0.0.1", "--port", str(port)], url, log)
    server = Server(process, f"http://127.0.0.1:{port}", token)
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient() as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited ({process.returncode}); see {log}")
            try:
                if (await client.get(f"{server.base_url}/readyz")).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"the server did not become ready; see {log}")
            await asyncio.sleep(0.1)


def _client(server: Server) -> httpx.AsyncClient:
    """One client: one keep-alive connection, as one source system's sender would hold.
    (One AsyncClient shared by 32 coroutines spends more time in its connection pool than
    separate clients do, which would lower every figure alike but add noise.)"""
    return httpx.AsyncClient(
        base_url=server.base_url, timeout=120,
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        headers={"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"})


@contextlib.asynccontextmanager
async def _clients(server: Server, count: int) -> AsyncIterator[list[httpx.AsyncClient]]:
    """`count` clients, made once per server: making an AsyncClient (its TLS context) costs
    milliseconds of CPU, which must not fall inside a timed slice."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(_client(server)) for _ in range(count)]


async def _drive(clients: list[httpx.AsyncClient], path: str, bodies: list[bytes],
                 seconds: float | None = None) -> tuple[float, list[float], list[httpx.Response]]:
    """Post the bodies in order, each client sending its next request when its last one
    was answered, until every body is sent or `seconds` have passed (then the requests under
    way finish); returns the elapsed time, each request's latency and the responses (in the
    order of the bodies, only those sent).

    The load generator's own garbage collector is off while it drives (collected just
    before): a full collection of this process stopped every client at once, and each
    request then under way was timed as slow although the server had answered it. Those
    collections grew with the responses kept: 63, 105 and 124 ms in one drive of 6,000
    requests (see bench/notes/23-http.md)."""
    next_index = 0
    latencies: list[float] = []
    responses: list[Any] = [None] * len(bodies)
    deadline = float("inf")

    async def sender(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < len(bodies) and time.perf_counter() < deadline:
            index, next_index = next_index, next_index + 1
            began = time.perf_counter()
            responses[index] = await client.post(path, content=bodies[index])
            latencies.append(time.perf_counter() - began)

    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        if seconds:
            deadline = started + seconds
        await asyncio.gather(*(sender(client) for client in clients))
        elapsed = time.perf_counter() - started
    finally:
        if collecting:
            gc.enable()
    return elapsed, latencies, responses[:next_index]


def _check(responses: list[httpx.Response], what: str) -> None:
    bad = [response for response in responses if response.status_code != 200]
    if bad:
        raise RuntimeError(f"{what}: {len(bad)} answers were not 200, e.g. "
                           f"{bad[0].status_code} {bad[0].text[:300]}")


async def run_batch(backend: Backend, bodies: list[dict[str, Any]], log: Path) -> dict:
    url = await backend.fresh()
    server = await start_server(url, [str(BIN / "pipeline-console"), "serve"], log)
    try:
        requests = [orjson.dumps({"messages": bodies[start:start + BATCH_SIZE]})
                    for start in range(0, len(bodies), BATCH_SIZE)]
        async with _clients(server, BATCH_CLIENTS) as clients:
            await _drive(clients, "/healthz", [b""] * BATCH_CLIENTS)  # connections open
            cpu = cpu_seconds(server.process.pid)
            elapsed, _, responses = await _drive(clients, "/api/v1/messages/batch", requests)
            cpu = cpu_seconds(server.process.pid) - cpu
        _check(responses, "batch")
        decided = sum(1 for response in responses for result in response.json()["results"]
                      if "decision" in result)
        if decided != len(bodies):
            raise RuntimeError(f"batch: {decided} of {len(bodies)} messages were decided")
        return {"rate": len(bodies) / elapsed, "rss": server.peak_rss_mb(),
                "cpu_ms": cpu * 1000 / len(bodies)}
    finally:
        server.stop()


async def run_single(backend: Backend, bodies: list[dict[str, Any]], log: Path) -> dict:
    """The three endpoints take turns in ROUNDS rounds (validate, insert, pipeline), so that
    a change in the machine's background load falls on all three alike. In each round an
    endpoint gets the next slice of the bodies (each endpoint keeps its own place in them),
    cut short after SLICE_SECONDS on a slow machine; its rate is the requests it served over
    its summed time."""
    url = await backend.fresh()
    server = await start_server(url, [sys.executable, "-m", "bench.app"], log)
    try:
        encoded = [orjson.dumps(body) for body in bodies]
        endpoints = (("validate", "/bench/validate"), ("insert", "/bench/insert"),
                     ("pipeline", "/api/v1/messages"))
        elapsed = dict.fromkeys(dict(endpoints), 0.0)
        served = dict.fromkeys(dict(endpoints), 0)
        latencies: dict[str, list[float]] = {name: [] for name, _ in endpoints}
        size = -(-len(encoded) // ROUNDS)
        async with _clients(server, SINGLE_CLIENTS) as clients:
            await _drive(clients, "/bench/validate", encoded[:WARMUP_REQUESTS])
            for _ in range(ROUNDS):
                for name, path in endpoints:
                    start = served[name]
                    took, times, responses = await _drive(
                        clients, path, encoded[start:start + size], SLICE_SECONDS)
                    _check(responses, name)
                    elapsed[name] += took
                    served[name] += len(responses)
                    latencies[name] += times
        out: dict[str, Any] = {"rss": server.peak_rss_mb()}
        for name, _ in endpoints:
            out[name] = served[name] / elapsed[name]
            out[f"{name}_requests"] = served[name]
            out[f"{name}_p50"] = percentile(latencies[name], 0.50)
            out[f"{name}_p99"] = percentile(latencies[name], 0.99)
        return out
    finally:
        server.stop()


async def _benchmark_one_rate(backend: str, config: BenchConfig, earlier: list[Figure]) -> float:
    for figure in earlier:
        if figure.number == "1" and figure.backend == backend and "msgs_per_s" in figure.extra:
            return figure.extra["msgs_per_s"]
    result = await ingestion.measure(backend, config.messages, config.runs, config.folder)
    return result["pipeline_msgs_per_s"]


async def measure(backend_name: str, config: BenchConfig, earlier: list[Figure]) -> dict:
    batch_bodies = messages(BATCH_MESSAGES)
    single_bodies = messages(SINGLE_REQUESTS)
    backend = Backend(backend_name, config.folder)
    log = config.folder / f"http-{backend_name}.log"
    batch_runs, single_runs = [], []
    try:
        for _ in range(config.runs):
            batch_runs.append(await run_batch(backend, batch_bodies, log))
            single_runs.append(await run_single(backend, single_bodies, log))
            await backend.drop_all()
    finally:
        await backend.drop_all()
    in_process = await _benchmark_one_rate(backend_name, config, earlier)

    def mid(runs: list[dict], name: str) -> float:
        return median([run[name] for run in runs])

    return {
        "backend": backend_name, "in_process": in_process,
        "batch": mid(batch_runs, "rate"),
        **{name: mid(single_runs, name) for name in single_runs[0] if name != "rss"},
        "throughput_ratio": median([run["pipeline"] / run["insert"] for run in single_runs]),
        "latency_ratio": median([run["pipeline_p99"] / run["pipeline_p50"]
                                 for run in single_runs]),
        "rss": max(run["rss"] for run in batch_runs + single_runs),
        "rss_batch": max(run["rss"] for run in batch_runs),
        "rss_single": max(run["rss"] for run in single_runs),
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


async def figures(config: BenchConfig, earlier: list[Figure]) -> list[Figure]:
    out = []
    for backend in BACKENDS:
        r = await measure(backend, config, earlier)
        out.append(Figure(
            "2", f"HTTP batch ingestion, {BATCH_MESSAGES:,} messages, POST /messages/batch of "
            f"{BATCH_SIZE}, {BATCH_CLIENTS} concurrent clients, pipeline-console serve",
            backend, f"{r['batch']:,.0f} msg/s",
            f"{r['in_process']:,.0f} msg/s (benchmark 1, in-process)",
            round(r["batch"] / r["in_process"], 3), 0.6))
        out.append(Figure(
            "3", f"HTTP single-message ingestion, POST /messages, {SINGLE_CLIENTS} concurrent "
            f"clients (group commit); up to {SINGLE_REQUESTS:,} requests per endpoint in "
            f"{ROUNDS} alternating rounds, a round cut at {SLICE_SECONDS:g} s (median served: "
            f"{r['pipeline_requests']:,.0f} pipeline, {r['insert_requests']:,.0f} (a), "
            f"{r['validate_requests']:,.0f} (b))", backend,
            f"{r['pipeline']:,.0f} req/s",
            f"{r['insert']:,.0f} req/s (a: bare validate + insert one row per transaction)",
            round(r["throughput_ratio"], 3), 1.0,
            detail=f"throughput: pipeline {r['pipeline']:,.0f} req/s, (a) bare validate + "
            f"insert {r['insert']:,.0f} req/s (p50 {_ms(r['insert_p50'])}, p99 "
            f"{_ms(r['insert_p99'])}), (b) bare validate only (the HTTP ceiling) "
            f"{r['validate']:,.0f} req/s; pipeline / ceiling "
            f"{r['pipeline'] / r['validate']:.2f}."))
        out.append(Figure(
            "3", f"HTTP single-message ingestion latency, p99 / p50 at {SINGLE_CLIENTS} "
            "concurrent clients", backend,
            f"p99 {_ms(r['pipeline_p99'])}", f"p50 {_ms(r['pipeline_p50'])}",
            round(r["latency_ratio"], 3), 3.0, at_most=True,
            detail=f"latency p99 / p50 in the same run: pipeline {r['latency_ratio']:.2f}; "
            f"(a) bare insert {r['insert_p99'] / r['insert_p50']:.2f}; (b) bare validate "
            f"{r['validate_p99'] / r['validate_p50']:.2f} (p50 {_ms(r['validate_p50'])}, p99 "
            f"{_ms(r['validate_p99'])})."))
        out.append(Figure(
            "8", "memory: peak RSS (VmHWM) of the server during benchmarks 2 and 3", backend,
            f"{r['rss']:.0f} MB", "—", round(r["rss"], 1), 250, at_most=True, unit="MB",
            detail=f"pipeline-console serve (benchmark 2) {r['rss_batch']:.0f} MB; "
            f"bench.app (benchmark 3: the product app plus two bare routes) "
            f"{r['rss_single']:.0f} MB."))
    return out


if __name__ == "__main__":
    import tempfile

    from bench.common import BenchConfig as _Config

    with tempfile.TemporaryDirectory() as folder:
        for name in BACKENDS:
            print(asyncio.run(measure(name, _Config(folder=Path(folder), runs=1), [])))
