"""The field-level diff an anomaly shows."""

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_console.ingestion.diff import _deepdiff, field_diff


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


def test_lists_that_differ_and_changed_types_are_diffed_by_deepdiff():
    # DeepDiff aligns a shifted list as one item removed and one added, not three changed
    assert field_diff({"l": [1, 2, 3]}, {"l": [2, 3, 4]}) == [
        {"path": "/l/0", "change": "removed", "current": 1},
        {"path": "/l/2", "change": "added", "incoming": 4}]
    assert field_diff({"lines": [1, 2, 3]}, {"lines": [1, 3]}) == _deepdiff_sorted(
        {"lines": [1, 2, 3]}, {"lines": [1, 3]})
    assert field_diff({"n": 1, "m": True}, {"n": 1.0, "m": 1}) == _deepdiff_sorted(
        {"n": 1, "m": True}, {"n": 1.0, "m": 1})
    assert field_diff({"n": 1}, {"n": 1.0}) == []
    assert field_diff({"l": [True]}, {"l": [1]}) == _deepdiff_sorted({"l": [True]}, {"l": [1]})


_LEAF = st.one_of(st.none(), st.booleans(), st.sampled_from([0, 1, 2, 1.0, 2.5, -0.0]),
                  st.sampled_from(["", "x", "y", "a/b~"]))
_JSON = st.recursive(
    _LEAF,
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.lists(st.sampled_from([1, 2, 3]), max_size=4),
                               st.dictionaries(st.sampled_from(["a", "b", "c/d"]), children,
                                               max_size=3)),
    max_leaves=10)


@settings(max_examples=400)
@given(current=st.dictionaries(st.sampled_from(["a", "b", "c"]), _JSON, max_size=3),
       incoming=st.dictionaries(st.sampled_from(["a", "b", "c"]), _JSON, max_size=3))
def test_the_walk_answers_exactly_as_deepdiff(current, incoming):
    assert field_diff(current, incoming) == _deepdiff_sorted(current, incoming)


@settings(max_examples=200)
@given(base=st.dictionaries(st.sampled_from(["a", "b", "c"]), _JSON, max_size=3),
       data=st.data())
def test_a_few_changed_leaves_diff_as_deepdiff_does(base, data):
    """The usual conflict: the same shape with some values changed."""
    def mutate(value):
        if isinstance(value, dict):
            return {key: mutate(item) for key, item in value.items()}
        if isinstance(value, list):
            return [mutate(item) for item in value]
        return data.draw(_LEAF) if data.draw(st.booleans()) else value
    incoming = mutate(base)
    assert field_diff(base, incoming) == _deepdiff_sorted(base, incoming)


def _deepdiff_sorted(current, incoming):
    return sorted(_deepdiff(current, incoming), key=lambda entry: entry["path"])


@settings(max_examples=200)
@given(items=st.lists(st.tuples(st.sampled_from([1, 2, 3, "x"]), st.sampled_from([1, 2, 3, "x"])),
                      min_size=1, max_size=5))
def test_lists_of_one_length_diff_as_deepdiff_does(items):
    """Shifted and permuted items: DeepDiff may align them as removed and added."""
    current = {"lines": [old for old, _ in items], "n": 1}
    incoming = {"lines": [new for _, new in items], "n": 2}
    assert field_diff(current, incoming) == _deepdiff_sorted(current, incoming)
