"""Migrations are the only way the schema is made, and they agree with the ORM models."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select

from pipeline_console.models import Base, ProductionRecord
from pipeline_console.schema import alembic_config, current_revision, head_revision
from tests.support import ingest, message


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


async def test_the_newest_migration_goes_down_and_up_with_data_in_the_tables(database):
    """Stepping back one migration must work on a database in use (on SQLite a rebuilt
    table that others refer to would fail its foreign keys)."""
    await ingest(database, message(1))
    previous = ScriptDirectory.from_config(alembic_config(None)).get_revision(
        head_revision()).down_revision
    async with database.engine.begin() as connection:
        await connection.run_sync(lambda sync: command.downgrade(alembic_config(sync),
                                                                 previous))
    async with database.engine.begin() as connection:
        await connection.run_sync(lambda sync: command.upgrade(alembic_config(sync), "head"))
    assert await schema_diff(database) == []
    async with database.read() as session:
        assert await session.scalar(select(func.count()).select_from(ProductionRecord)) == 1
