"""make bench: run the benchmarks and write docs/benchmarks.md. Every figure is a ratio to a
floor measured on the same machine in the same run, the median of several runs."""

from __future__ import annotations

import asyncio
import os
import platform
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench.ingestion import measure

TARGETS = {"1": 0.5}
OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def main() -> None:
    count = int(os.environ.get("BENCH_MESSAGES", "20000"))
    runs = int(os.environ.get("BENCH_RUNS", "3"))
    lines = ["# Benchmarks", "",
             f"Written by `make bench` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: "
             f"{platform.platform()}, Python {platform.python_version()}, "
             f"{os.cpu_count()} cores. Each figure is the median of {runs} runs; each ratio "
             "compares with a floor measured in the same run on the same database.", "",
             "| # | benchmark | database | pipeline | floor | ratio | target | |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory() as folder:
        for backend in ("sqlite", "postgresql"):
            result = asyncio.run(measure(backend, count, runs, Path(folder)))
            verdict = "PASS" if result["ratio"] >= TARGETS["1"] else "SHORT"
            print(f"1 batch ingestion {backend}: {result['pipeline_msgs_per_s']} msg/s vs "
                  f"floor {result['floor_msgs_per_s']} msg/s = {result['ratio']} "
                  f"(target ≥ {TARGETS['1']}) {verdict}")
            lines.append(
                f"| 1 | in-process batch ingestion, {count} messages in batches of 1,000 "
                f"({result['rows_per_message']} rows per message) | {backend} | "
                f"{result['pipeline_msgs_per_s']} msg/s | {result['floor_msgs_per_s']} msg/s "
                f"(raw executemany of the same rows) | {result['ratio']} | "
                f"≥ {TARGETS['1']} | {verdict} |")
    lines += ["", "Benchmarks 2 to 8 of issue 8 are not built yet; see the issue's notes.", ""]
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
