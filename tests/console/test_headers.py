"""What every answer tells the browser (api/web_security.py), the Host allow-list, the Origin
check and the CSRF comparison. The console's pages are taken from the app's routes, so a new
page cannot be forgotten."""

from __future__ import annotations

import re

import httpx
import pytest
from fastapi.routing import APIRoute, iter_route_contexts

from pipeline_console.demo import load_demo
from tests.conftest import make_token
from tests.console.test_sessions import browser_for, sign_in
from tests.test_auth import concrete

CSP_REQUIRED = ("default-src 'self'", "script-src 'self'", "style-src 'self'",
                "frame-ancestors 'none'", "base-uri 'none'", "form-action 'self'")


@pytest.fixture
async def demo(database, clock, settings):
    return await load_demo(database, now=clock.now, settings=settings)


def console_pages(app) -> list[str]:
    """Every GET route of the console (not the API, not the operations endpoints)."""
    return sorted({context.path for context in iter_route_contexts(app.routes)
                   if isinstance(context.original_route, APIRoute)
                   and "GET" in context.methods
                   and not context.path.startswith(("/api/", "/healthz", "/readyz",
                                                    "/metrics"))})


def assert_browser_headers(response: httpx.Response, where: str) -> None:
    headers = response.headers
    assert headers["x-frame-options"] == "DENY", where
    assert headers["x-content-type-options"] == "nosniff", where
    assert headers["referrer-policy"] == "same-origin", where
    if headers.get("content-type", "").startswith("text/html"):
        policy = headers["content-security-policy"]
        assert all(part in policy for part in CSP_REQUIRED), (where, policy)
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy, where
        assert headers["cross-origin-opener-policy"] == "same-origin", where
        assert headers["cache-control"] == "no-store", where


INLINE = [re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.I),  # a script without src
          re.compile(r"<[a-z][^>]*\sstyle\s*=", re.I),  # a style attribute
          re.compile(r"<style[\s>]", re.I),
          re.compile(r"<[a-z][^>]*\son[a-z]+\s*=", re.I),  # onclick=…
          re.compile(r"""(href|src|action)\s*=\s*["']?\s*javascript:""", re.I)]


def inline_code(text: str) -> list[str]:
    return [match.group(0) for pattern in INLINE for match in pattern.finditer(text)]


class TestEveryConsolePage:
    async def test_has_the_headers_and_no_inline_script_or_style(self, client, demo,
                                                                 database):
        pages = console_pages(client.app)
        assert {"/", "/jobs", "/login", "/anomalies/{anomaly_id}"} <= set(pages)
        operator = await make_token(database, "admin", name="header-check")
        async with browser_for(client.app) as browser:
            await sign_in(browser, token=operator)
            for path in pages:
                url = concrete(path)
                response = await browser.get(url)
                assert response.status_code == 200, (url, response.status_code)
                assert response.headers["content-type"].startswith("text/html"), url
                assert_browser_headers(response, url)
                assert inline_code(response.text) == [], url

    async def test_problem_answers_and_error_pages_carry_them_too(self, client):
        anyone = httpx.AsyncClient(transport=httpx.ASGITransport(app=client.app),
                                   base_url="http://test")
        async with anyone:
            for response in (await anyone.get("/api/v1/records"),  # 401 problem
                             await client.get("/api/v1/records/customer:NOPE"),  # 404
                             await client.get("/records/customer:NOPE"),  # an HTML 404
                             await client.get("/login"),
                             await client.get("/static/console.css"),
                             await client.get("/openapi.json"),
                             await anyone.get("/healthz")):
                assert_browser_headers(response, str(response.url))
            api = await client.get("/api/v1/records")
            assert "content-security-policy" not in api.headers  # JSON needs none

    async def test_an_unexpected_error_page_carries_them_too(self, settings, database):
        from pipeline_console.app import create_app

        app = create_app(settings, database=database)

        @app.get("/boom", include_in_schema=False)
        async def boom() -> None:
            raise RuntimeError("a bug")

        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as anyone:
            response = await anyone.get("/boom")
        assert response.status_code == 500
        assert_browser_headers(response, "/boom")

    async def test_the_page_templates_hold_no_inline_code(self):
        from pipeline_console.console.templating import HERE

        for template in sorted((HERE / "templates").glob("*.html")):
            assert inline_code(template.read_text()) == [], template.name


class TestSwaggerUi:
    async def test_docs_come_from_the_package_and_hold_no_inline_script(self, client):
        page = await client.get("/docs")
        assert page.status_code == 200
        assert_browser_headers(page, "/docs")
        assert inline_code(page.text) == []
        assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert assets and all(asset.startswith("/static/swagger/") for asset in assets)
        for asset in assets:
            answer = await client.get(asset)
            assert answer.status_code == 200 and len(answer.content) > 100, asset
        assert (await client.get("/redoc")).status_code == 404


class TestAllowedHosts:
    async def test_another_host_gets_400_naming_it(self, client):
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io",
                     "[::1]evil.example", "[::1]:80x"):
            response = await client.get("/api/v1/records", headers={"host": host})
            assert response.status_code == 400, host
            assert response.headers["content-type"] == "application/problem+json"
            assert host in response.json()["detail"] and response.json()["host"] == host
            assert response.headers["x-frame-options"] == "DENY"
        assert (await client.get("/", headers={"host": "rebound.example"})).status_code == 400

    async def test_health_and_readiness_answer_any_host(self, client):
        for path in ("/healthz", "/readyz"):
            response = await client.get(path, headers={"host": "10.0.0.7:8000"})
            assert response.status_code == 200, path

    async def test_an_allowed_host_with_a_port_or_in_brackets_is_served(self, client):
        for host in ("test:8000", "127.0.0.1:8000", "localhost", "[::1]:8000", "TEST"):
            response = await client.get("/api/v1/records", headers={"host": host})
            assert response.status_code == 200, host

    async def test_an_allowed_entry_is_read_as_a_host_header_is(self):
        from pipeline_console.api.web_security import WebSecurity

        hosts = WebSecurity(None, ["Pipeline.Example.com.:443", "[::1]"])
        assert hosts.host_allowed("pipeline.example.com") and hosts.host_allowed("[::1]:8000")
        assert not hosts.host_allowed("example.com")

    async def test_the_default_is_this_machine_only(self):
        from pipeline_console.config import Settings

        assert Settings.model_fields["allowed_hosts"].default == [
            "127.0.0.1", "localhost", "::1"]


class TestFormPosts:
    async def test_an_origin_with_another_scheme_or_port_is_refused(self, client, database):
        token = await make_token(database, "operator", name="origin-check")
        async with browser_for(client.app) as browser:
            for origin in ("https://test", "http://test:8080", "http://test.evil",
                           "null", "http://[bad"):
                response = await browser.post("/login", data={"token": token},
                                              headers={"origin": origin})
                assert response.status_code == 403, origin
            assert (await browser.post("/login", data={"token": token},
                                       headers={"origin": "http://test:80"})
                    ).status_code == 303  # the default port, written out

    @pytest.mark.parametrize("csrf", ["zz" * 20, "é" * 40, "\u2603", "", "0" * 4000])
    async def test_a_csrf_value_that_is_not_hex_is_403_not_500(self, client, database, demo,
                                                                csrf):
        token = await make_token(database, "operator", name="csrf-check")
        async with browser_for(client.app) as browser:
            await sign_in(browser, token=token)
            response = await browser.post("/jobs/promote_staging/run", data={"csrf": csrf})
            assert response.status_code == 403
            assert "CSRF" in response.text
