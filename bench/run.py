"""make bench: run the benchmarks of issue 8 and write docs/benchmarks.md. Every figure is a
ratio to a floor measured on the same machine in the same run (or, for the latency
benchmarks, a percentile against its target), the median of several runs.

BENCH_ONLY=1,2 runs a subset of the modules (by the numbers they report, or by name:
BENCH_ONLY=validation runs bench/validation.py alone); the other knobs are in
bench/common.py's BenchConfig."""

from __future__ import annotations

import asyncio
import importlib
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.common import BenchConfig, Figure

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks.md"
NOTES = Path(__file__).resolve().parent / "notes"
# module, the benchmark numbers it reports (in the order they run)
MODULES = [("bench.ingestion", {"1"}), ("bench.validation", {"1"}),
           ("bench.http", {"2", "3", "8"}), ("bench.large", {"4", "5", "8"}),
           ("bench.delivery", {"6", "7"}), ("bench.brokers", {"9"})]


def _selected() -> list[str]:
    only = {part.strip() for part in os.environ.get("BENCH_ONLY", "").split(",") if part.strip()}
    return [name for name, numbers in MODULES
            if not only or numbers & only or name.removeprefix("bench.") in only]


def main() -> None:
    started = time.monotonic()
    results: list[Figure] = []
    with tempfile.TemporaryDirectory() as folder:
        config = BenchConfig(folder=Path(folder))
        for name in _selected():
            try:
                module = importlib.import_module(name)
            except ModuleNotFoundError as error:
                if error.name != name:
                    raise
                print(f"{name}: not built yet")
                continue
            began = time.monotonic()
            for figure in asyncio.run(module.figures(config, results)):
                results.append(figure)
                print(f"{figure.number} {figure.benchmark} [{figure.backend}]: "
                      f"{figure.measured} vs {figure.floor} = {figure.ratio_text} "
                      f"(target {figure.target_text}) {figure.verdict}", flush=True)
            print(f"   ({name} took {time.monotonic() - began:.0f} s)", flush=True)
    minutes = (time.monotonic() - started) / 60
    lines = ["# Benchmarks", "",
             f"Written by `make bench` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: "
             f"{platform.platform()}, Python {platform.python_version()}, "
             f"{os.cpu_count()} cores; the whole run took {minutes:.1f} minutes. "
             f"Settings: BENCH_MESSAGES={config.messages}, BENCH_RUNS={config.runs}, "
             f"BENCH_LARGE_MESSAGES={config.large}, BENCH_DELIVERIES={config.deliveries}. "
             "Each figure is the median of the runs; each ratio compares with a floor "
             "measured in the same run on the same database.", "",
             "| # | benchmark | database | measured | floor | ratio | target | |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for f in sorted(results, key=lambda f: (f.number, f.backend)):
        lines.append(f"| {f.number} | {f.benchmark} | {f.backend} | {f.measured} | {f.floor} | "
                     f"{f.ratio_text} | {f.target_text} | {f.verdict} |")
    details = [f for f in results if f.detail]
    if details:
        lines += ["", "## Details", ""]
        lines += [f"- **{f.number} [{f.backend}]** {f.detail}" for f in details]
    for note in sorted(NOTES.glob("*.md")):
        lines += ["", note.read_text().rstrip()]
    OUT.write_text("\n".join(lines) + "\n")
    short = sum(not f.passed for f in results)
    print(f"wrote {OUT}: {len(results) - short} PASS, {short} SHORT, {minutes:.1f} min")


if __name__ == "__main__":
    main()
