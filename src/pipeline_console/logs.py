"""Structured logs: one JSON object per line (or readable text), from our loggers, uvicorn's
and SQLAlchemy's alike, with the request id and, where there is one, the idempotency key and
correlation id of the message being handled (bound with structlog's contextvars)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import structlog
from asgi_correlation_id import correlation_id

SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(log_format: str = "json", level: int = logging.INFO) -> None:
    renderer: Any = (structlog.processors.JSONRenderer() if log_format == "json"
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[*SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=SHARED,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer])
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our access line has more in it
    # their INFO lines (httpx) may carry whole URLs, credentials too
    for name in ("aiohttp.client", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


access_log = structlog.get_logger("pipeline_console.access")


class AccessLog:
    """One line per request: method, path, status, duration, and the request id (from
    asgi-correlation-id, which also answers it in X-Request-ID)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=correlation_id.get())
        started, status = time.perf_counter(), 500

        async def send_and_see(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            access_log.info("request", method=scope["method"], path=scope["path"],
                            status=status,
                            duration_ms=round((time.perf_counter() - started) * 1000, 2))
            structlog.contextvars.clear_contextvars()
