"""No secret leaks: after each kind of secret is set and deliveries are sent with them, every
API answer a viewer, an operator and an admin can get, every console page, every log line
and every audit row is searched for each secret (and its base64, and the Basic header made
of it), and none is found. The walk is driven by the app's own routes, so a route added
later is walked too."""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from pipeline_console.models import AuditEvent
from tests.conftest import make_token
from tests.console.test_headers import console_pages
from tests.console.test_sessions import browser_for, sign_in
from tests.delivery.test_delivery import ingest, run_pass
from tests.support import message

pytestmark = pytest.mark.backends

KEY = "customer:C-100"
PATH_PARAMETER = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")


def client_certificate() -> tuple[str, str]:
    """A real key and a self-signed certificate for it, made here."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pipeline-client")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=30))
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode())


def forbidden_forms(values: dict[str, str], username: str) -> dict[str, str]:
    """Each secret as it might show up: itself, its base64 (standard and URL-safe), and for
    the basic password the Authorization header value made of it."""
    forms = {}
    for kind, value in values.items():
        forms[kind] = value
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            forms[f"{kind} ({encode.__name__})"] = encode(value.encode()).decode().rstrip("=")
    basic = base64.b64encode(f"{username}:{values['basic password']}".encode()).decode()
    forms["Basic authorization"] = basic.rstrip("=")
    return forms


def secrets_in(text: str, forms: dict[str, str]) -> list[str]:
    return [kind for kind, form in forms.items() if form in text]


def fill(path: str, values: dict[str, list[str]]) -> list[str]:
    """Every concrete path of a route template with its parameters taken from existing data
    (a parameter with no data of its own gets a few plausible values: a 404 is an answer
    too)."""
    paths = [path]
    for name in PATH_PARAMETER.findall(path):
        candidates = values.get(name) or values["*"]
        paths = [PATH_PARAMETER.sub(lambda _, c=c: c, p, count=1)
                 for p in paths for c in candidates]
    return paths


def get_routes(app, api: bool) -> list[str]:
    if api:
        return sorted(path for path, methods in app.openapi()["paths"].items()
                      if "get" in methods)
    return console_pages(app)


async def set_every_kind_of_secret(client, sink, values: dict[str, str], username: str,
                                   cert: str) -> dict[str, str]:
    url = sink.base + "/receive"
    systems = {
        "s-bearer": {"auth": {"type": "bearer", "token": values["bearer token"]}},
        "s-basic": {"auth": {"type": "basic", "username": username,
                             "password": values["basic password"]}},
        "s-header": {"auth": {"type": "header", "name": "X-Api-Key",
                              "value": values["header value"]}},
        "s-oauth": {"auth": {"type": "oauth2_client_credentials",
                             "token_url": sink.base + "/token", "client_id": "pipeline",
                             "client_secret": values["oauth2 client secret"]}},
        "s-signed": {},
        "s-tls": {"tls": {"client_cert": cert, "client_key": values["tls client key"]}},
    }
    for name, settings in systems.items():
        answer = await client.post("/api/v1/systems", json={
            "name": name, "transport": "http", "url": url, "entity_types": ["customer"],
            "max_attempts": 1, **settings})
        assert answer.status_code == 201, answer.text
    patched = await client.patch("/api/v1/systems/s-signed", json={
        "signing": {"scheme": "standard-webhooks", "secret": values["signing secret"]}})
    assert patched.status_code == 200, patched.text
    rotated = await client.post("/api/v1/systems/s-signed/signing/rotate",
                                json={"overlap_s": 3600})
    assert rotated.status_code == 200, rotated.text
    return {"rotated signing secret": rotated.json()["secret"]}


async def test_no_secret_shows_anywhere(client, database, sink, caplog, capsys) -> None:
    caplog.set_level(logging.DEBUG)
    cert, key_pem = client_certificate()
    username = "svc-" + secrets.token_hex(4)
    values = {
        "bearer token": "brr-" + secrets.token_hex(16),
        "basic password": "pw-" + secrets.token_hex(16),
        "header value": "hdr-" + secrets.token_hex(16),
        "oauth2 client secret": "oas-" + secrets.token_hex(16),
        "signing secret": "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
        "tls client key": key_pem,
    }
    values |= await set_every_kind_of_secret(client, sink, values, username, cert)
    forms = forbidden_forms(values, username)
    for kind in ("signing secret", "rotated signing secret"):  # the key without its prefix
        forms[f"{kind} (key)"] = values[kind].removeprefix("whsec_")
    body = "".join(key_pem.splitlines()[1:-1])
    forms["tls client key (body)"] = body[len(body) // 3: len(body) // 3 + 40]

    await ingest(client, message(1), message(1, entity_id="C-101"))
    await run_pass(client)
    answers: list[tuple[str, int, str]] = []
    for name in ("s-bearer", "s-basic", "s-header", "s-oauth", "s-signed", "s-tls"):
        preview = await client.post(f"/api/v1/systems/{name}/preview", json={"key": KEY})
        answers.append((f"POST preview {name}", preview.status_code, preview.text))

    deliveries = (await client.get("/api/v1/deliveries?limit=500")).json()["items"]
    assert deliveries, "nothing was delivered: the walk would prove little"
    ids = {name: [str(item["id"]) for item in (await client.get(path)).json()["items"]][:3]
           for name, path in (("ambiguous_id", "/api/v1/ambiguous"),
                              ("dead_letter_id", "/api/v1/dlq"),
                              ("request_id", "/api/v1/replays"),
                              ("anomaly_id", "/api/v1/anomalies"))
           if (await client.get(path)).status_code == 200}
    names = ["s-bearer", "s-basic", "s-header", "s-oauth", "s-signed", "s-tls"]
    fillers = {"name": names, "system": names, "key": [KEY],
               "delivery_id": [str(item["id"]) for item in deliveries],
               "*": ["1", "s-basic", KEY], **{k: v for k, v in ids.items() if v}}

    tokens = {role: await make_token(database, role, name=f"leak-{role}")
              for role in ("viewer", "operator")}
    api_routes = get_routes(client.app, api=True)
    assert "/api/v1/systems/{name}" in api_routes and "/api/v1/audit" in api_routes
    for role, token in (*tokens.items(), ("admin", None)):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        for route in api_routes:
            for path in fill(route, fillers):
                answer = await client.get(path, headers=headers)
                assert answer.status_code < 500, (role, path, answer.text[:300])
                answers.append((f"{role} GET {path}", answer.status_code, answer.text))
    shown = [text for where, status, text in answers if "/systems/s-" in where
             and status == 200 and "GET" in where]
    assert any('"secret_set":true' in text.replace(" ", "") for text in shown)

    admin = await make_token(database, "admin", name="leak-console-admin")
    console_routes = get_routes(client.app, api=False)
    assert "/systems/{name}" in console_routes
    async with browser_for(client.app) as browser:
        await sign_in(browser, token=admin)
        for route in console_routes:
            for path in fill(route, fillers):
                page = await browser.get(path)
                assert page.status_code < 500, (path, page.text[:300])
                answers.append((f"console {path}", page.status_code, page.text))

    async with database.read() as session:
        rows = (await session.execute(select(AuditEvent))).scalars().all()
        audit = [json.dumps(row.details) for row in rows]
    assert {row.subject_id for row in rows if row.action == "system.created"} >= set(names)
    captured = capsys.readouterr()
    logs = [("log records", caplog.text), ("stdout (the access log)", captured.out),
            ("stderr", captured.err)]
    assert "/api/v1/systems" in captured.out  # the access log was captured

    leaks = [(where, found) for where, _, text in answers
             if (found := secrets_in(text, forms))]
    leaks += [(f"audit row {i}", found) for i, details in enumerate(audit)
              if (found := secrets_in(details, forms))]
    leaks += [(where, found) for where, text in logs if (found := secrets_in(text, forms))]
    assert leaks == [], leaks
    assert len(answers) > 100  # the walk really walked
