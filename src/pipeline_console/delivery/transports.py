"""How a delivery reaches a downstream system: real HTTP through one shared aiohttp session, or
a deterministic simulation for demos. Both answer with a SendResult; neither decides what
the result means (policy.classify does)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import random
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import yarl

from pipeline_console.delivery.mapping import MappingError, apply_template_to_text
from pipeline_console.delivery.masking import masked, secret_forms
from pipeline_console.delivery.oauth import AccessTokens, TokenEndpointError
from pipeline_console.delivery.policy import Failure, SendResult
from pipeline_console.delivery.schemas import BEARER_TOKEN, HEADER_VALUE
from pipeline_console.delivery.tls import certificate_problem, ssl_context

RESPONSE_EXCERPT_BYTES = 2048


@dataclass(frozen=True)
class SystemConfig:
    """A system's settings as one send needs them. `auth`, `signing` and `tls` are the
    stored (secret-free) settings; `secrets` holds their secrets in the clear, slot →
    value (vault.py's slots: auth, signing, signing_previous, tls_client_key), and is never
    printed."""

    name: str
    transport: str
    url: str | None
    status_url: str | None
    timeout_s: float
    simulation: dict[str, Any] | None
    method: str = "POST"
    headers: Mapping[str, str] = field(default_factory=dict)
    auth: Mapping[str, Any] | None = None
    signing: Mapping[str, Any] | None = None
    tls: Mapping[str, Any] | None = None
    body_template: str | None = None
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    # the slots whose secret this process's key cannot read (stored with another key)
    unreadable: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeliveryRequest:
    """Exactly what goes over the wire, the same for a first try, a retry and a replay.

    `url` is the system's URL with the record's values put in (None: the system's URL as
    it is); `unsendable`, when set, says why this request cannot be sent at all (its
    body_template failed on the record): a permanent failure, and nothing leaves.
    `body_template`, when set, is still to be applied to `body` (map_body, at send time). `shown`
    holds what the attempt's summary shows in place of the headers whose values are
    secrets (signing.sign adds them right before the send)."""

    delivery_id: int
    attempt_number: int
    idempotency_key: str
    version: int
    body: bytes
    headers: dict[str, str]
    method: str = "POST"
    url: str | None = None
    unsendable: str | None = None
    shown: Mapping[str, str] = field(default_factory=dict)
    body_template: str | None = None

    def summary(self, system: SystemConfig) -> dict[str, Any]:
        """What an attempt keeps of the request: no secret (auth and signature values are
        ***), and the body only by its hash and size."""
        summary: dict[str, Any] = {
            "method": self.method,
            "url": (self.url or system.url) if system.transport == "http"
            else f"simulated:{system.name}",
            "headers": {**self.headers, **secret_headers_shown(system), **self.shown},
            "body_sha256": hashlib.sha256(self.body).hexdigest(),
            "body_bytes": len(self.body),
        }
        if self.unsendable:
            summary["unsendable"] = self.unsendable
        return summary


def secret_headers_shown(system: SystemConfig) -> dict[str, str]:
    """The headers the system's auth adds (at send time, in the transport), as every reader
    sees them: the scheme, and *** in place of the credential."""
    auth = system.auth or {}
    kind = auth.get("type")
    if kind in ("bearer", "oauth2_client_credentials"):
        return {"Authorization": "Bearer ***"}
    if kind == "basic":
        return {"Authorization": "Basic ***"}
    if kind == "header" and auth.get("name"):
        return {auth["name"]: "***"}
    return {}


def default_body(delivery: Any) -> dict[str, Any]:
    """The body every delivery starts from (a body_template's input)."""
    return {
        "idempotency_key": delivery.idempotency_key,
        "version": delivery.version,
        "entity_type": delivery.entity_type,
        "entity_id": delivery.entity_id,
        "payload": delivery.payload,
        "correlation_id": delivery.correlation_id,
    }


def build_request(delivery: Any, attempt_number: int, system: SystemConfig | None = None,
                  *, map_now: bool = True) -> DeliveryRequest:
    """The request for one try of `delivery` to `system` (without one: POST of the default
    body to the system's URL as it is). The static headers come first, so the pipeline's
    own win. `map_now=False` leaves the body_template for map_body to apply at send time
    (outside the claim's transaction, as the send path does)."""
    headers: dict[str, str] = {}
    method, url, template = "POST", None, None
    if system is not None:
        method = system.method or "POST"
        if system.url is not None and "{" in system.url:
            url = render_url(system.url, delivery.entity_type, delivery.entity_id,
                             delivery.idempotency_key, delivery.version)
        if system.headers:
            headers.update(system.headers)
        template = system.body_template
    headers["Content-Type"] = "application/json"
    headers["Idempotency-Key"] = idempotency_header(delivery.idempotency_key, delivery.version)
    request = DeliveryRequest(delivery.id, attempt_number, delivery.idempotency_key,
                              delivery.version, orjson.dumps(default_body(delivery)), headers,
                              method, url, body_template=template or None)
    return map_body(request) if map_now else request


def changed(request: DeliveryRequest, **changes: Any) -> DeliveryRequest:
    """A copy of the request with `changes`: what dataclasses.replace does, in a tenth of
    its time (it runs twice per send on the hot path: mapping, signing)."""
    copy = object.__new__(DeliveryRequest)
    copy.__dict__.update(request.__dict__, **changes)
    return copy


def map_body(request: DeliveryRequest) -> DeliveryRequest:
    """The request with its body_template applied to its body. A template that fails on
    the record makes the request unsendable rather than raising: the delivery is then
    dead-lettered with jq's message."""
    if request.body_template is None:
        return request
    try:
        body = orjson.dumps(apply_template_to_text(request.body_template,
                                                   request.body.decode()))
    except MappingError as error:
        return changed(request, body=b"", body_template=None, unsendable=str(error))
    return changed(request, body=body, body_template=None)


def request_summary(delivery: Any, attempt_number: int, system: SystemConfig) -> dict[str, Any]:
    """What an attempt keeps of a request that was built but perhaps never signed or sent
    (a lost claim's)."""
    return build_request(delivery, attempt_number, system).summary(system)


def render_url(template: str, entity_type: str, entity_id: str, key: str,
               version: int) -> str:
    """A URL template with the record's values put in, each percent-encoded whole (a '/'
    in an id stays inside its path segment)."""
    return (template.replace("{entity_type}", quote(entity_type, safe=""))
            .replace("{entity_id}", quote(entity_id, safe=""))
            .replace("{key}", quote(key, safe=""))
            .replace("{version}", str(version)))


# Header values are ASCII. Printable ASCII other than '%' passes unchanged, so the usual
# key "customer:C-100" is sent as is; anything else is percent-encoded (UTF-8).
_HEADER_SAFE = "".join(chr(code) for code in range(0x21, 0x7F) if chr(code) != "%")


def idempotency_header(key: str, version: int) -> str:
    return f"{quote(key, safe=_HEADER_SAFE)}:{version}"


def status_query_url(template: str, key: str, version: int) -> str:
    """The status URL of one version (a key is "entity_type:entity_id")."""
    entity_type, _, entity_id = key.partition(":")
    return render_url(template, entity_type, entity_id, key, version)


class Transports:
    """The one object that sends. Built once per process (`Transports.open()`), with one
    shared aiohttp session: keep-alive connections, at most `max_connections` at once.

    aiohttp rather than httpx: posting the same bodies to the same local sink, a bare
    aiohttp loop spent 0.08 ms of CPU per request where a bare httpx loop spent 0.55 to 0.63
    (httpcore's pool checks every connection with a socket poll and getpeername on every
    request); the worker's sends were half of its CPU (bench/notes/67-delivery.md)."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.tokens = AccessTokens()  # OAuth2 access tokens, shared by this process's sends

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, *, max_connections: int = 100) -> AsyncIterator[Transports]:
        # No cookie jar: one delivery's answer must not change what the next one sends.
        # Not trust_env: it reads ~/.netrc (in a thread) and the proxy variables on every
        # request, a tenth of the worker's time in benchmark 6; deliveries go straight to
        # the systems' URLs, whatever HTTP(S)_PROXY says.
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections),
            cookie_jar=aiohttp.DummyCookieJar())
        async with session:
            yield cls(session)

    async def send(self, system: SystemConfig, request: DeliveryRequest) -> SendResult:
        """The answer, with the system's secrets (and the access tokens this send used) cut
        out of it before anyone records or logs it: a system may echo the request."""
        if system.transport == "simulated":
            return simulate_send(system, request)
        tokens: list[str] = []
        result = await self._post(system, request, tokens)
        return masked(result, secret_forms(system, tokens))

    def has_status_query(self, system: SystemConfig) -> bool:
        if system.transport == "simulated":
            return bool((system.simulation or {}).get("status_query"))
        return bool(system.status_url)

    async def query_status(self, system: SystemConfig, key: str, version: int) -> int | None:
        """The status query's HTTP status, or None when it gave no answer. It authenticates
        as the deliveries do (a 401 with an OAuth2 token: fetched again, asked again once)."""
        if system.transport == "simulated":
            return simulate_status_query(system)
        assert system.status_url is not None
        url = _as_sent(status_query_url(system.status_url, key, version))
        try:
            async with asyncio.timeout(total_deadline_s(system.timeout_s)):
                headers, token = await self._authenticate(system, {})
                status = await self._status_of(system, url, headers)
                if status == 401 and token is not None:
                    headers, token = await self._authenticate(system, {}, refused=token)
                    status = await self._status_of(system, url, headers)
                return status
        except Exception:  # no answer of any kind: the outcome stays ambiguous
            return None

    async def _status_of(self, system: SystemConfig, url: yarl.URL,
                         headers: Mapping[str, str]) -> int:
        async with self.session.get(url, headers=headers, allow_redirects=False,
                                    ssl=_ssl_for(system, str(url)),
                                    timeout=_phases(system.timeout_s)) as response:
            return response.status

    async def _authenticate(self, system: SystemConfig, headers: Mapping[str, str], *,
                            refused: str | None = None) -> tuple[Mapping[str, str], str | None]:
        """`headers` with the system's credentials, and the OAuth2 token among them (None for
        the other auth types). `refused`: the token the system has just answered 401 to."""
        auth = system.auth
        if not auth or auth.get("type") in (None, "none"):
            return headers, None
        kind = auth["type"]
        if kind == "oauth2_client_credentials":
            token = await self.tokens.token(self.session, system, replacing=refused)
            return {**headers, "Authorization": f"Bearer {token}"}, token
        secret = system.secrets.get("auth")
        if secret is None:
            raise TokenEndpointError(f"the {kind} secret could not be read (is "
                                     "PIPELINE_CONSOLE_SECRET_KEY set?)", Failure.NOT_SENT)
        if kind in ("bearer", "header") and not (
                BEARER_TOKEN if kind == "bearer" else HEADER_VALUE).fullmatch(secret):
            # stored before the API checked it: no retry can send it
            raise TokenEndpointError(
                f"the {kind} auth's {'token' if kind == 'bearer' else 'value'} holds "
                "characters a header value cannot carry (control characters, line breaks, "
                "text beyond ASCII); PATCH the system with a new one", Failure.UNSENDABLE)
        if kind == "bearer":
            return {**headers, "Authorization": f"Bearer {secret}"}, None
        if kind == "basic":
            pair = f"{auth['username']}:{secret}".encode()
            return {**headers, "Authorization": "Basic " + base64.b64encode(pair).decode()}, None
        if kind == "header":
            return {**headers, auth["name"]: secret}, None
        raise TokenEndpointError(f"unknown auth type {kind!r}", Failure.TOKEN_REFUSED)

    async def _post(self, system: SystemConfig, request: DeliveryRequest,
                    tokens: list[str]) -> SendResult:
        """`tokens` gathers the OAuth2 access tokens this send used."""
        assert system.url is not None
        started = time.perf_counter()
        sending = False  # whether the request has started on its way (a timeout then is not
        # "never sent")
        try:
            # The timeout bounds each phase (connecting, which includes waiting for a free
            # connection, and each read); the deadline bounds the whole exchange, so a
            # slowly dripping answer cannot outlive the delivery's lease. It holds for the
            # token fetches and the one resend after a 401 too.
            async with asyncio.timeout(total_deadline_s(system.timeout_s)):
                headers, token = (await self._authenticate(system, request.headers)
                                  if system.auth else (request.headers, None))
                tokens.extend([token] if token else [])
                sending = True
                status, content, retry_after = await self._exchange(system, request, headers)
                if status == 401 and token is not None:
                    # the token may have been revoked before its time: a new one, once
                    sending = False
                    headers, token = await self._authenticate(system, request.headers,
                                                              refused=token)
                    tokens.extend([token] if token else [])
                    sending = True
                    status, content, retry_after = await self._exchange(system, request,
                                                                        headers)
        except TokenEndpointError as error:
            return SendResult(failure=error.failure, error=str(error), body=str(error),
                              retry_after_s=_retry_after(error.retry_after),
                              latency_ms=_since(started))
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError,
                aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as error:
            # refused, unreachable, no such host, TLS handshake failed, no free connection
            # in time, a URL that cannot be requested: nothing reached the system
            problem = certificate_problem(error)
            if problem is not None:
                return SendResult(failure=Failure.CERTIFICATE, error=problem,
                                  latency_ms=_since(started))
            return SendResult(failure=Failure.NOT_SENT, error=_describe(error),
                              latency_ms=_since(started))
        except (aiohttp.ClientError, TimeoutError) as error:
            problem = certificate_problem(error)
            if problem is not None:
                # TLS 1.3: the server checks our certificate after we have written the
                # request, and refuses it on our first read; its application never saw it
                return SendResult(failure=Failure.CERTIFICATE, error=problem,
                                  latency_ms=_since(started))
            if not sending:  # the deadline passed while waiting for a token
                return SendResult(failure=Failure.TOKEN_UNAVAILABLE,
                                  error="token endpoint gave no answer in time",
                                  body="token endpoint gave no answer in time",
                                  latency_ms=_since(started))
            # a read timeout, a dropped connection, a malformed answer…: the request may
            # have arrived. Anything we cannot tell apart is treated the same way.
            return SendResult(failure=Failure.MAYBE_SENT, error=_describe(error),
                              latency_ms=_since(started))
        except ValueError as error:
            # aiohttp refusing what it was given (a header value with a line break, …)
            # before writing anything: never sent, and the same request fails every time
            return SendResult(failure=Failure.UNSENDABLE, error=_describe(error),
                              latency_ms=_since(started))
        except Exception as error:  # a request that could not even be built: never sent
            return SendResult(failure=Failure.NOT_SENT, error=_describe(error),
                              latency_ms=_since(started))
        body = content[:RESPONSE_EXCERPT_BYTES].decode("utf-8", errors="replace")
        return SendResult(status=status, body=body.replace("\x00", "\ufffd"),
                          retry_after_s=_retry_after(retry_after), latency_ms=_since(started))

    async def _exchange(self, system: SystemConfig, request: DeliveryRequest,
                        headers: Mapping[str, str]) -> tuple[int, bytes, str | None]:
        assert system.url is not None
        url = request.url or system.url
        async with self.session.request(
                request.method, _as_sent(url), data=request.body, headers=headers,
                allow_redirects=False, ssl=_ssl_for(system, url),
                timeout=_phases(system.timeout_s)) as response:
            content = await response.read()
            return response.status, content, response.headers.get("retry-after")


def _ssl_for(system: SystemConfig, url: str) -> ssl.SSLContext | bool:
    """The system's own TLS context for an https URL with tls settings (its CA bundle, its
    client certificate); else aiohttp's default, which verifies against the machine's
    store. Verification is never off."""
    tls = system.tls
    if not tls or not url.startswith("https"):
        return True
    return ssl_context(tls.get("ca_bundle"), tls.get("client_cert"),
                       system.secrets.get("tls_client_key") if tls.get("client_cert") else None)


# What a URL may hold as it is: the reserved characters, and '%' (an escape already made).
_URL_SAFE = ":/?#[]@!$&'()*+,;=%"


def _as_sent(url: str) -> yarl.URL:
    """The URL as written, with only what may not appear in one escaped (a space, text
    beyond ASCII). yarl would otherwise normalise it: a key's "%3A" sent as ":"."""
    return yarl.URL(quote(url, safe=_URL_SAFE), encoded=True)


