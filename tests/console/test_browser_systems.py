"""The system form in a real browser (what plain HTTP cannot show: the form posts with its
CSRF token and Origin as Chromium sends them, and a secret is typed into a password field
that comes back empty, with "set" beside it)."""

from __future__ import annotations

import pytest
from playwright.async_api import expect

from tests.conftest import make_token

pytestmark = pytest.mark.backends

TOKEN = "tok-typed-in-chromium-9b2e"


async def test_an_admin_registers_a_system_with_a_bearer_token_and_edits_it_keeping_it(
        page, database, client, console_url, screenshots, backend):
    admin = await make_token(database, "admin", name="integrator")
    await page.context.clear_cookies()
    await page.goto(f"/login#token={admin}")
    await page.get_by_role("button", name="Sign in with this link").click()
    await expect(page).to_have_url(f"{console_url}/")

    await page.goto("/systems")
    await page.get_by_role("link", name="Register a system").click()
    form = page.locator("#system-form")
    await form.locator("input[name=name]").fill("erp-api")
    await form.locator("select[name=method]").select_option("PUT")
    await form.locator("input[name=url]").fill("https://erp.example/api/customers/{entity_id}")
    await form.locator("input[name=entity_types]").fill("customer")
    await expect(form.locator("input[name=auth_token]")).to_be_hidden()  # auth none
    await form.locator("select[name=auth_type]").select_option("bearer")
    await expect(form.locator("input[name=auth_username]")).to_be_hidden()
    await form.locator("input[name=auth_token]").fill(TOKEN)
    await form.locator("textarea[name=headers]").fill("X-Tenant: t1")
    await form.get_by_role("button", name="Register").click()
    await expect(page).to_have_url(f"{console_url}/systems/erp-api")
    await expect(page.locator("#connection")).to_contain_text("token set · fingerprint")

    fingerprint = (await client.get("/api/v1/systems/erp-api")).json()["auth"]["token"][
        "fingerprint"]
    await page.get_by_role("link", name="Change its settings").click()
    secret = page.locator("#system-form input[name=auth_token]")
    await expect(secret).to_have_attribute("type", "password")
    await expect(secret).to_have_value("")
    await expect(page.locator("[data-secret=auth_token]")).to_contain_text(fingerprint[:8])
    await page.locator("#system-form input[name=max_in_flight]").fill("3")
    await page.screenshot(path=str(screenshots / f"system-form-{backend}.png"), full_page=True)
    await page.get_by_role("button", name="Save changes").click()
    await expect(page).to_have_url(f"{console_url}/systems/erp-api")
    await expect(page.locator("body")).to_contain_text("System erp-api changed: max_in_flight")

    after = (await client.get("/api/v1/systems/erp-api")).json()
    assert after["max_in_flight"] == 3 and after["auth"]["token"]["fingerprint"] == fingerprint
    assert TOKEN not in await page.content()
