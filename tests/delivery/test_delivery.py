"""End-to-end delivery against a real HTTP server on 127.0.0.1, on SQLite and PostgreSQL:
outbox, classification, retries, DLQ, circuit breaker, ambiguous outcomes."""

from __future__ import annotations

import socket
from datetime import datetime, timedelta

import pytest

from tests.sink import Answer
from tests.support import message

KEY = "customer:C-100"


async def add_system(client, sink=None, name="billing", **settings):
    body = {"name": name, "transport": "http",
            "url": settings.pop("url", sink.base + "/receive" if sink else None),
            "entity_types": ["customer"], "timeout_s": 2, "max_attempts": 3,
            "backoff_base_s": 1, "backoff_max_s": 60, "failure_threshold": 3, **settings}
    response = await client.post("/api/v1/systems", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def ingest(client, *bodies):
    response = await client.post("/api/v1/messages/batch", json={"messages": list(bodies)})
    assert response.status_code == 200
    return response.json()["results"]


async def run_pass(client):
    response = await client.post("/api/v1/jobs/deliver_due/run")
    assert response.status_code == 200, response.text
    return response.json()["result"]


async def deliveries(client, **filters):
    query = "&".join(f"{k}={v}" for k, v in filters.items())
    return (await client.get(f"/api/v1/deliveries?{query}")).json()["items"]


async def attempts(client, delivery_id):
    return (await client.get(f"/api/v1/deliveries/{delivery_id}/attempts")).json()["items"]


async def circuit(client, name="billing"):
    items = (await client.get("/api/v1/circuits")).json()["items"]
    return next(item for item in items if item["system"] == name)


class TestTheOutbox:
    async def test_promotion_queues_one_delivery_per_subscribed_system(self, client, sink):
        await add_system(client, sink, name="billing")
        await add_system(client, sink, name="crm-sync", entity_types=["customer", "order"])
        await add_system(client, sink, name="orders-only", entity_types=["order"])
        await ingest(client, message(1))
        queued = await deliveries(client)
        assert sorted(d["system"] for d in queued) == ["billing", "crm-sync"]
        assert {d["status"] for d in queued} == {"pending"}

    async def test_skips_and_partials_queue_nothing(self, client, sink):
        await add_system(client, sink)
        await client.put("/api/v1/entity-types/customer",
                         json={"schema": {"required": ["country"]}})
        await ingest(client, message(1, {"name": "A"}), message(1, {"name": "A"}))
        assert await deliveries(client) == []

    async def test_a_newer_version_supersedes_an_unsent_older_one(self, client, sink):
        await add_system(client, sink)
        await ingest(client, message(1, {"v": 1}))
        await ingest(client, message(2, {"v": 2}))
        await run_pass(client)
        by_version = {d["version"]: d["status"] for d in await deliveries(client)}
        assert by_version == {1: "superseded", 2: "delivered"}
        assert [r.body["version"] for r in sink.received] == [2]

    async def test_only_the_same_record_to_the_same_system_is_superseded(self, client, sink):
        await add_system(client, sink, name="billing")
        await add_system(client, sink, name="crm-sync")
        other = {**message(1, {"v": 1}), "entity_id": "C-200", "message_id": "m-other"}
        await ingest(client, message(1, {"v": 1}), other)
        # crm-sync stops taking customers: a newer C-100 is queued for billing only, so
        # crm-sync's unsent v1 is not superseded, and nothing of C-200 is touched.
        patched = await client.patch("/api/v1/systems/crm-sync", json={"entity_types": ["order"]})
        assert patched.status_code == 200, patched.text
        await ingest(client, message(2, {"v": 2}))
        statuses = {(d["system"], d["idempotency_key"], d["version"]): d["status"]
                    for d in await deliveries(client)}
        assert statuses == {
            ("billing", KEY, 1): "superseded", ("billing", KEY, 2): "pending",
            ("crm-sync", KEY, 1): "pending",
            ("billing", "customer:C-200", 1): "pending",
            ("crm-sync", "customer:C-200", 1): "pending"}


class TestDelivery:
    async def test_a_delivery_is_a_post_with_the_contract_body_and_idempotency_key(
            self, client, sink):
        await add_system(client, sink)
        await ingest(client, message(3, {"name": "Acme"}, correlation_id="evt-1"))
        assert (await run_pass(client))["delivered"] == 1
        [received] = sink.received
        assert received.headers["Idempotency-Key"] == "customer:C-100:3"
        assert received.body == {"idempotency_key": KEY, "version": 3,
                                 "entity_type": "customer", "entity_id": "C-100",
                                 "payload": {"name": "Acme"}, "correlation_id": "evt-1"}
        [delivery] = await deliveries(client)
        assert delivery["status"] == "delivered"
        [attempt] = await attempts(client, delivery["id"])
        assert (attempt["trigger"], attempt["classification"], attempt["rule"],
                attempt["response_status"]) == ("scheduled", "success", "2xx", 200)
        assert attempt["request"]["headers"]["Idempotency-Key"] == "customer:C-100:3"

    async def test_transient_then_success_retries_with_the_same_key(self, client, sink, clock):
        sink.answer(Answer(503), Answer(200))
        await add_system(client, sink)
        await ingest(client, message(1))
        assert (await run_pass(client))["retry"] == 1
        [delivery] = await deliveries(client)
        assert delivery["status"] == "pending" and delivery["attempts"] == 1
        assert (await run_pass(client))["claimed"] == 0  # not due before the backoff
        clock.advance(seconds=120)
        assert (await run_pass(client))["delivered"] == 1
        assert [a["classification"] for a in await attempts(client, delivery["id"])] == [
            "transient", "success"]
        assert sink.keys_received() == {"customer:C-100:1": 2}

    async def test_a_permanent_failure_goes_to_the_dlq_at_once(self, client, sink):
        sink.answer(Answer(400, body="field 'name' is too long"))
        await add_system(client, sink)
        await ingest(client, message(1))
        assert (await run_pass(client))["dead_lettered"] == 1
        [entry] = (await client.get("/api/v1/dlq?system=billing")).json()["items"]
        assert entry["classification"] == "permanent" and entry["status"] == "open"
        assert "HTTP 400" in entry["reason"] and "too long" in entry["reason"]
        assert len(sink.received) == 1

    async def test_retries_exhausted_go_to_the_dlq(self, client, sink, clock):
        sink.answer(Answer(500))
        await add_system(client, sink, max_attempts=2, failure_threshold=10)
        await ingest(client, message(1))
        await run_pass(client)
        clock.advance(seconds=120)
        assert (await run_pass(client))["dead_lettered"] == 1
        [entry] = (await client.get("/api/v1/dlq")).json()["items"]
        assert entry["reason"].startswith("retries_exhausted")
        assert len(sink.received) == 2

    async def test_retry_after_is_honoured(self, client, sink, clock):
        sink.answer(Answer(429, headers={"Retry-After": "45"}), Answer(200))
        await add_system(client, sink)
        await ingest(client, message(1))
        await run_pass(client)
        [delivery] = await deliveries(client)
        wait = datetime.fromisoformat(delivery["next_attempt_at"]) - clock.now
        assert wait >= timedelta(seconds=45)

    async def test_a_system_override_turns_409_into_success(self, client, sink):
        sink.answer(Answer(409, body="already have it"))
        await add_system(client, sink, classification_overrides=[
            {"status": 409, "classification": "success"}])
        await ingest(client, message(1))
        assert (await run_pass(client))["delivered"] == 1
        [delivery] = await deliveries(client)
        assert (await attempts(client, delivery["id"]))[0]["rule"] == "override:409"

    async def test_a_refused_connection_is_transient(self, client):
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        await add_system(client, url=f"http://127.0.0.1:{port}/x")
        await ingest(client, message(1))
        assert (await run_pass(client))["retry"] == 1
        [delivery] = await deliveries(client)
        assert (await attempts(client, delivery["id"]))[0]["rule"] == "not_sent"

    async def test_deliver_now_skips_the_backoff_through_the_same_path(self, client, sink):
        sink.answer(Answer(503), Answer(200))
        await add_system(client, sink)
        await ingest(client, message(1))
        await run_pass(client)
        [delivery] = await deliveries(client)
        response = await client.post(f"/api/v1/deliveries/{delivery['id']}/deliver")
        assert response.status_code == 200
        assert (response.json()["trigger"], response.json()["classification"]) == (
            "manual", "success")
        again = await client.post(f"/api/v1/deliveries/{delivery['id']}/deliver")
        assert again.status_code == 409


class TestTheCircuitBreaker:
    async def test_opens_holds_is_reset_and_a_trial_closes_it(self, client, sink, clock):
        sink.answer(Answer(503))
        await add_system(client, sink, failure_threshold=2, max_attempts=10)
        await ingest(client, message(1, entity_id="A"), message(1, entity_id="B"))
        await run_pass(client)
        assert (await circuit(client))["state"] == "open"
        sent = len(sink.received)
        assert sent == 2

        await ingest(client, message(1, entity_id="C"))
        clock.advance(seconds=120)
        result = await run_pass(client)
        assert result["claimed"] == 0
        assert len(sink.received) == sent  # nothing is sent while open
        assert {d["status"] for d in await deliveries(client)} == {"held"}
        assert await client.get("/api/v1/dlq") and (
            await client.get("/api/v1/dlq")).json()["items"] == []

        refused = await client.post("/api/v1/circuits/billing/reset", json={"reason": " "})
        assert refused.status_code == 422
        reset = await client.post("/api/v1/circuits/billing/reset",
                                  json={"reason": "billing fixed their load balancer"})
        assert reset.json()["state"] == "half_open"
        sink.answer(Answer(200))
        trial = await run_pass(client)
        assert (trial["claimed"], trial["delivered"]) == (1, 1)
        assert (await circuit(client))["state"] == "closed"
        rest = await run_pass(client)
        assert rest["delivered"] == 2
        assert {d["status"] for d in await deliveries(client)} == {"delivered"}

        events = (await client.get("/api/v1/audit?subject_type=circuit")).json()["items"]
        assert [e["action"] for e in events] == ["circuit.open", "circuit.half_open",
                                                "circuit.closed"]
        assert events[1]["actor"] == "tester (admin)"
        assert events[1]["details"]["reason"] == "billing fixed their load balancer"

    async def test_a_failed_trial_opens_it_again(self, client, sink, clock):
        sink.answer(Answer(503))
        await add_system(client, sink, failure_threshold=1, max_attempts=10)
        await ingest(client, message(1))
        await run_pass(client)
        await client.post("/api/v1/circuits/billing/reset", json={"reason": "try"})
        clock.advance(seconds=120)
        assert (await run_pass(client))["claimed"] == 1
        assert (await circuit(client))["state"] == "open"

    async def test_an_operator_can_force_it_open_and_reset_needs_an_open_circuit(
            self, client, sink):
        await add_system(client, sink)
        closed_reset = await client.post("/api/v1/circuits/billing/reset",
                                         json={"reason": "x"})
        assert closed_reset.status_code == 409
        opened = await client.post("/api/v1/circuits/billing/open",
                                   json={"reason": "maintenance window"})
        assert opened.json()["state"] == "open"
        await ingest(client, message(1))
        await run_pass(client)
        assert sink.received == []
        assert (await client.post("/api/v1/circuits/nope/open",
                                  json={"reason": "x"})).status_code == 404


class TestAmbiguousOutcomes:
    async def test_a_timeout_after_sending_is_ambiguous_and_never_retried_blindly(
            self, client, sink, clock):
        sink.answer(Answer(200, delay_s=1.5))
        await add_system(client, sink, timeout_s=0.3, status_url=sink.status_url)
        await ingest(client, message(1))
        assert (await run_pass(client))["ambiguous"] == 1
        [outcome] = (await client.get("/api/v1/ambiguous?status=open")).json()["items"]
        assert outcome["reason"].startswith("maybe_sent")
        clock.advance(hours=1)
        assert (await run_pass(client))["claimed"] == 0
        assert len(sink.received) == 1

    async def test_a_status_query_answering_200_resolves_it_without_a_second_send(
            self, client, sink):
        sink.answer(Answer(200, delay_s=1.5))
        await add_system(client, sink, timeout_s=0.3, status_url=sink.status_url)
        await ingest(client, message(1))
        await run_pass(client)
        sink.status_answers[(KEY, 1)] = 200
        [outcome] = (await client.get("/api/v1/ambiguous")).json()["items"]
        response = await client.post(f"/api/v1/ambiguous/{outcome['id']}/query-status")
        assert response.json()["resolution"] == "delivered"
        assert [d["status"] for d in await deliveries(client)] == ["delivered"]
        assert len(sink.received) == 1
        assert sink.status_queries == ["/status/customer%3AC-100/1"]

    async def test_a_status_query_answering_404_sends_again_through_the_canonical_path(
            self, client, sink):
        sink.answer(Answer(200, delay_s=1.5), Answer(200))
        await add_system(client, sink, timeout_s=0.3, status_url=sink.status_url)
        await ingest(client, message(1))
        await run_pass(client)
        result = await client.post("/api/v1/jobs/query_ambiguous/run")
        assert result.json()["result"]["resent"] == 1
        [delivery] = await deliveries(client)
        assert delivery["status"] == "delivered"
        assert [a["trigger"] for a in await attempts(client, delivery["id"])] == [
            "scheduled", "resolution"]
        assert sink.keys_received() == {"customer:C-100:1": 2}

    async def test_another_status_answer_leaves_it_ambiguous(self, client, sink):
        sink.answer(Answer(200, delay_s=1.5))
        await add_system(client, sink, timeout_s=0.3, status_url=sink.status_url)
        await ingest(client, message(1))
        await run_pass(client)
        sink.status_answers[(KEY, 1)] = 500
        [outcome] = (await client.get("/api/v1/ambiguous")).json()["items"]
        body = (await client.post(f"/api/v1/ambiguous/{outcome['id']}/query-status")).json()
        assert (body["status"], body["queries"]) == ("open", 1)
        assert "HTTP 500" in body["last_query_result"]

    async def test_without_a_status_query_it_waits_for_an_operator(self, client, sink):
        sink.answer(Answer(200, delay_s=1.5), Answer(200))
        await add_system(client, sink, timeout_s=0.3)
        await ingest(client, message(1))
        await run_pass(client)
        [outcome] = (await client.get("/api/v1/ambiguous")).json()["items"]
        assert (await client.post(
            f"/api/v1/ambiguous/{outcome['id']}/query-status")).status_code == 409
        assert (await client.post("/api/v1/jobs/query_ambiguous/run")).json()["result"][
            "no_status_query"] == 1
        no_note = await client.post(f"/api/v1/ambiguous/{outcome['id']}/resolve",
                                    json={"resolution": "delivered"})
        assert no_note.status_code == 422
        resolved = await client.post(f"/api/v1/ambiguous/{outcome['id']}/resolve", json={
            "resolution": "not_delivered", "note": "billing says they never got it"})
        assert resolved.json()["resolved_by"] == "tester (admin)"
        assert [d["status"] for d in await deliveries(client)] == ["delivered"]
        assert len(sink.received) == 2
        events = (await client.get("/api/v1/audit?action=ambiguous.resolved")).json()["items"]
        assert events[0]["details"]["note"] == "billing says they never got it"

    async def test_an_expired_lease_makes_the_delivery_ambiguous(self, client, sink, clock):
        from pipeline_console.delivery.service import claim_due, recover_expired_leases

        await add_system(client, sink)
        await ingest(client, message(1))
        deliverer = client.app.state.deliverer
        assert len(await claim_due(deliverer, 10)) == 1  # claimed, then the "worker" dies
        clock.advance(minutes=5)
        assert await recover_expired_leases(deliverer) == 1
        [delivery] = await deliveries(client)
        assert delivery["status"] == "ambiguous"
        [attempt] = await attempts(client, delivery["id"])
        assert (attempt["classification"], attempt["rule"]) == ("worker_lost", "lease_expired")


class TestSystems:
    @pytest.mark.parametrize(("change", "field"), [
        ({"url": "ftp://x/y"}, "url"), ({"url": "not a url"}, "url"),
        ({"transport": "carrier-pigeon"}, "transport"), ({"url": None}, "url"),
        ({"timeout_s": 0}, "timeout_s"), ({"name": "bad name"}, "name"),
        ({"classification_overrides": [{"status": 999, "classification": "success"}]},
         "classification_overrides.0.status"),
        ({"status_url": "http://x/status"}, "status_url"),
    ])
    async def test_bad_settings_are_422_naming_the_field(self, client, change, field):
        body = {"name": "billing", "transport": "http", "url": "http://127.0.0.1:9/x",
                **change}
        response = await client.post("/api/v1/systems", json=body)
        assert response.status_code == 422
        assert field in [error["field"] for error in response.json()["errors"]]

    async def test_create_read_patch_and_list(self, client, sink):
        await add_system(client, sink)
        duplicate = await client.post("/api/v1/systems", json={
            "name": "billing", "transport": "simulated"})
        assert duplicate.status_code == 409
        patched = await client.patch("/api/v1/systems/billing", json={"max_attempts": 9})
        assert patched.json()["max_attempts"] == 9
        assert (await client.get("/api/v1/systems/billing")).json()["max_attempts"] == 9
        assert [s["name"] for s in (await client.get("/api/v1/systems")).json()["items"]] == [
            "billing"]
        assert (await client.patch("/api/v1/systems/nope", json={})).status_code == 404
        events = (await client.get("/api/v1/audit?subject_type=system")).json()["items"]
        assert [e["action"] for e in events] == ["system.created", "system.updated"]
        assert events[1]["details"] == {"before": {"max_attempts": 3},
                                        "after": {"max_attempts": 9}}

    async def test_a_simulated_system_delivers_deterministically(self, client):
        await client.post("/api/v1/systems", json={
            "name": "sim", "transport": "simulated", "entity_types": ["customer"],
            "simulation": {"seed": 3, "outcomes": {"success": 1, "permanent": 1}}})
        await ingest(client, *[message(1, entity_id=f"S-{i}") for i in range(20)])
        totals: dict[str, int] = {}
        while (result := await run_pass(client))["claimed"]:
            # a pass claims up to the batch size (and sends `concurrency` at a time)
            assert result["claimed"] <= client.app.state.settings.worker_batch_size
            for name in ("delivered", "dead_lettered"):
                totals[name] = totals.get(name, 0) + result.get(name, 0)
        assert totals["delivered"] + totals["dead_lettered"] == 20
        assert 0 < totals["delivered"] < 20


class TestPrivateAddresses:
    async def test_are_refused_when_the_setting_says_so(self, client):
        client.app.state.settings = client.app.state.settings.model_copy(
            update={"refuse_private_system_urls": True})
        for url in ("http://127.0.0.1:9/in", "http://10.1.2.3/in", "http://localhost/in",
                    "http://[::1]/in", "http://169.254.169.254/latest/meta-data"):
            response = await client.post("/api/v1/systems", json={
                "name": "inner", "transport": "http", "url": url})
            assert response.status_code == 422, (url, response.text)
            assert response.json()["errors"][0]["field"] == "url"
        public = await client.post("/api/v1/systems", json={
            "name": "outer", "transport": "http", "url": "https://93.184.216.34/in",
            "status_url": "https://93.184.216.34/in/{key}"})
        assert public.status_code == 201, public.text
        moved = await client.patch("/api/v1/systems/outer", json={"url": "http://192.168.1.5/"})
        assert moved.status_code == 422

    async def test_the_oauth2_token_endpoint_is_checked_too(self, client):
        # the token endpoint is sent the client secret: a private one is refused like a
        # private url (literal addresses and localhost: no name leaves this machine)
        client.app.state.settings = client.app.state.settings.model_copy(
            update={"refuse_private_system_urls": True})
        public = "https://93.184.216.34/in"
        for token_url in ("http://127.0.0.1:9/token", "http://localhost/token",
                          "http://[::1]/token", "http://169.254.169.254/token"):
            auth = {"type": "oauth2_client_credentials", "token_url": token_url,
                    "client_id": "pipeline", "client_secret": "cs-123456"}
            created = await client.post("/api/v1/systems", json={
                "name": "inner", "transport": "http", "url": public, "auth": auth})
            assert created.status_code == 422, (token_url, created.text)
            assert [e["field"] for e in created.json()["errors"]] == ["auth.token_url"]
            assert "cs-123456" not in created.text
        outer = await client.post("/api/v1/systems", json={
            "name": "outer", "transport": "http", "url": public})
        assert outer.status_code == 201, outer.text
        moved = await client.patch("/api/v1/systems/outer", json={"auth": {
            "type": "oauth2_client_credentials", "token_url": "http://10.1.2.3/token",
            "client_id": "pipeline", "client_secret": "cs-123456"}})
        assert moved.status_code == 422, moved.text
        assert [e["field"] for e in moved.json()["errors"]] == ["auth.token_url"]
        assert (await client.get("/api/v1/systems/outer")).json()["auth"] == {"type": "none"}

    async def test_are_allowed_by_default_for_local_use(self, client, sink):
        await add_system(client, sink)  # the test sink listens on 127.0.0.1
