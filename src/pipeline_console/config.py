"""One Settings object; every value can be set with a PIPELINE_CONSOLE_ environment variable."""

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PIPELINE_CONSOLE_", extra="ignore")

    database_url: str = Field(
        default="sqlite+aiosqlite:///./pipeline_console.db",
        description="sqlite+aiosqlite:///path.db or postgresql+asyncpg://user@host/db",
    )
    database_pool_size: int = Field(default=10, ge=1)
    database_connect_timeout_s: float = Field(
        default=10.0, gt=0,
        description="PostgreSQL: how long opening a connection may take; past it the request "
                    "gets 503 (asyncpg's own default is 60 s)")
    sqlite_busy_timeout_ms: int = Field(default=30_000, ge=0)
    sqlite_checkpoint: Literal["background", "commit"] = Field(
        default="background",
        description="where a SQLite file's write-ahead log is copied back into the database: "
                    "a thread of each process after its commits, or SQLite's default, inside "
                    "the commit that takes the log past 1,000 pages")

    log_format: Literal["json", "text"] = Field(
        default="json", description="one JSON object per log line, or readable text")

    # Who may do what (docs/security.md).
    auth: Literal["enabled", "disabled"] = Field(
        default="enabled", description="'disabled' lets anyone do anything: local experiments "
        "only (a loud warning is logged)")
    bootstrap_admin_token: SecretStr | None = Field(
        default=None, description="an admin token (pc_…, at least 32 characters) created at "
        "start-up, named bootstrap-admin, for automation")
    @field_validator("bootstrap_admin_token")
    @classmethod
    def _a_real_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            token = value.get_secret_value()
            if not token.startswith("pc_") or len(token) < 32 or not token.isascii():
                raise ValueError("must start with pc_ and be at least 32 ASCII characters "
                                 "(make one with: pipeline-console tokens new)")
        return value

    metrics_auth: Literal["open", "viewer"] = Field(
        default="viewer", description="whether GET /metrics needs a token with the viewer role")
    token_cache_s: float = Field(
        default=5.0, ge=0, le=300,
        description="how long a process remembers a token it has checked (0: look it up on "
        "every request); a revoked token keeps working for at most this long")

    secret_key: SecretStr | None = Field(
        default=None, description="encrypts downstream systems' secrets at rest (make one "
        "with: pipeline-console secrets new-key); a process refuses to start if the database "
        "holds secrets this key cannot read")
    new_secret_key: SecretStr | None = Field(
        default=None, description="secrets rotate-key re-encrypts every secret from "
        "SECRET_KEY to this key")

    refuse_private_system_urls: bool = Field(
        default=False, description="refuse downstream systems whose URL resolves to a private, "
        "loopback or reserved address (off for local use)")

    # Input limits. Oversized input gets 413, malformed input 422; both are recorded as rejected.
    max_message_bytes: int = Field(default=1_048_576, ge=1024, description="body of POST /messages")
    max_batch_bytes: int = Field(default=10_485_760, ge=1024, description="body of /messages/batch")
    max_batch_messages: int = Field(default=1000, ge=1)
    max_payload_depth: int = Field(default=32, ge=1, description="nesting depth of a payload")
    max_payload_string_length: int = Field(
        default=65_536, ge=16, description="characters in any string (or key) of a payload")
    rejected_body_excerpt_bytes: int = Field(default=4096, ge=0)
    group_commit_max_messages: int = Field(
        default=500, ge=1, le=10_000,
        description="POST /messages: concurrent requests share one transaction, at most this "
        "many messages (1: a transaction per message)")

    # The console.
    console_refresh_s: int = Field(default=15, ge=1, le=3600,
                                   description="how often the dashboard refreshes itself")
    console_session_max_age_s: int = Field(
        default=12 * 3600, ge=60, description="a console session ends this long after sign-in")
    console_session_idle_s: int = Field(
        default=3600, ge=60, description="a console session unused this long ends")
    login_code_ttl_s: int = Field(
        default=900, ge=10, le=86_400,
        description="how long a one-time login link (tokens login-link) can be used")
    console_https: bool = Field(
        default=False, description="the console is reached over HTTPS even if this process "
        "sees plain HTTP (a proxy ends TLS): the cookie is then Secure and named __Host-…")
    console_secret_key: SecretStr | None = Field(
        default=None, description="signs the console's one-time notices; default: a random "
        "key per process (set one shared value when several processes serve the console)")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default=["127.0.0.1", "localhost", "::1"],
        description="the host names (comma-separated) this server answers to; another Host "
        "header gets 400 (DNS rebinding). '*' allows any. /healthz and /readyz answer any")

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [host.strip().lower() for host in value.split(",") if host.strip()]
        return value

    # The dashboard.
    stale_partial_after_s: float = Field(
        default=3600.0, gt=0, description="a partial record waiting longer needs attention")

    # The delivery worker.
    worker_batch_size: int = Field(default=50, ge=1, le=1000, description="claimed per pass")
    worker_concurrency: int = Field(default=10, ge=1, le=500, description="sends at once")
    worker_poll_interval_s: float = Field(default=1.0, gt=0, description="idle wait")
    promote_staging_interval_s: float = Field(
        default=60.0, ge=0, description="how often the worker runs promote_staging (0: never)")
    query_ambiguous_interval_s: float = Field(
        default=30.0, ge=0, description="how often the worker runs query_ambiguous (0: never)")
    stale_partial_sweep_interval_s: float = Field(
        default=300.0, ge=0,
        description="how often the worker runs stale_partial_sweep (0: never)")
    audit_anchor_interval_s: float = Field(
        default=3600.0, ge=0,
        description="how often the worker runs audit_anchor, which writes the audit log's "
        "head to the log and to AUDIT_ANCHOR_FILE (0: never)")
    audit_anchor_file: str | None = Field(
        default=None,
        description="a file the audit_anchor job appends 'ISO-time ID:HASH' lines to (with "
        "fsync); keep it where the database's owner cannot rewrite it")
    daily_report_at_utc: str = Field(
        default="00:05", pattern=r"^$|^([01][0-9]|2[0-3]):[0-5][0-9]$",
        description="when (HH:MM, UTC) the worker runs daily_report for the day before "
        "('' : never)")
    lease_margin_s: float = Field(
        default=30.0, ge=0,
        description="a claim's lease lasts the exchanges it may wait for (twice the system's "
        "timeout plus 1 s each) and this long; then it is recovered as ambiguous "
        "(worker_lost)")
    lease_safety_s: float = Field(
        default=5.0, ge=0,
        description="a claimed delivery is sent only if its whole exchange (twice the system's "
        "timeout plus 1 s) and this many seconds more still fit in its lease; otherwise it "
        "is released unsent")
    worker_heartbeat_s: float = Field(
        default=5.0, gt=0, description="how often a worker tells the database it is alive")
    worker_lost_after_s: float = Field(
        default=30.0, gt=0,
        description="a worker whose heartbeat is older than this is lost; its claims become "
        "ambiguous (worker_lost) one exchange of their system later, without waiting for "
        "their leases")
    worker_metrics_port: int = Field(
        default=0, ge=0, le=65535,
        description="port on which a worker serves its Prometheus counters (0: it does not)")
    worker_metrics_host: str = Field(
        default="127.0.0.1", description="address the worker's metrics port listens on")

    # Broker consumers (pipeline-console consume).
    consumer_prefetch: int = Field(
        default=1000, ge=1, le=10_000,
        description="messages a consumer holds unacknowledged at most (RabbitMQ's prefetch "
        "count; NATS' fetch batch, and a quarter of max_ack_pending of a consumer it "
        "creates); twice consumer_batch_size lets one batch gather while the one before it "
        "is written")
    consumer_batch_size: int = Field(
        default=500, ge=1, le=10_000,
        description="messages a consumer writes in one transaction at most")
    consumer_heartbeat_s: float = Field(
        default=5.0, gt=0,
        description="how often a consumer tells the database it is alive, with its counts "
        "and its broker's backlog")
    consumer_lost_after_s: float = Field(
        default=30.0, gt=0, description="a consumer whose heartbeat is older than this is lost")
    consumer_backlog_alert_s: float = Field(
        default=300.0, gt=0,
        description="the dashboard shows a consumer whose broker's backlog has grown at every "
        "heartbeat for this long")
    consumer_ack_wait_s: float = Field(
        default=60.0, gt=0,
        description="NATS: ack_wait of a durable consumer the consumer creates (redelivered "
        "if not acknowledged within this)")
    broker_username: str | None = Field(
        default=None, description="the broker user, when the URL has none")
    broker_password: SecretStr | None = Field(
        default=None, description="the broker password, when the URL has none (never shown)")
    consumer_metrics_port: int = Field(
        default=0, ge=0, le=65535,
        description="port on which a consumer serves its Prometheus counters (0: it does not)")

    @model_validator(mode="after")
    def _margins_that_can_hold(self) -> "Settings":
        if self.lease_safety_s >= self.lease_margin_s:
            raise ValueError("lease_safety_s must be smaller than lease_margin_s, or no "
                             "claim could ever be sent")
        if self.worker_lost_after_s < 3 * self.worker_heartbeat_s:
            raise ValueError("worker_lost_after_s must be at least three heartbeats "
                             "(worker_heartbeat_s), or a live worker would be taken for lost")
        if self.consumer_lost_after_s < 3 * self.consumer_heartbeat_s:
            raise ValueError("consumer_lost_after_s must be at least three heartbeats "
                             "(consumer_heartbeat_s), or a live consumer would be taken for "
                             "lost")
        return self

