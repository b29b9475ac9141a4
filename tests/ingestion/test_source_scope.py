"""Ingest tokens are bound to their source systems (issue 19, finding 1): with the shop's token,
a message claiming to come from the ERP is refused (403) and recorded as rejected, so the
ERP's next message is still decided against the ERP's own versions."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from pipeline_console.ingestion.policy import (
    OTHER_SOURCE,
    CurrentState,
    decide,
    foreign_source,
    reason_for_ingest_token,
)
from pipeline_console.models import AuditEvent, IngestionAttempt, RecordState
from tests.conftest import make_token
from tests.support import message

PROBLEM = "application/problem+json"
HUGE = 9223372036854775807


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def shop(database, clock):
    return bearer(await make_token(database, "ingest", name="shop-ingest", now=clock.now,
                                   sources=["shop"]))


@pytest.fixture
async def erp(database, clock):
    return bearer(await make_token(database, "ingest", name="erp-ingest", now=clock.now,
                                   sources=["erp"]))


async def attempts(database):
    async with database.read() as session:
        return list((await session.execute(
            select(IngestionAttempt).order_by(IngestionAttempt.id))).scalars())


class TestAForgedSourceIsRefused:
    async def test_the_shop_token_cannot_post_for_the_erp(self, client, database, shop, erp):
        assert (await client.post("/api/v1/messages", headers=erp,
                                  json=message(3, entity_id="C-1003"))).json()["decision"] \
            == "accept_new"
        forged = await client.post("/api/v1/messages", headers=shop,
                                   json=message(HUGE, {"name": "Evil"}, entity_id="C-1003"))
        assert forged.status_code == 403
        assert forged.headers["content-type"] == PROBLEM
        problem = forged.json()
        assert problem["status"] == 403 and problem["type"] == "/problems/forbidden"
        assert [error["field"] for error in problem["errors"]] == ["source_system"]
        assert "shop-ingest" in problem["detail"]

        *_, recorded = await attempts(database)
        assert recorded.id == problem["attempt_id"]
        assert recorded.decision == "rejected"
        assert "shop-ingest" in recorded.reason and recorded.version == HUGE
        assert recorded.source_system == "erp" and recorded.idempotency_key == "customer:C-1003"
        assert recorded.errors[0]["field"] == "source_system"
        async with database.read() as session:
            state = await session.get(RecordState, "customer:C-1003")
        assert state.current_version == 3  # nothing was decided

        following = await client.post("/api/v1/messages", headers=erp,
                                      json=message(4, {"name": "Initech"}, entity_id="C-1003"))
        assert following.status_code == 200
        assert following.json()["decision"] == "accept_supersede"  # not skip_stale

    async def test_a_token_with_two_sources_posts_for_both(self, client, database, clock):
        both = bearer(await make_token(database, "ingest", name="hub", now=clock.now,
                                       sources=["crm", "shop"]))
        for source in ("crm", "shop"):
            answer = await client.post("/api/v1/messages", headers=both,
                                       json=message(1, entity_id=f"{source}-1",
                                                    source_system=source))
            assert answer.status_code == 200, answer.text
        refused = await client.post("/api/v1/messages", headers=both, json=message(1))
        assert refused.status_code == 403
        assert "crm, shop" in refused.json()["detail"]

    async def test_an_unscoped_legacy_token_still_posts_for_any_source(self, client, database,
                                                                        clock):
        """Made before scoping existed: it keeps working, flagged until it is replaced
        (tests/test_tokens.py)."""
        from tests.test_tokens import legacy_ingest_token

        legacy = bearer(await legacy_ingest_token(database, clock, "old-connector"))
        answer = await client.post("/api/v1/messages", headers=legacy,
                                   json=message(1, source_system="shop"))
        assert answer.status_code == 200


class TestABatchRefusesOnlyTheForeignItems:
    async def test_mixed_items(self, client, database, shop):
        batch = {"messages": [
            message(1, entity_id="S-1", source_system="shop"),
            message(7, entity_id="C-1003"),  # the ERP's
            {"source_system": "shop", "entity_type": "customer"},  # malformed
            message(1, entity_id="S-2", source_system="shop"),
        ]}
        response = await client.post("/api/v1/messages/batch", headers=shop, json=batch)
        assert response.status_code == 200
        results = response.json()["results"]
        assert [result.get("decision") for result in results] == [
            "accept_new", None, None, "accept_new"]
        forbidden, malformed = results[1]["error"], results[2]["error"]
        assert forbidden["status"] == 403 and forbidden["type"] == "/problems/forbidden"
        assert [error["field"] for error in forbidden["errors"]] == ["source_system"]
        assert malformed["status"] == 422
        recorded = {row.id: row for row in await attempts(database)}
        assert recorded[forbidden["attempt_id"]].decision == "rejected"
        assert "shop-ingest" in recorded[forbidden["attempt_id"]].reason
        assert '"C-1003"' in recorded[forbidden["attempt_id"]].raw_body
        async with database.read() as session:
            assert await session.get(RecordState, "customer:C-1003") is None


class TestReasonsDoNotNameOtherSources:
    def test_the_holder_of_the_current_version_is_redacted(self):
        stale = decide(CurrentState(5, "h", "erp"), 3, "x", "shop").reason
        assert reason_for_ingest_token(stale, {"shop"}) == (
            f"version 3 from shop is older than current version 5 ({OTHER_SOURCE})")
        newer = decide(CurrentState(5, "h", "erp"), 6, "x", "shop").reason
        assert "erp" not in reason_for_ingest_token(newer, {"shop"})

    def test_its_own_sources_are_kept(self):
        stale = decide(CurrentState(5, "h", "crm"), 3, "x", "shop").reason
        assert reason_for_ingest_token(stale, {"shop", "crm"}) == stale
        first = decide(None, 1, "x", "shop").reason
        assert reason_for_ingest_token(first, {"shop"}) == first

    @pytest.mark.parametrize("held", [None, CurrentState(2, "h", "erp"),
                                      CurrentState(2, "x", "erp")])
    def test_no_branch_names_another_source(self, held):
        for version in (1, 2, 3):
            reason = decide(held, version, "x", "shop").reason
            assert "erp" not in reason_for_ingest_token(reason, {"shop"})

    def test_the_scope_check(self):
        assert not foreign_source(None, "erp")
        assert foreign_source(frozenset({"shop"}), "erp")
        assert not foreign_source(frozenset({"shop"}), "shop")

    async def test_the_answer_to_the_shop_is_redacted(self, client, database, shop):
        await client.post("/api/v1/messages", json=message(5, entity_id="C-7",
                                                           source_system="shop"))
        await client.post("/api/v1/messages", json=message(9, entity_id="C-7"))  # the ERP's
        answer = (await client.post("/api/v1/messages", headers=shop, json=message(
            6, entity_id="C-7", source_system="shop"))).json()
        assert answer["decision"] == "skip_stale"
        assert "erp" not in answer["reason"] and OTHER_SOURCE in answer["reason"]
        batch = (await client.post("/api/v1/messages/batch", headers=shop, json={"messages": [
            message(7, entity_id="C-7", source_system="shop")]})).json()
        assert "erp" not in batch["results"][0]["reason"]
        *_, recorded = await attempts(database)
        assert "(erp)" in recorded.reason  # the attempt log keeps the whole reason


class TestOperatorsAndAdminsPostFromAnySource:
    @pytest.mark.parametrize("role", ["operator", "admin"])
    async def test_any_source(self, client, database, clock, role):
        token = bearer(await make_token(database, role, name=f"hand-{role}", now=clock.now))
        for source in ("erp", "shop"):
            answer = await client.post("/api/v1/messages", headers=token, json=message(
                1, entity_id=f"{role}-{source}", source_system=source))
            assert answer.status_code == 200, answer.text
        async with database.read() as session:
            actors = set((await session.execute(select(AuditEvent.actor).where(
                AuditEvent.action == "record.accepted"))).scalars())
        assert actors == {f"hand-{role} ({role})"}

    async def test_a_viewer_may_not_post(self, client, database, clock):
        token = bearer(await make_token(database, "viewer", name="reader", now=clock.now))
        assert (await client.post("/api/v1/messages", headers=token,
                                  json=message(1))).status_code == 403
