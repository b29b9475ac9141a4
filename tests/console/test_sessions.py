"""Console sessions and one-time login codes (auth/sessions.py): the cookie is a random
session id, never a token; the API refuses it; logout, revocation, expiry and idleness end it
at once; a login code works once. In-process, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import httpx
import pytest
from sqlalchemy import select

from pipeline_console.app import create_app
from pipeline_console.auth.sessions import (
    issue_login_code,
    redeem_login_code,
    secret_hash,
)
from pipeline_console.auth.tokens import revoke_token
from pipeline_console.console.templating import NOTICE_COOKIE
from pipeline_console.models.auth import ConsoleSession
from tests.conftest import make_token
from tests.test_operations import run_cli

COOKIE = "console_session"


@asynccontextmanager
async def browser_for(app, base_url: str = "http://test"):
    """A client like a browser: no Authorization header, a cookie jar, this site's Origin."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=base_url,
                                 headers={"origin": base_url}) as browser:
        yield browser


@pytest.fixture
async def app(client):
    return client.app


@pytest.fixture
async def operator(database, clock):
    return await make_token(database, "operator", name="night-operator", now=clock.now)


async def sign_in(browser, **form) -> httpx.Response:
    response = await browser.post("/login", data=form)
    assert response.status_code == 303, response.text
    return response


async def signed_in(browser) -> bool:
    response = await browser.get("/jobs")
    assert response.status_code in (200, 303), response.status_code
    return response.status_code == 200


async def session_row(database, cookie: str) -> ConsoleSession:
    async with database.read() as session:
        return await session.scalar(select(ConsoleSession).where(
            ConsoleSession.session_hash == secret_hash(cookie)))


class TestTheCookieIsASessionNotAToken:
    async def test_the_cookie_holds_a_random_id_stored_only_as_its_hash(self, app, operator,
                                                                        database):
        async with browser_for(app) as browser:
            response = await sign_in(browser, token=operator)
            header = response.headers["set-cookie"]
            cookie = browser.cookies[COOKIE]
            assert cookie.startswith("cs_") and operator not in header
            assert "HttpOnly" in header and "SameSite=strict" in header
            assert "Path=/" in header and "Domain" not in header and "Secure" not in header
            row = await session_row(database, cookie)
            assert row is not None and row.ended_at is None
            assert (row.expires_at - row.created_at).total_seconds() == 12 * 3600
            assert await signed_in(browser)

    async def test_the_api_refuses_the_session_id_as_bearer_and_as_cookie(self, app, operator):
        async with browser_for(app) as browser:
            await sign_in(browser, token=operator)
            cookie = browser.cookies[COOKIE]
            as_cookie = await browser.get("/api/v1/records")
            assert as_cookie.status_code == 401
            as_bearer = await browser.get("/api/v1/records",
                                          headers={"Authorization": f"Bearer {cookie}"})
            assert as_bearer.status_code == 401
            assert as_bearer.headers["content-type"] == "application/problem+json"
            forged = await browser.post("/api/v1/jobs/promote_staging/run")
            assert forged.status_code == 401

    async def test_the_console_refuses_a_token_placed_in_the_cookie(self, app, operator):
        async with browser_for(app) as browser:
            browser.cookies.set(COOKIE, operator)
            assert not await signed_in(browser)


