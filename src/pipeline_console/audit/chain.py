"""The audit log's hash chain: each row's hash covers its content and the previous row's hash."""

import functools
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from pipeline_console.ingestion.policy import SAFE_INTEGER, canonical_json, orjson_is_canonical

GENESIS_HASH = "0" * 64


@dataclass(frozen=True)
class ChainedContent:
    id: int
    occurred_at: datetime
    actor: str
    action: str
    subject_type: str
    subject_id: str
    idempotency_key: str | None
    details: dict[str, Any]


def _hashable(value: Any) -> Any:
    """RFC 8785 numbers are IEEE doubles; integers beyond 2**53 (a nanosecond-timestamp
    version, say) are hashed in a tagged string form, so they are covered exactly."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > SAFE_INTEGER:
        return {"$integer": str(value)}
    if isinstance(value, dict):
        return {key: _hashable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_hashable(item) for item in value]
    return value


@functools.lru_cache(maxsize=256)
def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def row_hash(prev_hash: str, content: ChainedContent) -> str:
    return _envelope_hash(prev_hash, {
        "id": content.id,
        "occurred_at": _timestamp(content.occurred_at),
        "actor": content.actor,
        "action": content.action,
        "subject_type": content.subject_type,
        "subject_id": content.subject_id,
        "idempotency_key": content.idempotency_key,
        "details": content.details,
    })


def chain_hashes(
    prev_hash: str, first_id: int, occurred_at: datetime, actor: str,
    entries: Iterable[tuple[str, str, str, dict[str, Any], str | None]],
) -> tuple[list[str], list[str]]:
    """The (prev_hash, row_hash) columns of the audit rows for (action, subject_type,
    subject_id, details, idempotency_key) entries, chained from `prev_hash` with ids from
    `first_id`: each row hashed exactly as `row_hash` hashes its ChainedContent, without
    building one per row (ingestion writes thousands per batch)."""
    stamp = _timestamp(occurred_at)
    prevs: list[str] = []
    hashes: list[str] = []
    for row_id, (action, subject_type, subject_id, details, idempotency_key) in enumerate(
            entries, first_id):
        prevs.append(prev_hash)
        prev_hash = _envelope_hash(prev_hash, {
            "id": row_id, "occurred_at": stamp, "actor": actor, "action": action,
            "subject_type": subject_type, "subject_id": subject_id,
            "idempotency_key": idempotency_key, "details": details})
        hashes.append(prev_hash)
    return prevs, hashes


def _envelope_hash(prev_hash: str, envelope: dict[str, Any]) -> str:
    body = None
    # The usual row: one walk of the details decides that orjson writes the RFC 8785 form.
    if abs(envelope["id"]) <= SAFE_INTEGER and orjson_is_canonical(envelope["details"]):
        try:
            body = orjson.dumps(envelope, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:  # a lone surrogate in a string
            body = None
    if body is None:
        body = canonical_json({**envelope, "details": _hashable(envelope["details"])})
    return hashlib.sha256(prev_hash.encode() + b"\n" + body).hexdigest()


@dataclass(frozen=True)
class BrokenLink:
    id: int
    reason: str


def first_broken_link(
    rows: list[tuple[ChainedContent, str, str]], expected_prev: str, expected_id: int | None
) -> BrokenLink | None:
    """Check (content, prev_hash, row_hash) rows in id order, continuing from a known hash."""
    for content, prev_hash, stored_hash in rows:
        if expected_id is not None and content.id != expected_id:
            return BrokenLink(content.id, f"row {expected_id} is missing before row {content.id}")
        if prev_hash != expected_prev:
            return BrokenLink(content.id, "prev_hash does not match the previous row's hash")
        if row_hash(prev_hash, content) != stored_hash:
            return BrokenLink(content.id, "row content does not match its hash (row was altered)")
        expected_prev, expected_id = stored_hash, content.id + 1
    return None


@dataclass(frozen=True)
class ChainHead:
    """A row of the chain by its id and hash: the newest row (the head), or an anchor (a head
    kept somewhere the database's owner cannot rewrite)."""

    id: int
    hash: str

    def __str__(self) -> str:
        return f"{self.id}:{self.hash}"


_ANCHOR = re.compile(r"([1-9][0-9]{0,18}):([0-9a-f]{64})")
ANCHOR_FORMAT = "ID:HASH, a row id (1 or more) and its 64-character lowercase hex row hash"


def parse_anchor(text: str) -> ChainHead:
    """`ID:HASH` as `audit verify` prints the head; ValueError if it is not one."""
    match = _ANCHOR.fullmatch(text.strip().lower()) if len(text) <= 100 else None
    if match is None:
        raise ValueError(f"an anchor is {ANCHOR_FORMAT}")
    return ChainHead(int(match.group(1)), match.group(2))


def anchor_mismatch(anchor: ChainHead, head: ChainHead | None,
                    stored_hash: str | None) -> str | None:
    """Why the log does not extend the anchor (None: it does, given that the chain itself
    verifies). `stored_hash`: the hash row anchor.id holds now (None: the row is gone)."""
    if head is None or anchor.id > head.id:
        newest = "is empty" if head is None else f"ends at row {head.id}"
        return (f"the anchor's row {anchor.id} is gone: the log {newest}, so its newest "
                "rows were deleted")
    if stored_hash is None:
        return f"the anchor's row {anchor.id} is missing"
    if stored_hash != anchor.hash:
        return (f"row {anchor.id} no longer has the anchor's hash: the log up to it was "
                "rewritten (and rehashed)")
    return None
