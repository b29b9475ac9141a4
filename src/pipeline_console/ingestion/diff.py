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
_LEAVES = (str, int, float, bool, type(None))


class _Unaligned(Exception):
    """The payloads differ in a way DeepDiff describes by its own rules: an object whose
    fields differ (it reports an object with few shared fields whole), a list that differs
    (it aligns the items as a sequence diff, reporting moves as removed and added), a
    value whose type changed."""


def field_diff(current: Any, incoming: Any) -> list[dict[str, Any]]:
    """Every differing field as {"path": JSON Pointer, "change", "current", "incoming"}.

    A field missing on one side has no "current" or "incoming" value. Payloads of the same
    shape (the usual conflict: the same fields, some values changed) are compared by one
    walk, which answers exactly as DeepDiff (a property test compares them) at a fraction of
    the cost; anything else by DeepDiff.
    """
    entries: list[dict[str, Any]] = []
    try:
        _walk(current, incoming, [], entries)
    except _Unaligned:
        entries = _deepdiff(current, incoming)
    return sorted(entries, key=lambda entry: entry["path"])


def _walk(current: Any, incoming: Any, path: list[Any], out: list[dict[str, Any]]) -> None:
    kind = type(current)
    if kind is not type(incoming):
        raise _Unaligned
    if kind is dict:
        if current.keys() != incoming.keys():
            raise _Unaligned
        for key, value in current.items():
            _walk(value, incoming[key], [*path, key], out)
    elif kind is list:
        if len(current) != len(incoming):
            raise _Unaligned
        differences: list[dict[str, Any]] = []
        for old, new in zip(current, incoming, strict=True):
            _walk(old, new, path, differences)
        if differences:  # DeepDiff aligns differing lists by its own rules
            raise _Unaligned
    elif kind not in _LEAVES:
        raise _Unaligned
    elif current != incoming:
        out.append({"path": _pointer(path), "change": "changed",
                    "current": current, "incoming": incoming})


def _deepdiff(current: Any, incoming: Any) -> list[dict[str, Any]]:
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
    return entries


def _pointer(parts: list[Any]) -> str:
    escaped = (str(part).replace("~", "~0").replace("/", "~1") for part in parts)
    return "".join("/" + part for part in escaped) or "/"
