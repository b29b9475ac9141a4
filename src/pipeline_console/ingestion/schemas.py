"""The wire shapes of ingestion (API.md, "Ingestion")."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
)
from pydantic_core import PydanticCustomError

MAX_VERSION = 2**63 - 1  # a PostgreSQL BIGINT

Name = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"),
    Field(description="letters, digits, '_', '.', '-'; at most 64 characters", examples=["erp"]),
]
# No control characters: they are unreadable in a console and PostgreSQL refuses NUL in text.
Identifier = Annotated[
    str,
    StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$"),
]



def _integral(value: Any) -> Any:
    """JSON Schema's integer admits 5.0; so does the API (never 5.5, "5" or true)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**63:
        return int(value)
    return value


Version = Annotated[StrictInt, BeforeValidator(_integral)]


def _in_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError as error:
        raise ValueError("is outside the range of representable UTC times") from error


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_in_utc)]

# RFC 3339's date-time: "T" between date and time (or "t"), seconds, and a zone, "Z" (or
# "z") or an offset with a colon. Pydantic alone would also take a Unix time (12345, or
# "12345"), no seconds, a space, or "+0100"; a message's time is none of those.
RFC3339_PATTERN = (r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
                   r"([Zz]|[+-][0-9]{2}:[0-9]{2})$")
_RFC3339 = re.compile(RFC3339_PATTERN.removesuffix("$"))


def _rfc3339(value: Any) -> Any:
    if isinstance(value, datetime) or (type(value) is str and _RFC3339.fullmatch(value)):
        return value  # (a datetime comes only from callers in this process, never from JSON)
    raise PydanticCustomError(
        "rfc3339_datetime", "must be an RFC 3339 date-time string with a time zone, such as "
        "2026-11-24T10:03:00Z or 2026-11-24T11:03:00+01:00")


MessageTime = Annotated[
    UtcDatetime, BeforeValidator(_rfc3339),
    Field(description="RFC 3339 date-time with a zone (Z or ±hh:mm); not a Unix time",
          json_schema_extra={"pattern": RFC3339_PATTERN}, examples=["2026-11-24T10:03:00Z"]),
]

Decision = Literal["accept_new", "accept_supersede", "skip_duplicate", "quarantine", "skip_stale"]
StagingStatus = Literal["partial", "complete", "promoted"]


class MessageIn(BaseModel):
    """One message from a source system about one entity at one version."""

    model_config = ConfigDict(extra="forbid")

    source_system: Name
    entity_type: Name
    entity_id: Identifier = Field(examples=["C-100"])
    version: Version = Field(ge=0, le=MAX_VERSION, description="increases with every change")
    payload: dict[str, Any] = Field(description="the entity's full state, a JSON object")
    correlation_id: Identifier | None = Field(default=None, description="the business event")
    message_id: Identifier | None = Field(default=None, description="the source's message id")
    occurred_at: MessageTime | None = None


class BatchIn(BaseModel):
    messages: list[MessageIn]


class IngestResult(BaseModel):
    decision: Decision
    idempotency_key: str
    version: int
    attempt_id: int
    staging_status: StagingStatus | None = Field(
        description="the staged row's status when this message was decided; null if not staged"
    )
    anomaly_id: int | None
    reason: str = Field(description="the decision in words")


class BatchItemResult(IngestResult):
    index: int


class FieldErrorOut(BaseModel):
    field: str
    location: str
    message: str
    type: str


class ItemProblem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldErrorOut] = []
    attempt_id: int


class BatchItemError(BaseModel):
    index: int
    error: ItemProblem


class BatchOut(BaseModel):
    results: list[BatchItemResult | BatchItemError]
