"""Times every HTTP request into pipeline_http_request_duration_seconds, labelled with the
route's template (`/api/v1/inspect/{key:path}`), never the raw path: keys, ids and probes for
paths that do not exist must not each become a time series."""

from __future__ import annotations

import time
from typing import Any

from fastapi.routing import iter_route_contexts

from pipeline_console.metrics import HTTP_ERRORS, HTTP_REQUEST_DURATION

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"


class MeasureRequests:
    def __init__(self, app: Any) -> None:
        self.app = app
        self._templates: dict[int, str] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless the application starts a response
        started = time.perf_counter()

        async def send_and_note_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            method = scope["method"] if scope["method"] in METHODS else "other"
            route = self._route(scope)
            HTTP_REQUEST_DURATION.labels(method, route, str(status)).observe(
                time.perf_counter() - started)
            if status >= 400:
                HTTP_ERRORS.labels(route, f"{status // 100}xx").inc()

    def _route(self, scope: dict[str, Any]) -> str:
        """The template of the route the router matched (it leaves the route in this same
        scope on its way down), with the prefixes of the routers it was included through."""
        route = scope.get("route")
        if route is None:
            return UNMATCHED
        if self._templates is None:
            # FastAPI keeps a route's own path unprefixed; its route contexts know the whole
            # template. The routes are fixed once the application serves.
            self._templates = {id(context.original_route): context.path
                               for context in iter_route_contexts(scope["app"].routes)
                               if context.path}
        return self._templates.get(id(route)) or getattr(route, "path", None) or UNMATCHED
