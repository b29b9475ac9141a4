"""Wire shapes of downstream systems, deliveries, attempts, dead letters, ambiguous outcomes
and circuits (API.md, "Downstream systems and delivery")."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from pipeline_console.ingestion.schemas import Name


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL")
    if "{" in parts.netloc or "}" in parts.netloc:
        # {key} and {version} go in the path or query: a host made of a record's values would
        # be a host no one checked
        raise ValueError("{key} and {version} may appear only in the path or the query")
    try:
        parts.port  # noqa: B018 (raises for a port outside 0…65535)
    except ValueError as error:
        raise ValueError(f"has an invalid port: {error}") from error
    if not value.isascii():
        raise ValueError("must be ASCII (percent-encode other characters)")
    return value


HttpUrl = Annotated[str, StringConstraints(max_length=2000, pattern=r"^[^\x00-\x20]+$"),
                    AfterValidator(_http_url)]
Reason = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000,
                                          pattern=r"^[^\x00]*$")]
# What an operator's override may make of an answer.
OverrideWord = Literal["success", "transient", "permanent", "ambiguous"]
# What an attempt can be: worker_lost is the pipeline's own, never an override's.
ClassificationWord = Literal["success", "transient", "permanent", "ambiguous", "worker_lost"]


def _unique(names: list[str] | None) -> list[str] | None:
    """Subscribing twice to one entity type must not deliver its records twice."""
    return None if names is None else list(dict.fromkeys(names))


EntityTypes = Annotated[list[Name], AfterValidator(_unique)]


class ClassificationOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: int = Field(ge=100, le=599)
    classification: OverrideWord


class Simulation(BaseModel):
    """For transport `simulated`: a deterministic stand-in for a real system."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    seed: int = Field(default=0, ge=0, le=2**31)
    outcomes: dict[OverrideWord, float] = Field(
        default_factory=lambda: {"success": 1.0},
        description="relative weights of each outcome")
    latency_ms: float = Field(default=1.0, ge=0, le=60_000)
    status_query: Literal["applied", "not_applied", "unavailable"] | None = Field(
        default=None, description="what a status query answers; null: the system has none")

    @model_validator(mode="after")
    def weights_are_positive(self) -> Simulation:
        if any(weight < 0 for weight in self.outcomes.values()) or not any(
                self.outcomes.values()):
            raise ValueError("outcomes need non-negative weights, at least one above zero")
        return self


class SystemFields(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    url: HttpUrl | None = Field(default=None, description="POST target (transport http)")
    status_url: HttpUrl | None = Field(
        default=None, description="GET template with {key} and {version}: 200 applied, "
        "404 not applied")
    entity_types: EntityTypes | None = Field(default=None, max_length=200,
                                             description="subscriptions")
    timeout_s: float | None = Field(default=None, gt=0, le=300)
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    backoff_base_s: float | None = Field(default=None, ge=0, le=3600,
                                         description="first retry delay; doubles each time")
    backoff_max_s: float | None = Field(default=None, ge=0, le=86_400)
    failure_threshold: int | None = Field(default=None, ge=1, le=10_000,
                                          description="consecutive failures that open the "
                                          "circuit")
    classification_overrides: list[ClassificationOverride] | None = Field(
        default=None, max_length=50)
    simulation: Simulation | None = None


class SystemCreate(SystemFields):
    name: Name
    transport: Literal["http", "simulated"]
    entity_types: EntityTypes = Field(default_factory=list, max_length=200)
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    max_attempts: int = Field(default=5, ge=1, le=100)
    backoff_base_s: float = Field(default=1.0, ge=0, le=3600)
    backoff_max_s: float = Field(default=300.0, ge=0, le=86_400)
    failure_threshold: int = Field(default=5, ge=1, le=10_000)
    classification_overrides: list[ClassificationOverride] = Field(default_factory=list,
                                                                   max_length=50)


NULLABLE = frozenset({"url", "status_url", "simulation"})


class SystemPatch(SystemFields):
    @model_validator(mode="after")
    def only_nullable_fields_may_be_null(self) -> SystemPatch:
        for name in self.model_fields_set - NULLABLE:
            if getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null; leave it out to keep its value")
        return self


class SystemRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    transport: str
    url: str | None
    status_url: str | None
    entity_types: list[str]
    timeout_s: float
    max_attempts: int
    backoff_base_s: float
    backoff_max_s: float
    failure_threshold: int
    classification_overrides: list[dict[str, Any]]
    simulation: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime


class DeliveryRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    system: str
    idempotency_key: str
    entity_type: str
    entity_id: str
    version: int
    correlation_id: str | None
    status: Literal["pending", "in_flight", "delivered", "dead_lettered", "ambiguous", "held",
                    "superseded"]
    attempts: int
    next_attempt_at: datetime
    lease_expires_at: datetime | None
    claimed_by: str | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None


class AttemptRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    delivery_id: int
    system: str
    attempt_number: int
    trigger: Literal["scheduled", "manual", "replay", "resolution"]
    actor: str
    started_at: datetime
    latency_ms: float | None
    request: dict[str, Any]
    response_status: int | None
    response_body: str | None
    classification: ClassificationWord
    rule: str
    error: str | None


class DeadLetterRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    delivery_id: int
    system: str
    idempotency_key: str
    reason: str
    classification: ClassificationWord
    attempt_id: int | None
    status: Literal["open", "closed"]
    created_at: datetime
    closed_at: datetime | None


class AmbiguousRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    delivery_id: int
    system: str
    idempotency_key: str
    reason: str
    attempt_id: int | None
    status: Literal["open", "resolved"]
    queries: int
    last_query_at: datetime | None
    last_query_result: str | None
    created_at: datetime
    resolved_at: datetime | None
    resolution: Literal["delivered", "not_delivered"] | None
    resolution_note: str | None
    resolved_by: str | None


class CircuitRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    system: str
    state: Literal["closed", "open", "half_open"]
    consecutive_failures: int
    trial_delivery_id: int | None
    changed_at: datetime
    reason: str | None


class CircuitAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Reason


class AmbiguousResolve(BaseModel):
    model_config = ConfigDict(extra="forbid")

    resolution: Literal["delivered", "not_delivered"]
    note: Reason


def page_model(name: str, item: type[BaseModel]) -> type[BaseModel]:
    from pydantic import create_model

    return create_model(name, items=(list[item], ...), next_cursor=(str | None, ...))


SystemPage = page_model("SystemPage", SystemRead)
DeliveryPage = page_model("DeliveryPage", DeliveryRead)
AttemptPage = page_model("DeliveryAttemptPage", AttemptRead)
DeadLetterPage = page_model("DeadLetterPage", DeadLetterRead)
AmbiguousPage = page_model("AmbiguousPage", AmbiguousRead)
CircuitPage = page_model("CircuitPage", CircuitRead)
