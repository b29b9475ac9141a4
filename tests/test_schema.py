"""Migrations are the only way the schema is made, and they agree with the ORM models."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from pipeline_console.models import Base
from pipeline_console.schema import alembic_config, current_revision, head_revision


async def schema_diff(database):
    async with database.engine.connect() as connection:
        return await connection.run_sync(
            lambda sync: compare_metadata(
                MigrationContext.configure(sync, opts={"compare_type": True}), Base.metadata
            )
        )


async def test_the_migrated_schema_and_the_models_agree(database):
    assert await current_revision(database.engine) == head_revision()
    assert await schema_diff(database) == []


async def test_the_migrations_go_down_and_up_again(database):
    async with database.engine.begin() as connection:
        await connection.run_sync(lambda sync: command.downgrade(alembic_config(sync), "base"))
    async with database.engine.connect() as connection:
        tables = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
    assert set(tables) <= {"alembic_version"}
    async with database.engine.begin() as connection:
        await connection.run_sync(lambda sync: command.upgrade(alembic_config(sync), "head"))
    assert await schema_diff(database) == []
