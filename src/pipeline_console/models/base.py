"""The declarative base, with one naming convention so constraint names match on both databases."""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Integer, MetaData
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# An auto-incrementing 64-bit id: SQLite only auto-increments a column declared INTEGER.
BigId = BigInteger().with_variant(Integer, "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in Python on both databases (SQLite stores naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; pass an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        """process_result_value's result, with a shortcut for the common case. The
        TypeDecorator's chain (the impl's parse, then this class's conversion) costs about
        1 µs a timestamp on SQLite, most of it in replace(tzinfo=…): an inspection of a long
        history reads 2,600 of them. SQLite holds naive UTC text, which fromisoformat reads
        with "+00:00" appended as the aware datetime in one call; PostgreSQL's driver already
        answers in UTC. Anything else takes the chain."""
        chain = super().result_processor(dialect, coltype)
        if chain is None:  # pragma: no cover - the class defines process_result_value
            return None
        if dialect.name == "sqlite":
            parse = datetime.fromisoformat

            def process_text(value: Any) -> datetime | None:
                if value is None:
                    return None
                try:
                    parsed = parse(value + "+00:00")
                except (TypeError, ValueError):  # not naive text (a number, an offset)
                    return chain(value)
                # (a date alone with "+00:00" would read as a naive datetime)
                return parsed if parsed.tzinfo is UTC else chain(value)

            return process_text

        def process(value: Any) -> datetime | None:
            if value is None or (isinstance(value, datetime) and value.tzinfo is UTC):
                return value
            return chain(value)

        return process


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
