"""decode_json finds every repeated object key, exactly: never one that is not there (strings
full of quotes, backslashes and colons), never missing one (keys equal only after
unescaping), and names where it is."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_console.ingestion.intake import BodyError, decode_json


def repeated_at(body: bytes) -> str | None:
    try:
        decode_json(body)
    except BodyError as error:
        assert error.errors[0].type == "duplicate_key", error.errors
        return error.errors[0].field
    return None


class TestNoRepeatedKeyIsSeenWhereThereIsNone:
    @pytest.mark.parametrize("body", [
        rb'{"a": "\"b\": 1"}',
        rb'{"a": "\\", "b": "\\\""}',
        rb'{"a": "\\\\\"", "b": "\\\\"}',
        rb'{"a": ["\":", "x\":\"y"], "b": {"c": "\\u0022:"}}',
        rb'{"a":":","b":":",":":":"}',
        rb'["a", ":", "b", ":"]',
        rb'{"\u00e9": 1, "\u00c9": 2, "e\u0301": 3}',
        '{"é": 1, "e\u0301": 2}'.encode(),
        rb'{"\ud83d\ude00": 1, "\ud83d\ude01": 2}',
        rb'{"a": 1, "A": 2, "a ": 3, " a": 4, "": 5}',
        rb'{"a": {"a": {"a": 1}}, "b": [{"a": 1}, {"a": 1}]}',
        rb'{"k": "{\"k\": 1, \"k\": 2}"}',
        b'{ "a" \n:\t1 , "b"\r\n : 2 }',
        b'"just a string: \\"x\\": 1"',
        b'[]', b'{}', b'12', b'null',
    ])
    def test_adversarial_strings(self, body):
        assert repeated_at(body) is None
        assert decode_json(body) == json.loads(body)


    @pytest.mark.parametrize("backslashes", range(21))
    def test_runs_of_backslashes_before_quotes(self, backslashes):
        text = "\\" * backslashes + '"'  # odd runs, as a value, a key, and both at once
        ending = "x" + "\\" * backslashes  # even runs before a closing quote
        body = json.dumps({"v": text, text: text, "w": [text, "x" + text, ending],
                           ending: ending}).encode()
        assert repeated_at(body) is None
        assert repeated_at(body[:-1] + b", " + json.dumps(text).encode() + b": 1}") == (
            text.replace("~", "~0").replace("/", "~1"))


class TestEveryRepeatedKeyIsFoundAndNamed:
    @pytest.mark.parametrize(("body", "where"), [
        (rb'{"a": 1, "a": 2}', "a"),
        (rb'{"a": 1, "\u0061": 2}', "a"),
        (rb'{"\u00e9": 1, "\u00E9": 2}', "é"),
        ('{"é": 1, "\\u00e9": 2}'.encode(), "é"),
        (rb'{"\ud83d\ude00": 1, "\uD83D\uDE00": 2}', "\U0001f600"),
        (rb'{"\"": 1, "\u0022": 2}', '"'),
        (rb'{"\\": 1, "\u005c": 2}', "\\"),
        (rb'{"\/": 1, "/": 2}', "~1"),
        (rb'{"x": "\":", "x": "\":"}', "x"),
        (rb'{"p": {"lines": [{"sku": 1}, {"sku": 1, "sku": 2}]}}', "p/lines/1/sku"),
        (rb'{"a": [[[{"b": {"c": 1, "c": 1}}]]]}', "a/0/0/0/b/c"),
        (rb'[{"a": 1}, {"b": 1, "b": 2}]', "1/b"),
        (rb'{"": 1, "": 2}', "/"),
        (rb'{"a": 1, "b": 2, "a": 3, "b": 4}', "a"),
        (rb'{"n": 100000000000000000001, "n": 1}', "n"),  # also read again exactly
        (b'{"' + b"k" * 100 + b'": 1, "' + b"k" * 100 + b'": 2}', "k" * 40 + "…"),
    ])
    def test_named_by_its_path(self, body, where):
        assert repeated_at(body) == where

    def test_every_repeated_key_is_listed(self):
        with pytest.raises(BodyError) as caught:
            decode_json(b'{"a": 1, "a": 2, "b": {"c": 1, "c": 2}}')
        assert [error.field for error in caught.value.errors] == ["a", "b/c"]

    def test_a_repeat_nested_too_deep_for_the_exact_reader_is_still_refused(self):
        body = b'{"x": ' * 1020 + b'{"a": 1, "a": 2}' + b"}" * 1020  # orjson reads 1,024
        with pytest.raises(BodyError) as caught:
            decode_json(body)
        [error] = caught.value.errors
        assert (error.field, error.type) == ("body", "duplicate_key")


# Documents as trees of members, written as JSON text with every choice a writer may make:
# keys escaped or not (so that keys equal only after unescaping occur), and repeats allowed.
ALPHABET = st.sampled_from(['a', 'b', '"', "\\", ":", "/", "~", "é", "\U0001f600", " ", "\n",
                            "{", "}", "[", "]", ","])
keys = st.text(ALPHABET, max_size=3)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                    st.text(ALPHABET, max_size=6))


def trees() -> Any:
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=3).map(lambda items: ("list", items)),
            st.lists(st.tuples(keys, children), max_size=4).map(lambda pairs: ("obj", pairs)),
        ),
        max_leaves=12,
    )


def write_string(text: str, escapes: list[bool]) -> str:
    out = []
    for index, char in enumerate(text):
        if escapes[index % len(escapes)]:
            if ord(char) > 0xFFFF:
                high, low = divmod(ord(char) - 0x10000, 0x400)
                out.append(f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04X}")
            else:
                out.append(f"\\u{ord(char):04x}")
        else:
            out.append(json.dumps(char, ensure_ascii=False)[1:-1])
    return '"' + "".join(out) + '"'


def write(tree: Any, escapes: list[bool]) -> str:
    if isinstance(tree, tuple) and tree[0] == "list":
        return "[" + ", ".join(write(item, escapes) for item in tree[1]) + "]"
    if isinstance(tree, tuple) and tree[0] == "obj":
        return "{" + ",".join(f"{write_string(key, escapes)} :{write(value, escapes)}"
                              for key, value in tree[1]) + "}"
    if isinstance(tree, str):
        return write_string(tree, escapes)
    return json.dumps(tree)


def first_repeat(tree: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every repeated key, as decode_json reports them: an object's own repeats, then what
    is inside the members it keeps (the last of each key)."""
    if not isinstance(tree, tuple):
        return []
    if tree[0] == "list":
        return [found for index, item in enumerate(tree[1])
                for found in first_repeat(item, (*path, str(index)))]
    seen: set[str] = set()
    kept: dict[str, Any] = {}
    repeats: list[tuple[str, ...]] = []
    for key, value in tree[1]:
        if key in seen and (*path, key) not in repeats:
            repeats.append((*path, key))
        seen.add(key)
        kept[key] = value
    for key, value in kept.items():
        repeats += first_repeat(value, (*path, key))
    return repeats


def pointer(path: tuple[str, ...]) -> str:
    return "/".join(part.replace("~", "~0").replace("/", "~1") for part in path) or "/"


@settings(max_examples=400, deadline=None)
@given(tree=trees(), escapes=st.lists(st.booleans(), min_size=1, max_size=5))
def test_repeats_are_found_exactly_as_a_member_by_member_reading_finds_them(tree, escapes):
    body = write(tree, escapes).encode()
    expected = first_repeat(tree)
    if not expected:
        assert repeated_at(body) is None, body
        assert decode_json(body) == json.loads(body)
    else:
        with pytest.raises(BodyError) as caught:
            decode_json(body)
        assert [error.field for error in caught.value.errors] == [
            pointer(path) for path in expected][:len(caught.value.errors)], body
