"""Tokens: ingest tokens scoped to their sources, unscoped ones flagged until replaced, and
token rows that never change in place (the database refuses it)."""

from __future__ import annotations

from pipeline_console.auth.tokens import hash_token, new_token
from pipeline_console.models import ApiToken


async def legacy_ingest_token(database, clock, name: str) -> str:
    """An ingest token as made before scoping existed (sources SQL NULL): tokens create
    refuses to make one now."""
    plain = new_token()
    async with database.transaction() as session:
        session.add(ApiToken(name=name, role="ingest", token_hash=hash_token(plain),
                             prefix=plain[:10], created_at=clock.now, created_by="old-cli",
                             sources=None))
    return plain
