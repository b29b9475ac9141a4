"""API tokens: stored only as SHA-256 hashes of high-entropy random strings; console sessions
and one-time login codes, made from a token and stored only as hashes too.

A token row never changes in place, except once to record its revocation: a database
trigger refuses any other UPDATE, and every DELETE (a role is changed by revoking the token
and creating another, which the audit log then shows)."""

from datetime import datetime

from sqlalchemy import JSON, CheckConstraint, ForeignKey, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from pipeline_console.models.base import Base, BigId, UTCDateTime


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # the first characters, to recognise it
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(128))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # the source systems an ingest token may post for; None: any (operator and admin
    # tokens, and ingest tokens made before scoping existed, which are flagged until replaced)
    # (SQL NULL, not JSON null: none_as_null)
    sources: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True), nullable=True)

    __table_args__ = (
        CheckConstraint("role IN ('ingest', 'viewer', 'operator', 'admin')", name="role"),
        # one active token per name: a name in the audit log means one token
        Index("uq_api_tokens_active_name", "name", unique=True,
              sqlite_where=text("revoked_at IS NULL"),
              postgresql_where=text("revoked_at IS NULL")),
    )


class ConsoleSession(Base):
    """A signed-in browser: the cookie holds a random id, this row only its hash. The API
    never accepts it; it ends at logout, at expiry, after an idle time, or when the token it
    was made from is revoked."""

    __tablename__ = "console_sessions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    session_hash: Mapped[str] = mapped_column(String(64), unique=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    ended_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)


class LoginCode(Base):
    """A one-time, short-lived code that signs a browser in as a token (the demo's link):
    it is exchanged once for a console session and is worth nothing after."""

    __tablename__ = "login_codes"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
