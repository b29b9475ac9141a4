"""Writing the production projection: shared by ingestion, the promote_staging job and
anomaly resolution. The version guard is in the statement itself, so production never
goes down even if a caller is wrong."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.db import Column, Stored, execute_columns, insert_columns, insert_returning
from pipeline_console.delivery.outbox import enqueue_deliveries
from pipeline_console.models import ProductionRecord, StagingRecord

_table = ProductionRecord.__table__


_COLUMNS = ("entity_type", "entity_id", "version", "payload", "payload_hash", "source_system",
            "correlation_id", "staging_id", "promoted_at")


async def write_production(
    session: AsyncSession, rows: Sequence[dict[str, Any]], *, allow_same_version: bool = False,
    stored_payloads: Sequence[Any] | None = None, new_keys: Collection[str] = (),
    held_versions: Mapping[str, int | None] | None = None,
) -> None:
    """Upsert production rows; an existing row is replaced only by a higher version
    (or, for an operator's anomaly resolution, by the same version). Every row written
    queues one delivery per subscribed downstream system.

    `stored_payloads`: the rows' payloads already serialized (db.stored_form), when the
    caller has them. `new_keys`: keys whose state this transaction created, so that no
    production row can exist for them; theirs are plain inserts (one executemany, no
    RETURNING to read), which fail loudly rather than overwrite if one did exist.
    `held_versions`: on SQLite, the production version (None: no row) of every other row's
    key as this transaction read it; the write lock has been held since, so those rows too
    are plain statements: an insert, or an update whose version guard stays in its WHERE
    clause and which fails the transaction loudly if a row did not match what was read.
    Each key appears at most once in `rows`."""
    if not rows:
        return
    plain_reads = held_versions is not None and session.bind.dialect.name == "sqlite"
    guard = "<=" if allow_same_version else "<"
    fresh: list[int] = []
    updated: list[int] = []
    upserted: list[int] = []
    for index, row in enumerate(rows):
        key = row["idempotency_key"]
        if key in new_keys:
            fresh.append(index)
        elif not plain_reads:
            upserted.append(index)
        elif (held := held_versions[key]) is None:  # type: ignore[index]
            fresh.append(index)
        elif held < row["version"] or (allow_same_version and held == row["version"]):
            updated.append(index)
        # else: the guard keeps the held version; nothing is written

    def columns(indices: list[int], names: Sequence[str]) -> dict[str, Column]:
        chosen = [rows[i] for i in indices]
        out: dict[str, Column] = {name: [row[name] for row in chosen] for name in names}
        if stored_payloads is not None:
            out["payload"] = Stored([stored_payloads[i] for i in indices])
        return out

    if fresh:
        await insert_columns(session, _table, columns(fresh, ("idempotency_key", *_COLUMNS)))
    written = {(rows[i]["idempotency_key"], rows[i]["version"]) for i in (*fresh, *updated)}
    if updated:
        assignments = ", ".join(f"{column} = ?" for column in _COLUMNS)
        versions = [rows[i]["version"] for i in updated]
        changed = await execute_columns(
            session, _table,
            f"UPDATE production_records SET {assignments} "
            f"WHERE idempotency_key = ? AND version {guard} ?",
            [*columns(updated, _COLUMNS).items(),
             ("idempotency_key", [rows[i]["idempotency_key"] for i in updated]),
             ("version", versions)])
        if changed != len(updated):
            raise RuntimeError(
                f"{len(updated) - changed} production rows were not at the version this "
                "transaction read under its write lock")
    if upserted:
        # Only rows the guard let through were written; exactly those get deliveries queued,
        # in this same transaction (the transactional outbox).
        written.update(tuple(row) for row in await insert_returning(
            session, _table, columns(upserted, ("idempotency_key", *_COLUMNS)),
            conflict=(
                "ON CONFLICT (idempotency_key) DO UPDATE SET "
                + ", ".join(f"{column} = excluded.{column}" for column in _COLUMNS)
                + f" WHERE production_records.version {guard} excluded.version"
            ),
            returning=["idempotency_key", "version"],
        ))
    await enqueue_deliveries(
        session,
        [row for row in rows if (row["idempotency_key"], row["version"]) in written],
        rows[0]["promoted_at"],
    )


def production_row(row: StagingRecord, now: datetime) -> dict[str, object]:
    """The production row that promoting a staged row writes."""
    return {
        "idempotency_key": row.idempotency_key,
        "entity_type": row.entity_type,
        "entity_id": row.entity_id,
        "version": row.version,
        "payload": row.payload,
        "payload_hash": row.payload_hash,
        "source_system": row.source_system,
        "correlation_id": row.correlation_id,
        "staging_id": row.id,
        "promoted_at": now,
    }
