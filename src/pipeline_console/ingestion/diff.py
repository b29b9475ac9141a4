"""The field-level diff between two payloads that an anomaly shows a person."""

from typing import Any

from deepdiff import DeepDiff

_CHANGES = {
    "values_changed": "changed",
    "type_changes": "changed",
    "dictionary_item_added": "added",
    "dictionary_item_removed": "removed",
    "iterable_item_added": "added",
    "iterable_item_removed": "removed",
}


def field_diff(current: Any, incoming: Any) -> list[dict[str, Any]]:
    """Every differing field as {"path": JSON Pointer, "change", "current", "incoming"}.

    A field missing on one side has no "current" or "incoming" value.
    """
    tree = DeepDiff(current, incoming, view="tree", ignore_numeric_type_changes=True)
    entries: list[dict[str, Any]] = []
    for report, change in _CHANGES.items():
        for node in tree.get(report, []):
            entry: dict[str, Any] = {"path": _pointer(node.path(output_format="list")),
                                     "change": change}
            if change != "added":
                entry["current"] = node.t1
            if change != "removed":
                entry["incoming"] = node.t2
            entries.append(entry)
    return sorted(entries, key=lambda entry: entry["path"])


def _pointer(parts: list[Any]) -> str:
    escaped = (str(part).replace("~", "~0").replace("/", "~1") for part in parts)
    return "".join("/" + part for part in escaped) or "/"