class TestASessionEnds:
    async def test_at_logout_the_old_cookie_is_dead_at_once(self, app, operator, database):
        async with browser_for(app) as browser:
            await sign_in(browser, token=operator)
            cookie = browser.cookies[COOKIE]
            assert await signed_in(browser)
            response = await browser.post("/logout")
            assert response.status_code == 303
            assert f'{COOKIE}=""' in response.headers["set-cookie"]
        async with browser_for(app) as replayed:  # someone who kept a copy of the cookie
            replayed.cookies.set(COOKIE, cookie)
            assert not await signed_in(replayed)
        assert (await session_row(database, cookie)).ended_reason == "logout"

    async def test_revoking_the_token_ends_its_sessions_at_once(self, app, operator, database,
                                                                clock):
        async with browser_for(app) as first, browser_for(app) as second:
            await sign_in(first, token=operator)
            await sign_in(second, token=operator)
            assert await signed_in(first) and await signed_in(second)
            async with database.transaction() as session:
                await revoke_token(session, "night-operator", actor="tester", now=clock.now)
            assert not await signed_in(first) and not await signed_in(second)
            for browser in (first, second):
                row = await session_row(database, browser.cookies[COOKIE])
                assert row.ended_reason == "token revoked"

    async def test_signing_in_again_replaces_the_browsers_session(self, app, operator,
                                                                  database):
        async with browser_for(app) as browser:
            await sign_in(browser, token=operator)
            old = browser.cookies[COOKIE]
            await sign_in(browser, token=operator)
            new = browser.cookies[COOKIE]
            assert new != old and await signed_in(browser)
        assert (await session_row(database, old)).ended_reason == "replaced"

    async def test_an_expired_session_is_refused(self, settings, database, clock, operator):
        app = create_app(settings.model_copy(update={"console_session_max_age_s": 3600,
                                                     "console_session_idle_s": 7200}),
                         database=database, clock=clock)
        async with app.router.lifespan_context(app), browser_for(app) as browser:
            await sign_in(browser, token=operator)
            clock.advance(minutes=59)
            assert await signed_in(browser)
            clock.advance(minutes=1)
            assert not await signed_in(browser)

    async def test_an_idle_session_is_refused_and_use_keeps_it_alive(self, app, operator,
                                                                      clock):
        async with browser_for(app) as browser:
            await sign_in(browser, token=operator)
            for _ in range(3):  # used every 50 minutes: alive after 2.5 hours
                clock.advance(minutes=50)
                assert await signed_in(browser)
            clock.advance(minutes=61)
            assert not await signed_in(browser)

    async def test_a_short_idle_timeout_never_signs_out_a_session_in_use(
            self, settings, database, clock, operator):
        app = create_app(settings.model_copy(update={"console_session_idle_s": 60}),
                         database=database, clock=clock)
        async with app.router.lifespan_context(app), browser_for(app) as browser:
            await sign_in(browser, token=operator)
            for _ in range(6):  # used every 31 s for three minutes
                clock.advance(seconds=31)
                assert await signed_in(browser)
            clock.advance(seconds=61)
            assert not await signed_in(browser)

    async def test_last_seen_is_written_at_most_once_a_minute(self, app, operator, database,
                                                              clock):
        async with browser_for(app) as browser:
            await sign_in(browser, token=operator)
            cookie = browser.cookies[COOKIE]
            signed_at = (await session_row(database, cookie)).last_seen_at
            clock.advance(seconds=30)
            assert await signed_in(browser)
            assert (await session_row(database, cookie)).last_seen_at == signed_at
            clock.advance(seconds=31)
            assert await signed_in(browser)
            assert (await session_row(database, cookie)).last_seen_at == clock.now


class TestOverHttps:
    async def test_the_cookie_is_secure_and_host_prefixed(self, app, operator):
        async with browser_for(app, "https://test") as browser:
            response = await sign_in(browser, token=operator)
            header = response.headers["set-cookie"]
            assert header.startswith("__Host-console_session=cs_")
            assert "Secure" in header and "Path=/" in header and "Domain" not in header
            assert await signed_in(browser)
            # the plain name, which plain HTTP or a sibling host could plant, is not read
            plain = browser.cookies["__Host-console_session"]
            browser.cookies.clear()
            browser.cookies.set(COOKIE, plain)
            assert not await signed_in(browser)

    async def test_behind_a_proxy_that_ends_tls_a_setting_says_so(self, settings, database,
                                                                  clock, operator):
        app = create_app(settings.model_copy(update={"console_https": True}),
                         database=database, clock=clock)
        async with app.router.lifespan_context(app), browser_for(app) as browser:
            # the browser is on https (only the proxy speaks http to us): its Origin says so
            browser.headers["origin"] = "https://test"
            response = await sign_in(browser, token=operator)
            assert response.headers["set-cookie"].startswith("__Host-console_session=")
            assert "Secure" in response.headers["set-cookie"]
            browser.headers["origin"] = "http://test"  # what no browser on https sends
            refused = await browser.post("/login", data={"token": operator})
            assert refused.status_code == 403


