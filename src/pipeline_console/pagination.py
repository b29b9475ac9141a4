"""Keyset pagination: an opaque cursor holding the sort key of the last item returned."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from pipeline_console.errors import FieldError, InvalidInput

DEFAULT_LIMIT = 50
MAX_LIMIT = 500

T = TypeVar("T")


@dataclass(frozen=True)
class PageRequest:
    limit: int = DEFAULT_LIMIT
    after: Any = None  # the decoded cursor: the sort key of the last item already seen


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


def encode_cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")


def decode_cursor(cursor: str | None, expected: type) -> Any:
    """The cursor's value, which must be of the expected type (int ids or str keys)."""
    if cursor is None:
        return None
    try:
        value = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        value = None
    if not _acceptable(value, expected):
        raise InvalidInput(
            "the cursor is not one this server issued",
            [FieldError(field="cursor", location="query", message="invalid cursor")],
        )
    return value


MAX_ID = 2**63 - 1


def _acceptable(value: Any, expected: type) -> bool:
    if not isinstance(value, expected) or isinstance(value, bool):
        return False
    if isinstance(value, int):
        return 0 <= value <= MAX_ID
    return isinstance(value, str) and "\x00" not in value


def page_of(rows: list[T], request: PageRequest, sort_key: Any) -> Page[T]:
    """Rows were fetched with limit + 1; the extra row only tells that there is a next page."""
    if len(rows) > request.limit:
        rows = rows[: request.limit]
        return Page(rows, encode_cursor(sort_key(rows[-1])))
    return Page(rows, None)


def matches(column: Any, value: Any) -> Any:
    """column = value, or for a tuple (several statuses of a filter) column IN value."""
    return column.in_(value) if isinstance(value, tuple) else column == value


async def fetch_page(
    session: AsyncSession,
    sort_column: InstrumentedAttribute[Any],
    page: PageRequest,
    *,
    equal: Iterable[tuple[InstrumentedAttribute[Any], Any]] = (),
    where: Iterable[Any] = (),
) -> Page[Any]:
    """One page of the entity that owns `sort_column`, ordered by it, filtered by each
    (column, value) pair whose value is not None (a tuple value: any of its values) and by
    every condition in `where`."""
    query = select(sort_column.class_).where(*where).order_by(sort_column).limit(page.limit + 1)
    for column, value in equal:
        if value is not None:
            query = query.where(matches(column, value))
    if page.after is not None:
        query = query.where(sort_column > page.after)
    rows = list((await session.execute(query)).scalars())
    return page_of(rows, page, lambda row: getattr(row, sort_column.key))
