"""The console's browser defences, in a real browser (Debian's Chromium) against a real
server: a page on another port of the same host cannot frame it, no page breaks its
Content-Security-Policy, /docs works with no network, and a login link needs a click and
leaves no trace in the address bar."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from playwright.async_api import expect

from pipeline_console.auth.sessions import issue_login_code
from pipeline_console.consumers.registry import ConsumerIdentity, Counts, heartbeat
from pipeline_console.demo import load_demo

CSP_WORDS = ("Content Security Policy", "Content-Security-Policy")


@pytest.fixture
async def demo(database, settings):
    return await load_demo(database, now=datetime.now(UTC), settings=settings)


@pytest.fixture
def other_port_site(tmp_path: Path, console_url: str) -> Iterator[str]:
    """Another service on this host (another port: the same site, so the browser sends it,
    and a frame of it, the console's cookie): a page that frames the console's /jobs."""
    folder = tmp_path / "other-site"
    folder.mkdir()
    (folder / "prize.html").write_text(
        "<!doctype html><title>Win a prize</title><h1>Click the button to win</h1>"
        f'<iframe id="victim" src="{console_url}/jobs" width="900" height="600"></iframe>')
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def csp_messages(page) -> list[str]:
    """Console messages about the Content-Security-Policy, as the page logs them."""
    found: list[str] = []
    page.on("console", lambda message: found.append(message.text)
            if any(word in message.text for word in CSP_WORDS) else None)
    return found


async def test_a_page_on_another_port_cannot_frame_the_signed_in_console(
        page, other_port_site, console_url):
    await page.goto("/jobs")  # signed in: the jobs page has its "Run now" buttons
    await expect(page.get_by_role("button", name="Run now").first).to_be_visible()
    refusals: list[str] = []
    page.on("console", lambda message: refusals.append(message.text))
    await page.goto(f"{other_port_site}/prize.html")
    await expect(page.locator("h1")).to_have_text("Click the button to win")
    [frame] = [frame for frame in page.frames if frame is not page.main_frame]
    # Chromium refuses to render it: the frame holds its own error page, not the console
    assert not frame.url.startswith(console_url), frame.url
    assert await frame.locator("button").count() == 0
    assert "Run now" not in await frame.content()
    assert any("frame" in text and ("ancestor" in text or "X-Frame-Options" in text)
               for text in refusals), refusals


NAV_EXTRA = ["/login", "/records/customer:C-1004", "/anomalies/1", "/circuits/crm-sync/reset",
             "/deliveries/1", "/events?correlation_id=evt-5002", "/records/customer:NOPE",
             "/systems/partner-webhook", "/systems/erp-api/preview?key=customer:C-1001"]


async def test_no_console_page_breaks_the_content_security_policy(page, demo, database):
    # a broker consumer, its backlog growing, so that the intake page draws a whole row
    consumer = ConsumerIdentity("rabbitmq", "amqp://broker:5672/", "orders", id="consumer:csp")
    now = datetime.now(UTC)
    await heartbeat(database, consumer, Counts(3, 2, 1), 5, now - timedelta(seconds=5))
    await heartbeat(database, consumer, Counts(3, 2, 1), 9, now)
    logged = csp_messages(page)
    await page.add_init_script(
        "window.__violations = []; document.addEventListener('securitypolicyviolation', "
        "e => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));")
    await page.goto("/")
    nav = await page.locator("header nav a").evaluate_all(
        "links => links.map(link => link.getAttribute('href'))")
    assert len(nav) >= 12 and "/intake" in nav
    for path in nav + NAV_EXTRA:
        await page.goto(path)
        await page.wait_for_timeout(200)
        assert await page.evaluate("window.__violations") == [], path
    assert logged == []
    await page.goto("/")
    assert await page.evaluate("typeof htmx") == "object"
    # htmx was told not to add its indicator <style> (which the policy would refuse)
    assert await page.evaluate("document.querySelectorAll('style').length") == 0


async def test_the_api_docs_render_every_operation_with_no_network(page, console_url):
    outside: list[str] = []

    async def only_this_server(route) -> None:
        if route.request.url.startswith(console_url):
            await route.continue_()
        else:
            outside.append(route.request.url)
            await route.abort()

    await page.context.route("**/*", only_this_server)
    logged = csp_messages(page)
    await page.goto("/docs")
    operations = page.locator(".opblock")
    await expect(operations.first).to_be_visible(timeout=30_000)
    async with httpx.AsyncClient() as http:
        spec = (await http.get(f"{console_url}/openapi.json")).json()
    expected = sum(len([m for m in methods if m in ("get", "post", "put", "delete", "patch")])
                   for methods in spec["paths"].values())
    await expect(operations).to_have_count(expected)
    assert outside == [] and logged == []


async def test_a_login_link_needs_a_click_and_leaves_no_fragment(page, database,
                                                                 console_url):
    async with database.transaction() as session:
        code = await issue_login_code(session, "night-operator", actor="test",
                                      now=datetime.now(UTC), ttl_s=900)
    await page.context.clear_cookies()
    await page.goto(f"/login#code={code}")
    await expect(page).to_have_url(f"{console_url}/login")
    assert await page.evaluate("location.hash") == ""
    button = page.get_by_role("button", name="Sign in with this link")
    await expect(button).to_be_visible()
    # whom it signs in as, asked without spending the code
    await expect(page.locator("#link-says")).to_have_text(
        "Sign in as night-operator (operator)?")
    await page.wait_for_timeout(500)  # nothing happens by itself
    assert page.url == f"{console_url}/login"
    assert not [c for c in await page.context.cookies() if c["name"] == "console_session"]
    await button.click()
    await expect(page).to_have_url(f"{console_url}/")
    await expect(page.locator("header .who")).to_have_text("night-operator (operator)")
    history = await page.evaluate("history.length")
    await page.go_back()
    assert code not in page.url and "#" not in page.url, (page.url, history)
    # what a service on another port receives is a session id: worth nothing to the API,
    # and nothing anywhere after sign-out
    [cookie] = [c["value"] for c in await page.context.cookies()
                if c["name"] == "console_session"]
    assert cookie.startswith("cs_")
    async with httpx.AsyncClient(base_url=console_url) as other_service:
        api = await other_service.get("/api/v1/records",
                                      headers={"Authorization": f"Bearer {cookie}"})
        assert api.status_code == 401
        await page.goto("/")
        await page.get_by_role("button", name="Sign out").click()
        await expect(page).to_have_url(f"{console_url}/login")
        other_service.cookies.set("console_session", cookie)
        replayed = await other_service.get("/jobs")
        assert replayed.status_code == 303  # to the sign-in page
    # and the link worked once (another query: a new page, not a move within this one)
    await page.goto(f"/login?next=%2F#code={code}")
    await expect(page.locator("#link-says")).to_have_text(
        "This link is unknown, used or expired.")
    await expect(page.get_by_role("button", name="Sign in with this link")).to_be_hidden()
    async with httpx.AsyncClient(base_url=console_url) as other_browser:
        spent = await other_browser.post("/login", data={"code": code},
                                         headers={"origin": console_url})
        assert spent.status_code == 401 and "used or expired" in spent.text


async def test_a_token_link_shows_a_button_too(page, operator_token, console_url):
    await page.context.clear_cookies()
    await page.goto(f"/login?next=%2Fjobs#token={operator_token}")
    await expect(page).to_have_url(f"{console_url}/login?next=%2Fjobs")
    await expect(page.locator("#link-says")).to_have_text(
        "Sign in as night-operator (operator)?")
    assert page.url.endswith("/login?next=%2Fjobs")
    await page.get_by_role("button", name="Sign in with this link").click()
    await expect(page).to_have_url(f"{console_url}/jobs")
