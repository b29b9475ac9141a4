"""Every console page renders (in-process, without a browser) on the demo's data, lists
paginate and filter, and errors on pages are pages while the API keeps problem+json."""

from __future__ import annotations

import html
import re
from urllib.parse import unquote

import pytest

from pipeline_console.demo import load_demo

PAGES = ["/", "/fragments/attention", "/search?q=evt-5002", "/records/customer:C-1004",
         "/events?correlation_id=evt-5002", "/events?message_id=crm-79", "/deliveries/1",
         "/anomalies", "/anomalies?status=all", "/anomalies/1", "/dlq", "/dlq?status=all",
         "/replays", "/replays/1", "/replays/2", "/ambiguous", "/circuits",
         "/circuits/ledger/open", "/circuits/crm-sync/reset", "/systems", "/systems/ledger",
         "/systems/erp-api", "/systems/billing-oauth", "/systems/partner-webhook",
         "/systems/erp-api/edit", "/systems/new",
         "/deliveries?status=held", "/staging", "/staging?status=all", "/jobs", "/audit",
         "/reports", "/reports?name=delivery", "/reports?name=anomalies",
         "/reports?name=replays", "/workers", "/intake", "/intake?status=all&kind=all"]


@pytest.fixture
async def demo(database, clock, settings):
    return await load_demo(database, now=clock.now, settings=settings)


async def test_every_page_renders(client, demo):
    for path in PAGES:
        response = await client.get(path)
        assert response.status_code == 200, (path, response.text[:500])
        assert response.headers["content-type"].startswith("text/html"), path
        assert ("Pipeline Console" if "fragments" not in path else 'id="attention"') in (
            response.text), path


async def test_lists_paginate_with_cursors(client, demo):
    first = await client.get("/audit?limit=5")
    older = re.search(r'href="(\?[^"]*cursor=[^"]+)"', first.text)
    assert older, "the audit log has more than five events"
    second = await client.get("/audit" + older.group(1).replace("&amp;", "&"))
    ids = [re.findall(r"<tr><td>(\d+)</td>", page.text) for page in (first, second)]
    assert len(ids[0]) == 5 and ids[1] and int(ids[1][0]) < int(ids[0][-1])
    page_one = await client.get("/deliveries?limit=3")
    next_link = re.search(r'href="(\?[^"]*cursor=[^"]+)" rel="next"', page_one.text)
    assert next_link
    page_two = await client.get("/deliveries" + next_link.group(1).replace("&amp;", "&"))
    assert page_two.status_code == 200


async def test_filters_narrow_the_lists(client, demo):
    ledger = (await client.get("/dlq?system=ledger")).text
    assert "2 dead letter(s) match" in ledger
    nothing = (await client.get("/dlq?system=ledger&reason=no-such-reason")).text
    assert "0 dead letter(s) match" in nothing


async def test_search_by_entity_id_redirects_to_the_one_record(client, demo):
    response = await client.get("/search?q=C-2001")
    assert response.status_code == 303
    assert response.headers["location"] == "/records/customer:C-2001"
    missing = await client.get("/search?q=nothing-like-this")
    assert "Nothing has the key" in missing.text


async def test_errors_are_pages_for_people_and_problems_for_machines(client, demo):
    page = await client.get("/records/customer:NOPE")
    assert page.status_code == 404 and "text/html" in page.headers["content-type"]
    assert "no record has the key" in page.text
    api = await client.get("/api/v1/inspect/customer:NOPE")
    assert api.status_code == 404
    assert api.headers["content-type"] == "application/problem+json"
    bad = await client.get("/dlq?from=yesterday")
    assert bad.status_code == 422 and "text/html" in bad.headers["content-type"]
    assert "from" in bad.text
    assert (await client.get("/no-such-page")).status_code == 404


async def test_a_form_without_its_note_is_refused_naming_the_field(client, demo):
    response = await client.post("/anomalies/1/resolve", data={"resolution": "keep_current"})
    assert response.status_code == 422
    assert "note: required" in response.text
    still = (await client.get("/api/v1/anomalies?key=customer:C-1004")).json()["items"]
    assert still[0]["status"] == "open"


async def test_run_now_runs_the_job_through_the_run_history(client, demo):
    response = await client.post("/jobs/promote_staging/run")
    assert response.status_code == 303 and response.headers["location"] == "/jobs"
    runs = (await client.get("/api/v1/jobs/runs?job=promote_staging")).json()["items"]
    assert runs[-1]["trigger"] == "api" and runs[-1]["status"] == "succeeded"
    jobs_page = await client.get("/jobs")
    assert "Job promote_staging" in jobs_page.text  # the notice, shown once
    assert "Job promote_staging" not in (await client.get("/jobs")).text


async def test_the_openapi_document_has_no_console_pages(client):
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert not [path for path in paths if not path.startswith(("/api/", "/healthz",
                                                               "/readyz", "/metrics"))]


async def test_ambiguous_outcomes_are_queried_and_resolved_from_the_page(client, demo):
    outcomes = (await client.get("/api/v1/ambiguous?status=open")).json()["items"]
    first, second = outcomes[0]["id"], outcomes[1]["id"]
    queried = await client.post(f"/ambiguous/{first}/query-status")
    assert queried.status_code == 303
    notice = (await client.get("/ambiguous")).text
    assert f"Ambiguous outcome {first}: the status query gave no answer; it is open" in notice
    refused = await client.post(f"/ambiguous/{second}/resolve",
                                data={"resolution": "delivered", "note": ""})
    assert refused.status_code == 422
    resolved = await client.post(f"/ambiguous/{second}/resolve", data={
        "resolution": "delivered", "note": "ledger support confirmed it arrived"})
    assert resolved.status_code == 303
    after = (await client.get("/api/v1/ambiguous?status=resolved")).json()["items"]
    assert [(o["id"], o["resolution"], o["resolution_note"]) for o in after] == [
        (second, "delivered", "ledger support confirmed it arrived")]
    audit = (await client.get("/api/v1/audit?limit=500")).json()["items"]
    assert any(e["action"] == "ambiguous.resolved" and e["subject_id"] for e in audit)


