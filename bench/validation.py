"""Benchmark 1, schema validation: jsonschema-rs (what completeness.py uses since issue 19)
against the Python `jsonschema` package it replaced, on benchmark 1's payloads, and both on
the pattern of the ReDoS finding with a hostile payload. No database: run it alone with
`python -m bench.validation` (or `BENCH_ONLY=validation make bench`, which rewrites
docs/benchmarks.md with this module's figures only)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import jsonschema
import jsonschema_rs

from bench.common import BenchConfig, Figure, median
from bench.workload import messages
from pipeline_console.entity_types.completeness import missing_fields

# What an operator would write for benchmark 1's customers: required fields, types, bounds
# and a pattern, so that each payload takes every kind of keyword.
CUSTOMER = {
    "type": "object",
    "required": ["name", "n", "notes"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 200,
                 "pattern": "^[a-z]+( [a-z0-9]+)*$"},
        "n": {"type": "integer", "minimum": 0},
        "notes": {"type": "string", "maxLength": 5000},
        "old": {"type": "boolean"},
    },
    "additionalProperties": False,
}
EVIL = {"type": "object", "properties": {
    "email": {"type": "string", "pattern": r"^([a-z0-9]+)+@example\.com$"}}}
# Python's `re` doubles its time per character here (27 took 3.6 s in the finding); 20 keeps
# the run short and is already far from linear.
HOSTILE_LENGTHS = (16, 18, 20)
LONG_HOSTILE = 100_000


def _python(schema: dict[str, Any]) -> Callable[[Any], list[Any]]:
    validator = jsonschema.validators.validator_for(schema)(schema)
    return lambda payload: list(validator.iter_errors(payload))


def _rust(schema: dict[str, Any]) -> Callable[[Any], list[Any]]:
    validator = jsonschema_rs.validator_for(schema, pattern_options=jsonschema_rs.RegexOptions(),
                                            validate_formats=False)
    return lambda payload: list(validator.iter_errors(payload))


def _seconds_per_call(check: Callable[[Any], Any], payloads: list[Any], runs: int) -> float:
    """The median over runs of the time per payload."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        for payload in payloads:
            check(payload)
        times.append((time.perf_counter() - started) / len(payloads))
    return median(times)


def measure(count: int, runs: int) -> dict[str, Any]:
    payloads = [message["payload"] for message in messages(count)]
    python, rust = _python(CUSTOMER), _rust(CUSTOMER)
    assert [len(python(p)) for p in payloads] == [len(rust(p)) for p in payloads]
    out: dict[str, Any] = {
        "payloads": count,
        "invalid": sum(bool(rust(p)) for p in payloads),
        "python_us": _seconds_per_call(python, payloads, runs) * 1e6,
        "rust_us": _seconds_per_call(rust, payloads, runs) * 1e6,
        "product_us": _seconds_per_call(lambda p: missing_fields(CUSTOMER, p), payloads,
                                        runs) * 1e6,
    }
    python_evil, rust_evil = _python(EVIL), _rust(EVIL)
    for length in HOSTILE_LENGTHS:
        hostile = [{"email": "a" * length + "!"}]
        out[f"python_evil_{length}_s"] = _seconds_per_call(python_evil, hostile, runs)
        out[f"rust_evil_{length}_s"] = _seconds_per_call(rust_evil, hostile, runs)
    out["rust_evil_long_s"] = _seconds_per_call(
        rust_evil, [{"email": "a" * LONG_HOSTILE + "!"}], runs)
    return out


async def figures(config: BenchConfig, earlier: list[Figure]) -> list[Figure]:
    result = await asyncio.to_thread(measure, config.messages, max(config.runs, 5))
    longest = HOSTILE_LENGTHS[-1]
    python_evil, rust_evil = (result[f"python_evil_{longest}_s"],
                              result[f"rust_evil_{longest}_s"])
    doubling = ", ".join(f"{n}: {result[f'python_evil_{n}_s'] * 1e3:,.1f} ms"
                         for n in HOSTILE_LENGTHS)
    return [
        Figure("1", f"entity-type schema validation per payload, benchmark 1's "
               f"{result['payloads']:,} payloads ({result['invalid']:,} partial), a "
               "4-property schema with a pattern: time with jsonschema ÷ time with jsonschema-rs",
               "no database", f"{result['rust_us']:.2f} µs (jsonschema-rs)",
               f"{result['python_us']:.2f} µs (jsonschema)",
               result["python_us"] / result["rust_us"], 1,
               detail=f"missing_fields() as ingestion calls it (the cache lookup by the "
               f"schema's canonical bytes included): {result['product_us']:.2f} µs per "
               "payload"),
        Figure("1", rf"the ReDoS pattern ^([a-z0-9]+)+@example\.com$ on a hostile "
               f"{longest}-character payload: jsonschema ÷ jsonschema-rs", "no database",
               f"{rust_evil * 1e6:,.1f} µs (jsonschema-rs)",
               f"{python_evil * 1e3:,.1f} ms (jsonschema)", python_evil / rust_evil, 1000,
               detail=f"jsonschema (Python's re) by length, doubling per character: "
               f"{doubling}; jsonschema-rs on {LONG_HOSTILE:,} characters: "
               f"{result['rust_evil_long_s'] * 1e3:,.2f} ms"),
    ]


if __name__ == "__main__":
    import sys

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    for key, value in measure(count, 5).items():
        print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
