"""The operator console in a real browser (Debian's Chromium) against a real server process,
on SQLite and PostgreSQL: the 3 a.m. path — see what needs attention, find the record,
understand why, act, and see the proof."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from playwright.async_api import expect

from pipeline_console.demo import load_demo
from tests.conftest import make_token
from tests.delivery.test_delivery import add_system, ingest, run_pass
from tests.sink import Answer
from tests.support import message

ATTENTION = ("open_anomalies", "dead_letters", "ambiguous_outcomes", "open_circuits",
             "half_open_circuits", "stale_partials", "delivery_backlog",
             "unsuccessful_replays")


@pytest.fixture
async def demo(database, settings):
    """The demo scenario, ending now (the server runs on the real clock)."""
    return await load_demo(database, now=datetime.now(UTC), settings=settings)


@pytest.fixture
def now_clock(clock):
    clock.now = datetime.now(UTC)  # the in-process client and the server agree on time
    return clock


async def shoot(page, screenshots, name, backend):
    await page.screenshot(path=str(screenshots / f"{name}-{backend}.png"), full_page=False)


async def test_the_dashboard_shows_the_demos_attention_items(page, demo, screenshots,
                                                              backend):
    await page.goto("/")
    await expect(page.locator("h1")).to_have_text("Dashboard")
    for name in ATTENTION:
        cards = page.locator(f'[data-item="{name}"] .count')
        counts = [int(text) for text in await cards.all_inner_texts()]
        assert counts and sum(counts) > 0, name
    # Each card links to the page that lists its rows.
    await page.locator('[data-item="open_anomalies"]').click()
    await expect(page).to_have_url(re.compile(r"/anomalies\?status=open$"))
    await expect(page.locator("table tr")).to_have_count(2)  # header + the open conflict
    await page.goto("/")
    await shoot(page, screenshots, "dashboard", backend)


async def test_the_dashboard_refreshes_itself(page, demo, client):
    await page.goto("/")
    assert await page.evaluate("typeof htmx") == "object"  # the vendored copy, no CDN
    count = page.locator('[data-item="open_anomalies"] .count')
    await expect(count).to_have_text("1")
    [anomaly] = (await client.get("/api/v1/anomalies?status=open")).json()["items"]
    resolved = await client.post(f"/api/v1/anomalies/{anomaly['id']}/resolve",
                                 json={"resolution": "keep_current", "note": "seen"})
    assert resolved.status_code == 200
    await expect(count).to_have_text("0", timeout=20_000)  # the page polls every 2 s here


async def test_search_finds_a_record_and_the_inspector_shows_its_timeline(
        page, demo, screenshots, backend):
    await page.goto("/")
    await page.fill("header input[name=q]", "C-1004")
    await page.press("header input[name=q]", "Enter")
    await expect(page).to_have_url(re.compile(r"/records/customer(:|%3A)C-1004$"))
    timeline = page.locator("table.timeline")
    await expect(timeline).to_contain_text("accept_new (message erp-C-1004-v1)")
    await expect(timeline).to_contain_text(
        "has a different payload than current version 1 (erp) at the same version")
    kinds = await timeline.locator("td.kind").all_inner_texts()
    assert kinds.count("ingestion.quarantine") == 2
    await shoot(page, screenshots, "inspector", backend)
    # A business event's siblings are one click away.
    await page.goto("/search?q=evt-5002")
    await page.get_by_role("link", name="The whole business event evt-5002").click()
    await expect(page.locator("main")).to_contain_text("invoice:INV-9002")


async def test_an_anomaly_is_resolved_through_the_ui_and_the_audit_log_shows_it(
        page, demo, client, screenshots, backend):
    await page.goto("/anomalies")
    await page.get_by_role("link", name="customer:C-1004").first.wait_for()
    row = page.locator("tr", has_text="customer:C-1004")
    await row.locator("td a").first.click()
    await expect(page.locator("h1")).to_contain_text("customer:C-1004 version 1")
    differing = page.locator("table.payloads tr.diff-row")
    await expect(differing).to_have_count(1)
    await expect(differing).to_contain_text("/country")
    await shoot(page, screenshots, "anomaly", backend)
    await page.check("input[value=keep_current]")
    await page.fill("textarea[name=note]", "The ERP is the master for addresses")
    await page.get_by_role("button", name="Resolve").click()
    await expect(page.locator(".notice")).to_contain_text("resolved: keep_current")
    await page.goto("/audit?action=anomaly.resolved")
    await expect(page.locator("table")).to_contain_text("The ERP is the master for addresses")
    resolved = (await client.get("/api/v1/anomalies?key=customer:C-1004")).json()["items"]
    assert resolved[0]["status"] == "resolved"
    assert resolved[0]["resolution_note"] == "The ERP is the master for addresses"


@pytest.fixture
async def dead_letters(client, sink, now_clock):
    """Two dead letters from a real HTTP system that refused them (400), then recovered."""
    sink.answer(Answer(400, body="unknown customer"), Answer(400, body="unknown customer"))
    await add_system(client, sink, name="billing")
    await ingest(client, message(1, {"n": "A"}, entity_id="A"),
                 message(1, {"n": "B"}, entity_id="B"))
    await run_pass(client)
    await run_pass(client)
    entries = (await client.get("/api/v1/dlq?status=open")).json()["items"]
    assert len(entries) == 2
    sink.answer(Answer(200))
    return entries


async def test_a_dead_letter_is_replayed_and_its_execution_links_to_a_real_attempt(
        page, dead_letters, sink, screenshots, backend):
    received_before = len(sink.received)
    await page.goto("/dlq?system=billing")
    entry = next(e for e in dead_letters if e["idempotency_key"] == "customer:A")
    await page.check(f'input[name=dlq_id][value="{entry["id"]}"]')
    await page.fill("textarea[name=reason]", "billing fixed its customer import")
    await shoot(page, screenshots, "dead-letters", backend)
    await page.get_by_role("button", name="Create replay request").click()
    await expect(page.locator(".notice")).to_contain_text("validated")
    await expect(page.locator("#items")).to_contain_text("yes")
    await page.get_by_role("button", name=re.compile("Execute replay")).click()
    await expect(page.locator(".notice")).to_contain_text("executed: completed")
    await shoot(page, screenshots, "replay", backend)
    link = page.locator("a.attempt-link")
    await expect(link).to_have_count(1)
    attempt_id = (await link.inner_text()).removeprefix("attempt ")
    await link.click()
    row = page.locator(f"#attempt-{attempt_id}")
    await expect(row).to_contain_text("replay")
    await expect(row).to_contain_text("success")
    assert len(sink.received) == received_before + 1  # one real request, no more
    assert sink.received[-1].body["idempotency_key"] == "customer:A"


async def test_a_mixed_replay_is_refused_whole_with_each_reason_shown(
        page, client, dead_letters, sink):
    await ingest(client, message(2, {"n": "B2"}, entity_id="B"))  # B moves on to version 2
    await run_pass(client)
    received_before = len(sink.received)
    await page.goto("/dlq?system=billing")
    for entry in dead_letters:
        await page.check(f'input[name=dlq_id][value="{entry["id"]}"]')
    await page.fill("textarea[name=reason]", "retry everything")
    await page.get_by_role("button", name="Create replay request").click()
    await expect(page.locator(".problem")).to_contain_text("Refused as a whole: 1 of 2")
    items = page.locator("#items")
    await expect(items).to_contain_text("not the current production version (2)")
    await expect(items).to_contain_text("NO")
    await expect(page.get_by_role("button", name=re.compile("Execute"))).to_have_count(0)
    assert len(sink.received) == received_before  # nothing was sent


async def test_a_circuit_is_reset_with_a_reason_after_a_confirmation(page, demo, client,
                                                                     screenshots, backend):
    await page.goto("/circuits")
    row = page.locator("table").first.locator("tr", has_text="crm-sync")
    await expect(row).to_contain_text("open")
    await shoot(page, screenshots, "circuits", backend)
    await row.get_by_role("link", name="Reset…").click()
    await expect(page.locator("main")).to_contain_text("deliveries are held")
    await page.fill("textarea[name=reason]", "crm-sync restarted its API pods")
    await page.check("input[name=confirm]")
    await page.get_by_role("button", name="Reset the circuit of crm-sync").click()
    await expect(page.locator(".notice")).to_contain_text("now half-open")
    transitions = page.locator("table").nth(1)
    await expect(transitions).to_contain_text("crm-sync restarted its API pods")
    circuits = (await client.get("/api/v1/circuits")).json()["items"]
    assert {c["system"]: c["state"] for c in circuits}["crm-sync"] == "half_open"


async def test_a_circuit_action_without_csrf_or_a_reason_is_refused(page, demo, client,
                                                                     console_url):
    await page.goto("/circuits/crm-sync/reset")
    forged = await page.request.post("/circuits/crm-sync/reset",
                                     form={"reason": "forged", "confirm": "yes"})
    assert forged.status == 403  # the session cookie alone: no Origin, no CSRF token
    same_site = {"Origin": console_url}
    no_csrf = await page.request.post("/circuits/crm-sync/reset", headers=same_site,
                                      form={"reason": "forged", "confirm": "yes"})
    assert no_csrf.status == 403
    assert "CSRF" in await no_csrf.text()
    csrf = await page.locator("main input[name=csrf]").get_attribute("value")
    response = await page.request.post("/circuits/crm-sync/reset", headers=same_site,
                                       form={"reason": "  ", "confirm": "yes", "csrf": csrf})
    assert response.status == 422
    assert "a reason is required" in await response.text()
    circuits = (await client.get("/api/v1/circuits")).json()["items"]
    assert {c["system"]: c["state"] for c in circuits}["crm-sync"] == "open"


HOSTILE = "<script>window.__owned = 1</script><img src=x onerror=window.__owned=2>"


async def test_a_payload_with_script_is_shown_as_text(page, client, now_clock):
    await ingest(client, message(1, {"name": HOSTILE, "country": "DE"}, entity_id="X"),
                 message(1, {"name": HOSTILE + "!", "country": "DE"}, entity_id="X",
                             source_system="crm"))
    await page.goto("/records/customer:X")
    await page.locator("details", has_text="Production payload").locator("summary").click()
    await expect(page.locator("main")).to_contain_text(HOSTILE)
    assert await page.evaluate("window.__owned") is None
    await page.goto("/anomalies")
    await page.locator("tr", has_text="customer:X").locator("td a").first.click()
    await expect(page.locator("table.payloads")).to_contain_text("<script>")
    assert await page.evaluate("window.__owned") is None
    await page.goto("/search?q=" + "%3Cscript%3Ewindow.__owned%3D3%3C%2Fscript%3E")
    await expect(page.locator(".problem")).to_contain_text("<script>window.__owned=3")
    assert await page.evaluate("window.__owned") is None


async def test_sign_out_and_in_again_with_a_login_link(page, operator_token, console_url):
    await page.goto("/")
    await expect(page.locator("header .who")).to_have_text("night-operator (operator)")
    await page.get_by_role("button", name="Sign out").click()
    await expect(page).to_have_url(re.compile(r"/login$"))
    await page.goto("/anomalies")  # no session: back to sign in, and on to the page after
    await expect(page).to_have_url(re.compile(r"/login\?next=%2Fanomalies$"))
    await page.goto(f"/login#token={operator_token}")
    await expect(page).to_have_url(f"{console_url}/login")  # the fragment left at once
    await page.get_by_role("button", name="Sign in with this link").click()  # never alone
    await expect(page).to_have_url(f"{console_url}/")
    await expect(page.locator("header .who")).to_contain_text("night-operator")


async def test_a_viewer_sees_no_actions_and_the_server_refuses_them(page, database, demo,
                                                                    console_url):
    viewer = await make_token(database, "viewer", name="auditor")
    await page.context.clear_cookies()
    await page.goto(f"/login#token={viewer}")
    await page.get_by_role("button", name="Sign in with this link").click()
    await expect(page).to_have_url(f"{console_url}/")
    await page.goto("/anomalies/1")
    await expect(page.locator("h1")).to_contain_text("Anomaly 1")
    await expect(page.get_by_role("button", name="Resolve")).to_have_count(0)
    await page.goto("/circuits")
    await expect(page.get_by_role("link", name="Reset…")).to_have_count(0)
    csrf = await page.locator("header input[name=csrf]").get_attribute("value")
    refused = await page.request.post("/anomalies/1/resolve", headers={"Origin": console_url},
                                      form={"resolution": "keep_current", "note": "sneaky",
                                            "csrf": csrf})
    assert refused.status == 403
