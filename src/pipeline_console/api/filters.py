"""Status filters of the lists: one or more status words, separated by commas.

`?status=pending,held` lists the rows in any of those statuses. The words are checked here,
once for the API and the console: an unknown one is a 422 that names the parameter. The
OpenAPI document gives the parameter's words (in its description) and a pattern that only
lists of them match."""

# No `from __future__ import annotations`: the dependency's annotation refers to its
# closure's Query, which FastAPI must see as an object, not as a string to resolve.
import re
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import Depends, Query

from pipeline_console.errors import FieldError, InvalidInput
from pipeline_console.models.delivery import DELIVERY_STATUSES
from pipeline_console.models.records import STAGING_STATUSES
from pipeline_console.models.replay import REQUEST_STATUSES

Statuses = tuple[str, ...]

# The words of each list's filter, as the tables' check constraints have them.
DELIVERY_STATUS_WORDS = DELIVERY_STATUSES
STAGING_STATUS_WORDS = STAGING_STATUSES
REPLAY_STATUS_WORDS = REQUEST_STATUSES
DEAD_LETTER_STATUS_WORDS = ("open", "closed")
AMBIGUOUS_STATUS_WORDS = ("open", "resolved")
ANOMALY_STATUS_WORDS = ("open", "resolved")
CIRCUIT_STATE_WORDS = ("closed", "open", "half_open")
JOB_RUN_STATUS_WORDS = ("running", "succeeded", "failed")


def words_pattern(words: Sequence[str]) -> str:
    """The regular expression of a comma-separated list of `words` (each may repeat)."""
    word = "|".join(re.escape(w) for w in words)
    return f"^({word})(,({word}))*$"


def parse_statuses(value: str | None, words: Sequence[str], *, name: str = "status",
                   location: str = "query") -> Statuses | None:
    """The distinct words of `value` in their order, or None (no filter) for None."""
    if value is None:
        return None
    given = value.split(",")
    unknown = [word for word in given if word not in words]
    if unknown:
        shown = ", ".join(repr(word) for word in unknown)
        message = (f"unknown {name} {shown}: give one or more of {', '.join(words)}, "
                   "separated by commas")
        raise InvalidInput(f"invalid input: {name}",
                           [FieldError(field=name, message=message, location=location,
                                       type="enum")])
    return tuple(dict.fromkeys(given))


def status_filter(words: Sequence[str], *, name: str = "status", what: str = "status") -> Any:
    """A dependency reading the query parameter `name` as a list of `words`; it gives a
    tuple of the words (None when the parameter is absent)."""
    words = tuple(words)
    description = (f"one or more {what} words separated by commas, any of which matches: "
                   + ", ".join(f"`{word}`" for word in words))
    pattern = words_pattern(words)

    def documented(schema: dict[str, Any]) -> None:
        # the pattern goes on the string branch of the parameter's schema (string or null)
        for branch in schema.get("anyOf", [schema]):
            if branch.get("type") == "string":
                branch["pattern"] = pattern

    async def dependency(
        value: Annotated[str | None, Query(
            alias=name, description=description,
            max_length=sum(len(word) + 1 for word in words) * 2,
            examples=[words[0], ",".join(words[:2])],
            json_schema_extra=documented)] = None,
    ) -> Statuses | None:
        return parse_statuses(value, words, name=name)

    return Depends(dependency)
