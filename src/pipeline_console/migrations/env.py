"""Alembic environment. The application passes a live connection in config.attributes;
the `alembic` command line (developers only) gets a fresh engine from the settings."""

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from pipeline_console.config import Settings
from pipeline_console.db import create_engine
from pipeline_console.models import Base

config = context.config
target_metadata = Base.metadata


def run_with_connection(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_with_new_engine() -> None:
    engine = create_engine(Settings(), null_pool=True)
    async with engine.begin() as connection:
        await connection.run_sync(run_with_connection)
    await engine.dispose()


connection = config.attributes.get("connection")
if connection is not None:
    run_with_connection(connection)
else:
    asyncio.run(run_with_new_engine())
