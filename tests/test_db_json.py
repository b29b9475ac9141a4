"""JSON columns are written and read with orjson, falling back to the standard library where
orjson would refuse or misread: whatever was storable before reads back the same."""

import json

from hypothesis import given
from hypothesis import strategies as st

from pipeline_console.db import json_text, json_value

VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6),
              st.sampled_from(["\ud800", "\x00", "\U0001f600"])),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.text(max_size=3), children, max_size=3)),
    max_leaves=10,
)


@given(VALUES)
def test_what_is_written_reads_back_equal(value):
    assert json_value(json_text(value)) == value


@given(VALUES)
def test_what_the_standard_library_wrote_before_reads_as_it_did(value):
    written = json.dumps(value)
    assert json_value(written) == json.loads(written)


def test_integers_beyond_64_bits_are_not_rounded():
    assert json_value("[123456789012345678901234567890]") == [123456789012345678901234567890]
    assert json_value('{"v": 18446744073709551616}') == {"v": 2**64}
