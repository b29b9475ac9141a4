"""A downstream system's secrets cut out of what it answered, before anything records or logs
it: a system that echoes the request (its error body quoting our Authorization header, a
debugging endpoint returning every header) must not put a credential into an attempt's
response excerpt, a dead letter's reason or a log line, which every viewer reads.

Cut out are the forms a secret travels in: each stored secret as it is (a token, a password,
a header's value, a client secret, a signing secret, a client key), the base64 of
`user:password` a basic auth sends, the base64 of the client credentials sent to an OAuth2
token endpoint, and the access tokens a send used; each also URL-encoded (quote_plus, as
in a form body or a query, and with quote's '/' kept) and JSON-escaped (as in an echo of the
request as JSON, also with '/' as '\\/'). An answer cut to its excerpt may end in the
beginning of a secret: that is masked too. A form shorter than four characters is left
alone: masking every "a" would hide the answer and protect nothing."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

import orjson

from pipeline_console.delivery.oauth import client_basic
from pipeline_console.delivery.policy import SendResult

MASK = "[secret]"
MIN_MASKED_CHARS = 4


def secret_forms(system: object, tokens: Iterable[str] = ()) -> tuple[str, ...]:
    """Every form of `system`'s secrets (a SystemConfig) and of `tokens` that an answer may
    echo, longest first (a secret that holds another is cut out whole)."""
    secrets = getattr(system, "secrets", None) or {}
    values = [*secrets.values(), *tokens]
    auth = getattr(system, "auth", None) or {}
    secret = secrets.get("auth")
    if secret and auth.get("type") == "basic":
        values.append(base64.b64encode(f"{auth['username']}:{secret}".encode()).decode())
    if secret and auth.get("type") == "oauth2_client_credentials":
        values.append(client_basic(auth["client_id"], secret).removeprefix("Basic "))
    forms = set()
    for value in values:
        if not value:
            continue
        as_json = orjson.dumps(value).decode()[1:-1]
        for form in (value, quote_plus(value), quote(value), as_json,
                     as_json.replace("/", "\\/")):  # PHP's json_encode escapes '/'
            if len(form) >= MIN_MASKED_CHARS:
                forms.add(form)
    return tuple(sorted(forms, key=len, reverse=True))


def _cut_short(text: str, forms: tuple[str, ...]) -> str:
    """The text with a secret's beginning at its very end masked: what an answer cut to its
    excerpt keeps of a secret that crossed the cut."""
    for form in forms:
        for length in range(min(len(form) - 1, len(text)), MIN_MASKED_CHARS - 1, -1):
            if text.endswith(form[:length]):
                return text[:-length] + MASK
    return text


def mask(text: str | None, forms: tuple[str, ...]) -> str | None:
    if not text or not forms:
        return text
    for form in forms:
        if form in text:
            text = text.replace(form, MASK)
    return _cut_short(text, forms)


def masked(result: SendResult, forms: tuple[str, ...]) -> SendResult:
    """The result with every form of a secret cut out of its body and its error."""
    if not forms or not (result.body or result.error):
        return result
    body, error = mask(result.body, forms), mask(result.error, forms)
    if body == result.body and error == result.error:
        return result
    return dataclasses.replace(result, body=body or "", error=error)
