"""Pure helpers that shape service results for the console's templates."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import orjson

from pipeline_console.ingestion.diff import field_diff

API_PREFIX = "/api/v1"


def console_path(item: Any) -> str:
    """The console page that lists exactly the rows a dashboard item counts: each API list
    the dashboard links to has a console page of the same path that takes the same filters."""
    return item.path.removeprefix(API_PREFIX) or "/"


def leaves(value: Any, pointer: str = "") -> dict[str, Any]:
    """Every leaf of a JSON value by its JSON Pointer."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            escaped = str(key).replace("~", "~0").replace("/", "~1")
            out.update(leaves(item, f"{pointer}/{escaped}"))
        return out
    if isinstance(value, list) and value:
        out = {}
        for index, item in enumerate(value):
            out.update(leaves(item, f"{pointer}/{index}"))
        return out
    return {pointer or "/": value}


@dataclass(frozen=True)
class FieldRow:
    path: str
    left: str | None
    right: str | None
    differs: bool


def side_by_side(left: Any, right: Any, differing: list[str]) -> list[FieldRow]:
    """Both payloads field by field; a row differs when its pointer is, or is under, a path
    of the diff."""
    a, b = leaves(left), leaves(right)

    def differs(path: str) -> bool:
        return any(path == d or path.startswith(d.rstrip("/") + "/") for d in differing)

    def shown(side: dict[str, Any], path: str) -> str | None:
        return orjson.dumps(side[path]).decode() if path in side else None

    # Marked as the anomaly's diff says (which treats 1 and 1.0 as the same number).
    return [FieldRow(path, shown(a, path), shown(b, path), differs(path))
            for path in sorted(a.keys() | b.keys())]


@dataclass(frozen=True)
class VersionChange:
    from_version: int
    to_version: int
    source_system: str
    changes: list[dict[str, Any]]


def version_changes(staging_rows: list[Any]) -> list[VersionChange]:
    """What changed from each accepted version to the next (staging rows, any order)."""
    rows = sorted(staging_rows, key=lambda row: (row.version, row.id))
    return [VersionChange(before.version, after.version, after.source_system,
                          field_diff(before.payload, after.payload))
            for before, after in pairwise(rows)
            if before.version != after.version]


def by_system(deliveries: list[Any], attempts: list[Any]) -> dict[str, list[tuple[Any, list]]]:
    """Deliveries grouped by system, each with its attempts, oldest first."""
    tries: dict[int, list[Any]] = {}
    for attempt in attempts:
        tries.setdefault(attempt.delivery_id, []).append(attempt)
    grouped: dict[str, list[tuple[Any, list]]] = {}
    for delivery in deliveries:
        grouped.setdefault(delivery.system, []).append((delivery, tries.get(delivery.id, [])))
    return dict(sorted(grouped.items()))
