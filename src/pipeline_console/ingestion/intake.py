"""From raw request bytes to messages the planner can decide, or to a recorded rejection."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from pydantic import ValidationError

from pipeline_console.errors import FieldError
from pipeline_console.ingestion.planner import IncomingMessage
from pipeline_console.ingestion.policy import (
    ASTRAL,
    SAFE_INTEGER,
    UnhashablePayload,
    foreign_source,
    foreign_source_detail,
    idempotency_key,
    payload_hash,
)
from pipeline_console.ingestion.schemas import MessageIn

# Why a message could not be decided: invalid (as JSON or as a message), larger than a limit,
# sent as something other than JSON, or from a source its token may not post for. The edge
# maps each to its status (422, 413, 415, 403).
RejectionKind = Literal["invalid", "too_large", "unsupported_media_type", "forbidden"]


@dataclass(frozen=True)
class RejectedMessage:
    """A message that could not be decided; it is still written to the attempt log."""

    detail: str
    errors: list[FieldError]
    raw_body: str
    kind: RejectionKind = "invalid"
    # What could be read of the message, so the rejection shows up next to its record.
    known: dict[str, Any] = field(default_factory=dict)


class BodyError(Exception):
    """The request body as a whole cannot be read (broken JSON, wrong top-level shape)."""

    def __init__(self, detail: str, errors: list[FieldError]) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors


def excerpt(body: bytes, limit: int) -> str:
    """The first `limit` bytes as text that every database can store."""
    text = body[:limit].decode("utf-8", errors="replace").replace("\x00", "\ufffd")
    return text + ("…" if len(body) > limit else "")


def excerpt_of(candidate: Any, limit: int) -> str:
    """The excerpt of one already-parsed message of a batch."""
    try:
        return excerpt(orjson.dumps(candidate), limit)
    except (TypeError, orjson.JSONEncodeError):
        return "(not shown: nested too deeply to serialize again)"


def decode_json(body: bytes) -> Any:
    """The JSON document in `body`, read exactly; BodyError when it is not JSON or when an
    object in it repeats a key (RFC 7493 I-JSON: such a document has no single meaning, and
    orjson, like `json`, would silently keep the last value)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise BodyError(
            "the body is not valid JSON",
            [FieldError(field="body", message=str(error), type="json_invalid")],
        ) from error
    strings, overflowed = _strings_and_overflow(document)
    if overflowed:
        # orjson reads an integer literal beyond 64 bits as a float, silently losing digits.
        # Read such (rare) bodies again exactly, so that the number is refused, not rounded.
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as error:
            raise BodyError(
                "the body is not valid JSON",
                [FieldError(field="body", message=str(error), type="json_invalid")],
            ) from error
    if _strings_in_text(body) != strings:
        raise BodyError(
            "an object in the body has the same key more than once, so the body has no "
            "single meaning (RFC 7493, I-JSON)", _repeated_keys(body))
    return document


def _strings_and_overflow(document: Any) -> tuple[int, bool]:
    """One walk: how many strings the decoded document holds, keys included (a repeated
    key and its value are held once), and whether an integer literal overflowed into a
    float."""
    strings, overflowed, stack = 0, False, [document]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str:
            strings += 1
        elif kind is dict:
            strings += len(item)
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        elif kind is float and abs(item) >= 2**63 and item.is_integer():
            overflowed = True
    return strings, overflowed


def _strings_in_text(body: bytes) -> int:
    """How many strings (keys included) the JSON text writes, counted exactly at the speed
    of bytes.count, for a body orjson has accepted. Every '"' outside a string opens or
    closes one; inside a string a '"' is always escaped. When the text writes more strings
    than the decoded document holds, an object repeated a key."""
    quotes = body.count(b'"')
    if b"\\" in body:
        quotes -= _escaped_quotes(body)
    return quotes // 2


def _escaped_quotes(body: bytes) -> int:
    """The quotes inside strings: those after an odd run of backslashes (backslashes occur
    only inside strings, and a run reads as escaped backslashes, then perhaps one that
    escapes the next character). With c(k) the quotes after at least k backslashes, that is
    c(1) - c(2) + c(3) - …, usually c(1) alone."""
    escaped, pattern, sign = 0, b'\\"', 1
    for _ in range(8):
        found = body.count(pattern)
        if not found:
            return escaped
        escaped += sign * found
        pattern, sign = b"\\" + pattern, -sign
    # Long runs of backslashes: drop the escaped ones, left to right as they read, in one
    # pass (so a crafted body costs one copy, not a count per backslash); '\\"' is then
    # exactly an escaped quote.
    return body.replace(b"\\\\", b"").count(b'\\"')


