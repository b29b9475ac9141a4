"""JSON columns read as their stored text. The inspector passes the long sections' payloads
through to its answer without looking inside them: decoding ~600 of them per inspection of a
long history only for orjson to encode them again was a fifth of the inspection's time."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson
from sqlalchemy import Text, cast
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator

from pipeline_console.db import json_value
from pipeline_console.redaction import redact_text


class StoredJSON:
    """A JSON column's text as the database holds it. `orjson.dumps(…, default=fragment)`
    writes it as it is; `json_of` decodes it."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"StoredJSON({self.text!r})"


class _StoredJSONType(TypeDecorator[Any]):
    impl = Text
    cache_ok = True

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        # orjson writes a Fragment unchecked; NaN and Infinity (which the standard library
        # once wrote) are not JSON: such a text is decoded here, and its value then written
        # as pydantic writes it (null). The one-letter tests are a memchr; "NaN" in text is
        # a slower search.
        if ("N" in value and "NaN" in value) or ("I" in value and "Infinity" in value):
            return json_value(value)
        return StoredJSON(value)


class _RedactedStoredJSONType(_StoredJSONType):
    """The text with the credentials of old URLs hidden (redaction.py: safe on JSON text)."""

    cache_ok = True

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        return super().process_result_value(None if value is None else redact_text(value),
                                            dialect)


class _RedactedJSONType(TypeDecorator[Any]):
    """A JSON column decoded, the credentials of old URLs hidden first."""

    impl = Text
    cache_ok = True

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        return None if value is None else json_value(redact_text(value))


def as_stored(column: Any, *, redacted: bool = False) -> ColumnElement[Any]:
    """The column read as a StoredJSON (or None). A CAST, because asyncpg decodes a json
    column by itself; on SQLite the CAST of a TEXT column to TEXT changes nothing."""
    kind = _RedactedStoredJSONType() if redacted else _StoredJSONType()
    return cast(column, kind).label(column.name)


def as_redacted(column: Any) -> ColumnElement[Any]:
    """The column decoded, with any URL's user:password@ as ***@ (rows from before systems
    had an auth: their attempts and audit details cannot change, so readers hide it)."""
    return cast(column, _RedactedJSONType()).label(column.name)


def fragment(value: Any) -> orjson.Fragment:
    """orjson's `default`: a StoredJSON is written as its text."""
    if type(value) is StoredJSON:
        return orjson.Fragment(value.text)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def json_of(value: Any) -> Any:
    """The Python value of what `as_stored` read (anything else is returned as it is)."""
    return json_value(value.text) if type(value) is StoredJSON else value


def decoded(rows: list[Any]) -> list[SimpleNamespace]:
    """The rows with their stored JSON decoded, for a reader that looks inside the payloads
    (the console's page, the pydantic models), with the rows' attribute access."""
    return [SimpleNamespace(**{name: json_of(value) for name, value in row._mapping.items()})
            for row in rows]
