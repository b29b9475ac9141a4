"""Finding 4 of issue 19: a schema `pattern` that backtracks stalled the event loop (a
27-character payload held /healthz for 3.6 s, doubling per character). On the linear-time
engine the hostile message is answered at once and /healthz stays fast meanwhile."""

from __future__ import annotations

import asyncio
import time

from pipeline_console.entity_types.completeness import missing_fields
from tests.support import message

EVIL = {"type": "object", "required": ["email"],
        "properties": {"email": {"type": "string", "pattern": r"^([a-z0-9]+)+@example\.com$"}}}
# Each more character doubled Python's time: 27 took 3.6 s, so 34 would take minutes.
HOSTILE = "a" * 34 + "!"
# Generous bounds on a loaded 2-core machine; the backtracking engine missed them by orders
# of magnitude.
ANSWER_BOUND_S = 5.0
HEALTHZ_BOUND_S = 1.0


def test_matching_time_does_not_grow_with_the_hostile_input():
    for length in (27, 30, 1_000, 100_000):
        started = time.perf_counter()
        errors = missing_fields(EVIL, {"email": "a" * length + "!"})
        assert [e["path"] for e in errors] == ["/email"]
        assert time.perf_counter() - started < HEALTHZ_BOUND_S, length


async def test_a_hostile_payload_is_answered_while_healthz_stays_fast(client):
    response = await client.put("/api/v1/entity-types/customer", json={"schema": EVIL})
    assert response.status_code == 201

    async def hostile(index: int) -> tuple[float, dict]:
        started = time.perf_counter()
        answer = await client.post("/api/v1/messages", json=message(
            1, {"email": HOSTILE}, entity_id=f"EVIL-{index}"))
        assert answer.status_code == 200
        return time.perf_counter() - started, answer.json()

    async def healthz_latencies() -> list[float]:
        latencies = []
        for _ in range(20):
            started = time.perf_counter()
            assert (await client.get("/healthz")).status_code == 200
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.01)
        return latencies

    # The requests share one event loop with the app (ASGI transport), as on a server: a
    # stalled loop would hold every /healthz behind the hostile messages.
    *answers, latencies = await asyncio.gather(*(hostile(i) for i in range(5)),
                                               healthz_latencies())
    assert max(elapsed for elapsed, _ in answers) < ANSWER_BOUND_S
    assert max(latencies) < HEALTHZ_BOUND_S, latencies
    assert {body["staging_status"] for _, body in answers} == {"partial"}
    staged = (await client.get("/api/v1/staging?status=partial")).json()["items"]
    assert any("does not match" in error["message"]
               for item in staged for error in item["validation_errors"])
