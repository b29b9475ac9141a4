"""Partial or complete: does a payload satisfy its entity type's JSON Schema?

Schemas are compiled by jsonschema-rs with Rust's `regex` crate, whose matching time is
linear in the input: a `pattern` cannot stall the event loop however it is written (Python's
`re` backtracks, and `^([a-z0-9]+)+@x$` took seconds on 27 characters). The price is that
backreferences and lookaround cannot be compiled; such a schema is refused at PUT.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

import jsonschema_rs
import orjson

from pipeline_console.errors import FieldError, InvalidInput
from pipeline_console.ingestion.intake import depth
from pipeline_console.ingestion.planner import Completeness
from pipeline_console.ingestion.policy import UnhashablePayload, canonical_json

MAX_REPORTED_ERRORS = 20
MAX_SCHEMA_DEPTH = 64
MAX_MESSAGE_CHARS = 300

# The drafts jsonschema-rs implements, by the `$schema` URI (with or without the empty
# fragment); no `$schema` means 2020-12.
SUPPORTED_DRAFTS = {
    "http://json-schema.org/draft-04/schema": "draft 4",
    "http://json-schema.org/draft-06/schema": "draft 6",
    "http://json-schema.org/draft-07/schema": "draft 7",
    "https://json-schema.org/draft/2019-09/schema": "draft 2019-09",
    "https://json-schema.org/draft/2020-12/schema": "draft 2020-12",
}
_SUPPORTED_LIST = "draft 4, 6, 7, 2019-09 or 2020-12"


def _compile(schema: dict[str, Any]) -> jsonschema_rs.Validator:
    """The one way a schema is compiled: linear-time regexes, formats as annotations only
    (as before), and never a network fetch (a reference the schema itself does not contain
    is an error, since a fetch would block the server and reach wherever the schema says)."""
    return jsonschema_rs.validator_for(schema, pattern_options=jsonschema_rs.RegexOptions(),
                                       validate_formats=False, offline=True)


def _refuse(message: str, where: str = "") -> InvalidInput:
    return InvalidInput(
        "the schema is not a valid JSON Schema",
        [FieldError(field="schema" + (f"/{where}" if where else ""), message=message)],
    )


def _quoted(value: Any) -> str:
    return orjson.dumps(value).decode()


def check_schema(schema: dict[str, Any]) -> None:
    """Refuse a schema that is not valid JSON Schema or that the engine cannot compile,
    naming where it is wrong."""
    if depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise _refuse(f"nested deeper than {MAX_SCHEMA_DEPTH} levels")
    try:
        canonical_json(schema)
    except UnhashablePayload as error:
        raise _refuse(f"cannot be put in canonical JSON form: {error}") from error
    dialect = schema.get("$schema")
    if dialect is not None and (not isinstance(dialect, str)
                                or dialect.rstrip("#") not in SUPPORTED_DRAFTS):
        named = "draft 3" if "draft-03" in str(dialect) else f"the dialect {_quoted(dialect)}"
        raise _refuse(f"{named} is not supported; use {_SUPPORTED_LIST}, or leave $schema "
                      "out for 2020-12", "$schema")
    for where, reference in _references(schema, ""):
        if not reference.startswith("#"):
            raise _refuse("only local references ('#…') are allowed; schemas are never "
                          "fetched", where)
        if reference.startswith("#/") and not _pointer_resolves(schema, reference[1:]):
            raise _refuse(f"the reference {_quoted(reference)} points at nothing", where)
    try:
        _compile(schema)
    except jsonschema_rs.ValidationError as error:
        raise _refuse(_compile_message(error),
                      "/".join(_escaped(part) for part in error.instance_path)) from error


def _compile_message(error: jsonschema_rs.ValidationError) -> str:
    kind = error.kind
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.Format) and kind.format == "regex":
        return (f"the pattern {_quoted(error.instance)} cannot be compiled by the linear-time "
                "regex engine: backreferences and lookaround such as (?=…), (?!…), (?<=…) "
                "are not supported, nor patterns whose compiled form is too large, such as "
                "(a{1000}){1000})")
    return error.message[:MAX_MESSAGE_CHARS]


def _escaped(part: object) -> str:
    """One reference token of a JSON Pointer (RFC 6901): '~' as '~0', '/' as '~1'."""
    return str(part).replace("~", "~0").replace("/", "~1")


def _references(node: Any, where: str) -> list[tuple[str, str]]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("$ref", "$dynamicRef") and isinstance(value, str):
                found.append((f"{where}/{key}".lstrip("/"), value))
            else:
                found += _references(value, f"{where}/{_escaped(key)}")
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


@dataclass(frozen=True)
class _Compiled:
    validator: jsonschema_rs.Validator | None
    failure: str | None = None


@lru_cache(maxsize=256)
def _validator(schema_json: bytes) -> _Compiled:
    """One compiled validator per distinct schema (its canonical bytes), or why there is none:
    a failure is cached too, so a broken stored schema is not recompiled per message."""
    try:
        return _Compiled(_compile(orjson.loads(schema_json)))
    except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, ValueError) as error:
        message = getattr(error, "message", None) or str(error)
        return _Compiled(None, message.split("\n", 1)[0][:200])


def missing_fields(schema: dict[str, Any] | None, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """What keeps the payload from satisfying the schema; empty when it is complete."""
    if schema is None:
        return []
    compiled = _validator(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS))
    if compiled.validator is None:
        # A schema stored before it was checked this strictly: the record waits as partial,
        # with the reason, instead of failing the message.
        return [{"path": "/", "message": "the entity type's schema could not be compiled: "
                 f"{compiled.failure}"}]
    problems = []
    for error in compiled.validator.iter_errors(payload):
        path = "".join(f"/{part}" for part in error.instance_path) or "/"
        problems.append({"path": path, "message": error.message[:MAX_MESSAGE_CHARS]})
        if len(problems) >= MAX_REPORTED_ERRORS:
            break
    return sorted(problems, key=lambda problem: problem["path"])


def completeness_for(schemas: dict[str, dict[str, Any] | None]) -> Completeness:
    def completeness(entity_type: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        return missing_fields(schemas.get(entity_type), payload)

    return completeness
