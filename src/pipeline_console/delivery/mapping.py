"""A system's body_template: a jq program (the `jq` package, libjq itself) that turns the
default delivery body into the body sent. Compiled once per program text and process; a
program that does not compile is refused when the system is saved; one that fails on a
record at send time is a permanent failure, with jq's message, in the dead letter."""

from __future__ import annotations

import functools
from typing import Any

import jq
import orjson


class MappingError(Exception):
    """The template failed on this record (jq's message), or gave no single JSON value."""


@functools.lru_cache(maxsize=256)
def compiled(template: str) -> Any:
    """The compiled program (ValueError with jq's message if it does not compile)."""
    return jq.compile(template)


def check_template(template: str) -> str | None:
    """Why the template cannot be used, or None."""
    try:
        compiled(template)
    except ValueError as error:
        return str(error)
    return None


def apply_template(template: str, body: Any) -> Any:
    """The one JSON value the template makes of `body`."""
    # The input as text made by orjson: a sixth faster than input_value's json.dumps.
    return apply_template_to_text(template, orjson.dumps(body).decode())


def apply_template_to_text(template: str, text: str) -> Any:
    """The one JSON value the template makes of the JSON `text`."""
    try:
        outputs = compiled(template).input_text(text).all()
    except ValueError as error:
        raise MappingError(f"body_template failed: {error}") from None
    if len(outputs) != 1:
        raise MappingError(f"body_template gave {len(outputs)} values; it must give exactly "
                           "one (wrap a stream in [ … ])")
    return outputs[0]