class _Object(dict):  # type: ignore[type-arg]
    """A decoded object that remembers the keys its text repeated."""

    __slots__ = ("repeated",)
    repeated: list[str]


def _object_of_pairs(pairs: list[tuple[str, Any]]) -> _Object:
    item = _Object(pairs)
    item.repeated = []
    if len(item) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen and key not in item.repeated:
                item.repeated.append(key)
            seen.add(key)
    return item


_MAX_REPEATS_NAMED = 10


def _repeated_keys(body: bytes) -> list[FieldError]:
    """The slow path, for bodies known to repeat a key: read again member by member and
    name each repeated key by its path, in document order."""
    try:
        document = json.loads(body, object_pairs_hook=_object_of_pairs)
    except (ValueError, RecursionError):  # nested too deeply for `json` (orjson reads more)
        return [FieldError(field="body", message="an object repeats a key (nested too "
                           "deeply to say where)", type="duplicate_key")]
    found: list[FieldError] = []
    stack: list[tuple[Any, tuple[str, ...]]] = [(document, ())]
    while stack and len(found) < _MAX_REPEATS_NAMED:
        item, path = stack.pop()
        if isinstance(item, _Object):
            found += [FieldError(field=_pointer((*path, key)), type="duplicate_key",
                                 message="this key appears more than once in its object")
                      for key in item.repeated]
            stack.extend(reversed([(child, (*path, key)) for key, child in item.items()]))
        elif isinstance(item, list):
            stack.extend(reversed([(child, (*path, str(index)))
                                   for index, child in enumerate(item)]))
    return found[:_MAX_REPEATS_NAMED]


def _pointer(path: tuple[str, ...]) -> str:
    """A path as the other errors name fields: JSON Pointer segments without the leading
    '/' (`payload/lines/0/sku`); '/' alone for the empty key at the top."""
    parts = []
    for part in path:
        escaped = part.replace("~", "~0").replace("/", "~1")
        parts.append(escaped if len(escaped) <= 64 else f"{escaped[:40]}…")
    return "/".join(parts) or "/"


def depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, stopping early once it passes `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def overlong_string(value: Any, limit: int) -> str | None:
    """The JSON Pointer of the first string (value or key) longer than `limit`, if any."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, pointer = stack.pop()
        if isinstance(item, str):
            if len(item) > limit:
                return pointer or "/"
        elif isinstance(item, dict):
            for key, child in item.items():
                escaped = str(key).replace("~", "~0").replace("/", "~1")
                if len(str(key)) > limit:
                    return f"{pointer}/{escaped[:40]}…"
                stack.append((child, f"{pointer}/{escaped}"))
        elif isinstance(item, list):
            stack.extend((child, f"{pointer}/{index}") for index, child in enumerate(item))
    return None


def scan_payload(payload: Any, max_depth: int, max_length: int) -> tuple[bool, bool]:
    """One walk of a payload instead of three: (clean, plain). `clean`: no nesting deeper
    than `max_depth` and no string or key longer than `max_length` (when it is False,
    _payload_problem finds and names the problem). `plain`: what policy.orjson_is_canonical
    would answer, so the payload hash need not walk it again. Scalars are checked where
    they are found; only containers go on the stack."""
    plain = True
    kind = type(payload)
    if kind is not dict and kind is not list:
        if kind is str:
            return len(payload) <= max_length, plain
        return True, kind is bool or payload is None or (
            kind is int and -SAFE_INTEGER <= payload <= SAFE_INTEGER)
    stack = [(payload, 1)]
    while stack:
        item, level = stack.pop()
        if level > max_depth:
            return False, plain
        if type(item) is dict:
            for key in item:
                if type(key) is not str:
                    plain = False
                elif len(key) > max_length:
                    return False, plain
                elif plain and not (key.isascii() or max(key) < ASTRAL):
                    plain = False
            children = item.values()
        else:
            children = item
        for child in children:
            kind = type(child)
            if kind is str:
                if len(child) > max_length:
                    return False, plain
            elif kind is dict or kind is list:
                stack.append((child, level + 1))
            elif kind is int:
                if plain and not -SAFE_INTEGER <= child <= SAFE_INTEGER:
                    plain = False
            elif not (kind is bool or child is None):
                plain = False
    return True, plain


def parse_message(
    candidate: Any, raw_body: str, *, max_depth: int, max_string_length: int = 65_536
) -> IncomingMessage | RejectedMessage:
    try:
        message = MessageIn.model_validate(candidate)
    except ValidationError as error:
        return RejectedMessage(
            detail="the message is not valid",
            errors=[_field_error(item) for item in error.errors()],
            raw_body=raw_body,
            known=_known_parts(candidate),
        )
    clean, plain = scan_payload(message.payload, max_depth, max_string_length)
    rejection = None if clean else _payload_problem(message.payload, max_depth,
                                                    max_string_length)
    if rejection is None:
        try:
            digest = payload_hash(message.payload, plain=plain)
        except UnhashablePayload as error:
            rejection = FieldError(
                field="payload", message=f"cannot be put in canonical JSON form: {error}",
                type="payload_not_canonical",
            )
    if rejection is not None:
        return RejectedMessage(
            detail="the message is not valid", errors=[rejection], raw_body=raw_body,
            known=_known_parts(candidate),
        )
    entity_type, entity_id = message.entity_type, message.entity_id
    return IncomingMessage(  # positional: one per message, and keywords cost a third more
        message.source_system, entity_type, entity_id,
        idempotency_key(entity_type, entity_id), message.version, message.payload, digest,
        message.correlation_id, message.message_id, message.occurred_at,
    )


def message_from_body(
    body: bytes, *, max_bytes: int, excerpt_bytes: int, max_depth: int,
    max_string_length: int, too_large: bool = False,
) -> IncomingMessage | RejectedMessage:
    """One message's bytes (a POST /messages body, a broker message, an NDJSON line) as a
    message to decide or a rejection to record: the one way every entrypoint reads them.
    `too_large`: the caller read only the first `max_bytes` + 1 bytes of a longer body."""
    if too_large or len(body) > max_bytes:
        return RejectedMessage(
            detail=f"the message is larger than the limit of {max_bytes} bytes",
            errors=[FieldError(field="body", message=f"larger than {max_bytes} bytes",
                               type="too_large")],
            raw_body=excerpt(body, excerpt_bytes), kind="too_large")
    try:
        candidate = decode_json(body)
    except BodyError as error:
        return RejectedMessage(error.detail, error.errors, excerpt(body, excerpt_bytes))
    return parse_message(candidate, excerpt(body, excerpt_bytes), max_depth=max_depth,
                         max_string_length=max_string_length)


def refuse_foreign_source(
    item: IncomingMessage | RejectedMessage, token_name: str,
    sources: frozenset[str] | None, raw_body: str,
) -> IncomingMessage | RejectedMessage:
    """A message whose source_system is not among its ingest token's sources becomes a
    rejection (recorded in the attempt log, naming the token), never a decision: a leaked
    shop token must not supersede the ERP's records."""
    if isinstance(item, RejectedMessage) or not foreign_source(sources, item.source_system):
        return item
    assert sources is not None
    known = {"source_system": item.source_system, "entity_type": item.entity_type,
             "entity_id": item.entity_id, "idempotency_key": item.key,
             "version": item.version, "correlation_id": item.correlation_id,
             "message_id": item.message_id}
    return RejectedMessage(
        detail=foreign_source_detail(token_name, sources, item.source_system),
        errors=[FieldError(field="source_system", type="source_not_allowed",
                           message="not one of the sources this token may post for")],
        raw_body=raw_body, kind="forbidden",
        known={name: value for name, value in known.items() if value is not None},
    )


def _payload_problem(payload: dict[str, Any], max_depth: int,
                     max_string_length: int) -> FieldError | None:
    if depth(payload, max_depth) > max_depth:
        return FieldError(
            field="payload", message=f"nested deeper than {max_depth} levels",
            type="payload_too_deep",
        )
    where = overlong_string(payload, max_string_length)
    if where is not None:
        return FieldError(
            field=f"payload{where}", message=f"a string longer than {max_string_length} "
            "characters", type="payload_string_too_long",
        )
    return None


def _field_error(item: Any) -> FieldError:
    location = [str(part) for part in item["loc"]]
    return FieldError(
        field=".".join(location) or "body", message=item["msg"], type=item["type"]
    )


_KNOWN_LIMITS = {"source_system": 64, "entity_type": 64, "entity_id": 256, "message_id": 256,
                 "correlation_id": 256}


def _known_parts(candidate: Any) -> dict[str, Any]:
    """Best effort: the identifying fields of a rejected message, when they are plain strings."""
    if not isinstance(candidate, dict):
        return {}
    known: dict[str, Any] = {}
    for name, limit in _KNOWN_LIMITS.items():
        value = candidate.get(name)
        if isinstance(value, str) and 0 < len(value) <= limit and value.isprintable():
            known[name] = value
    version = candidate.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and 0 <= version < 2**63:
        known["version"] = version
    if "entity_type" in known and "entity_id" in known and ":" not in known["entity_type"]:
        known["idempotency_key"] = idempotency_key(known["entity_type"], known["entity_id"])
    return known