async def test_running_a_job_from_the_console_is_in_the_audit_log(client, demo):
    await client.post("/jobs/stale_partial_sweep/run")
    audit = (await client.get("/audit?action=job.ran")).text
    assert "stale_partial_sweep" in audit and "tester (admin)" in audit


async def test_the_inspector_page_shows_every_section(client, demo):
    text = (await client.get("/records/customer:C-1004")).text
    assert '<a href="/anomalies/' in text and "crm vs erp, open" in text
    staging = text[text.index('id="staging"'):text.index('id="attempts"')]
    assert "<td>1</td><td>erp</td><td>promoted" in staging
    audit = text[text.index('id="audit"'):]
    assert "anomaly.opened" in audit
    assert "circuit <span" in text  # each system's circuit state beside its deliveries


async def test_links_to_records_with_awkward_keys_lead_to_them(client):
    for entity_id in ("a/../../b", "x/..", "a/./b", "50% off #1?", "Zürich 東京"):
        response = await client.post("/api/v1/messages", json={
            "source_system": "erp", "entity_type": "customer", "entity_id": entity_id,
            "version": 1, "payload": {"n": 1}})
        assert response.status_code == 200, response.text
        listing = (await client.get("/audit?action=record.accepted")).text
        links = re.findall(r'href="(/records/[^"]+)"', listing)
        key = f"customer:{entity_id}"
        [link] = [link for link in links if unquote(link.removeprefix("/records/")) == key]
        assert "/" not in link.removeprefix("/records/")
        page = await client.get(link.replace("&amp;", "&"))
        assert page.status_code == 200 and f"Record {html.escape(key)}" in page.text


async def test_each_attention_card_links_to_the_rows_it_counts(client, demo):
    dashboard = (await client.get("/")).text
    cards = re.findall(r'<a class="card \w+" href="([^"]+)" data-item="(\w+)"[^>]*>\s*'
                       r'<div class="count">(\d+)</div>', dashboard)
    assert {name for _, name, _ in cards} >= {"delivery_backlog", "unsuccessful_replays",
                                              "stale_partials"}
    for href, name, count in cards:
        if name not in ("delivery_backlog", "unsuccessful_replays", "stale_partials"):
            continue
        listing = (await client.get(html.unescape(href) + "&limit=500")).text
        rows = len(re.findall(r"<tr><td>", listing))
        assert rows == int(count), (name, href, rows, count)


async def test_odd_form_input_is_refused_not_a_500(client, demo):
    assert (await client.post("/dlq/replay", data={"reason": "x", "dlq_id": "²"})
            ).status_code == 422
    assert (await client.post("/dlq/replay", data={
        "reason": "x", "scope": "all_matching", "system": "ledger",
        "from": "0001-01-01T00:00:00+05:00"})).status_code == 422
    assert (await client.post("/dlq/replay", data={
        "reason": "x", "scope": "all_matching", "system": "ledger",
        "reason_contains": "a\x00b"})).status_code == 422
    assert (await client.get("/events")).status_code == 422


async def test_a_notice_carries_any_character(client, demo):
    response = await client.post("/circuits/warehouse/open", data={
        "reason": "Wartung \u2013 5 \u20ac pro Minute \u2615", "confirm": "yes"})
    assert response.status_code == 303
    assert "Wartung \u2013 5 \u20ac pro Minute \u2615" in (await client.get("/circuits")).text


async def test_the_event_link_of_a_search_with_spaces_works(client, demo):
    text = (await client.get("/search?q=%20evt-5002%20")).text
    link = re.search(r'href="(/events\?correlation_id=[^"]+)"', text).group(1)
    assert (await client.get(html.unescape(link))).status_code == 200


async def test_an_inconclusive_status_query_is_audited(client, demo):
    [first, *_] = (await client.get("/api/v1/ambiguous?status=open")).json()["items"]
    await client.post(f"/ambiguous/{first['id']}/query-status")
    audit = (await client.get("/api/v1/audit?limit=500")).json()["items"]
    assert [e for e in audit if e["action"] == "ambiguous.queried"
            and e["subject_id"] == str(first["id"])]
    timeline = (await client.get(f"/api/v1/inspect/{first['idempotency_key']}")).json()
    assert any("status query about the ambiguous delivery to ledger: no answer"
               in entry["summary"] for entry in timeline["timeline"])


async def test_resolving_not_delivered_says_what_happened_to_the_resend(client, demo):
    [first, *_] = (await client.get("/api/v1/ambiguous?status=open")).json()["items"]
    await client.post("/circuits/ledger/open", data={"reason": "maintenance", "confirm": "yes"})
    await client.get("/circuits")  # reads the notice
    await client.post(f"/ambiguous/{first['id']}/resolve",
                      data={"resolution": "not_delivered", "note": "ledger lost it"})
    assert "it waits to be sent again" in (await client.get("/ambiguous")).text


async def test_the_audit_log_filters_by_subject(client, demo):
    text = (await client.get("/audit?subject=circuit&limit=500")).text
    actions = set(re.findall(r'<td class="kind">([a-z_.]+)</td>', text))
    assert actions and all(action.startswith("circuit.") for action in actions), actions
