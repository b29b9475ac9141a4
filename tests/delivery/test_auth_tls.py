"""Each delivery authenticates, and its TLS connection is verified, against real servers on
127.0.0.1 started here: a sink that checks bearer, basic and header credentials; an OAuth2
token endpoint that counts its token requests and issues tokens that expire, with a sink that
takes only a current one; an HTTPS sink that wants a client certificate, with the CA and
every certificate made in the test. No secret appears in what the API shows of an attempt."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote_plus

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pipeline_console.delivery.base import system_config
from pipeline_console.delivery.service import deliver_due
from pipeline_console.delivery.vault import load_secrets
from pipeline_console.models import DownstreamSystem
from tests.delivery.test_delivery import add_system, attempts, deliveries, ingest
from tests.delivery.test_http_transport import free_port
from tests.support import message

pytestmark = pytest.mark.backends

BEARER, PASSWORD, API_KEY = "bearer-s3cret-1", "basic-s3cret-2", "header-s3cret-3"
CLIENT_ID, CLIENT_SECRET = "pipeline console", "client s3cret+4/="  # encoded as RFC 6749 says


# --- the servers ---

@dataclass
class Seen:
    path: str
    credential: str | None
    accepted: bool


@dataclass
class AuthServer:
    """POST /token: an OAuth2 token endpoint (client credentials, client authenticated with
    HTTP Basic). POST /bearer, /basic, /header: sinks that want those credentials. POST
    /oauth: a sink that takes only a token issued and not expired (`expire()`)."""

    expires_in: int = 60
    token_answer: tuple[int, dict] | None = None  # instead of a token: (status, body)
    refuse_all: bool = False  # /oauth refuses even a current token
    token_requests: int = 0
    scopes: list[str | None] = field(default_factory=list)
    current: set[str] = field(default_factory=set)
    issued: list[str] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def expire(self) -> None:
        with self.lock:
            self.current.clear()

    def refused(self, path: str) -> int:
        with self.lock:
            return sum(1 for seen in self.seen if seen.path == path and not seen.accepted)

    def accepted(self, path: str) -> list[str | None]:
        with self.lock:
            return [seen.credential for seen in self.seen if seen.path == path and seen.accepted]

    def token(self, authorization: str | None, form: dict) -> tuple[int, dict]:
        with self.lock:
            self.token_requests += 1
            self.scopes.append(form.get("scope", [None])[0])
            if self.token_answer is not None:
                return self.token_answer
            scheme, _, encoded = (authorization or "").partition(" ")
            pair = base64.b64decode(encoded).decode() if scheme == "Basic" else ""
            client_id, _, secret = pair.partition(":")
            if (form.get("grant_type") != ["client_credentials"]
                    or (unquote_plus(client_id), unquote_plus(secret)) != (CLIENT_ID,
                                                                          CLIENT_SECRET)):
                return 401, {"error": "invalid_client"}
            value = f"access-{self.token_requests}-{os.urandom(6).hex()}"
            self.current.add(value)
            self.issued.append(value)
            return 200, {"access_token": value, "token_type": "Bearer",
                         "expires_in": self.expires_in}

    def check(self, path: str, headers: dict) -> bool:
        authorization = headers.get("Authorization")
        with self.lock:
            if path == "/bearer":
                credential, ok = authorization, authorization == f"Bearer {BEARER}"
            elif path == "/basic":
                expected = base64.b64encode(f"svc:{PASSWORD}".encode()).decode()
                credential, ok = authorization, authorization == f"Basic {expected}"
            elif path == "/header":
                credential = headers.get("X-Api-Key")
                ok = credential == API_KEY and authorization is None
            else:
                credential = (authorization or "").removeprefix("Bearer ")
                ok = credential in self.current and not self.refuse_all
            self.seen.append(Seen(path, credential, ok))
        return ok


def serve(handler_owner: AuthServer, wrap: ssl.SSLContext | None = None) -> Iterator[str]:
    owner = handler_owner

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args: object) -> None:
            pass

        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers.get("content-length", 0)))
            if self.path == "/token":
                status, body = owner.token(self.headers.get("Authorization"),
                                           parse_qs(data.decode()))
            elif owner.check(self.path, dict(self.headers)):
                status, body = 200, {"ok": True}
            else:
                status, body = 401, {"error": "unauthorized"}
            self.answer(status, body)

        def do_GET(self) -> None:  # status queries: authenticated like the deliveries
            ok = owner.check("/oauth" if self.path.startswith("/status/oauth") else self.path,
                             dict(self.headers))
            self.answer(200 if ok else 401, {})

        def answer(self, status: int, body: dict) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128

        def finish_request(self, request: socket.socket, client_address: object) -> None:
            if wrap is None:
                return super().finish_request(request, client_address)
            raw = request.dup()
            try:
                request = wrap.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                # as nginx does (lingering close): our alert is sent, then the client's
                # bytes are read until it closes, so it reads the alert, not a reset
                try:
                    raw.shutdown(socket.SHUT_WR)
                    raw.settimeout(5)
                    while raw.recv(65536):
                        pass
                except OSError:
                    pass
                return None
            finally:
                raw.close()
            return super().finish_request(request, client_address)

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if wrap else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def auth_server() -> Iterator[tuple[AuthServer, str]]:
    owner = AuthServer()
    for base in serve(owner):
        yield owner, base


class Ticker:
    """The token cache's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ticker(client) -> Ticker:
    ticker = Ticker()
    client.app.state.deliverer.transports.tokens.monotonic = ticker
    return ticker


