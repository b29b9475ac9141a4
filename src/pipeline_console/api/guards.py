"""Refuse URLs that contain NUL before any route sees them: PostgreSQL cannot store or compare
text with NUL in it, so such a value would otherwise fail deep inside a query as a 500."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote

from pipeline_console.api.problems import problem
from pipeline_console.errors import FieldError


class RefuseNulInUrls:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            errors = _nul_errors(scope)
            if errors:
                response = problem(422, "NUL characters are not allowed in URLs", errors=errors)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _nul_errors(scope: dict[str, Any]) -> list[FieldError]:
    errors = []
    raw_path = scope.get("raw_path") or scope.get("path", "").encode()
    if "\x00" in scope.get("path", "") or "\x00" in unquote(raw_path.decode("latin-1")):
        errors.append(FieldError(field="path", location="path", message="contains NUL",
                                 type="string_pattern_mismatch"))
    query = scope.get("query_string", b"").decode("latin-1")
    if "%00" in query or "\x00" in query:
        for name, value in parse_qsl(query, keep_blank_values=True):
            if "\x00" in name or "\x00" in value:
                errors.append(FieldError(field=name.replace("\x00", "\ufffd"),
                                         location="query", message="contains NUL",
                                         type="string_pattern_mismatch"))
    return errors
