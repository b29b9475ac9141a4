"""OAuth2 client credentials (RFC 6749 §4.4): the access token a system's sends carry, fetched
from its token endpoint and kept in this process until shortly before it expires.

The client authenticates with HTTP Basic (RFC 6749 §2.3.1: client_id and client_secret, each
form-urlencoded, joined by ':' and base64-encoded), the way every authorization server must
accept; the form body holds only grant_type and scope. One fetch at a time per token: every
send that needs a token while one is being fetched waits for that same fetch, so a worker
sending a hundred deliveries at once asks the endpoint once, not a hundred times.

Neither the client secret nor a token is ever part of an error message: what the endpoint
answered is reduced to its status and its OAuth error fields (RFC 6749 §5.2), with the
secret cut out should the endpoint echo it.

The token endpoint is reached with the machine's own trust store: a system's tls settings
(its CA bundle, its client certificate) are for the system, and an authorization server is
usually another host."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import orjson

from pipeline_console.delivery.policy import Failure
from pipeline_console.delivery.tls import certificate_problem

# Statuses of the token endpoint that a later try may well not get again.
TRANSIENT_TOKEN_STATUSES = frozenset({408, 425, 429})
# Without expires_in a token is kept until the system refuses it, but never beyond this.
DEFAULT_LIFETIME_S = 3600.0
MAX_ERROR_CHARS = 300


class TokenEndpointError(Exception):
    """The token endpoint gave no token. `failure` says whether a retry may help
    (TOKEN_UNAVAILABLE, NOT_SENT) or not (TOKEN_REFUSED, CERTIFICATE); the message is safe
    to show."""

    def __init__(self, message: str, failure: Failure, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.failure = failure
        self.retry_after = retry_after  # the endpoint's Retry-After header, as it came


@dataclass(frozen=True)
class _Token:
    value: str
    renew_at: float  # on the cache's monotonic clock


Key = tuple[str, str, str, str, str]


def margin_s(expires_in: float) -> float:
    """How long before its expiry a token is renewed: a send must not leave with a token that
    runs out on its way. A tenth of its life, at most a minute (a 2-second token is renewed
    after 1.8 s, an hour's token after 59 minutes)."""
    return min(60.0, expires_in / 10)


def client_basic(client_id: str, client_secret: str) -> str:
    pair = f"{quote_plus(client_id)}:{quote_plus(client_secret)}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


class AccessTokens:
    """The tokens of one process, per (system, token_url, client_id, scope, fingerprint of
    the client secret): a changed secret or endpoint gets a token of its own. `monotonic` is
    the clock expiry is measured on (tests pass one they control)."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.monotonic = monotonic
        self._tokens: dict[Key, _Token] = {}
        self._fetches: dict[Key, asyncio.Task[_Token]] = {}
        self.fetches = 0  # token requests made by this process

    async def token(self, session: aiohttp.ClientSession, system: Any, *,
                    replacing: str | None = None) -> str:
        """A current token for `system` (a SystemConfig with an oauth2 auth). `replacing`:
        the token the system has just refused (a 401); a token other than that one, already
        fetched by a send that saw the same 401, is good, else one fetch is made (once for
        all the sends that saw it)."""
        key = cache_key(system)
        held = self._tokens.get(key)
        if held is not None and held.value != replacing and held.renew_at > self.monotonic():
            return held.value
        if held is not None and held.value == replacing:
            del self._tokens[key]  # refused: no send may take it again
        fetch = self._fetches.get(key)
        if fetch is None:
            fetch = asyncio.create_task(self._fetch(session, system, key))
            self._fetches[key] = fetch
            fetch.add_done_callback(lambda done: self._forget(key, done))
        # shielded: a send that gives up (its deadline) does not cancel the others' fetch
        return (await asyncio.shield(fetch)).value

    def _forget(self, key: Key, done: asyncio.Task[_Token]) -> None:
        if self._fetches.get(key) is done:
            del self._fetches[key]
        if not done.cancelled():
            done.exception()  # retrieved: a failed fetch nobody awaited any more is not logged

    async def _fetch(self, session: aiohttp.ClientSession, system: Any, key: Key) -> _Token:
        auth: Mapping[str, Any] = system.auth
        secret = system.secrets.get("auth")
        if secret is None:
            raise TokenEndpointError("the client secret could not be read (is "
                                     "PIPELINE_CONSOLE_SECRET_KEY set?)", Failure.NOT_SENT)
        form = {"grant_type": "client_credentials"}
        if auth.get("scope"):
            form["scope"] = auth["scope"]
        asked = self.monotonic()  # before asking: the token's life is counted from here
        self.fetches += 1
        timeout = aiohttp.ClientTimeout(total=None, connect=system.timeout_s,
                                        sock_connect=system.timeout_s,
                                        sock_read=system.timeout_s)
        try:
            async with asyncio.timeout(2 * system.timeout_s + 1), session.post(
                    auth["token_url"], data=form, allow_redirects=False,
                    timeout=timeout,
                    headers={"Authorization": client_basic(auth["client_id"], secret),
                             "Accept": "application/json"}) as response:
                content = await response.read()
                status, retry_after = response.status, response.headers.get("retry-after")
        except aiohttp.ClientError as error:
            problem = certificate_problem(error)
            if problem is not None:
                raise TokenEndpointError(f"token endpoint: {problem}",
                                         Failure.CERTIFICATE) from None
            raise TokenEndpointError(f"token endpoint unreachable: {type(error).__name__}: "
                                     f"{error}"[:500],
                                     Failure.TOKEN_UNAVAILABLE) from None
        except TimeoutError:
            raise TokenEndpointError("token endpoint gave no answer in time",
                                     Failure.TOKEN_UNAVAILABLE) from None
        if not 200 <= status < 300:
            failure = (Failure.TOKEN_UNAVAILABLE if status in TRANSIENT_TOKEN_STATUSES
                       or 500 <= status < 600 else Failure.TOKEN_REFUSED)
            raise TokenEndpointError(
                f"token endpoint answered {status}: {_reason(content, secret)}", failure,
                retry_after)
        try:
            answer = orjson.loads(content)
            value = answer["access_token"]
            lifetime = float(answer.get("expires_in") or DEFAULT_LIFETIME_S)
            kind = str(answer.get("token_type") or "bearer")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise TokenEndpointError(f"token endpoint answered {status} without an "
                                     "access_token (JSON with access_token expected)",
                                     Failure.TOKEN_REFUSED) from None
        if not isinstance(value, str) or not value or not value.isascii() or \
                not value.isprintable():
            raise TokenEndpointError(f"token endpoint answered {status} with an access_token "
                                     "that cannot be sent in a header", Failure.TOKEN_REFUSED)
        if kind.lower() != "bearer":
            raise TokenEndpointError(f"token endpoint issued a {kind[:40]!r} token; only "
                                     "bearer tokens are supported", Failure.TOKEN_REFUSED)
        token = _Token(value, asked + lifetime - margin_s(lifetime))
        for other in [held for held in self._tokens if held[0] == key[0] and held != key]:
            del self._tokens[other]  # the system's earlier settings: not used again
        self._tokens[key] = token
        return token


def cache_key(system: Any) -> Key:
    auth = system.auth
    secret = system.secrets.get("auth") or ""
    return (system.name, auth["token_url"], auth["client_id"], auth.get("scope") or "",
            hashlib.sha256(secret.encode()).hexdigest()[:16])


def _reason(content: bytes, secret: str) -> str:
    """What the endpoint said, as RFC 6749 §5.2 has it ("invalid_client: …"), or an excerpt
    of its body; never the secret, should it be echoed."""
    text = content[:2048].decode("utf-8", errors="replace")
    try:
        answer = orjson.loads(content)
    except orjson.JSONDecodeError:
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        text = answer["error"] + (f": {answer['error_description']}"
                                  if isinstance(answer.get("error_description"), str) else "")
    for shown in {secret, quote_plus(secret)}:
        if shown:
            text = text.replace(shown, "***")
    return " ".join(text.split())[:MAX_ERROR_CHARS] or "(empty body)"
