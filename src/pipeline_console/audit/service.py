"""Appending to and verifying the audit log. Appending is always the last write of a
transaction: on PostgreSQL it takes a transaction-level advisory lock so that the chain is
extended by one transaction at a time, and holds it only until the commit."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.audit.chain import (
    GENESIS_HASH,
    BrokenLink,
    ChainedContent,
    ChainHead,
    anchor_mismatch,
    chain_hashes,
    first_broken_link,
)
from pipeline_console.db import Same, insert_columns
from pipeline_console.models import AuditEvent

_CHAIN_LOCK = 0x70_63_61_75  # "pcau": the advisory lock id that serializes chain appends
_table = AuditEvent.__table__


class AuditEntry(NamedTuple):  # a NamedTuple: thousands are made per batch
    action: str
    subject_type: str
    subject_id: str
    details: dict[str, Any]
    idempotency_key: str | None = None


async def append_audit(
    session: AsyncSession, entries: Sequence[AuditEntry], *, actor: str, now: datetime
) -> None:
    if not entries:
        return
    now = now.astimezone(UTC)
    if session.bind.dialect.name == "postgresql":
        await session.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": _CHAIN_LOCK})
    last = (
        await session.execute(
            select(AuditEvent.id, AuditEvent.row_hash).order_by(AuditEvent.id.desc()).limit(1)
        )
    ).first()
    next_id, prev_hash = (last.id + 1, last.row_hash) if last else (1, GENESIS_HASH)
    # An AuditEntry is the (action, subject_type, subject_id, details, key) chain_hashes takes.
    prevs, hashes = chain_hashes(prev_hash, next_id, now, actor, entries)
    actions, subject_types, subject_ids, details, keys = zip(*entries, strict=True)
    await insert_columns(session, _table, {
        "id": range(next_id, next_id + len(prevs)), "occurred_at": Same(now),
        "actor": Same(actor), "action": actions, "subject_type": subject_types,
        "subject_id": subject_ids, "idempotency_key": keys, "details": details,
        "prev_hash": prevs, "row_hash": hashes,
    })


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    checked: int
    first_broken: BrokenLink | None
    head: ChainHead | None = None  # the newest row (None: the log is empty)
    anchor: ChainHead | None = None
    anchor_problem: str | None = None  # why the log does not extend the anchor


async def chain_head(session: AsyncSession) -> ChainHead | None:
    """The newest row of the audit log, by its id and hash (one indexed read)."""
    last = (await session.execute(
        select(AuditEvent.id, AuditEvent.row_hash).order_by(AuditEvent.id.desc()).limit(1)
    )).first()
    return None if last is None else ChainHead(last.id, last.row_hash)


async def verify_audit_chain(session: AsyncSession, *, page_size: int = 2000,
                             anchor: ChainHead | None = None) -> VerifyReport:
    """Recompute the chain from the first row up to the head read at the start; report the
    first row that does not fit. With an `anchor` (a head written down earlier, outside the
    database), the log must still hold that row with that hash: a verified chain from
    genesis through it to the head then proves nothing before it was rewritten and nothing
    was cut off after it, which the chain alone cannot show (deleting the newest rows, or
    rewriting a row and rehashing everything after it, leaves a chain that verifies)."""
    head = await chain_head(session)
    lowest = await session.scalar(select(func.min(AuditEvent.id)))
    if lowest is not None and lowest < 1:  # the CHECK (id >= 1) was dropped to write it
        return VerifyReport(False, 0, BrokenLink(lowest, f"row {lowest} precedes the first "
                                                 "row of the chain (ids start at 1)"),
                            head, anchor, None)
    expected_prev, expected_id, checked = GENESIS_HASH, 1, 0
    anchored_hash: str | None = None
    while head is not None:
        result = await session.execute(
            select(AuditEvent)
            .where(AuditEvent.id >= expected_id, AuditEvent.id <= head.id)
            .order_by(AuditEvent.id)
            .limit(page_size)
        )
        events = result.scalars().all()
        if not events:
            break
        rows = [(chained_content(event), event.prev_hash, event.row_hash) for event in events]
        broken = first_broken_link(rows, expected_prev, expected_id)
        if broken is not None:
            checked += sum(1 for content, _, _ in rows if content.id < broken.id)
            return VerifyReport(False, checked, broken, head, anchor, None)
        if anchor is not None and events[0].id <= anchor.id <= events[-1].id:
            anchored_hash = events[anchor.id - events[0].id].row_hash  # ids are consecutive
        checked += len(rows)
        expected_prev, expected_id = events[-1].row_hash, events[-1].id + 1
        session.expunge_all()
    problem = None if anchor is None else anchor_mismatch(anchor, head, anchored_hash)
    return VerifyReport(problem is None, checked, None, head, anchor, problem)


def append_anchor(path: str, head: ChainHead, now: datetime) -> str:
    """Append `ISO-time ID:HASH` to the anchor file and fsync it (blocking: run it in a
    thread). Returns the line written."""
    line = f"{now.astimezone(UTC).isoformat(timespec='seconds').replace('+00:00', 'Z')} {head}"
    with open(path, "a", encoding="ascii") as anchors:
        anchors.write(line + "\n")
        anchors.flush()
        os.fsync(anchors.fileno())
    return line


def chained_content(event: AuditEvent) -> ChainedContent:
    return ChainedContent(
        id=event.id,
        occurred_at=event.occurred_at,
        actor=event.actor,
        action=event.action,
        subject_type=event.subject_type,
        subject_id=event.subject_id,
        idempotency_key=event.idempotency_key,
        details=event.details,
    )
