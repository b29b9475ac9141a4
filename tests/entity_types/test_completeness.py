"""Entity-type schemas on a linear-time engine: what PUT refuses (naming where), what a
payload lacks (in readable words), and a stored schema the engine cannot compile."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import insert

from pipeline_console.entity_types.completeness import check_schema, missing_fields
from pipeline_console.errors import InvalidInput
from pipeline_console.models import EntityType
from tests.support import message

BACKREFERENCE = {"type": "object", "properties": {"email": {"pattern": r"^(\w+)\1$"}}}


def refusal(schema: dict) -> tuple[str, str]:
    with pytest.raises(InvalidInput) as caught:
        check_schema(schema)
    [error] = caught.value.errors
    return error.field, error.message


class TestWhatTheEngineCannotCompile:
    @pytest.mark.parametrize(("schema", "field"), [
        (BACKREFERENCE, "schema/properties/email/pattern"),
        ({"properties": {"a": {"pattern": "(?=x)y"}}}, "schema/properties/a/pattern"),
        ({"properties": {"a": {"pattern": "(?<!x)y"}}}, "schema/properties/a/pattern"),
        ({"patternProperties": {"^(?!tmp)": {}}}, "schema/patternProperties/^(?!tmp)"),
        ({"propertyNames": {"pattern": r"(a)\1"}}, "schema/propertyNames/pattern"),
        ({"patternProperties": {"a/b~(?=c)": {}}}, "schema/patternProperties/a~1b~0(?=c)"),
        ({"properties": {"a": {"pattern": "(a{1000}){1000}"}}}, "schema/properties/a/pattern"),
    ], ids=["backreference", "lookahead", "lookbehind", "pattern-property", "property-names",
            "escaped-pointer", "too-large"])
    def test_a_pattern_that_needs_backtracking_is_refused_where_it_is(self, schema, field):
        where, why = refusal(schema)
        assert where == field
        assert "linear-time regex engine" in why

    def test_draft_3_is_refused_by_name(self):
        where, why = refusal({"$schema": "http://json-schema.org/draft-03/schema#"})
        assert where == "schema/$schema" and why.startswith("draft 3 is not supported")

    def test_an_unknown_dialect_is_refused(self):
        where, why = refusal({"$schema": "https://example.com/my-dialect"})
        assert where == "schema/$schema" and '"https://example.com/my-dialect"' in why

    @pytest.mark.parametrize("dialect", [
        "http://json-schema.org/draft-04/schema#", "http://json-schema.org/draft-07/schema",
        "https://json-schema.org/draft/2019-09/schema",
        "https://json-schema.org/draft/2020-12/schema"])
    def test_the_drafts_the_engine_implements_are_accepted(self, dialect):
        check_schema({"$schema": dialect, "type": "object",
                      "properties": {"email": {"pattern": r"^[a-z0-9.]+@example\.com$"}}})

    def test_a_keyword_of_the_wrong_type_names_the_keyword(self):
        assert refusal({"type": "object", "required": "name"}) == (
            "schema/required", '"name" is not of type "array"')


class TestWhatAPayloadLacks:
    def test_values_in_messages_are_json_quoted(self):
        schema = {"type": "object", "required": ["country"],
                  "properties": {"kind": {"enum": ["a", "b"]}, "n": {"maximum": 3}}}
        assert missing_fields(schema, {"kind": "c", "n": 5}) == [
            {"path": "/", "message": '"country" is a required property'},
            {"path": "/kind", "message": '"c" is not one of "a" or "b"'},
            {"path": "/n", "message": "5 is greater than the maximum of 3"},
        ]

    def test_formats_stay_annotations_as_before(self):
        schema = {"$schema": "http://json-schema.org/draft-07/schema#",
                  "properties": {"email": {"format": "email"}}}
        assert missing_fields(schema, {"email": "not an address"}) == []

    def test_a_recursive_schema_is_evaluated(self):
        schema = {"properties": {"child": {"$ref": "#"}}, "required": ["id"]}
        assert [p["path"] for p in missing_fields(schema, {"id": 1, "child": {}})] == [
            "/child"]


class TestThePut:
    async def test_a_backreference_is_a_422_naming_the_pointer(self, client):
        response = await client.put("/api/v1/entity-types/customer",
                                    json={"schema": BACKREFERENCE})
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["errors"][0]["field"] == "schema/properties/email/pattern"
        assert (await client.get("/api/v1/entity-types/customer")).status_code == 404

    async def test_draft_3_is_a_422(self, client):
        response = await client.put("/api/v1/entity-types/customer", json={
            "schema": {"$schema": "http://json-schema.org/draft-03/schema#"}})
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == "schema/$schema"


class TestAStoredSchemaThatNoLongerCompiles:
    """Stored before PUT checked this strictly (or by another version): ingestion goes on."""

    @pytest.mark.parametrize("schema", [
        BACKREFERENCE, {"$schema": "http://json-schema.org/draft-03/schema#"}],
        ids=["backreference", "draft-3"])
    async def test_the_record_waits_as_partial_saying_why(self, client, database, schema):
        now = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
        async with database.transaction() as session:
            await session.execute(insert(EntityType).values(
                name="customer", schema=schema, created_at=now, updated_at=now))
        response = await client.post("/api/v1/messages",
                                     json=message(1, {"email": "aa"}))
        assert response.status_code == 200
        assert response.json()["staging_status"] == "partial"
        [staged] = (await client.get("/api/v1/staging?status=partial")).json()["items"]
        [reason] = staged["validation_errors"]
        assert reason["message"].startswith("the entity type's schema could not be compiled")
        run = await client.post("/api/v1/jobs/promote_staging/run")
        assert run.status_code == 200 and run.json()["result"]["promoted"] == 0
