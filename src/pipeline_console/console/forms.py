"""Reading the console's form posts: the same limits as the API's bodies, errors that name
the field."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from pipeline_console.api.filters import Statuses, parse_statuses
from pipeline_console.errors import FieldError, InvalidInput, TooLarge

MAX_TEXT = 2000


MAX_FORM_BYTES = 256 * 1024


async def form_of(request: Request) -> Any:
    """The posted form, refused before parsing when it is larger than any console form."""
    length = request.headers.get("content-length", "")
    if not (length.isascii() and length.isdigit()) or int(length) > MAX_FORM_BYTES:
        raise TooLarge(f"a console form is at most {MAX_FORM_BYTES} bytes with a "
                       "Content-Length")
    return await request.form(max_files=0, max_fields=1000)


def required_text(form: Any, field: str, label: str) -> str:
    value = str(form.get(field) or "").strip()
    if not value:
        raise InvalidInput(f"{label} is required", [FieldError(field, "required", "form")])
    if len(value) > MAX_TEXT or "\x00" in value:
        raise InvalidInput(f"{label} is too long or not text",
                           [FieldError(field, f"at most {MAX_TEXT} characters", "form")])
    return value


def choice(form: Any, field: str, allowed: tuple[str, ...]) -> str:
    value = str(form.get(field) or "")
    if value not in allowed:
        raise InvalidInput(f"choose one of: {', '.join(allowed)}",
                           [FieldError(field, f"one of {', '.join(allowed)}", "form")])
    return value


def listed(value: str, words: tuple[str, ...], *,
           name: str = "status") -> tuple[str, Statuses | None]:
    """A list page's status filter: `all` (no filter), or one or more of `words` separated by
    commas, exactly as the API's list takes them. Returns the filter as the page shows it and
    the statuses to match (None for all)."""
    if value == "all":
        return value, None
    statuses = parse_statuses(value, words, name=name)
    assert statuses is not None
    return ",".join(statuses), statuses


def ids(form: Any, field: str) -> list[int]:
    values = []
    for raw in form.getlist(field):
        if not (str(raw).isascii() and str(raw).isdigit()) or not 1 <= int(raw) <= 2**63 - 1:
            raise InvalidInput("not an id", [FieldError(field, f"{raw!r} is not an id", "form")])
        values.append(int(raw))
    return values