def _phases(timeout_s: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_connect=timeout_s,
                                 sock_read=timeout_s)


def _since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"[:500]


def total_deadline_s(timeout_s: float) -> float:
    return 2 * timeout_s + 1


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(moment.timestamp() - time.time(), 0.0)


# --- the simulated transport (named as such: a stand-in for a system that is not there) ---

DEFAULT_OUTCOMES = {"success": 1.0}


def simulate_send(system: SystemConfig, request: DeliveryRequest) -> SendResult:
    """Deterministic: the same system seed, delivery and attempt number give the same result.

    simulation = {"seed": 7, "outcomes": {"success": 0.7, "transient": 0.2,
                  "permanent": 0.05, "ambiguous": 0.05}, "latency_ms": 5,
                  "status_query": "applied" | "not_applied" | "unavailable" | null}
    """
    simulation = system.simulation or {}
    rng = random.Random(f"{simulation.get('seed', 0)}:{request.delivery_id}:"
                        f"{request.attempt_number}")
    outcomes = simulation.get("outcomes") or DEFAULT_OUTCOMES
    roll, outcome = rng.random() * sum(outcomes.values()), "success"
    for name, weight in outcomes.items():
        if roll < weight:
            outcome = name
            break
        roll -= weight
    latency = float(simulation.get("latency_ms", 1))
    if outcome == "transient":
        return SendResult(status=503, body="simulated: unavailable", latency_ms=latency)
    if outcome == "permanent":
        return SendResult(status=422, body="simulated: rejected", latency_ms=latency)
    if outcome == "ambiguous":
        return SendResult(failure=Failure.MAYBE_SENT, error="simulated: timed out after sending",
                          latency_ms=latency)
    return SendResult(status=200, body="simulated: ok", latency_ms=latency)


def simulate_status_query(system: SystemConfig) -> int | None:
    answer = (system.simulation or {}).get("status_query")
    return {"applied": 200, "not_applied": 404}.get(answer)
