"""What every benchmark shares: a fresh database per run (SQLite file in WAL, or a new
PostgreSQL database), the run's settings, and the Figure each benchmark reports to
`bench.run`, which prints it with PASS or SHORT and writes docs/benchmarks.md."""

from __future__ import annotations

import os
import statistics
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from pipeline_console.config import Settings
from pipeline_console.db import Database, create_engine
from pipeline_console.schema import upgrade_to_head

POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
BACKENDS = ("sqlite", "postgresql")


@dataclass(frozen=True)
class BenchConfig:
    """The knobs of one `make bench` run (environment variables, documented in the README)."""

    folder: Path
    messages: int = int(os.environ.get("BENCH_MESSAGES", "20000"))
    runs: int = int(os.environ.get("BENCH_RUNS", "3"))
    large: int = int(os.environ.get("BENCH_LARGE_MESSAGES", "1000000"))
    deliveries: int = int(os.environ.get("BENCH_DELIVERIES", "20000"))


@dataclass(frozen=True)
class Figure:
    """One line of the results: what was measured, against what, and whether it reaches its
    target. `ratio` is the number compared with the target (a ratio to a floor, or a time in
    milliseconds for the latency benchmarks); `at_most` flips the comparison."""

    number: str
    benchmark: str
    backend: str
    measured: str
    floor: str
    ratio: float
    target: float
    at_most: bool = False
    unit: str = "ratio"
    detail: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.ratio <= self.target if self.at_most else self.ratio >= self.target

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "SHORT"

    @property
    def target_text(self) -> str:
        unit = "" if self.unit == "ratio" else f" {self.unit}"
        return f"{'≤' if self.at_most else '≥'} {self.target:g}{unit}"

    @property
    def ratio_text(self) -> str:
        return f"{self.ratio:.3g}" if self.unit == "ratio" else f"{self.ratio:.3g} {self.unit}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (the same rule as the delivery report)."""
    ordered = sorted(values)
    rank = max(1, -(-int(fraction * 1000) * len(ordered) // 1000))
    return ordered[min(rank, len(ordered)) - 1]


class Backend:
    """Fresh, migrated databases of one kind; `drop_all` removes the PostgreSQL ones."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name, self.folder, self.created = name, folder, []

    async def fresh(self, *, migrate: bool = True) -> str:
        if self.name == "sqlite":
            path = self.folder / f"{uuid.uuid4().hex[:8]}.db"
            self.created.append(path)
            url = f"sqlite+aiosqlite:///{path}"
        else:
            name = f"pc_bench_{uuid.uuid4().hex[:8]}"
            admin = await asyncpg.connect(POSTGRES_ADMIN)
            await admin.execute(f'CREATE DATABASE "{name}"')
            await admin.close()
            self.created.append(name)
            url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
        if migrate:
            database = Database(create_engine(Settings(database_url=url)))
            await upgrade_to_head(database.engine)
            await database.dispose()
        return url

    async def drop_all(self) -> None:
        if self.name == "postgresql":
            admin = await asyncpg.connect(POSTGRES_ADMIN)
            for name in self.created:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()
        else:
            for path in self.created:
                _remove_sqlite_files(path)
        self.created.clear()


def _remove_sqlite_files(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def sqlite_path(url: str) -> str:
    return url.removeprefix("sqlite+aiosqlite:///")


def pg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int | str = "self") -> float:
    """The process's peak resident set (VmHWM) in MB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for {pid}")
