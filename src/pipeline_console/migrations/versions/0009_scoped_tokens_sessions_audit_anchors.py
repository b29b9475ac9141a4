"""scoped ingest tokens, token rows that never change in place, console sessions and login
codes, and audit ids from 1

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 08:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from pipeline_console.models.base import BigId, UTCDateTime

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

POSITIVE_ID = "CONSTRAINT ck_audit_events_positive_id CHECK (id >= 1)"
# what a token row may change: revoked_at and revoked_by, once, from NULL
TOKEN_COLUMNS = ("id", "name", "role", "token_hash", "prefix", "created_at", "created_by",
                 "sources")


def upgrade() -> None:
    for table, secret in (("console_sessions", "session_hash"), ("login_codes", "code_hash")):
        columns = [
            sa.Column("id", BigId, autoincrement=True, nullable=False),
            sa.Column(secret, sa.String(length=64), nullable=False),
            sa.Column("token_id", BigId, nullable=False),
            sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        ]
        if table == "console_sessions":
            columns += [
                sa.Column("last_seen_at", UTCDateTime(timezone=True), nullable=False),
                sa.Column("expires_at", UTCDateTime(timezone=True), nullable=False),
                sa.Column("ended_at", UTCDateTime(timezone=True), nullable=True),
                sa.Column("ended_reason", sa.String(length=32), nullable=True),
            ]
        else:
            columns += [
                sa.Column("expires_at", UTCDateTime(timezone=True), nullable=False),
                sa.Column("used_at", UTCDateTime(timezone=True), nullable=True),
            ]
        op.create_table(
            table, *columns,
            sa.ForeignKeyConstraint(["token_id"], ["api_tokens.id"],
                                    name=op.f(f"fk_{table}_token_id_api_tokens")),
            sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}")),
            sa.UniqueConstraint(secret, name=op.f(f"uq_{table}_{secret}")),
        )
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_index(batch_op.f(f"ix_{table}_token_id"), ["token_id"],
                                  unique=False)
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sources", sa.JSON(), nullable=True))
    _freeze_token_rows()
    _audit_ids_from_one()


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        for verb in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS api_tokens_no_{verb}")
        _edit_sqlite_table("audit_events", ",\n\t" + POSITIVE_ID, "")
    else:
        op.execute("DROP TRIGGER IF EXISTS api_tokens_no_truncate ON api_tokens")
        op.execute("DROP TRIGGER IF EXISTS api_tokens_append_only ON api_tokens")
        op.execute("DROP FUNCTION IF EXISTS refuse_change_to_token_row()")
        op.drop_constraint(op.f("ck_audit_events_positive_id"), "audit_events", type_="check")
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.drop_column("sources")
    for table in ("login_codes", "console_sessions"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(batch_op.f(f"ix_{table}_token_id"))
        op.drop_table(table)


def _freeze_token_rows() -> None:
    """A token's role, name, hash or sources never change in place and no token row is
    deleted: the audit log says which token did what, and a role changed in place would
    make that a lie nobody could see. Only a revocation may be recorded, once."""
    changed = " OR ".join(f"NEW.{column} IS NOT OLD.{column}" for column in TOKEN_COLUMNS)
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            "CREATE TRIGGER api_tokens_no_update BEFORE UPDATE ON api_tokens "
            f"WHEN {changed} OR OLD.revoked_at IS NOT NULL BEGIN SELECT RAISE(ABORT, "
            "'api_tokens rows do not change in place: revoke the token and create another'); "
            "END")
        op.execute(
            "CREATE TRIGGER api_tokens_no_delete BEFORE DELETE ON api_tokens BEGIN SELECT "
            "RAISE(ABORT, 'api_tokens rows are never deleted: revoke the token'); END")
        return
    # json has no equality operator in PostgreSQL: its text is compared
    changed = " OR ".join(
        f"NEW.{c}{'::text' if c == 'sources' else ''} IS DISTINCT FROM "
        f"OLD.{c}{'::text' if c == 'sources' else ''}" for c in TOKEN_COLUMNS)
    op.execute(f"""
        CREATE FUNCTION refuse_change_to_token_row() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'DELETE' THEN
                RAISE EXCEPTION 'api_tokens rows are never deleted: revoke the token'
                    USING ERRCODE = 'insufficient_privilege';
            END IF;
            IF {changed} OR OLD.revoked_at IS NOT NULL THEN
                RAISE EXCEPTION 'api_tokens rows do not change in place: revoke the token '
                    'and create another' USING ERRCODE = 'insufficient_privilege';
            END IF;
            RETURN NEW;
        END
        $$
        """)
    op.execute("CREATE TRIGGER api_tokens_append_only BEFORE UPDATE OR DELETE ON api_tokens "
               "FOR EACH ROW EXECUTE FUNCTION refuse_change_to_token_row()")
    op.execute("CREATE TRIGGER api_tokens_no_truncate BEFORE TRUNCATE ON api_tokens "
               "FOR EACH STATEMENT EXECUTE FUNCTION refuse_change_to_append_only_table()")


def _audit_ids_from_one() -> None:
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT 1 FROM audit_events WHERE id < 1 LIMIT 1")).first():
        raise RuntimeError("audit_events holds rows with an id below 1, which the chain never "
                           "writes: the log was tampered with. Run `pipeline-console audit "
                           "verify` and investigate before migrating")
    if bind.dialect.name != "sqlite":
        # NOT VALID, then VALIDATE: the existing rows are checked under a lock that lets
        # audit rows be appended meanwhile
        op.create_check_constraint("positive_id", "audit_events", sa.text("id >= 1"),
                                   postgresql_not_valid=True)
        op.execute("ALTER TABLE audit_events VALIDATE CONSTRAINT ck_audit_events_positive_id")
        return
    # audit_events is append-only (triggers), so batch mode cannot rebuild it; no stored row
    # violates the CHECK (checked above), so the stored CREATE TABLE is edited (as 0008 does)
    stored = bind.execute(sa.text(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'audit_events'"
    )).scalar_one()
    head, _, tail = stored.rpartition(")")
    _edit_sqlite_table("audit_events", stored, head.rstrip() + ",\n\t" + POSITIVE_ID + "\n)"
                       + tail)


def _edit_sqlite_table(table: str, old: str, new: str) -> None:
    """Replace `old` by `new` in the stored CREATE TABLE (sqlite.org/lang_altertable.html,
    "Making Other Kinds Of Table Schema Changes"), bumping the schema version so that every
    connection reads it again."""
    bind = op.get_bind()
    stored = bind.execute(sa.text(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = :name"), {"name": table}
    ).scalar_one()
    if old not in stored:
        raise RuntimeError(f"{table}'s stored schema is not the expected one: {stored}")
    version = bind.execute(sa.text("PRAGMA schema_version")).scalar_one()
    bind.execute(sa.text("PRAGMA writable_schema = ON"))
    bind.execute(sa.text(
        "UPDATE sqlite_master SET sql = :sql WHERE type = 'table' AND name = :name"),
        {"sql": stored.replace(old, new), "name": table})
    bind.execute(sa.text(f"PRAGMA schema_version = {int(version) + 1}"))
    bind.execute(sa.text("PRAGMA writable_schema = OFF"))
