"""Partial or complete: does a payload satisfy its entity type's JSON Schema?"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import orjson
from jsonschema import exceptions, validators

from pipeline_console.errors import FieldError, InvalidInput
from pipeline_console.ingestion.planner import Completeness

MAX_REPORTED_ERRORS = 20


def check_schema(schema: dict[str, Any]) -> None:
    """Refuse a schema that is not valid JSON Schema, naming where it is wrong."""
    validator_class = validators.validator_for(schema, default=validators.Draft202012Validator)
    try:
        validator_class.check_schema(schema)
    except exceptions.SchemaError as error:
        path = "/".join(str(part) for part in error.absolute_path)
        raise InvalidInput(
            "the schema is not a valid JSON Schema",
            [FieldError(field="schema" + (f"/{path}" if path else ""), message=error.message)],
        ) from error


@lru_cache(maxsize=256)
def _validator(schema_json: bytes) -> Any:
    schema = orjson.loads(schema_json)
    validator_class = validators.validator_for(schema, default=validators.Draft202012Validator)
    return validator_class(schema)


def missing_fields(schema: dict[str, Any] | None, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """What keeps the payload from satisfying the schema; empty when it is complete."""
    if schema is None:
        return []
    validator = _validator(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS))
    problems = []
    for error in validator.iter_errors(payload):
        path = "".join(f"/{part}" for part in error.absolute_path) or "/"
        problems.append({"path": path, "message": error.message[:300]})
        if len(problems) >= MAX_REPORTED_ERRORS:
            break
    return sorted(problems, key=lambda problem: problem["path"])


def completeness_for(schemas: dict[str, dict[str, Any] | None]) -> Completeness:
    def completeness(entity_type: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        return missing_fields(schemas.get(entity_type), payload)

    return completeness
