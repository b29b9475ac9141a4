"""Several ambiguous outcomes at once (POST /ambiguous/resolve and /ambiguous/query-status,
issue 22's bulk actions), on both databases: each id acted on as its one-id route would,
with its own audit row, and an answer per id; an id that cannot be acted on is refused in
its answer, not the whole call."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from pipeline_console.models import AuditEvent
from tests.conftest import make_token
from tests.delivery.test_delivery import add_system, deliveries, ingest, run_pass
from tests.support import message

pytestmark = pytest.mark.backends


async def ambiguous_ledger(client, count: int, status_query: str | None = None) -> list[int]:
    """`count` open ambiguous outcomes of a simulated ledger that never answers in time."""
    await add_system(client, name="ledger", transport="simulated", failure_threshold=100,
                     simulation={"seed": 1, "outcomes": {"ambiguous": 1}, "latency_ms": 0.0,
                                 "status_query": status_query})
    await ingest(client, *[message(1, entity_id=f"C-{n}") for n in range(count)])
    assert (await run_pass(client))["ambiguous"] == count
    page = (await client.get("/api/v1/ambiguous?status=open&limit=500")).json()
    return [item["id"] for item in page["items"]]


async def test_fifty_outcomes_resolved_in_one_call_each_audited(client, database) -> None:
    ids = await ambiguous_ledger(client, 50)
    assert len(ids) == 50
    answer = await client.post("/api/v1/ambiguous/resolve", json={
        "ids": ids, "resolution": "delivered", "note": "ledger confirmed the six by phone"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["done"], body["refused"]) == (50, 0)
    assert [item["id"] for item in body["items"]] == ids
    assert {(item["outcome"], item["item"]["status"], item["item"]["resolution"])
            for item in body["items"]} == {("done", "resolved", "delivered")}
    assert {d["status"] for d in await deliveries(client)} == {"delivered"}
    async with database.read() as session:
        audited = await session.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.action == "ambiguous.resolved"))
    assert audited == 50
    assert (await client.get("/api/v1/ambiguous?status=open")).json()["items"] == []


async def test_an_id_that_cannot_be_resolved_is_refused_in_its_answer(client) -> None:
    first, second = await ambiguous_ledger(client, 2)
    await client.post(f"/api/v1/ambiguous/{first}/resolve",
                      json={"resolution": "delivered", "note": "by hand"})
    answer = (await client.post("/api/v1/ambiguous/resolve", json={
        "ids": [first, second, 999], "resolution": "not_delivered",
        "note": "the ledger has none of them"})).json()
    assert [(item["id"], item["outcome"]) for item in answer["items"]] == [
        (first, "refused"), (second, "done"), (999, "refused")]
    assert "already resolved" in answer["items"][0]["error"]
    assert answer["items"][0]["item"]["resolution"] == "delivered"  # unchanged
    assert "does not exist" in answer["items"][2]["error"] and answer["items"][2]["item"] is None
    assert (answer["done"], answer["refused"]) == (1, 2)


async def test_many_outcomes_are_queried_in_one_call(client) -> None:
    ids = await ambiguous_ledger(client, 5, status_query="applied")
    answer = (await client.post("/api/v1/ambiguous/query-status", json={"ids": ids})).json()
    assert {(item["outcome"], item["query_status"], item["item"]["resolution"])
            for item in answer["items"]} == {("done", 200, "delivered")}


@pytest.mark.parametrize(("body", "field"), [
    ({"ids": []}, "ids"), ({"ids": [1, 1]}, "ids"), ({"ids": [0]}, "ids.0"),
    ({"ids": [2**63]}, "ids.0"),
    ({"ids": list(range(1, 502))}, "ids"), ({"ids": [1], "extra": 1}, "extra"),
])
async def test_a_bad_list_of_ids_is_422_naming_it(client, body, field) -> None:
    answer = await client.post("/api/v1/ambiguous/query-status", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert field in [error["field"] for error in answer.json()["errors"]], answer.text


async def test_a_viewer_may_not(client, database, clock) -> None:
    token = await make_token(database, "viewer", now=clock.now)
    for path, body in (("resolve", {"ids": [1], "resolution": "delivered", "note": "x"}),
                       ("query-status", {"ids": [1]})):
        answer = await client.post(f"/api/v1/ambiguous/{path}", json=body,
                                   headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 403, answer.text