class TestLoginCodes:
    async def code(self, database, clock, name="night-operator", ttl_s=900) -> str:
        async with database.transaction() as session:
            return await issue_login_code(session, name, actor="tester", now=clock.now,
                                          ttl_s=ttl_s)

    async def test_a_code_signs_in_once(self, app, operator, database, clock):
        code = await self.code(database, clock)
        assert code.startswith("lc_")
        async with browser_for(app) as browser:
            await sign_in(browser, code=code)
            assert await signed_in(browser)
        async with browser_for(app) as again:
            second = await again.post("/login", data={"code": code})
            assert second.status_code == 401 and "used or expired" in second.text
            assert COOKIE not in again.cookies

    async def test_an_expired_code_is_refused(self, app, operator, database, clock):
        code = await self.code(database, clock, ttl_s=60)
        clock.advance(seconds=60)
        async with browser_for(app) as browser:
            assert (await browser.post("/login", data={"code": code})).status_code == 401

    async def test_a_code_of_a_revoked_token_is_refused(self, app, operator, database, clock):
        code = await self.code(database, clock)
        async with database.transaction() as session:
            await revoke_token(session, "night-operator", actor="tester", now=clock.now)
        async with browser_for(app) as browser:
            assert (await browser.post("/login", data={"code": code})).status_code == 401

    async def test_two_uses_at_the_same_moment_let_one_win(self, database, operator, clock):
        code = await self.code(database, clock)
        start = asyncio.Event()

        async def use() -> bool:
            async with database.transaction() as session:
                await start.wait()
                return await redeem_login_code(session, code, now=clock.now) is not None

        racers = [asyncio.create_task(use()) for _ in range(2)]
        await asyncio.sleep(0.05)
        start.set()
        assert sorted(await asyncio.gather(*racers)) == [False, True]

    async def test_two_browsers_posting_one_code_together_get_one_session(self, app, operator,
                                                                          database, clock):
        code = await self.code(database, clock)
        async with browser_for(app) as first, browser_for(app) as second:
            answers = await asyncio.gather(first.post("/login", data={"code": code}),
                                           second.post("/login", data={"code": code}))
        assert sorted(answer.status_code for answer in answers) == [303, 401]

    async def test_the_cli_prints_a_link_with_a_code_never_the_token(self, client,
                                                                     database_url, operator):
        result = await asyncio.to_thread(run_cli, database_url, "tokens", "login-link",
                                         "night-operator", "--base-url",
                                         "https://console.example/")
        assert result.returncode == 0, result.stderr
        link = result.stdout.strip().splitlines()[-1]
        assert link.startswith("https://console.example/login#code=lc_")
        assert operator not in result.stdout
        code = link.partition("#code=")[2]
        async with browser_for(client.app) as browser:
            await sign_in(browser, code=code)
            assert await signed_in(browser)
        unknown = await asyncio.to_thread(run_cli, database_url, "tokens", "login-link",
                                          "nobody")
        assert unknown.returncode == 2 and "no active token" in unknown.stderr
        script = await asyncio.to_thread(run_cli, database_url, "tokens", "login-link",
                                         "night-operator", "--base-url", "javascript:alert(1)")
        assert script.returncode == 2 and "--base-url must be an http" in script.stderr

    async def test_an_ingest_token_cannot_sign_in_nor_get_a_link(self, client, database,
                                                                  database_url, clock):
        """Every console page would refuse it (it only posts messages): the sign-in says so
        instead of starting a session that leads nowhere."""
        shop = await make_token(database, "ingest", name="shop-ingest", sources=["shop"],
                                now=clock.now)
        async with browser_for(client.app) as browser:
            refused = await browser.post("/login", data={"token": shop})
            assert refused.status_code == 403
            assert "cannot sign in to the console" in refused.text
            assert COOKIE not in browser.cookies
        link = await asyncio.to_thread(run_cli, database_url, "tokens", "login-link",
                                       "shop-ingest")
        assert link.returncode == 2 and "ingest token" in link.stderr


class TestNotices:
    async def test_a_notice_is_shown_once_to_the_session_that_caused_it(self, app, operator):
        async with browser_for(app) as browser:
            await sign_in(browser, token=operator)
            page = (await browser.get("/jobs")).text
            csrf = page.split('name="csrf" value="')[1].split('"')[0]
            ran = await browser.post("/jobs/promote_staging/run", data={"csrf": csrf})
            assert ran.status_code == 303
            signed = browser.cookies[NOTICE_COOKIE]
            assert "Job promote_staging" in (await browser.get("/jobs")).text
        async with browser_for(app) as other:  # the same signed cookie, another session
            await sign_in(other, token=operator)
            other.cookies.set(NOTICE_COOKIE, signed)
            assert "Job promote_staging" not in (await other.get("/jobs")).text

    @pytest.mark.parametrize("planted", ["Your%20session%20expired%3A%20call%20%2B1-555",
                                         "Your session expired: call +1-555",
                                         '["", "Your session expired: call +1-555"]'])
    async def test_a_planted_notice_shows_nothing(self, app, operator, planted):
        async with browser_for(app) as browser:
            await sign_in(browser, token=operator)
            browser.cookies.set(NOTICE_COOKIE, planted)
            page = await browser.get("/jobs")
            assert page.status_code == 200
            assert "call +1-555" not in page.text and 'class="notice"' not in page.text


class TestWhomALinkSignsInAs:
    async def test_a_code_is_named_without_being_spent(self, app, operator, database, clock):
        code = await TestLoginCodes().code(database, clock)
        async with browser_for(app) as browser:
            for _ in range(2):
                who = await browser.post("/login/who", data={"code": code})
                assert who.json() == {"name": "night-operator", "role": "operator"}
            token = await browser.post("/login/who", data={"token": operator})
            assert token.json() == {"name": "night-operator", "role": "operator"}
            await sign_in(browser, code=code)  # still unspent
            spent = await browser.post("/login/who", data={"code": code})
            assert spent.status_code == 404 and "night-operator" not in spent.text
            other_site = await browser.post("/login/who", data={"code": code},
                                            headers={"origin": "http://evil.example"})
            assert other_site.status_code == 403
