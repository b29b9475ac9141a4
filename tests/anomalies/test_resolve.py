"""Resolving anomalies over the API: accept_incoming, keep_current, and what refuses."""

from __future__ import annotations

from sqlalchemy import select

from pipeline_console.models import AuditEvent
from tests.support import message

KEY = "customer:C-100"


async def open_conflict(client, current=None, incoming=None):
    await client.post("/api/v1/messages", json=message(2, current or {"name": "Acme"}))
    response = await client.post("/api/v1/messages", json=message(
        2, incoming or {"name": "Acme Corp"}, source_system="crm"))
    return response.json()["anomaly_id"]


async def record(client):
    return (await client.get(f"/api/v1/records/{KEY.replace(':', '%3A')}")).json()


class TestListing:
    async def test_open_anomalies_are_listed_with_both_payloads_and_the_diff(self, client):
        anomaly_id = await open_conflict(client)
        [item] = (await client.get("/api/v1/anomalies?status=open")).json()["items"]
        assert item["id"] == anomaly_id and item["status"] == "open"
        assert item["current_payload"] == {"name": "Acme"}
        assert item["incoming_payload"] == {"name": "Acme Corp"}
        assert item["diff"] == [{"path": "/name", "change": "changed", "current": "Acme",
                                 "incoming": "Acme Corp"}]
        assert (await client.get("/api/v1/anomalies?status=resolved")).json()["items"] == []


class TestAcceptIncoming:
    async def test_makes_the_quarantined_payload_current_and_promotes_it(self, client):
        anomaly_id = await open_conflict(client)
        response = await client.post(f"/api/v1/anomalies/{anomaly_id}/resolve", json={
            "resolution": "accept_incoming", "note": "CRM is the master for names"})
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "resolved"
        assert response.json()["resolved_by"] == "tester (admin)"
        state = await record(client)
        assert state["production"]["payload"] == {"name": "Acme Corp"}
        assert state["production"]["version"] == 2
        assert state["source_system"] == "crm"
        # the old current payload is now a conflict, the accepted one a duplicate
        again = await client.post("/api/v1/messages", json=message(
            2, {"name": "Acme Corp"}, source_system="crm"))
        assert again.json()["decision"] == "skip_duplicate"

    async def test_is_refused_once_a_newer_version_was_accepted(self, client):
        anomaly_id = await open_conflict(client)
        await client.post("/api/v1/messages", json=message(3, {"name": "Acme 3"}))
        response = await client.post(f"/api/v1/anomalies/{anomaly_id}/resolve", json={
            "resolution": "accept_incoming", "note": "too late"})
        assert response.status_code == 409
        assert "version 3 from erp was accepted since" in response.json()["detail"]
        assert (await record(client))["production"]["payload"] == {"name": "Acme 3"}
        kept = await client.post(f"/api/v1/anomalies/{anomaly_id}/resolve", json={
            "resolution": "keep_current", "note": "superseded by version 3"})
        assert kept.status_code == 200


class TestKeepCurrent:
    async def test_dismisses_the_incoming_payload(self, client):
        anomaly_id = await open_conflict(client)
        response = await client.post(f"/api/v1/anomalies/{anomaly_id}/resolve", json={
            "resolution": "keep_current", "note": "CRM typo"})
        assert response.json()["resolution"] == "keep_current"
        assert (await record(client))["production"]["payload"] == {"name": "Acme"}


class TestRefusals:
    async def test_a_note_is_required(self, client):
        anomaly_id = await open_conflict(client)
        for body in ({"resolution": "keep_current"},
                     {"resolution": "keep_current", "note": "   "}):
            response = await client.post(f"/api/v1/anomalies/{anomaly_id}/resolve", json=body)
            assert response.status_code == 422
            assert response.json()["errors"][0]["field"] == "note"

    async def test_an_unknown_resolution_is_422(self, client):
        anomaly_id = await open_conflict(client)
        response = await client.post(f"/api/v1/anomalies/{anomaly_id}/resolve", json={
            "resolution": "merge", "note": "x"})
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == "resolution"

    async def test_resolving_twice_is_a_conflict(self, client):
        anomaly_id = await open_conflict(client)
        body = {"resolution": "keep_current", "note": "first"}
        assert (await client.post(f"/api/v1/anomalies/{anomaly_id}/resolve",
                                  json=body)).status_code == 200
        second = await client.post(f"/api/v1/anomalies/{anomaly_id}/resolve", json=body)
        assert second.status_code == 409
        assert "already resolved" in second.json()["detail"]

    async def test_an_unknown_anomaly_is_404(self, client):
        response = await client.post("/api/v1/anomalies/999/resolve", json={
            "resolution": "keep_current", "note": "x"})
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"


class TestLaterMessagesForAKeyWithAnOpenAnomaly:
    async def test_a_newer_version_is_accepted_and_the_anomaly_stays_open(self, client):
        anomaly_id = await open_conflict(client)
        newer = await client.post("/api/v1/messages", json=message(3, {"name": "Acme v3"}))
        assert newer.json()["decision"] == "accept_supersede"
        anomaly = (await client.get(f"/api/v1/anomalies/{anomaly_id}")).json()
        assert anomaly["status"] == "open"


class TestTheAuditLogRecordsTheResolution:
    async def test_with_actor_resolution_and_note(self, client, database):
        anomaly_id = await open_conflict(client)
        await client.post(f"/api/v1/anomalies/{anomaly_id}/resolve", json={
            "resolution": "accept_incoming", "note": "CRM is the master for names"})
        async with database.read() as session:
            events = list((await session.execute(
                select(AuditEvent).where(AuditEvent.idempotency_key == KEY)
                .order_by(AuditEvent.id))).scalars())
        actions = [event.action for event in events]
        assert actions[-4:] == ["anomaly.opened", "anomaly.resolved", "record.accepted",
                                "record.promoted"]
        resolved = events[-3]
        assert resolved.actor == "tester (admin)"
        assert resolved.details == {"resolution": "accept_incoming",
                                    "note": "CRM is the master for names", "version": 2}
        verify = (await client.get("/api/v1/audit/verify")).json()
        assert verify["ok"] is True and verify["checked"] == len(
            (await client.get("/api/v1/audit?limit=500")).json()["items"])
