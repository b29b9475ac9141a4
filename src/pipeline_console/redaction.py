"""Credentials in URLs, hidden wherever an old row is shown.

Before systems had an auth, the only way to authenticate was user:password@ in the URL, and
that URL was written into each attempt's request summary and into audit details. Those rows
cannot change (attempts are append-only; the audit chain hashes every detail), so every
reader shows them through here instead: the userinfo of any URL becomes `***@`. The stored
rows, and the audit chain's hashes, stay as they are."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

from sqlalchemy import inspect as orm_inspect

# A scheme, then the userinfo up to its last '@' before the host (a password may hold
# an '@' of its own, as urlsplit reads it). The userinfo never runs
# past a quote or a backslash escape's end, so the same pattern is safe on JSON text: a
# match always stays inside one string literal (a `\"` inside it is consumed as a pair).
_USERINFO = re.compile(r'\b([A-Za-z][A-Za-z0-9+.\-]*://)(?:[^/?#\s"\\]|\\.)*@')


def redact_text(text: str) -> str:
    """`text` with every URL's user:password@ as ***@ (JSON text stays valid JSON)."""
    if "@" not in text or "://" not in text:  # two memchr-speed tests: the common case
        return text
    return _USERINFO.sub(r"\1***@", text)


def redact(value: Any) -> Any:
    """A JSON value with redact_text applied to every string in it, keys included."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact_text(key) if isinstance(key, str) else key: redact(item)
                for key, item in value.items()}
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value


def shown(row: Any, *fields: str) -> SimpleNamespace:
    """An ORM row as a template reads it, with `fields` redacted: a copy, so the session
    never sees a changed attribute it might flush."""
    values = {attribute.key: getattr(row, attribute.key)
              for attribute in orm_inspect(row).mapper.column_attrs}
    for name in fields:
        values[name] = redact(values[name])
    return SimpleNamespace(**values)
