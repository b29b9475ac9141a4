"""What one delivery request looks like, against a real HTTP server on 127.0.0.1 (both
databases): PUT and PATCH to URL templates with the record's values percent-encoded, static
headers, a jq body_template (and its failure at send time: a dead letter with jq's message,
nothing sent), Standard Webhooks signatures checked by the `standardwebhooks` package itself
on every request (across a retry, and across a rotation of the secret), and the preview,
which must be what the sink then receives."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest
from sqlalchemy import select, update
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from pipeline_console.delivery.mapping import refused_word
from pipeline_console.delivery.signing import signature
from pipeline_console.delivery.transports import render_url, status_query_url
from pipeline_console.models import AuditEvent, DownstreamSystem
from tests.delivery.test_delivery import add_system, attempts, deliveries, ingest, run_pass
from tests.sink import Answer, Received
from tests.support import message

pytestmark = pytest.mark.backends

SECRET = "whsec_" + base64.b64encode(b"signing-secret-of-the-tests-32by").decode()
ODD_ID = "A/B C:1"  # a '/', a ' ' and a ':' in one entity id
ODD_KEY = f"customer:{ODD_ID}"


def verified_by(secret: str, received: Received) -> bool:
    """Whether the reference verifier, knowing `secret`, accepts the request."""
    try:
        Webhook(secret).verify(received.raw, received.headers)
    except WebhookVerificationError:
        return False
    return True


async def dead_letters(client) -> list[dict]:
    return (await client.get("/api/v1/dlq")).json()["items"]


class TestUrlTemplates:
    def test_each_value_is_percent_encoded_whole(self) -> None:
        url = render_url("http://x/{entity_type}/{entity_id}?k={key}&v={version}",
                         "customer", ODD_ID, ODD_KEY, 3)
        assert url == "http://x/customer/A%2FB%20C%3A1?k=customer%3AA%2FB%20C%3A1&v=3"

    def test_the_status_url_is_rendered_by_the_same_function(self) -> None:
        assert status_query_url("http://x/{entity_type}/{entity_id}/{version}", ODD_KEY, 2) \
            == "http://x/customer/A%2FB%20C%3A1/2"


class TestMethodUrlAndHeaders:
    async def test_put_then_patch_reach_the_templated_url_with_the_static_headers(
            self, client, sink) -> None:
        await add_system(client, sink, method="PUT",
                         url=sink.base + "/{entity_type}/{entity_id}?key={key}&v={version}",
                         headers={"X-Tenant": "t1"})
        await ingest(client, message(1, {"name": "A"}, entity_id=ODD_ID))
        await run_pass(client)
        patched = await client.patch("/api/v1/systems/billing", json={"method": "PATCH"})
        assert patched.status_code == 200, patched.text
        await ingest(client, message(2, {"name": "B"}, entity_id=ODD_ID))
        await run_pass(client)

        assert [(r.method, r.path) for r in sink.received] == [
            ("PUT", "/customer/A%2FB%20C%3A1?key=customer%3AA%2FB%20C%3A1&v=1"),
            ("PATCH", "/customer/A%2FB%20C%3A1?key=customer%3AA%2FB%20C%3A1&v=2")]
        first = sink.received[0]
        assert first.headers["X-Tenant"] == "t1"
        assert first.headers["Content-Type"] == "application/json"
        assert first.headers["Idempotency-Key"] == "customer:A/B%20C:1:1"
        assert first.body["payload"] == {"name": "A"}

        [delivery] = [d for d in await deliveries(client) if d["version"] == 1]
        [attempt] = await attempts(client, delivery["id"])
        assert attempt["request"]["method"] == "PUT"
        assert attempt["request"]["url"] == sink.base + first.path
        assert attempt["request"]["headers"]["X-Tenant"] == "t1"


class TestBodyTemplate:
    async def test_the_template_makes_the_body_sent(self, client, sink) -> None:
        await add_system(client, sink, body_template=(
            "{id: .entity_id, name: .payload.name, revision: .version, "
            "ref: .idempotency_key}"))
        await ingest(client, message(3, {"name": "Ada"}))
        await run_pass(client)
        [received] = sink.received
        assert received.body == {"id": "C-100", "name": "Ada", "revision": 3,
                                 "ref": "customer:C-100"}
        assert json.loads(received.raw) == received.body

    async def test_a_template_failing_on_a_record_dead_letters_it_with_jqs_message(
            self, client, sink) -> None:
        await add_system(client, sink, body_template=(
            'if .payload.name == null then error("customer has no name") '
            "else {name: .payload.name} end"))
        await ingest(client, message(1, {"country": "NL"}))
        counts = await run_pass(client)

        assert counts.get("dead_lettered") == 1, counts
        assert sink.received == []  # nothing was sent
        [letter] = await dead_letters(client)
        assert "customer has no name" in letter["reason"]
        assert letter["classification"] == "permanent"
        [delivery] = await deliveries(client)
        assert delivery["status"] == "dead_lettered"
        [attempt] = await attempts(client, delivery["id"])
        assert attempt["classification"] == "permanent"
        assert "customer has no name" in attempt["error"]
        # Nothing was asked of the system: its circuit has nothing to learn from this.
        circuits = (await client.get("/api/v1/circuits")).json()["items"]
        assert [(c["state"], c["consecutive_failures"]) for c in circuits] == [("closed", 0)]


class TestTemplateSubset:
    """A template maps one record: it may not read the environment (the secret key is
    there) or files, define functions, loop or use regular expressions."""

    @pytest.mark.parametrize("template", [
        "$ENV.PIPELINE_CONSOLE_SECRET_KEY", "env | keys", '{k: "\\($ENV)"}',
        "def f: f; f", "[limit(5; repeat(1))]", "[range(1e9)]", "[.. | recurse]",
        'last(1 | until(false; .))', '.payload.name | test("(a+)+$")',
        'gsub("a"; "b")', "input", "[inputs]", 'import "x" as x; .', "halt",
        ".payload | env", "{a: env}", '"a,b" | split(", *"; null)',
        '_match_impl("a"; null; true)', "[null[combinations:]]", ".[halt:]?", "{$ENV: 1}",
    ])
    def test_refused(self, template) -> None:
        assert refused_word(template) is not None, template

    @pytest.mark.parametrize("template", [
        "{id: .entity_id, env: .payload.env, test: .payload.test}", ".payload.range",
        '{"def": "repeat", note: "while until env $ENV"}', '.payload["import"]',
        "# env in a comment\n{id: .entity_id}", '"\\(.entity_id) def"',
        "[.payload.items[] | {sku, qty}]", "if .version > 1 then . else empty end",
        '.payload.name | split(",")', "{a: 1, env: 2}", ".payload.list[1:2]",
    ])
    def test_allowed(self, template) -> None:
        assert refused_word(template) is None, template

    async def test_a_template_reading_the_environment_is_refused_naming_body_template(
            self, client, sink) -> None:
        for template in ("{key: $ENV.PIPELINE_CONSOLE_SECRET_KEY}", "def f: f; f"):
            answer = await client.post("/api/v1/systems", json={
                "name": "billing", "transport": "http", "url": sink.base + "/in",
                "entity_types": ["customer"], "body_template": template})
            assert answer.status_code == 422, answer.text
            assert answer.headers["content-type"].startswith("application/problem+json")
            assert "body_template" in answer.text and "may not use" in answer.text

    async def test_a_stored_template_reading_the_environment_sends_nothing(
            self, client, sink, database, monkeypatch) -> None:
        """A template saved before the check (written to the database directly here) fails
        at send time, permanently, and no environment value leaves the process."""
        monkeypatch.setenv("TEMPLATE_CANARY", "canary-value-of-the-environment")
        await add_system(client, sink, body_template="{id: .entity_id}")
        async with database.transaction() as session:
            await session.execute(update(DownstreamSystem)
                                  .where(DownstreamSystem.name == "billing")
                                  .values(body_template="{id: .entity_id, e: env}"))
        await ingest(client, message(1, {"name": "Ada"}))
        counts = await run_pass(client)
        assert counts.get("dead_lettered") == 1, counts
        assert sink.received == []
        [letter] = await dead_letters(client)
        assert "may not use 'env'" in letter["reason"]
        assert "canary-value" not in json.dumps(letter)


class TestSigning:
    def test_the_signature_is_the_reference_implementations(self) -> None:
        from datetime import UTC, datetime

        body = b'{"a":1}'
        expected = Webhook(SECRET).sign("msg_7", datetime.fromtimestamp(1_700_000_000, UTC),
                                        body.decode())
        assert signature(SECRET, "msg_7", 1_700_000_000, body) == expected

    async def test_every_try_is_signed_and_keeps_its_webhook_id(self, client, sink,
                                                                 clock) -> None:
        await add_system(client, sink, signing={"scheme": "standard-webhooks",
                                                "secret": SECRET})
        sink.answer(Answer(503), Answer(200))
        await ingest(client, message(1, {"name": "A"}))
        assert (await run_pass(client)).get("retry") == 1
        clock.advance(minutes=5)
        assert (await run_pass(client)).get("delivered") == 1

        first, second = sink.received
        assert verified_by(SECRET, first) and verified_by(SECRET, second)
        [delivery] = await deliveries(client)
        assert first.headers["webhook-id"] == second.headers["webhook-id"] \
            == f"msg_{delivery['id']}"
        assert first.headers["webhook-timestamp"].isdigit()
        tampered = dataclasses.replace(first, raw=first.raw.replace(b'"A"', b'"B"'))
        assert not verified_by(SECRET, tampered)

        shown = [attempt["request"]["headers"] for attempt in
                 await attempts(client, delivery["id"])]
        assert [headers["webhook-signature"] for headers in shown] == ["v1,***", "v1,***"]
        assert first.headers["webhook-signature"] not in json.dumps(shown)

    async def test_during_the_overlap_old_and_new_secrets_verify_and_after_it_only_the_new(
            self, client, sink, clock, database) -> None:
        await add_system(client, sink, signing={"scheme": "standard-webhooks",
                                                "secret": SECRET})
        rotated = await client.post("/api/v1/systems/billing/signing/rotate",
                                    json={"overlap_s": 3600})
        assert rotated.status_code == 200, rotated.text
        new_secret = rotated.json()["secret"]
        assert new_secret.startswith("whsec_") and new_secret != SECRET
        assert len(base64.b64decode(new_secret.removeprefix("whsec_"))) == 32

        await ingest(client, message(1, {"name": "A"}))
        await run_pass(client)
        during = sink.received[-1]
        assert len(during.headers["webhook-signature"].split(" ")) == 2
        assert verified_by(SECRET, during) and verified_by(new_secret, during)

        clock.advance(seconds=3601)
        await ingest(client, message(2, {"name": "B"}))
        await run_pass(client)
        after = sink.received[-1]
        assert after.body["version"] == 2
        assert len(after.headers["webhook-signature"].split(" ")) == 1
        assert verified_by(new_secret, after) and not verified_by(SECRET, after)

        view = (await client.get("/api/v1/systems/billing")).json()["signing"]
        assert view["secret"]["secret_set"] is True and view["previous"] is None  # over
        async with database.read() as session:
            rows = (await session.execute(select(AuditEvent).where(
                AuditEvent.action == "system.signing_rotated"))).scalars().all()
        [row] = rows
        assert row.details["secret"] == view["secret"]["fingerprint"]
        audited = json.dumps(row.details)
        for value in (SECRET, new_secret, SECRET[6:], new_secret[6:]):
            assert value not in audited

    async def test_rotating_turns_signing_on_and_the_overlap_is_bounded(
            self, client, sink) -> None:
        await add_system(client, sink)
        too_long = await client.post("/api/v1/systems/billing/signing/rotate",
                                     json={"overlap_s": 31 * 86_400})
        assert too_long.status_code == 422
        assert too_long.json()["errors"][0]["field"] == "overlap_s"
        missing = await client.post("/api/v1/systems/nope/signing/rotate", json={})
        assert missing.status_code == 404

        rotated = await client.post("/api/v1/systems/billing/signing/rotate",
                                    json={"overlap_s": 0})
        assert rotated.status_code == 200, rotated.text
        await ingest(client, message(1))
        await run_pass(client)
        assert verified_by(rotated.json()["secret"], sink.received[-1])


    async def test_during_the_overlap_a_patch_is_audited_and_after_it_no_previous_shows(
            self, client, sink, clock, database) -> None:
        await add_system(client, sink, signing={"scheme": "standard-webhooks",
                                                "secret": SECRET})
        rotated = await client.post("/api/v1/systems/billing/signing/rotate",
                                    json={"overlap_s": 3600})
        assert rotated.status_code == 200, rotated.text
        # a PATCH naming signing while the previous secret is kept (its expiry in the audit)
        patched = await client.patch("/api/v1/systems/billing",
                                     json={"signing": {"scheme": "standard-webhooks"},
                                           "timeout_s": 7})
        assert patched.status_code == 200, patched.text
        assert patched.json()["signing"]["previous"]["expires_at"]
        async with database.read() as session:
            [row] = (await session.execute(select(AuditEvent).where(
                AuditEvent.action == "system.updated"))).scalars().all()
        assert row.details["after"]["signing"]["previous"]["expires_at"]
        assert SECRET not in json.dumps(row.details)

        clock.advance(seconds=3601)
        for answer in (await client.get("/api/v1/systems/billing"),):
            assert answer.json()["signing"]["previous"] is None, answer.text
        [listed] = (await client.get("/api/v1/systems")).json()["items"]
        assert listed["signing"]["previous"] is None

class TestPreview:
    async def test_the_preview_is_what_the_sink_then_receives(self, client, sink) -> None:
        await add_system(client, sink, method="PUT",
                         url=sink.base + "/customers/{entity_id}?v={version}",
                         headers={"X-Tenant": "t1"},
                         auth={"type": "bearer", "token": "tok-preview-123"},
                         signing={"scheme": "standard-webhooks", "secret": SECRET},
                         body_template="{id: .entity_id, name: .payload.name}")
        await ingest(client, message(1, {"name": "Ada"}, entity_id=ODD_ID))
        answer = await client.post("/api/v1/systems/billing/preview", json={"key": ODD_KEY})
        assert answer.status_code == 200, answer.text
        preview = answer.json()
        assert "tok-preview-123" not in answer.text
        assert preview["headers"]["Authorization"] == "Bearer ***"
        assert preview["headers"]["webhook-signature"] == "v1,***"

        await run_pass(client)
        [received] = sink.received
        assert preview["method"] == received.method == "PUT"
        assert preview["url"] == sink.base + received.path
        assert preview["body"] == received.body == {"id": ODD_ID, "name": "Ada"}
        sent = {name.lower(): value for name, value in received.headers.items()}
        masked = {"authorization", "webhook-signature", "webhook-timestamp"}
        for name, value in preview["headers"].items():
            if name.lower() not in masked:
                assert sent[name.lower()] == value, name
        assert verified_by(SECRET, received)
        [delivery] = await deliveries(client)
        [attempt] = await attempts(client, delivery["id"])
        assert attempt["request"]["headers"]["Authorization"] == "Bearer ***"
        assert attempt["request"]["url"] == preview["url"]
        assert "tok-preview-123" not in json.dumps(attempt)

    async def test_an_unknown_key_is_404_and_a_failing_template_422(self, client, sink) -> None:
        await add_system(client, sink, body_template='error("no mapping for " + .entity_id)')
        await ingest(client, message(1))
        unknown = await client.post("/api/v1/systems/billing/preview",
                                    json={"key": "customer:nope"})
        assert unknown.status_code == 404
        failing = await client.post("/api/v1/systems/billing/preview",
                                    json={"key": "customer:C-100"})
        assert failing.status_code == 422
        [error] = failing.json()["errors"]
        assert error["field"] == "body_template"
        assert "no mapping for C-100" in error["message"]
