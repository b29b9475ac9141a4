"""The application benchmark 3 serves: the product app (create_app, unchanged, auth as in
production) plus two bare endpoints that are its floors, in the same process, behind the same
middleware. They exist only here, never in the product app.

- POST /bench/validate: reads the body and parses it exactly as POST /api/v1/messages does
  (orjson, the MessageIn model, the canonical payload hash), and answers. The HTTP ceiling.
- POST /bench/insert: the same, then inserts one row in its own write transaction (the
  product's Database.transaction: on SQLite BEGIN IMMEDIATE behind the process's writer lock).

Run with `python -m bench.app --port P` (uvicorn with factory=True, logging and the garbage
collector set up as `pipeline-console serve` sets them), PIPELINE_CONSOLE_DATABASE_URL naming
a migrated database.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import JSON, BigInteger, Column, Integer, MetaData, String, Table, insert

from pipeline_console.app import create_app
from pipeline_console.config import Settings
from pipeline_console.db import Database
from pipeline_console.ingestion.api import read_bounded
from pipeline_console.ingestion.intake import BodyError, RejectedMessage, decode_json, parse_message
from pipeline_console.logs import configure_logging
from pipeline_console.process import settle_long_lived_objects

metadata = MetaData()
bench_rows = Table(
    "bench_rows", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("idempotency_key", String(300), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("payload_hash", String(64), nullable=False),
    Column("payload", JSON, nullable=False),
)


async def _parse(request: Request, settings: Settings) -> Any:
    body, too_large = await read_bounded(request, settings.max_message_bytes)
    if too_large:
        return None
    try:
        candidate = decode_json(body)
    except BodyError:
        return None
    item = parse_message(candidate, "", max_depth=settings.max_payload_depth,
                         max_string_length=settings.max_payload_string_length)
    return None if isinstance(item, RejectedMessage) else item


def create_bench_app() -> FastAPI:
    settings = Settings()
    configure_logging(settings.log_format)
    app = create_app(settings)
    settle_long_lived_objects()  # as `serve` does
    product_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: FastAPI) -> AsyncIterator[None]:
        async with product_lifespan(app_):
            async with app_.state.database.engine.begin() as connection:
                await connection.run_sync(metadata.create_all)
            yield

    app.router.lifespan_context = lifespan

    @app.post("/bench/validate", include_in_schema=False)
    async def validate(request: Request) -> Any:
        item = await _parse(request, settings)
        if item is None:
            return JSONResponse({"error": "invalid"}, status_code=422)
        return {"idempotency_key": item.key, "version": item.version}

    @app.post("/bench/insert", include_in_schema=False)
    async def insert_one(request: Request) -> Any:
        item = await _parse(request, settings)
        if item is None:
            return JSONResponse({"error": "invalid"}, status_code=422)
        database: Database = request.app.state.database
        async with database.transaction() as session:
            await session.execute(insert(bench_rows).values(
                idempotency_key=item.key, version=item.version, payload_hash=item.payload_hash,
                payload=item.payload))
        return {"idempotency_key": item.key, "version": item.version}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    arguments = parser.parse_args()
    uvicorn.run("bench.app:create_bench_app", factory=True, host=arguments.host,
                port=arguments.port, log_config=None, timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
