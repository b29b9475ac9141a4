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

from pipeline_console.delivery.oauth import AccessTokens, TokenEndpointError
from pipeline_console.delivery.policy import Failure, SendResult
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


@dataclass(frozen=True)
class DeliveryRequest:
    """Exactly what goes over the wire, the same for a first try, a retry and a replay."""

    delivery_id: int
    attempt_number: int
    idempotency_key: str
    version: int
    body: bytes
    headers: dict[str, str]

    def summary(self, system: SystemConfig) -> dict[str, Any]:
        return {
            "method": "POST",
            "url": system.url if system.transport == "http" else f"simulated:{system.name}",
            "headers": self.headers,
            "body_sha256": hashlib.sha256(self.body).hexdigest(),
            "body_bytes": len(self.body),
        }


def build_request(delivery: Any, attempt_number: int) -> DeliveryRequest:
    body = orjson.dumps(
        {
            "idempotency_key": delivery.idempotency_key,
            "version": delivery.version,
            "entity_type": delivery.entity_type,
            "entity_id": delivery.entity_id,
            "payload": delivery.payload,
            "correlation_id": delivery.correlation_id,
        }
    )
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": idempotency_header(delivery.idempotency_key, delivery.version),
    }
    return DeliveryRequest(delivery.id, attempt_number, delivery.idempotency_key,
                           delivery.version, body, headers)


# Header values are ASCII. Printable ASCII other than '%' passes unchanged, so the usual
# key "customer:C-100" is sent as is; anything else is percent-encoded (UTF-8).
_HEADER_SAFE = "".join(chr(code) for code in range(0x21, 0x7F) if chr(code) != "%")


def idempotency_header(key: str, version: int) -> str:
    return f"{quote(key, safe=_HEADER_SAFE)}:{version}"


def status_query_url(template: str, key: str, version: int) -> str:
    return template.replace("{key}", quote(key, safe="")).replace("{version}", str(version))


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
        if system.transport == "simulated":
            return simulate_send(system, request)
        return await self._post(system, request)

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
        if kind == "bearer":
            return {**headers, "Authorization": f"Bearer {secret}"}, None
        if kind == "basic":
            pair = f"{auth['username']}:{secret}".encode()
            return {**headers, "Authorization": "Basic " + base64.b64encode(pair).decode()}, None
        if kind == "header":
            return {**headers, auth["name"]: secret}, None
        raise TokenEndpointError(f"unknown auth type {kind!r}", Failure.TOKEN_REFUSED)

    async def _post(self, system: SystemConfig, request: DeliveryRequest) -> SendResult:
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
                sending = True
                status, content, retry_after = await self._exchange(system, request, headers)
                if status == 401 and token is not None:
                    # the token may have been revoked before its time: a new one, once
                    sending = False
                    headers, token = await self._authenticate(system, request.headers,
                                                              refused=token)
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
        except Exception as error:  # a request that could not even be built: never sent
            return SendResult(failure=Failure.NOT_SENT, error=_describe(error),
                              latency_ms=_since(started))
        body = content[:RESPONSE_EXCERPT_BYTES].decode("utf-8", errors="replace")
        return SendResult(status=status, body=body.replace("\x00", "\ufffd"),
                          retry_after_s=_retry_after(retry_after), latency_ms=_since(started))

    async def _exchange(self, system: SystemConfig, request: DeliveryRequest,
                        headers: Mapping[str, str]) -> tuple[int, bytes, str | None]:
        assert system.url is not None
        async with self.session.post(
                _as_sent(system.url), data=request.body, headers=headers,
                allow_redirects=False, ssl=_ssl_for(system, system.url),
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
