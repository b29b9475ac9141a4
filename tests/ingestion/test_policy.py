"""The five-branch decision and canonical hashing, without a database."""

import json

import pytest
import rfc8785
from hypothesis import given
from hypothesis import strategies as st

from pipeline_console.ingestion.intake import depth, overlong_string, scan_payload
from pipeline_console.ingestion.policy import (
    CurrentState,
    Decision,
    UnhashablePayload,
    canonical_json,
    decide,
    orjson_is_canonical,
    payload_hash,
)

CURRENT = CurrentState(version=3, payload_hash="h-current", source_system="erp")


class TestTheDecisionTable:
    @pytest.mark.parametrize(
        ("current", "version", "hash_", "expected", "reason_says"),
        [
            (None, 3, "h-any", Decision.ACCEPT_NEW, "first message for this key"),
            (None, 0, "h-any", Decision.ACCEPT_NEW, "first message"),
            (CURRENT, 4, "h-other", Decision.ACCEPT_SUPERSEDE, "newer than current version 3"),
            (CURRENT, 4, "h-current", Decision.ACCEPT_SUPERSEDE, "newer"),
            (CURRENT, 3, "h-current", Decision.SKIP_DUPLICATE, "same payload"),
            (CURRENT, 3, "h-other", Decision.QUARANTINE, "different payload"),
            (CURRENT, 2, "h-current", Decision.SKIP_STALE, "older than current version 3"),
            (CURRENT, 2, "h-other", Decision.SKIP_STALE, "older"),
        ],
        ids=["new", "new-at-zero", "supersede", "supersede-same-hash", "duplicate",
             "quarantine", "stale", "stale-other-payload"],
    )
    def test_each_branch(self, current, version, hash_, expected, reason_says):
        verdict = decide(current, version, hash_, "crm")
        assert verdict.decision is expected
        assert reason_says in verdict.reason
        assert "crm" in verdict.reason

    def test_only_the_two_accept_branches_are_accepted(self):
        assert {d for d in Decision if d.accepted} == {
            Decision.ACCEPT_NEW, Decision.ACCEPT_SUPERSEDE
        }


class TestCanonicalHashing:
    def test_key_order_and_whitespace_never_change_the_hash(self):
        compact = json.loads(
            '{"name":"Acme","address":{"city":"Berlin","zip":"10115"},"tags":[1,2]}'
        )
        spaced = json.loads(
            '{ "tags" : [ 1 , 2 ],\n  "address": {"zip": "10115",   "city": "Berlin"},'
            '\t"name": "Acme" }'
        )
        assert payload_hash(compact) == payload_hash(spaced)

    def test_different_values_give_different_hashes(self):
        assert payload_hash({"name": "Acme"}) != payload_hash({"name": "ACME"})

    def test_list_order_is_significant(self):
        assert payload_hash({"tags": [1, 2]}) != payload_hash({"tags": [2, 1]})

    def test_one_and_one_point_zero_are_the_same_number(self):
        assert payload_hash({"total": 1}) == payload_hash({"total": 1.0})

    def test_an_integer_beyond_json_precision_is_refused(self):
        with pytest.raises(UnhashablePayload):
            payload_hash({"id": 2**60})

    @given(st.dictionaries(st.text(max_size=8),
                           st.one_of(st.integers(-1000, 1000), st.text(max_size=8),
                                     st.booleans(), st.none()),
                           max_size=8))
    def test_any_reordering_of_keys_keeps_the_hash(self, payload):
        reordered = dict(reversed(list(payload.items())))
        assert payload_hash(payload) == payload_hash(reordered)


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**60), 2**60),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6),
              st.sampled_from(["\ue000", "\U0001f600", "\ud800", "\x00\x1f\x7f", "\u2028"])),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=4), st.sampled_from(
            ["\ue000", "\U0001f600", "a\U00010000", "\ufb01", "b"])), children, max_size=4)),
    max_leaves=12,
)


class TestTheFastCanonicalFormIsRfc8785:
    """canonical_json writes most values with orjson: it must be byte-for-byte what the
    rfc8785 library writes (old hashes and audit chains stay valid), and refuse what it
    refuses."""

    @staticmethod
    def _reference(value):
        try:
            return rfc8785.dumps(value)
        except (rfc8785.CanonicalizationError, TypeError, ValueError):
            return UnhashablePayload

    @staticmethod
    def _ours(value):
        try:
            return canonical_json(value)
        except UnhashablePayload:
            return UnhashablePayload

    @given(JSON_VALUES)
    def test_same_bytes_as_the_reference_library(self, value):
        assert self._ours(value) == self._reference(value)

    @pytest.mark.parametrize("value", [
        {"\ue000": 1, "\U0001f600": 2},  # UTF-16 order differs from code point order
        {"total": 1.0}, {"x": 1e21}, {"x": -0.0}, {"big": 2**53}, {"s": "\ud800"},
        {"ctl": "\x00\x1f\x7f\"\\/\b\f\n\r\t"}, [True, None, -(2**53 - 1)],
    ])
    def test_the_awkward_cases(self, value):
        assert self._ours(value) == self._reference(value)


class TestOneWalkOfThePayload:
    """parse_message walks a payload once (scan_payload) instead of three times: its answers
    must be those of the three walks it replaces."""

    @given(JSON_VALUES, st.integers(1, 4), st.integers(0, 5))
    def test_the_same_answers_as_the_three_walks(self, value, max_depth, max_length):
        payload = {"p": value}
        clean, plain = scan_payload(payload, max_depth, max_length)
        expected_clean = (depth(payload, max_depth) <= max_depth
                          and overlong_string(payload, max_length) is None)
        assert clean == expected_clean
        if clean:
            assert plain == orjson_is_canonical(payload)
