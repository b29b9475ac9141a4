"""Timestamps read back as aware UTC datetimes on both databases, whatever the shortcut the
SQLite reader takes for the naive UTC text the product stores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Column, MetaData, Table, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.types import TypeDecorator

from pipeline_console.models.base import UTCDateTime

_SQLITE = sqlite.dialect()
_SQLITE_READ = UTCDateTime().dialect_impl(_SQLITE).result_processor(_SQLITE, None)


def _chain(value):
    """What the TypeDecorator's own chain answers: the impl's parse, then the conversion."""
    return TypeDecorator.result_processor(UTCDateTime().dialect_impl(_SQLITE), _SQLITE,
                                          None)(value)


@given(st.datetimes(timezones=st.just(UTC)))
def test_sqlites_stored_text_reads_as_the_chain_reads_it(moment):
    stored = sqlite.DATETIME().bind_processor(_SQLITE)(moment.replace(tzinfo=None))
    read = _SQLITE_READ(stored)
    assert read == moment == _chain(stored)
    assert read.tzinfo is UTC


@pytest.mark.parametrize("text", ["2026-11-24 12:00:00+02:00", "2026-11-24",
                                  "2026-11-24T12:00:00.5"])
def test_other_texts_take_the_chain(text):
    assert _SQLITE_READ(text) == _chain(text)
    assert _SQLITE_READ(None) is None


def test_postgresqls_answers_are_utc():
    dialect = postgresql.asyncpg.dialect()
    read = UTCDateTime().dialect_impl(dialect).result_processor(dialect, None)
    moment = datetime(2026, 11, 24, 12, tzinfo=timezone(timedelta(hours=2)))
    assert read(moment) == moment and read(moment).tzinfo is UTC
    utc = datetime(2026, 11, 24, 10, tzinfo=UTC)
    assert read(utc) is utc and read(None) is None


async def test_a_stored_timestamp_reads_back_equal_and_utc(database):
    table = Table("pc_test_timestamps", MetaData(), Column("at", UTCDateTime))
    moments = [datetime(2026, 11, 24, 12, 0, 0, 123456, tzinfo=UTC),
               datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=-5)))]
    async with database.transaction() as session:
        connection = await session.connection()
        await connection.run_sync(lambda sync: table.create(sync))
        await session.execute(insert(table), [{"at": moment} for moment in moments])
        read = (await session.execute(select(table.c.at))).scalars().all()
    assert read == moments and {moment.tzinfo for moment in read} == {UTC}
