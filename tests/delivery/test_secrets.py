"""The systems' secrets at rest: encrypted with PIPELINE_CONSOLE_SECRET_KEY, fingerprinted,
re-encrypted by `secrets rotate-key`; serve and worker (real processes) refuse to start when
the key cannot read them or a URL still holds credentials; `migrate` moves such credentials
into auth; the URLs of rows written before this release are shown with ***@."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select, update

from pipeline_console.app import create_app
from pipeline_console.audit.service import AuditEntry, append_audit
from pipeline_console.config import Settings
from pipeline_console.delivery.startup import StartupRefused, check_connections
from pipeline_console.delivery.vault import KeyProblem, Vault, check_readable, load_secrets
from pipeline_console.models import AuditEvent, DeliveryAttempt, DownstreamSystem, SystemSecret
from tests.conftest import TEST_SECRET_KEY, make_token
from tests.delivery.test_delivery import add_system, ingest, run_pass
from tests.sink import Answer
from tests.support import message

pytestmark = pytest.mark.backends

TOKEN = "tok-" + "7c1f0e9a5b3d4c2e8f6a"
PASSWORD = "pw-" + "e41b9d2c7a8f3e6b"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_cli(database_url: str, *args: str, key: str | None = TEST_SECRET_KEY,
            new_key: str | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    """The command as an admin runs it: its own process, its settings in the environment."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("PIPELINE_CONSOLE_SECRET_KEY", "PIPELINE_CONSOLE_NEW_SECRET_KEY")}
    env["PIPELINE_CONSOLE_DATABASE_URL"] = database_url
    if key is not None:
        env["PIPELINE_CONSOLE_SECRET_KEY"] = key
    if new_key is not None:
        env["PIPELINE_CONSOLE_NEW_SECRET_KEY"] = new_key
    return subprocess.run([sys.executable, "-m", "pipeline_console.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


async def cli(database_url: str, *args: str, **options) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(run_cli, database_url, *args, **options)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """What stderr says to a person (serve's structured log lines, from the schema
    migration, are the log's)."""
    return [line for line in result.stderr.splitlines()
            if line.strip() and not line.startswith('{"event"')]


async def add_secret_system(client, name: str = "ledger", token: str = TOKEN) -> dict:
    answer = await client.post("/api/v1/systems", json={
        "name": name, "transport": "http", "url": "http://127.0.0.1:9/in",
        "entity_types": ["customer"], "auth": {"type": "bearer", "token": token}})
    assert answer.status_code == 201, answer.text
    return answer.json()


async def put_credentials_in_url(database, name: str, url: str) -> None:
    """What a database from before auth existed holds (the API refuses such a URL now)."""
    async with database.transaction() as session:
        await session.execute(update(DownstreamSystem).where(DownstreamSystem.name == name)
                              .values(url=url))


@pytest.fixture
async def keyless_client(database_url, database, clock) -> AsyncIterator[httpx.AsyncClient]:
    """An admin's client of a server started without PIPELINE_CONSOLE_SECRET_KEY."""
    app = create_app(Settings(database_url=database_url, secret_key=None), database=database,
                     clock=clock)
    token = await make_token(database, "admin", name="keyless-admin", now=clock.now)
    async with (app.router.lifespan_context(app),
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                  headers={"Authorization": f"Bearer {token}"}) as client):
        yield client


class TestStoringSecrets:
    async def test_a_secret_given_to_a_server_without_a_key_is_refused_naming_its_field(
            self, keyless_client, database) -> None:
        answer = await keyless_client.post("/api/v1/systems", json={
            "name": "ledger", "transport": "http", "url": "http://127.0.0.1:9/in",
            "auth": {"type": "bearer", "token": TOKEN}})
        assert answer.status_code == 422, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert [error["field"] for error in answer.json()["errors"]] == ["auth.token"]
        assert "PIPELINE_CONSOLE_SECRET_KEY" in answer.text and TOKEN not in answer.text
        plain = await keyless_client.post("/api/v1/systems", json={
            "name": "ledger", "transport": "http", "url": "http://127.0.0.1:9/in"})
        assert plain.status_code == 201  # without a secret, no key is needed
        signing = await keyless_client.patch("/api/v1/systems/ledger", json={
            "signing": {"scheme": "standard-webhooks",
                        "secret": "whsec_" + base64.b64encode(b"k" * 24).decode()}})
        assert signing.status_code == 422
        assert [error["field"] for error in signing.json()["errors"]] == ["signing.secret"]
        async with database.read() as session:
            assert (await session.execute(select(SystemSecret))).scalars().all() == []

    async def test_the_stored_ciphertext_never_holds_the_value(self, client, database) -> None:
        await add_secret_system(client)
        await client.post("/api/v1/systems", json={
            "name": "crm", "transport": "http", "url": "http://127.0.0.1:9/in",
            "auth": {"type": "basic", "username": "svc", "password": PASSWORD}})
        async with database.read() as session:
            rows = (await session.execute(select(SystemSecret))).scalars().all()
            clear = await load_secrets(session, Vault(TEST_SECRET_KEY), ["ledger", "crm"])
        assert clear == {"ledger": {"auth": TOKEN}, "crm": {"auth": PASSWORD}}
        for row in rows:
            for value in (TOKEN, PASSWORD):
                for form in (value, base64.b64encode(value.encode()).decode(),
                             base64.urlsafe_b64encode(value.encode()).decode()):
                    assert form not in row.ciphertext
                    assert form not in row.fingerprint

    async def test_fingerprints_tell_values_apart_and_the_same_value_alike(self, client) -> None:
        first = await add_secret_system(client, "a", token=TOKEN)
        same = await add_secret_system(client, "b", token=TOKEN)
        other = await add_secret_system(client, "c", token=TOKEN + "x")
        fingerprints = [body["auth"]["token"]["fingerprint"] for body in (first, same, other)]
        assert fingerprints[0] == fingerprints[1] != fingerprints[2]
        assert all(len(value) == 12 and TOKEN not in value for value in fingerprints)


class TestTheKeyCommands:
    async def test_new_key_prints_a_usable_key_on_its_last_line(self, database_url) -> None:
        results = [await cli(database_url, "secrets", "new-key", key=None) for _ in range(2)]
        keys = [result.stdout.strip().splitlines()[-1] for result in results]
        assert all(result.returncode == 0 for result in results)
        assert keys[0] != keys[1]
        vault = Vault(keys[0])
        assert vault.decrypt(vault.encrypt("a value")) == "a value"
        Fernet(keys[1])  # a Fernet key, as the variable's documentation says

    async def test_rotate_key_re_encrypts_everything_and_keeps_the_fingerprints(
            self, client, database, database_url) -> None:
        await add_secret_system(client, "ledger")
        signed = await client.post("/api/v1/systems/ledger/signing/rotate",
                                   json={"overlap_s": 3600})
        assert signed.status_code == 200, signed.text
        await client.post("/api/v1/systems/ledger/signing/rotate", json={"overlap_s": 3600})
        before = (await client.get("/api/v1/systems/ledger")).json()
        async with database.read() as session:
            old_clear = await load_secrets(session, Vault(TEST_SECRET_KEY), ["ledger"])
        assert set(old_clear["ledger"]) == {"auth", "signing", "signing_previous"}
        new_key = Fernet.generate_key().decode()

        result = await cli(database_url, "secrets", "rotate-key", new_key=new_key)
        assert result.returncode == 0, result.stderr
        assert "re-encrypted 3 secrets" in result.stdout

        async with database.read() as session:
            with pytest.raises(KeyProblem, match="cannot read 3 of the 3"):
                await check_readable(session, Vault(TEST_SECRET_KEY))
            assert await check_readable(session, Vault(new_key)) == 3
            assert await load_secrets(session, Vault(new_key), ["ledger"]) == old_clear
        after = (await client.get("/api/v1/systems/ledger")).json()
        assert after["auth"] == before["auth"] and after["signing"] == before["signing"]

    async def test_rotate_key_refuses_without_both_keys_or_with_the_wrong_one(
            self, client, database, database_url) -> None:
        await add_secret_system(client)
        async with database.read() as session:
            stored = {row.slot: row.ciphertext for row in
                      (await session.execute(select(SystemSecret))).scalars()}
        new_key = Fernet.generate_key().decode()
        for options in ({}, {"key": None, "new_key": new_key},
                        {"key": Fernet.generate_key().decode(), "new_key": new_key},
                        {"new_key": "not a key"}):
            result = await cli(database_url, "secrets", "rotate-key", **options)
            assert result.returncode == 1, (options, result.stdout, result.stderr)
            assert len(error_lines(result)) == 1, result.stderr
            assert error_lines(result)[0].startswith("error: ")
        async with database.read() as session:
            assert {row.slot: row.ciphertext for row in
                    (await session.execute(select(SystemSecret))).scalars()} == stored


def _start(database_url: str, command: str, key: str | None) -> subprocess.CompletedProcess:
    args = ["serve", "--port", str(_free_port())] if command == "serve" else ["worker"]
    # a process that wrongly starts runs until the timeout: the test then fails
    return run_cli(database_url, *args, key=key, timeout=60)


@pytest.mark.parametrize("command", ["worker", "serve"])
class TestRefusingToStart:
    async def test_when_the_key_cannot_read_a_stored_secret(
            self, client, database_url, command) -> None:
        await add_secret_system(client)
        result = await asyncio.to_thread(_start, database_url, command,
                                         Fernet.generate_key().decode())
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert len(error_lines(result)) == 1, result.stderr
        [line] = error_lines(result)
        assert "PIPELINE_CONSOLE_SECRET_KEY cannot read 1 of the 1 secrets" in line
        assert "ledger.auth" in line

    async def test_when_the_key_is_missing_but_secrets_exist(
            self, client, database_url, command) -> None:
        await add_secret_system(client)
        result = await asyncio.to_thread(_start, database_url, command, None)
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert len(error_lines(result)) == 1, result.stderr
        [line] = error_lines(result)
        assert "holds 1 secrets" in line and "PIPELINE_CONSOLE_SECRET_KEY is not set" in line

    async def test_when_a_url_still_holds_credentials(
            self, client, database, database_url, command) -> None:
        await add_system(client, url="http://127.0.0.1:9/in")
        await put_credentials_in_url(database, "billing", f"http://svc:{PASSWORD}@127.0.0.1:9/in")
        result = await asyncio.to_thread(_start, database_url, command, TEST_SECRET_KEY)
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert len(error_lines(result)) == 1, result.stderr
        [line] = error_lines(result)
        assert "hold credentials (billing)" in line and "pipeline-console migrate" in line
        assert PASSWORD not in result.stderr + result.stdout
        async with database.read() as session:  # refusing changed nothing
            system = await session.get(DownstreamSystem, "billing")
            assert system.url == f"http://svc:{PASSWORD}@127.0.0.1:9/in"


NOT_A_KEY = "not-a-fernet-key-" + "5b0c9e2d41"


@pytest.mark.parametrize("command", ["serve", "worker", "consume"])
async def test_a_malformed_key_is_refused_at_start_up_on_a_database_without_secrets(
        database_url, command) -> None:
    # nothing stored yet: without the check, the key would fail only at the first secret
    args = {"serve": ["serve", "--port", str(_free_port())], "worker": ["worker"],
            "consume": ["consume", "amqp://guest:guest@127.0.0.1:5672/",
                        "--queue", "never-declared-malformed-key"]}[command]
    result = await cli(database_url, *args, key=NOT_A_KEY, timeout=60)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    [line] = error_lines(result)
    assert line.startswith("error: PIPELINE_CONSOLE_SECRET_KEY is not a key"), line
    assert "secrets new-key" in line
    assert NOT_A_KEY not in result.stderr + result.stdout


async def test_a_malformed_key_is_named_as_such_when_secrets_are_stored(
        client, database) -> None:
    await add_secret_system(client)
    async with database.read() as session:
        with pytest.raises(StartupRefused, match="PIPELINE_CONSOLE_SECRET_KEY is not a key"):
            await check_connections(database, Vault(NOT_A_KEY))
        with pytest.raises(KeyProblem, match="is not a key"):
            await check_readable(session, Vault(NOT_A_KEY))


class TestMigratingCredentialsOutOfUrls:
    async def test_migrate_moves_them_into_basic_auth_audited_without_the_password(
            self, client, database, database_url) -> None:
        await add_system(client, url="http://127.0.0.1:9/in",
                         status_url="http://127.0.0.1:9/status/{key}")
        password = PASSWORD + "@:/"  # percent-encoded in the URL, as a URL must hold it
        encoded = PASSWORD + "%40%3A%2F"
        await put_credentials_in_url(database, "billing", f"http://svc:{encoded}@127.0.0.1:9/in")
        async with database.transaction() as session:
            await session.execute(update(DownstreamSystem).values(
                status_url=f"http://svc:{encoded}@127.0.0.1:9/status/{{key}}"))

        result = await cli(database_url, "migrate")
        assert result.returncode == 0, result.stderr
        assert "moved the credentials in the URLs of billing" in result.stdout

        shown = (await client.get("/api/v1/systems/billing")).json()
        assert shown["url"] == "http://127.0.0.1:9/in"
        assert shown["status_url"] == "http://127.0.0.1:9/status/{key}"
        assert shown["auth"]["type"] == "basic" and shown["auth"]["username"] == "svc"
        assert shown["auth"]["password"]["secret_set"] is True
        async with database.read() as session:
            clear = await load_secrets(session, Vault(TEST_SECRET_KEY), ["billing"])
            audit = (await session.execute(select(AuditEvent).where(
                AuditEvent.actor == "migrate"))).scalars().all()
            await check_connections(database, Vault(TEST_SECRET_KEY))  # would start now
        assert clear == {"billing": {"auth": password}}
        [event] = audit
        assert event.action == "system.updated" and event.subject_id == "billing"
        assert event.details["before"]["url"] == "http://***@127.0.0.1:9/in"
        assert event.details["after"]["auth"]["password"]["secret_set"] is True
        assert PASSWORD not in str(event.details) and PASSWORD not in result.stdout
        verified = (await client.get("/api/v1/audit/verify")).json()
        assert verified["ok"] is True

        again = await cli(database_url, "migrate")  # nothing left to move
        assert again.returncode == 0 and "moved" not in again.stdout

    async def test_migrate_without_a_key_refuses_and_changes_nothing(
            self, client, database, database_url) -> None:
        await add_system(client, url="http://127.0.0.1:9/in")
        await put_credentials_in_url(database, "billing", f"http://svc:{PASSWORD}@127.0.0.1:9/in")
        result = await cli(database_url, "migrate", key=None)
        assert result.returncode == 1, result.stdout
        assert len(error_lines(result)) == 1, result.stderr
        [line] = error_lines(result)
        assert "set PIPELINE_CONSOLE_SECRET_KEY" in line and "billing" in line
        assert PASSWORD not in result.stderr
        async with database.read() as session:
            assert (await session.get(DownstreamSystem, "billing")).url.startswith("http://svc:")
            assert (await session.execute(select(SystemSecret))).scalars().all() == []
        with pytest.raises(StartupRefused):
            await check_connections(database, Vault(TEST_SECRET_KEY))


class TestUrlsWithCredentialsAreRefused:
    @pytest.mark.parametrize("field", ["url", "status_url"])
    async def test_by_post_and_by_patch_naming_the_field(self, client, field) -> None:
        url = f"http://svc:{PASSWORD}@127.0.0.1:9/in" + ("/{key}" if field == "status_url"
                                                         else "")
        posted = await client.post("/api/v1/systems", json={
            "name": "ledger", "transport": "http", "url": "http://127.0.0.1:9/in",
            field: url})
        assert posted.status_code == 422
        assert [error["field"] for error in posted.json()["errors"]] == [field]
        await add_system(client, url="http://127.0.0.1:9/in")
        patched = await client.patch("/api/v1/systems/billing", json={field: url})
        assert patched.status_code == 422
        assert [error["field"] for error in patched.json()["errors"]] == [field]
        for answer in (posted, patched):
            assert "use auth" in answer.text
            assert PASSWORD not in answer.text  # the refused value is not echoed back
        assert (await client.get("/api/v1/systems/billing")).json()["url"] == \
            "http://127.0.0.1:9/in"


class TestOldRowsAreShownWithoutTheirCredentials:
    """Attempts and audit rows written before this release may hold user:password@ in a URL;
    they cannot change (append-only, hashed), so every reader shows ***@ instead."""

    async def test_attempts_and_audit_details_read_with_userinfo_hidden(
            self, client, database, sink) -> None:
        await add_system(client, sink)
        await ingest(client, message(1))
        await run_pass(client)
        old_url = sink.base.replace("http://", f"http://svc:{PASSWORD}@") + "/receive"
        async with database.transaction() as session:
            [attempt] = (await session.execute(select(DeliveryAttempt))).scalars().all()
            session.add(DeliveryAttempt(
                delivery_id=attempt.delivery_id, system=attempt.system, attempt_number=2,
                trigger="manual", actor="old", started_at=attempt.started_at,
                latency_ms=1.0, request={**attempt.request, "url": old_url},
                response_status=200, response_body="", classification="success",
                rule="2xx", error=None))
            await append_audit(session, [AuditEntry(
                "system.updated", "system", "billing",
                {"before": {"url": old_url}, "after": {"url": sink.base + "/receive"}},
                idempotency_key="customer:C-100")], actor="old", now=datetime.now(UTC))
        delivery_id = attempt.delivery_id

        answers = [
            await client.get(f"/api/v1/deliveries/{delivery_id}/attempts"),
            await client.get("/api/v1/audit?limit=500"),
            await client.get("/api/v1/audit?key=customer:C-100"),
            await client.get("/api/v1/inspect/customer:C-100"),
        ]
        for path in (f"/deliveries/{delivery_id}", "/audit", "/records/customer:C-100"):
            answers.append(await client.get(path))
        for answer in answers:
            assert answer.status_code == 200, (answer.url, answer.text[:300])
            assert PASSWORD not in answer.text, answer.url
            assert "http://***@127.0.0.1" in answer.text, answer.url
        inspected = answers[3].json()
        assert [a["request"]["url"] for a in inspected["delivery_attempts"]][-1] == \
            sink.base.replace("http://", "http://***@") + "/receive"
        assert PASSWORD not in str(inspected["timeline"])

        async with database.read() as session:  # the rows themselves are as written
            stored = (await session.execute(select(DeliveryAttempt.request).where(
                DeliveryAttempt.attempt_number == 2))).scalar_one()
            assert stored["url"] == old_url
        assert (await client.get("/api/v1/audit/verify")).json()["ok"] is True


class TestAProcessWithTheOldKey:
    async def test_after_rotate_key_only_the_systems_with_secrets_wait_for_the_new_key(
            self, client, sink, database, database_url, caplog, clock) -> None:
        """The in-process server keeps running with the old key after `secrets rotate-key`
        (as a worker does until it is restarted): a system without secrets is delivered as
        before, and one whose secret it cannot read is not sent, transiently, saying why."""
        await add_system(client, sink, name="plain", url=sink.base + "/plain")
        await add_system(client, sink, name="ledger", url=sink.base + "/ledger",
                         auth={"type": "bearer", "token": TOKEN})
        result = await cli(database_url, "secrets", "rotate-key",
                           new_key=Fernet.generate_key().decode())
        assert result.returncode == 0, result.stderr

        await ingest(client, message(1, {"name": "Ada"}))
        counts = await run_pass(client)
        assert [received.path for received in sink.received] == ["/plain"], counts
        ledger = (await client.get("/api/v1/deliveries?system=ledger")).json()["items"]
        [delivery] = ledger
        assert delivery["status"] == "pending", delivery
        [attempt] = (await client.get(
            f"/api/v1/deliveries/{delivery['id']}/attempts")).json()["items"]
        assert (attempt["classification"], attempt["rule"]) == ("transient",
                                                                "secret_unreadable")
        assert "rotate-key" in attempt["error"] and "auth" in attempt["error"]
        assert TOKEN not in caplog.text
        # not the system's failure (its circuit is shared with the workers that have the
        # new key), and not one of the delivery's tries: it never runs out this way
        breaker = (await client.get("/api/v1/circuits")).json()["items"]
        assert {(c["system"], c["consecutive_failures"]) for c in breaker} == {
            ("plain", 0), ("ledger", 0)}
        for _ in range(4):  # max_attempts is 3
            clock.advance(seconds=120)
            await run_pass(client)
        [delivery] = (await client.get("/api/v1/deliveries?system=ledger")).json()["items"]
        assert (delivery["status"], delivery["attempts"]) == ("pending", 5), delivery


class TestTheStatusQuery:
    async def test_it_authenticates_as_the_deliveries_do(self, client, sink) -> None:
        """An ambiguous send to a system with auth: the status query carries the system's
        credentials (without them it would be refused, and the outcome stay open)."""
        sink.answer(Answer(200, delay_s=1.5))
        await add_system(client, sink, timeout_s=0.3, status_url=sink.status_url,
                         auth={"type": "bearer", "token": TOKEN})
        await ingest(client, message(1))
        await run_pass(client)
        sink.status_answers[("customer:C-100", 1)] = 200
        [outcome] = (await client.get("/api/v1/ambiguous")).json()["items"]
        response = await client.post(f"/api/v1/ambiguous/{outcome['id']}/query-status")
        assert response.status_code == 200, response.text
        assert response.json()["resolution"] == "delivered", response.text
        [headers] = sink.status_query_headers
        assert headers["Authorization"] == f"Bearer {TOKEN}"
