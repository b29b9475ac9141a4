"""The field-level diff an anomaly shows."""

from pipeline_console.ingestion.diff import field_diff


def test_a_changed_field_shows_both_values():
    assert field_diff({"name": "Acme", "country": "DE"}, {"name": "ACME", "country": "DE"}) == [
        {"path": "/name", "change": "changed", "current": "Acme", "incoming": "ACME"}
    ]


def test_added_and_removed_fields_have_one_side():
    diff = field_diff({"a": 1, "gone": True}, {"a": 1, "new": None})
    assert diff == [
        {"path": "/gone", "change": "removed", "current": True},
        {"path": "/new", "change": "added", "incoming": None},
    ]


def test_nested_paths_are_json_pointers():
    diff = field_diff({"address": {"city": "Berlin"}, "lines": [1, 2]},
                      {"address": {"city": "Bonn"}, "lines": [1, 3]})
    assert [entry["path"] for entry in diff] == ["/address/city", "/lines/1"]


def test_slashes_in_field_names_are_escaped():
    assert field_diff({"a/b": 1}, {"a/b": 2})[0]["path"] == "/a~1b"


def test_equal_payloads_have_no_diff():
    assert field_diff({"x": [1, {"y": 2}]}, {"x": [1, {"y": 2}]}) == []
