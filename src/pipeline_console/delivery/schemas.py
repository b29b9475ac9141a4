"""Wire shapes of downstream systems, deliveries, attempts, dead letters, ambiguous outcomes
and circuits (API.md, "Downstream systems and delivery")."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    field_validator,
    model_validator,
)

from pipeline_console.errors import FieldValueError
from pipeline_console.ingestion.schemas import Name
from pipeline_console.pagination import MAX_ID
from pipeline_console.redaction import redact

# What a URL template may hold: a record's values, percent-encoded when a delivery is sent.
URL_PLACEHOLDERS = ("{entity_type}", "{entity_id}", "{key}", "{version}")
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL")
    if "@" in parts.netloc:
        # every viewer reads a system's URL: a password has no place in it
        raise ValueError("must not hold credentials (user:password@); use auth instead")
    if "{" in parts.netloc or "}" in parts.netloc:
        # placeholders go in the path or query: a host made of a record's values would be a
        # host no one checked
        raise ValueError("{entity_type}, {entity_id}, {key} and {version} may appear only "
                         "in the path or the query")
    unknown = [found for found in _PLACEHOLDER.findall(value) if found not in URL_PLACEHOLDERS]
    if unknown or value.count("{") != value.count("}"):
        raise ValueError(f"may hold only the placeholders {', '.join(URL_PLACEHOLDERS)}"
                         + (f" (not {unknown[0]})" if unknown else ""))
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

    @field_validator("outcomes")
    @classmethod
    def weights_are_positive(cls, outcomes: dict[str, float]) -> dict[str, float]:
        if any(weight < 0 for weight in outcomes.values()) or not any(outcomes.values()):
            raise ValueError("outcomes need non-negative weights, at least one above zero")
        return outcomes


# --- connecting to real systems: auth, signing, TLS (secrets are write-only) ---

# A secret as given: any printable text (a header value must also be sendable: checked on
# the header auth). Read back only as {"secret_set": true, "fingerprint": "…"}.
Secret = Annotated[SecretStr, Field(min_length=1, max_length=8192)]
HeaderName = Annotated[str, StringConstraints(min_length=1, max_length=256,
                                              pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")]
HeaderValue = Annotated[str, StringConstraints(max_length=8192, pattern=r"^[\t\x20-\x7e]*$")]
# What a header can carry of a credential: a bearer token is visible ASCII (RFC 9110
# token68 and more, as real systems issue them; a space would split "Bearer <token>"), a
# header auth's value printable ASCII and tabs (transports.py checks stored ones again).
BEARER_TOKEN = re.compile(r"[\x21-\x7e]+")
HEADER_VALUE = re.compile(r"[\t\x20-\x7e]+")
# Headers the pipeline sets itself, or that would carry a credential in the clear (a
# system's headers are shown to every viewer: a credential goes in auth).
RESERVED_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "content-type",
    "idempotency-key", "webhook-id", "webhook-timestamp", "webhook-signature",
    "authorization", "proxy-authorization", "cookie"})


class AuthNone(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["none"]


class AuthBearer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["bearer"]
    token: Secret | None = Field(default=None, description="write-only; leave out on a PATCH "
                                 "to keep the stored one; visible ASCII (a header value)")

    @field_validator("token")
    @classmethod
    def sendable(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and not BEARER_TOKEN.fullmatch(token.get_secret_value()):
            raise ValueError("must be visible ASCII, without spaces, control characters or "
                             "line breaks (it is sent in the Authorization header)")
        return token


class AuthBasic(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["basic"]
    username: Annotated[str, StringConstraints(min_length=1, max_length=256,
                                               pattern=r"^[^:\x00-\x1f\x7f]+$")]
    password: Secret | None = Field(default=None, description="write-only")


class AuthHeader(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["header"]
    name: HeaderName
    value: Secret | None = Field(default=None, description="write-only")

    @field_validator("name")
    @classmethod
    def not_the_pipelines(cls, name: str) -> str:
        if name.lower() in RESERVED_HEADERS - {"authorization", "proxy-authorization",
                                               "cookie"}:
            raise ValueError(f"{name} is a header the pipeline sets itself")
        return name

    @field_validator("value")
    @classmethod
    def sendable(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not HEADER_VALUE.fullmatch(value.get_secret_value()):
            raise ValueError("must be printable ASCII (a header value)")
        return value


class AuthOAuth2(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["oauth2_client_credentials"]
    token_url: Annotated[str, StringConstraints(max_length=2000, pattern=r"^[^\x00-\x20{}]+$"),
                         AfterValidator(lambda value: _http_url(value))]
    client_id: Annotated[str, StringConstraints(min_length=1, max_length=512,
                                                pattern=r"^[\x20-\x7e]+$")]
    client_secret: Secret | None = Field(default=None, description="write-only")
    scope: Annotated[str, StringConstraints(max_length=2000,
                                            pattern=r"^[\x20-\x7e]*$")] | None = None


Auth = Annotated[AuthNone | AuthBearer | AuthBasic | AuthHeader | AuthOAuth2,
                 Field(discriminator="type")]
# Which field of each auth type is its secret.
AUTH_SECRET_FIELD = {"bearer": "token", "basic": "password", "header": "value",
                     "oauth2_client_credentials": "client_secret"}

SIGNING_SECRET = re.compile(r"^whsec_[A-Za-z0-9+/]{22,}={0,2}$")


class Signing(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scheme: Literal["standard-webhooks"]
    secret: Secret | None = Field(
        default=None, description="whsec_ and the base64 of 16 to 64 random bytes; write-only. "
        "Leave out to keep the stored one; POST /systems/{name}/signing/rotate makes one")

    @field_validator("secret")
    @classmethod
    def well_formed(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None:
            value = secret.get_secret_value()
            if not SIGNING_SECRET.match(value):
                raise ValueError("must be whsec_ followed by base64 (as `signing/rotate` "
                                 "makes it)")
            raw = len(value[6:].rstrip("=")) * 3 // 4
            if not 16 <= raw <= 64:
                raise ValueError("must hold 16 to 64 bytes")
        return secret


Pem = Annotated[str, StringConstraints(min_length=1, max_length=200_000)]


class Tls(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ca_bundle: Pem | None = Field(
        default=None, description="PEM certificates to trust instead of the system's store")
    client_cert: Pem | None = Field(default=None, description="PEM; with client_key")
    client_key: Annotated[SecretStr, Field(min_length=1, max_length=200_000)] | None = Field(
        default=None, description="PEM private key, unencrypted; write-only")


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
    method: Literal["POST", "PUT", "PATCH"] | None = Field(
        default=None, description="how a delivery is sent (default POST)")
    auth: Auth | None = Field(default=None, description="how each request authenticates")
    headers: dict[HeaderName, HeaderValue] | None = Field(
        default=None, max_length=50, description="extra static headers (not secret: shown "
        "to every viewer)")
    signing: Signing | None = Field(default=None, description="Standard Webhooks signatures")
    tls: Tls | None = None
    body_template: Annotated[str, StringConstraints(min_length=1, max_length=20_000)] | None = \
        Field(default=None, description="a jq program: the default body in, the body sent out")
    max_in_flight: int | None = Field(default=None, ge=1, le=10_000,
                                      description="sends at once, across every worker")
    max_per_second: float | None = Field(default=None, gt=0, le=100_000,
                                         description="sends per second, across every worker")

    @field_validator("headers")
    @classmethod
    def headers_are_not_reserved(cls, headers: dict[str, str] | None) -> dict[str, str] | None:
        for name in headers or {}:
            if name.lower() in RESERVED_HEADERS:
                raise FieldValueError(name, f"{name} cannot be set here (the pipeline sets "
                                      "it, or it is a credential: use auth)")
        return headers


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


NULLABLE = frozenset({"url", "status_url", "simulation", "auth", "headers", "signing", "tls",
                      "body_template", "max_in_flight", "max_per_second"})


class SystemPatch(SystemFields):
    @model_validator(mode="after")
    def only_nullable_fields_may_be_null(self) -> SystemPatch:
        for name in self.model_fields_set - NULLABLE:
            if getattr(self, name) is None:
                raise FieldValueError(name, f"{name} cannot be null; leave it out to keep "
                                      "its value")
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
    method: str
    auth: dict[str, Any] = Field(description="the secret field reads "
                                 '{"secret_set": true, "fingerprint": "…"}')
    headers: dict[str, str]
    signing: dict[str, Any] | None = Field(
        description='{"scheme", "secret": {"secret_set", "fingerprint"}, "previous": '
        '{"secret_set", "fingerprint", "expires_at"} | null}')
    tls: dict[str, Any] | None = Field(
        description='{"ca_bundle", "client_cert", "client_key": {"secret_set", '
        '"fingerprint"} | null}')
    body_template: str | None
    max_in_flight: int | None
    max_per_second: float | None
    throttled_until: datetime | None = Field(
        description="a 429 or 503 with Retry-After: nothing is sent to it before then")
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

    @field_validator("request")
    @classmethod
    def without_credentials(cls, request: dict[str, Any]) -> dict[str, Any]:
        # an attempt from before systems had an auth may hold its URL's user:password@
        return redact(request)


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


class SigningRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overlap_s: int = Field(default=86_400, ge=0, le=30 * 86_400, description=(
        "how long the previous secret keeps signing beside the new one (0: not at all)"))


class SigningSecretRead(BaseModel):
    secret: str = Field(description="the new whsec_ secret, shown this once")


class PreviewCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: Annotated[str, StringConstraints(min_length=1, max_length=321)] = Field(
        description="a record's idempotency key, e.g. customer:C-100")


class PreviewRead(BaseModel):
    method: str
    url: str | None
    headers: dict[str, str] = Field(description="secret values as ***")
    body: Any


class AmbiguousResolve(BaseModel):
    model_config = ConfigDict(extra="forbid")

    resolution: Literal["delivered", "not_delivered"]
    note: Reason


MAX_BULK_IDS = 500


class AmbiguousIds(BaseModel):
    """Several ambiguous outcomes at once (each acted on as the one-id route would)."""

    model_config = ConfigDict(extra="forbid")

    ids: list[Annotated[int, Field(ge=1, le=MAX_ID)]] = Field(min_length=1,
                                                             max_length=MAX_BULK_IDS)

    @field_validator("ids")
    @classmethod
    def _unique(cls, ids: list[int]) -> list[int]:
        if len(set(ids)) != len(ids):
            raise ValueError("each id may be given once")
        return ids


class AmbiguousBulkResolve(AmbiguousIds):
    resolution: Literal["delivered", "not_delivered"]
    note: Reason


class AmbiguousBulkItem(BaseModel):
    """One id's outcome: `done` (queried, or resolved), or `refused` with the reason (no such
    outcome, already resolved, a system without a status query). `item`: the outcome as it
    is now (null when there is none)."""

    id: int
    outcome: Literal["done", "refused"]
    error: str | None
    query_status: int | None = None
    item: AmbiguousRead | None


class AmbiguousBulkResult(BaseModel):
    items: list[AmbiguousBulkItem]
    done: int
    refused: int


def page_model(name: str, item: type[BaseModel]) -> type[BaseModel]:
    from pydantic import create_model

    return create_model(name, items=(list[item], ...), next_cursor=(str | None, ...))


SystemPage = page_model("SystemPage", SystemRead)
DeliveryPage = page_model("DeliveryPage", DeliveryRead)
AttemptPage = page_model("DeliveryAttemptPage", AttemptRead)
DeadLetterPage = page_model("DeadLetterPage", DeadLetterRead)
AmbiguousPage = page_model("AmbiguousPage", AmbiguousRead)
CircuitPage = page_model("CircuitPage", CircuitRead)
