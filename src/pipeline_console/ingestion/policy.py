"""The five-branch decision and the canonical payload hash: pure functions of plain values.

| condition                                       | decision          |
| key never seen                                  | accept_new        |
| incoming version newer than current             | accept_supersede  |
| same version, same payload hash                 | skip_duplicate    |
| same version, different payload hash            | quarantine        |
| incoming version older than current             | skip_stale        |
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection
from enum import StrEnum
from typing import Any, NamedTuple

import orjson
import rfc8785


class Decision(StrEnum):
    ACCEPT_NEW = "accept_new"
    ACCEPT_SUPERSEDE = "accept_supersede"
    SKIP_DUPLICATE = "skip_duplicate"
    QUARANTINE = "quarantine"
    SKIP_STALE = "skip_stale"

    @property
    def accepted(self) -> bool:
        return self in (Decision.ACCEPT_NEW, Decision.ACCEPT_SUPERSEDE)


REJECTED = "rejected"  # the attempt-log word for a malformed message (no decision was possible)


class CurrentState(NamedTuple):
    """What the pipeline holds for a key: the highest accepted version and its payload hash."""

    version: int
    payload_hash: str
    source_system: str


class Verdict(NamedTuple):
    decision: Decision
    reason: str


def decide(
    current: CurrentState | None, version: int, payload_hash: str, source_system: str
) -> Verdict:
    """Decide what to do with one message, given the key's current state (None: never seen)."""
    incoming = f"version {version} from {source_system}"
    if current is None:
        return Verdict(Decision.ACCEPT_NEW, f"{incoming} is the first message for this key")
    held = f"current version {current.version} ({current.source_system})"
    if version > current.version:
        return Verdict(Decision.ACCEPT_SUPERSEDE, f"{incoming} is newer than {held}")
    if version < current.version:
        return Verdict(Decision.SKIP_STALE, f"{incoming} is older than {held}")
    if payload_hash == current.payload_hash:
        return Verdict(
            Decision.SKIP_DUPLICATE, f"{incoming} has the same payload as {held}; nothing to do"
        )
    return Verdict(
        Decision.QUARANTINE,
        f"{incoming} has a different payload than {held} at the same version; "
        "an anomaly is open for a person to decide",
    )


def foreign_source(sources: Collection[str] | None, source_system: str) -> bool:
    """Whether a token scoped to `sources` (None: any source) may not post this message."""
    return sources is not None and source_system not in sources


def foreign_source_detail(token_name: str, sources: Collection[str], source_system: str) -> str:
    """Why a scoped ingest token's message is refused: it names the token, its own sources
    and the source the message claims (which its sender wrote), nothing else."""
    return (f"the token {token_name!r} may post only messages of the source system"
            f"{'s' if len(sources) > 1 else ''} {', '.join(sorted(sources))}, not of "
            f"{source_system!r}")


# decide() names the holder of a key's current version as "current version N (SOURCE)"
_HELD_BY = re.compile(r"current version (\d+) \(([^()]*)\)")
OTHER_SOURCE = "another source"


def reason_for_ingest_token(reason: str, sources: Collection[str]) -> str:
    """A decision's reason as a scoped ingest token may read it: which other source system
    holds a key's current version is not its business (a leaked shop token must not learn
    that the ERP writes customer C-1003), so that name becomes "another source"."""

    def redact(match: re.Match[str]) -> str:
        holder = match.group(2)
        shown = holder if holder in sources else OTHER_SOURCE
        return f"current version {match.group(1)} ({shown})"

    return _HELD_BY.sub(redact, reason)


class UnhashablePayload(ValueError):
    """The payload cannot be put in canonical form (for example an integer beyond 2**53)."""


def canonical_json(value: Any, *, plain: bool | None = None) -> bytes:
    """RFC 8785 canonical JSON: key order and whitespace never change it.

    `rfc8785` is pure Python and was half the cost of ingesting a batch (docs/benchmarks.md).
    For the values where orjson's sorted output is byte-for-byte RFC 8785 — strings, integers
    within ±(2**53 - 1), booleans, null, and object keys within the Basic Multilingual Plane
    (where UTF-16 order, which RFC 8785 sorts by, is code point order) — orjson writes it;
    anything else (floats, whose ECMAScript form differs from orjson's, astral-plane keys,
    lone surrogates) goes to `rfc8785`. tests/ingestion/test_policy.py proves the two agree."""
    if plain if plain is not None else orjson_is_canonical(value):
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        except (orjson.JSONEncodeError, TypeError):
            pass  # a lone surrogate, say: let rfc8785 give its own error
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as error:
        raise UnhashablePayload(str(error)) from error


SAFE_INTEGER = 2**53 - 1  # RFC 8785 numbers are IEEE doubles
ASTRAL = "\U00010000"  # the first code point beyond the Basic Multilingual Plane


def orjson_is_canonical(value: Any) -> bool:
    """Whether orjson's sorted output of `value` is its RFC 8785 form (see canonical_json).
    Scalars inside a container are checked where they are found, not pushed on the stack:
    most values checked (an audit row's details, say) are one flat object."""
    kind = type(value)
    if kind is not dict and kind is not list:
        return _canonical_scalar(value)
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            for key in item:
                if type(key) is not str or not (key.isascii() or max(key) < ASTRAL):
                    return False
            children = item.values()
        else:
            children = item
        for child in children:
            kind = type(child)
            if kind is str or kind is bool or child is None:
                continue
            if kind is int:
                if -SAFE_INTEGER <= child <= SAFE_INTEGER:
                    continue
                return False
            if kind is dict or kind is list:
                stack.append(child)
                continue
            return False
    return True


def _canonical_scalar(value: Any) -> bool:
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    return kind is int and -SAFE_INTEGER <= value <= SAFE_INTEGER


def payload_hash(payload: Any, *, plain: bool | None = None) -> str:
    """`plain`: the caller already knows whether orjson_is_canonical(payload) holds."""
    return hashlib.sha256(canonical_json(payload, plain=plain)).hexdigest()


def idempotency_key(entity_type: str, entity_id: str) -> str:
    return f"{entity_type}:{entity_id}"
