"""Read endpoints: records, staging, correlations, entity types, attempts, audit; jobs."""

from __future__ import annotations

import pytest

from tests.support import message


async def post_batch(client, *bodies):
    response = await client.post("/api/v1/messages/batch", json={"messages": list(bodies)})
    assert response.status_code == 200
    return response.json()["results"]


async def all_pages(client, path):
    items, cursor = [], None
    while True:
        separator = "&" if "?" in path else "?"
        url = path + (f"{separator}cursor={cursor}" if cursor else "")
        page = (await client.get(url)).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


class TestRecords:
    async def test_a_record_shows_state_production_and_staging(self, client):
        await post_batch(client, message(1, {"name": "Acme"}), message(2, {"name": "Acme 2"}))
        body = (await client.get("/api/v1/records/customer%3AC-100")).json()
        assert body["idempotency_key"] == "customer:C-100"
        assert body["current_version"] == 2
        assert len(body["payload_hash"]) == 64
        assert body["production"]["payload"] == {"name": "Acme 2"}
        assert body["staging"]["version"] == 2 and body["staging"]["status"] == "promoted"

    async def test_keys_and_correlation_ids_with_slashes_are_found(self, client):
        await post_batch(client, message(1, entity_id="A/B 1", correlation_id="evt/1"))
        record = await client.get("/api/v1/records/customer%3AA%2FB%201")
        assert record.status_code == 200
        assert record.json()["idempotency_key"] == "customer:A/B 1"
        event = await client.get("/api/v1/correlations/evt%2F1")
        assert event.status_code == 200 and len(event.json()["records"]) == 1

    async def test_an_unknown_key_is_404_problem(self, client):
        response = await client.get("/api/v1/records/customer%3ANOPE")
        assert response.status_code == 404
        assert "customer:NOPE" in response.json()["detail"]

    async def test_pages_cover_every_record_once_in_key_order(self, client):
        await post_batch(client, *[message(1, entity_id=f"C-{i:03}") for i in range(23)])
        items = await all_pages(client, "/api/v1/records?limit=5")
        keys = [item["idempotency_key"] for item in items]
        assert keys == sorted(keys) and len(set(keys)) == 23

    async def test_filters_by_entity_type_and_source_system(self, client):
        await post_batch(
            client, message(1, entity_id="A"), message(1, entity_id="B", source_system="crm"),
            message(1, {"total": 1}, entity_type="order", entity_id="O"))
        by_type = (await client.get("/api/v1/records?entity_type=order")).json()["items"]
        by_source = (await client.get("/api/v1/records?source_system=crm")).json()["items"]
        assert [r["idempotency_key"] for r in by_type] == ["order:O"]
        assert [r["idempotency_key"] for r in by_source] == ["customer:B"]

    @pytest.mark.parametrize("query", ["limit=0", "limit=501", "limit=x", "cursor=%27%3B--",
                                       "cursor=eyJhIjoxfQ"])
    async def test_bad_paging_is_422_naming_the_parameter(self, client, query):
        response = await client.get(f"/api/v1/records?{query}")
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == query.split("=")[0]

    async def test_hostile_filter_values_are_just_values(self, client):
        await post_batch(client, message(1))
        response = await client.get("/api/v1/records?entity_type=x%27%20OR%20%271%27%3D%271")
        assert response.status_code == 200 and response.json()["items"] == []


class TestStaging:
    async def test_partial_records_are_listed_with_what_they_lack(self, client):
        await client.put("/api/v1/entity-types/customer", json={
            "schema": {"type": "object", "required": ["country"]}})
        await post_batch(client, message(1, {"name": "A"}, entity_id="A"),
                         message(1, {"name": "B", "country": "DE"}, entity_id="B"))
        items = (await client.get("/api/v1/staging?status=partial")).json()["items"]
        assert [item["idempotency_key"] for item in items] == ["customer:A"]
        assert "country" in items[0]["validation_errors"][0]["message"]


class TestCorrelations:
    async def test_every_record_of_a_business_event(self, client):
        await post_batch(
            client, message(1, entity_id="C-1", correlation_id="evt-1"),
            message(1, {"total": 5}, entity_type="order", entity_id="O-1",
                    source_system="shop", correlation_id="evt-1"),
            message(1, entity_id="C-9", correlation_id="evt-2"))
        body = (await client.get("/api/v1/correlations/evt-1")).json()
        assert body["correlation_id"] == "evt-1"
        assert [(r["idempotency_key"], r["linked_by_source_system"]) for r in body["records"]] == [
            ("customer:C-1", "erp"), ("order:O-1", "shop")]
        assert body["records"][1]["production"]["payload"] == {"total": 5}

    async def test_an_unknown_correlation_is_404(self, client):
        assert (await client.get("/api/v1/correlations/none")).status_code == 404


class TestEntityTypes:
    async def test_create_replace_and_list(self, client):
        created = await client.put("/api/v1/entity-types/customer", json={
            "schema": {"type": "object", "required": ["name"]}})
        assert created.status_code == 201
        assert created.json()["schema"] == {"type": "object", "required": ["name"]}
        replaced = await client.put("/api/v1/entity-types/customer", json={"schema": None})
        assert replaced.status_code == 200 and replaced.json()["schema"] is None
        await post_batch(client, message(1, {"x": 1}, entity_type="invoice"))
        names = [item["name"] for item in (await client.get("/api/v1/entity-types")).json()[
            "items"]]
        assert names == ["customer", "invoice"]

    async def test_an_invalid_schema_is_422_naming_where(self, client):
        response = await client.put("/api/v1/entity-types/customer", json={
            "schema": {"type": "object", "required": "name"}})
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"].startswith("schema")

    async def test_a_bad_name_is_422(self, client):
        response = await client.put("/api/v1/entity-types/has%20space", json={"schema": None})
        assert response.status_code == 422

    async def test_a_schema_change_is_audited(self, client):
        await client.put("/api/v1/entity-types/customer", json={"schema": {"type": "object"}})
        events = (await client.get("/api/v1/audit?subject_type=entity_type")).json()["items"]
        assert [e["action"] for e in events] == ["entity_type.schema_set"]
        assert events[0]["details"]["schema"] == {"type": "object"}


class TestAttempts:
    async def test_the_attempt_log_filters_by_key_and_decision(self, client):
        await post_batch(client, message(1), message(1), message(1, entity_id="X"),
                         message(-1))
        for_key = (await client.get("/api/v1/attempts?key=customer%3AC-100")).json()["items"]
        assert [a["decision"] for a in for_key] == ["accept_new", "skip_duplicate", "rejected"]
        rejected = (await client.get("/api/v1/attempts?decision=rejected")).json()["items"]
        assert len(rejected) == 1 and rejected[0]["errors"][0]["field"] == "version"


class TestJobs:
    async def test_promote_staging_runs_on_demand(self, client):
        await client.put("/api/v1/entity-types/customer", json={
            "schema": {"type": "object", "required": ["country"]}})
        await post_batch(client, message(1, {"name": "A"}))
        await client.put("/api/v1/entity-types/customer", json={"schema": None})
        jobs = (await client.get("/api/v1/jobs")).json()["items"]
        assert "promote_staging" in [job["name"] for job in jobs]
        run = (await client.post("/api/v1/jobs/promote_staging/run")).json()
        assert run["result"]["promoted"] == 1
        record = (await client.get("/api/v1/records/customer%3AC-100")).json()
        assert record["production"]["payload"] == {"name": "A"}

    async def test_an_unknown_job_is_404(self, client):
        assert (await client.post("/api/v1/jobs/nope/run")).status_code == 404
