"""What strict intake's repeated-key check costs per message (issue 18), measured on
benchmark 1's workload as the HTTP routes receive it (bytes), in one process: `decode_json`
as it was before the check (orjson, then the walk for overflowed integers: copied below),
and as it is now (the same walk also counts the strings the document holds; the text's
quotes are counted, less the escaped ones when a body holds a backslash). Not a figure of
`make bench`: run it with `python -m bench.intake [messages]` and compare with benchmark
1's µs per message (bench/notes/01-ingestion.md, "Strict intake")."""

from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from bench.workload import messages
from pipeline_console.ingestion.intake import decode_json

REPEATS = 15
BATCH = 1000


def decode_as_before(body: bytes) -> Any:
    """decode_json before issue 18 (without its BodyError handling, never taken here)."""
    document = orjson.loads(body)
    stack = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and abs(item) >= 2**63 and item.is_integer():
            return json.loads(body)
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return document


def variants(count: int) -> dict[str, list[dict[str, Any]]]:
    """Benchmark 1's messages as orjson writes them (no backslash in any of them), and the
    same with occurred_at and a note of quotes, a line break and non-ASCII letters, as
    Python's json.dumps writes them (backslashes in every body: the bytes.replace path)."""
    plain = messages(count)
    noted = [{**body, "occurred_at": "2026-11-24T10:03:00Z",
              "payload": {**body["payload"], "note": 'Müller said "ok"\nsee C:\\notes'}}
             for body in plain]
    return {"benchmark 1's messages (orjson)": plain,
            "with escapes (json.dumps)": noted}


def encode(name: str, document: Any) -> bytes:
    return json.dumps(document).encode() if "json.dumps" in name else orjson.dumps(document)


def once(decode: Callable[[bytes], Any], bodies: list[bytes]) -> float:
    started = time.perf_counter()
    for body in bodies:
        decode(body)
    return time.perf_counter() - started


def measure(count: int) -> list[dict[str, Any]]:
    out = []
    for name, documents in variants(count).items():
        shapes = {
            "one message per body (POST /messages)": [encode(name, d) for d in documents],
            f"batches of {BATCH:,} (POST /messages/batch)": [
                encode(name, {"messages": documents[start:start + BATCH]})
                for start in range(0, count, BATCH)],
        }
        for shape, bodies in shapes.items():
            assert all(decode_json(body) == decode_as_before(body) for body in bodies)
            times: dict[str, list[float]] = {"orjson": [], "before": [], "after": []}
            gc.collect()
            gc.disable()
            try:
                for _ in range(REPEATS):  # alternating, so that load falls on all alike
                    times["orjson"].append(once(orjson.loads, bodies))
                    times["before"].append(once(decode_as_before, bodies))
                    times["after"].append(once(decode_json, bodies))
            finally:
                gc.enable()
            per_message = {key: min(values) / count * 1e6 for key, values in times.items()}
            out.append({"messages": name, "bodies": shape,
                        **{f"{key}_us": round(value, 2) for key, value in per_message.items()},
                        "check_us": round(per_message["after"] - per_message["before"], 2),
                        "after_over_before": round(per_message["after"] / per_message["before"],
                                                   3)})
    return out


if __name__ == "__main__":
    for row in measure(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000):
        print(row)