async def run(client, concurrency: int = 10) -> dict[str, int]:
    return await deliver_due(client.app.state.deliverer, limit=100, concurrency=concurrency)


def records(count: int, start: int = 0) -> list[dict]:
    return [{**message(1, entity_id=f"C-{n}"), "message_id": f"m-{n}"}
            for n in range(start, start + count)]


async def all_attempts(client) -> list[dict]:
    return [attempt for delivery in await deliveries(client, limit=200)
            for attempt in await attempts(client, delivery["id"])]


async def shows_no_secret(client, *extra: str) -> None:
    """No secret, nor anything made from one, in the attempts, the dead letters or the
    systems as the API shows them."""
    shown = json.dumps(await all_attempts(client)) + (await client.get("/api/v1/dlq")).text \
        + (await client.get("/api/v1/systems")).text
    for secret in (BEARER, PASSWORD, API_KEY, CLIENT_SECRET, *extra,
                   base64.b64encode(f"svc:{PASSWORD}".encode()).decode()):
        assert secret not in shown


def oauth(base: str, token_url: str | None = None, **settings) -> dict:
    return {"url": base + "/oauth", "auth": {
        "type": "oauth2_client_credentials", "token_url": token_url or base + "/token",
        "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "scope": "deliveries:write"},
        **settings}


# --- bearer, basic, header ---

async def test_bearer_basic_and_header_credentials_and_wrong_ones(client, auth_server) -> None:
    server, base = auth_server
    right = {"bearer": {"type": "bearer", "token": BEARER},
             "basic": {"type": "basic", "username": "svc", "password": PASSWORD},
             "header": {"type": "header", "name": "X-Api-Key", "value": API_KEY}}
    wrong = {"bearer": {"type": "bearer", "token": "not-it"},
             "basic": {"type": "basic", "username": "svc", "password": "not-it"},
             "header": {"type": "header", "name": "X-Api-Key", "value": "not-it"}}
    for kind in right:
        await add_system(client, name=f"{kind}-right", url=f"{base}/{kind}", auth=right[kind])
        await add_system(client, name=f"{kind}-wrong", url=f"{base}/{kind}", auth=wrong[kind])
    await ingest(client, message(1))
    assert await run(client) == {"recovered_as_ambiguous": 0, "claimed": 6, "delivered": 3,
                                 "dead_lettered": 3}
    status = {d["system"]: d["status"] for d in await deliveries(client)}
    assert status == {f"{kind}-{how}": "delivered" if how == "right" else "dead_lettered"
                      for kind in right for how in ("right", "wrong")}
    assert [len(server.accepted(f"/{kind}")) for kind in right] == [1, 1, 1]
    assert [server.refused(f"/{kind}") for kind in right] == [1, 1, 1]
    refused = [a for a in await all_attempts(client) if a["system"].endswith("-wrong")]
    assert {(a["response_status"], a["classification"], a["rule"]) for a in refused} == {
        (401, "permanent", "4xx")}
    await shows_no_secret(client)


# --- OAuth2 client credentials ---

async def test_one_token_request_serves_many_deliveries_until_it_expires(
        client, auth_server, ticker) -> None:
    server, base = auth_server
    server.expires_in = 300
    await add_system(client, **oauth(base))
    await ingest(client, *records(30))
    assert (await run(client, concurrency=15))["delivered"] == 30
    assert server.token_requests == 1, "thirty sends at once share one token request"
    assert server.scopes == ["deliveries:write"]
    [first] = server.issued
    assert server.accepted("/oauth") == [first] * 30

    # The token's life, less its margin (a tenth, at most a minute), runs out: the next send
    # fetches a new one before sending, so the sink never sees the expired one.
    ticker.now += 300 - 30 + 0.01
    server.expire()
    await ingest(client, *records(5, start=30))
    assert (await run(client))["delivered"] == 5
    assert server.token_requests == 2
    assert server.refused("/oauth") == 0
    assert server.accepted("/oauth")[30:] == [server.issued[1]] * 5
    await shows_no_secret(client, *server.issued)


async def test_a_token_refused_before_its_time_is_fetched_again_once(
        client, auth_server, ticker) -> None:
    server, base = auth_server
    await add_system(client, **oauth(base))
    await ingest(client, *records(1))
    assert (await run(client))["delivered"] == 1
    server.expire()  # revoked: the cache still holds it as current
    await ingest(client, *records(8, start=1))
    assert (await run(client, concurrency=8))["delivered"] == 8
    assert server.token_requests == 2, "eight 401s at once lead to one new token"
    assert server.refused("/oauth") == 8
    assert server.accepted("/oauth")[1:] == [server.issued[1]] * 8
    # each delivery is one attempt: the resend after the 401 is part of the same try
    assert len(await all_attempts(client)) == 9

    # Refused again with the new token: no second refetch; the 401 is the answer.
    server.refuse_all = True
    await ingest(client, *records(1, start=9))
    assert await run(client) == {"recovered_as_ambiguous": 0, "claimed": 1,
                                 "dead_lettered": 1}
    assert server.token_requests == 3
    [last] = [a for a in await all_attempts(client) if a["response_status"] == 401]
    assert (last["classification"], last["rule"]) == ("permanent", "4xx")
    await shows_no_secret(client, *server.issued)


async def test_status_queries_authenticate_as_deliveries_do(client, auth_server) -> None:
    server, base = auth_server
    await add_system(client, **oauth(base, status_url=base + "/status/oauth/{key}/{version}"))
    transports = client.app.state.deliverer.transports
    async with client.app.state.database.read() as session:
        row = await session.get(DownstreamSystem, "billing")
        held = await load_secrets(session, client.app.state.vault, ["billing"],
                                  now=client.app.state.clock())
    config = system_config(row, held.get("billing"))
    assert await transports.query_status(config, "customer:C-1", 1) == 200
    server.expire()
    assert await transports.query_status(config, "customer:C-1", 1) == 200
    assert server.token_requests == 2 and server.refused("/oauth") == 1


async def test_token_endpoint_down_is_transient_and_shown_in_the_attempt(
        client, auth_server) -> None:
    server, base = auth_server
    await add_system(client, **oauth(base, token_url=f"http://127.0.0.1:{free_port()}/token"))
    await ingest(client, message(1))
    assert (await run(client))["retry"] == 1
    [attempt] = await all_attempts(client)
    assert (attempt["classification"], attempt["rule"], attempt["response_status"]) == (
        "transient", "token_endpoint_unavailable", None)
    assert attempt["error"].startswith("token endpoint unreachable")
    assert server.seen == [], "the delivery itself was never sent"

    await client.patch("/api/v1/systems/billing", json=oauth(base))
    server.token_answer = (503, {"error": "temporarily_unavailable"})
    [delivery] = await deliveries(client)
    answer = await client.post(f"/api/v1/deliveries/{delivery['id']}/deliver")
    assert answer.status_code == 200, answer.text
    second = max(await all_attempts(client), key=lambda attempt: attempt["id"])
    assert (second["classification"], second["rule"]) == ("transient",
                                                          "token_endpoint_unavailable")
    assert second["error"] == "token endpoint answered 503: temporarily_unavailable"
    assert second["response_body"] == second["error"]
    await shows_no_secret(client)


async def test_token_endpoint_refusing_the_client_is_permanent(client, auth_server) -> None:
    server, base = auth_server
    await add_system(client, **oauth(base, auth={
        "type": "oauth2_client_credentials", "token_url": base + "/token",
        "client_id": CLIENT_ID, "client_secret": "the wrong one"}))
    await ingest(client, message(1))
    assert (await run(client))["dead_lettered"] == 1
    [attempt] = await all_attempts(client)
    assert (attempt["classification"], attempt["rule"]) == ("permanent",
                                                            "token_endpoint_refused")
    assert attempt["error"] == "token endpoint answered 401: invalid_client"
    [dead] = (await client.get("/api/v1/dlq")).json()["items"]
    assert dead["reason"] == ("permanent (token_endpoint_refused): token endpoint answered "
                              "401: invalid_client")
    assert server.seen == []
    await shows_no_secret(client, "the wrong one")


# --- TLS with a private CA and a client certificate ---

def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _certificate(name: str, key: ec.EllipticCurvePrivateKey, issuer: str,
                 signer: ec.EllipticCurvePrivateKey, usage: x509.ObjectIdentifier | None,
                 ) -> str:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=usage is None, path_length=None),
                              critical=True))
    if usage is None:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(signer, hashes.SHA256()).public_bytes(
        serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class Pki:
    ca: str
    client_cert: str
    client_key: str
    base: str


@pytest.fixture
def https_sink() -> Iterator[tuple[AuthServer, Pki]]:
    """An HTTPS sink (ssl.CERT_REQUIRED) whose certificate, and the client's, a CA made here
    signed. Its /bearer path still wants the bearer token."""
    ca_key, server_key, client_key = _key(), _key(), _key()
    ca = _certificate("Test CA", ca_key, "Test CA", ca_key, None)
    server_cert = _certificate("127.0.0.1", server_key, "Test CA", ca_key,
                               ExtendedKeyUsageOID.SERVER_AUTH)
    client_cert = _certificate("pipeline-console", client_key, "Test CA", ca_key,
                               ExtendedKeyUsageOID.CLIENT_AUTH)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as chain:
        chain.write(server_cert + _pem_key(server_key))
        chain.flush()
        context.load_cert_chain(chain.name)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=ca)
    owner = AuthServer()
    for base in serve(owner, wrap=context):
        yield owner, Pki(ca, client_cert, _pem_key(client_key), base)


