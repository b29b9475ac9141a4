"""Partial or complete: does a payload satisfy its entity type's JSON Schema?"""

from __future__ import annotations

from functools import lru_cache
from typing import Any
from urllib.parse import unquote

import orjson
from jsonschema import exceptions, validators
from referencing import Registry
from referencing.exceptions import Unresolvable

from pipeline_console.errors import FieldError, InvalidInput
from pipeline_console.ingestion.intake import depth
from pipeline_console.ingestion.planner import Completeness
from pipeline_console.ingestion.policy import UnhashablePayload, canonical_json

MAX_REPORTED_ERRORS = 20


MAX_SCHEMA_DEPTH = 64
# No retrieval function: a reference the schema itself does not contain is an error,
# never a network fetch (which would block the server and reach wherever the schema says).
_NO_REMOTE_SCHEMAS = Registry()


def _refuse(message: str, where: str = "") -> InvalidInput:
    return InvalidInput(
        "the schema is not a valid JSON Schema",
        [FieldError(field="schema" + (f"/{where}" if where else ""), message=message)],
    )


def check_schema(schema: dict[str, Any]) -> None:
    """Refuse a schema that is not valid JSON Schema, naming where it is wrong."""
    if depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise _refuse(f"nested deeper than {MAX_SCHEMA_DEPTH} levels")
    try:
        canonical_json(schema)
    except UnhashablePayload as error:
        raise _refuse(f"cannot be put in canonical JSON form: {error}") from error
    validator_class = validators.validator_for(schema, default=validators.Draft202012Validator)
    try:
        validator_class.check_schema(schema)
    except exceptions.SchemaError as error:
        path = "/".join(str(part) for part in error.absolute_path)
        raise _refuse(error.message, path) from error
    for where, reference in _references(schema, ""):
        if not reference.startswith("#"):
            raise _refuse("only local references ('#…') are allowed; schemas are never "
                          "fetched", where)
        if reference.startswith("#/") and not _pointer_resolves(schema, reference[1:]):
            raise _refuse(f"the reference {reference!r} points at nothing", where)


def _references(node: Any, where: str) -> list[tuple[str, str]]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("$ref", "$dynamicRef") and isinstance(value, str):
                found.append((f"{where}/{key}".lstrip("/"), value))
            else:
                found += _references(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _references(value, f"{where}/{index}")
    return found


def _pointer_resolves(schema: Any, pointer: str) -> bool:
    node = schema
    for raw in pointer.split("/")[1:]:
        part = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


@lru_cache(maxsize=256)
def _validator(schema_json: bytes) -> Any:
    schema = orjson.loads(schema_json)
    validator_class = validators.validator_for(schema, default=validators.Draft202012Validator)
    return validator_class(schema, registry=_NO_REMOTE_SCHEMAS)


def missing_fields(schema: dict[str, Any] | None, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """What keeps the payload from satisfying the schema; empty when it is complete."""
    if schema is None:
        return []
    validator = _validator(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS))
    problems = []
    try:
        for error in validator.iter_errors(payload):
            path = "".join(f"/{part}" for part in error.absolute_path) or "/"
            problems.append({"path": path, "message": error.message[:300]})
            if len(problems) >= MAX_REPORTED_ERRORS:
                break
    except (Unresolvable, RecursionError) as error:
        # A schema stored before it could be checked this strictly: the record waits as
        # partial, with the reason, instead of failing the message.
        return [{"path": "/", "message": f"the entity type's schema cannot be evaluated: "
                 f"{str(error)[:200]}"}]
    return sorted(problems, key=lambda problem: problem["path"])


def completeness_for(schemas: dict[str, dict[str, Any] | None]) -> Completeness:
    def completeness(entity_type: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        return missing_fields(schemas.get(entity_type), payload)

    return completeness