async def test_https_with_a_private_ca_and_a_client_certificate(client, https_sink) -> None:
    server, pki = https_sink
    bearer = {"type": "bearer", "token": BEARER}
    await add_system(client, name="mtls", url=pki.base + "/bearer", auth=bearer, tls={
        "ca_bundle": pki.ca, "client_cert": pki.client_cert, "client_key": pki.client_key})
    await add_system(client, name="no-client-cert", url=pki.base + "/bearer", auth=bearer,
                     tls={"ca_bundle": pki.ca})
    await add_system(client, name="no-ca", url=pki.base + "/bearer", auth=bearer)
    await ingest(client, message(1))
    assert await run(client) == {"recovered_as_ambiguous": 0, "claimed": 3, "delivered": 1,
                                 "dead_lettered": 2}
    assert server.accepted("/bearer") == [f"Bearer {BEARER}"], "only mtls reached the sink"
    by_system = {a["system"]: a for a in await all_attempts(client)}
    assert (by_system["mtls"]["classification"], by_system["mtls"]["response_status"]) == (
        "success", 200)
    refused, unverified = by_system["no-client-cert"], by_system["no-ca"]
    assert (refused["classification"], refused["rule"]) == ("permanent", "tls_certificate")
    assert "refused the handshake" in refused["error"]
    assert "certificate" in refused["error"]
    assert (unverified["classification"], unverified["rule"]) == ("permanent",
                                                                  "tls_certificate")
    assert "could not be verified" in unverified["error"]
    reasons = {d["system"]: d["reason"] for d in (await client.get("/api/v1/dlq")).json()[
        "items"]}
    assert set(reasons) == {"no-client-cert", "no-ca"}
    assert all(reason.startswith("permanent (tls_certificate): TLS:")
               for reason in reasons.values())
    await shows_no_secret(client, pki.client_key.splitlines()[1])

