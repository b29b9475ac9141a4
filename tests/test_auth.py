"""Tokens and roles. The role-by-endpoint matrix is generated from the application's routes, so
a new endpoint that declares no role fails this suite."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from fastapi.routing import APIRoute, iter_route_contexts

from pipeline_console.app import create_app
from pipeline_console.auth.dependencies import Public, Requires
from pipeline_console.auth.roles import ROLES, allows
from pipeline_console.auth.tokens import (
    KnownToken,
    TokenCache,
    create_token,
    hash_token,
    new_token,
    revoke_token,
)
from pipeline_console.config import Settings
from pipeline_console.demo import load_demo
from pipeline_console.models import ApiToken
from tests.conftest import make_token
from tests.support import message
from tests.test_operations import run_cli


def declared_role(route: APIRoute) -> str | None:
    for dependency in route.dependant.dependencies:
        if isinstance(dependency.call, Requires | Public):
            return dependency.call.role
    return None


def routes(app) -> list[tuple[str, str, APIRoute]]:
    return sorted(
        (method, context.path, context.original_route)
        for context in iter_route_contexts(app.routes)
        if isinstance(context.original_route, APIRoute)
        for method in context.methods if method != "HEAD")


def test_every_route_declares_its_role():
    app = create_app(Settings())
    undeclared = [f"{method} {path}" for method, path, route in routes(app)
                  if declared_role(route) is None]
    assert undeclared == []
    assert len(routes(app)) > 70  # the API and the console, not an empty list


def test_the_roles_admit_what_docs_security_says():
    # operators may post messages too (API.md: operator and admin tokens post from any source)
    assert [r for r in ROLES if allows(r, "ingest")] == ["ingest", "operator", "admin"]
    assert [r for r in ROLES if allows(r, "viewer")] == ["viewer", "operator", "admin"]
    assert [r for r in ROLES if allows(r, "operator")] == ["operator", "admin"]
    assert [r for r in ROLES if allows(r, "admin")] == ["admin"]


@pytest.fixture
async def tokens(database, clock):
    return {role: await make_token(database, role, name=f"matrix-{role}", now=clock.now)
            for role in ROLES}


@pytest.fixture
async def demo(database, clock, settings):
    await load_demo(database, now=clock.now, settings=settings)


SAMPLES = {"key": "customer:C-1004", "anomaly_id": "1", "delivery_id": "1", "replay_id": "1",
           "ambiguous_id": "1", "correlation_id": "evt-5002", "system": "crm-sync",
           "action": "reset"}
NAMES = {"/systems/": "ledger", "/entity-types/": "customer", "/reports/": "ingestion",
         "/jobs/": "promote_staging"}
QUERIES = {"/api/v1/inspect": "?correlation_id=evt-5002", "/events": "?correlation_id=evt-5002",
           "/search": "?q=evt-5002"}


def concrete(path: str) -> str:
    def fill(match: re.Match) -> str:
        name = match.group(1).split(":")[0]
        if name == "name":
            return next(value for prefix, value in NAMES.items() if prefix in path)
        return SAMPLES[name]

    return re.sub(r"\{([^}]+)\}", fill, path) + QUERIES.get(path, "")


async def test_each_role_is_admitted_where_allowed_and_refused_where_not(
        client, tokens, demo):
    app = client.app
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    outcomes = []
    async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                 headers={"origin": "http://test"}) as anyone:
        for method, path, route in routes(app):
            required = declared_role(route)
            url = concrete(path)
            body = message(1, entity_id="MATRIX") if path == "/api/v1/messages" else None
            nobody = await anyone.request(method, url, json=body)
            if required == "public":  # no token needed (a failed sign-in is its own 401 page)
                assert nobody.status_code not in (403, 500), (method, path)
                if method == "GET":
                    assert nobody.status_code == 200, (method, path)
                continue
            assert nobody.status_code in (401, 303), (method, path, nobody.status_code)
            for role, token in tokens.items():
                response = await anyone.request(method, url, json=body,
                                                headers={"Authorization": f"Bearer {token}"})
                status = response.status_code
                if not allows(role, required):
                    assert status == 403, (method, path, role, status)
                elif method == "GET" or path == "/api/v1/messages":
                    # reads, and a valid message, succeed for every role admitted
                    assert 200 <= status < 300, (method, path, role, status, response.text[:300])
                else:
                    # an action admitted without a valid body: refused for the body, not the role
                    assert status not in (401, 403) and status < 500, (method, path, role, status)
                outcomes.append((role, required, status))
    assert {required for _, required, _ in outcomes} == {"ingest", "viewer", "operator", "admin"}


async def test_no_token_a_wrong_token_and_a_revoked_token_are_401(client, database, clock):
    token = await make_token(database, "viewer", name="soon-revoked", now=clock.now)
    headers = {"Authorization": f"Bearer {token}"}
    transport = httpx.ASGITransport(app=client.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as anyone:
        assert (await anyone.get("/api/v1/records", headers=headers)).status_code == 200
        missing = await anyone.get("/api/v1/records")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert missing.headers["content-type"] == "application/problem+json"
        wrong = await anyone.get("/api/v1/records", headers={"Authorization": "Bearer pc_x"})
        assert wrong.status_code == 401
        result = await asyncio.to_thread(run_cli, str(database.engine.url.render_as_string(
            hide_password=False)), "tokens", "revoke", "soon-revoked")
        assert result.returncode == 0, result.stderr
        # A process remembers a token it has just checked for TOKEN_CACHE_S (5 s by default),
        # so revocation reaches it within that time, not at once.
        assert (await anyone.get("/api/v1/records", headers=headers)).status_code == 200
        clock.advance(seconds=5)
        assert (await anyone.get("/api/v1/records", headers=headers)).status_code == 401


async def test_without_the_cache_a_revoked_token_is_refused_at_once(database, clock):
    app = create_app(Settings(database_url=database.engine.url.render_as_string(
        hide_password=False), token_cache_s=0), database=database, clock=clock)
    token = await make_token(database, "viewer", name="revoked-now", now=clock.now)
    headers = {"Authorization": f"Bearer {token}"}
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test") as anyone:
        assert (await anyone.get("/api/v1/records", headers=headers)).status_code == 200
        async with database.transaction() as session:
            await revoke_token(session, "revoked-now", actor="tester", now=clock.now)
        assert (await anyone.get("/api/v1/records", headers=headers)).status_code == 401


async def test_the_cache_never_remembers_an_unknown_token(client, database, clock):
    """A refused token is looked up again next time: a token created a moment later works."""
    token = new_token()
    headers = {"Authorization": f"Bearer {token}"}
    assert (await client.get("/api/v1/records", headers=headers)).status_code == 401
    async with database.transaction() as session:
        await create_token(session, name="just-made", role="viewer", actor="tester",
                           now=clock.now, token=token)
    assert (await client.get("/api/v1/records", headers=headers)).status_code == 200


async def test_tokens_are_stored_only_as_hashes_and_printed_once(client, database_url,
                                                                 database):
    created = await asyncio.to_thread(run_cli, database_url, "tokens", "create", "--role",
                                      "operator", "--name", "alice")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    assert token.startswith("pc_") and len(token) >= 40
    async with database.read() as session:
        stored = await session.scalar(ApiToken.__table__.select().where(
            ApiToken.name == "alice").with_only_columns(ApiToken.token_hash))
    assert stored == hash_token(token)
    listed = await asyncio.to_thread(run_cli, database_url, "tokens", "list")
    assert "alice" in listed.stdout and "operator" in listed.stdout
    assert token not in listed.stdout
    twice = await asyncio.to_thread(run_cli, database_url, "tokens", "create", "--role",
                                    "viewer", "--name", "alice")
    assert twice.returncode == 2 and "already named" in twice.stderr
    bad = await asyncio.to_thread(run_cli, database_url, "tokens", "create", "--role",
                                  "root", "--name", "mallory")
    assert bad.returncode == 2


async def test_the_actor_in_the_audit_log_is_the_tokens_name_and_role(client, database,
                                                                      clock, demo):
    token = await make_token(database, "operator", name="night-shift", now=clock.now)
    response = await client.post("/api/v1/circuits/crm-sync/reset",
                                 json={"reason": "pods restarted"},
                                 headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    audit = (await client.get("/api/v1/audit?limit=500")).json()["items"]
    [event] = [e for e in audit if e["action"] == "circuit.half_open"
               and e["subject_id"] == "crm-sync"]
    assert event["actor"] == "night-shift (operator)"


async def test_a_bootstrap_admin_token_is_created_at_start_up(database_url, database):
    token = "pc_" + "b" * 40
    settings = Settings(database_url=database_url, bootstrap_admin_token=token)
    app = create_app(settings, database=database)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=transport, base_url="http://test") as anyone:
        response = await anyone.post("/api/v1/systems", headers={
            "Authorization": f"Bearer {token}"}, json={"name": "x", "transport": "simulated"})
        assert response.status_code == 201, response.text
    async with app.router.lifespan_context(app):  # a restart keeps the same token
        pass
    async with database.read() as session:
        rows = (await session.execute(ApiToken.__table__.select().where(
            ApiToken.name == "bootstrap-admin"))).all()
    assert len(rows) == 1
    with pytest.raises(ValueError, match="pc_"):
        Settings(bootstrap_admin_token="short")


async def test_with_auth_disabled_anyone_is_admin_and_a_warning_is_logged(
        database_url, database, caplog):
    settings = Settings(database_url=database_url, auth="disabled")
    app = create_app(settings, database=database)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=transport, base_url="http://test") as anyone:
        assert (await anyone.get("/api/v1/records")).status_code == 200
    assert "AUTHENTICATION IS DISABLED" in caplog.text


async def test_metrics_are_for_viewers_unless_configured_open(client, tokens):
    transport = httpx.ASGITransport(app=client.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as anyone:
        assert (await anyone.get("/metrics")).status_code == 401
        viewer = {"Authorization": f"Bearer {tokens['viewer']}"}
        assert (await anyone.get("/metrics", headers=viewer)).status_code == 200
        client.app.state.settings = client.app.state.settings.model_copy(
            update={"metrics_auth": "open"})
        assert (await anyone.get("/metrics")).status_code == 200


def expected_role(method: str, path: str) -> str:
    """The policy of docs/security.md, independent of what the routes declare."""
    if path in ("/healthz", "/readyz", "/login", "/login/who", "/logout"):
        return "public"
    if path in ("/api/v1/tokens", "/tokens"):  # who holds which token: admins only
        return "admin"
    # a system's form holds its secrets' fields: admins, as the API's changes to systems
    if path in ("/systems/new", "/systems/{name}/edit"):
        return "admin"
    # a preview shows a record's payload as it would be sent: operators
    if path in ("/systems/{name}/preview", "/api/v1/systems/{name}/preview"):
        return "operator"
    if method == "GET":
        return "operator" if re.fullmatch(r"/circuits/\{system\}/\{action\}", path) else "viewer"
    if path.startswith("/api/v1/messages"):
        return "ingest"
    if path.startswith(("/api/v1/systems", "/api/v1/entity-types")):
        return "admin"
    return "operator"


def test_each_route_declares_the_role_the_policy_gives_it():
    app = create_app(Settings())
    wrong = [(method, path, declared_role(route), expected_role(method, path))
             for method, path, route in routes(app)
             if declared_role(route) != expected_role(method, path)]
    assert wrong == []
    # the lists of the processes that run the pipeline: for every viewer, page and API alike
    declared = {(method, path): declared_role(route) for method, path, route in routes(app)}
    for path in ("/workers", "/api/v1/workers", "/intake", "/api/v1/intake"):
        assert declared[("GET", path)] == "viewer", path


def test_the_only_routes_without_a_role_are_the_public_description_and_static_files():
    app = create_app(Settings())
    others = sorted(getattr(route, "path", "") for route in app.routes
                    if not isinstance(route, APIRoute) and getattr(route, "path", None)
                    and not any(context.original_route is route
                                for context in iter_route_contexts(app.routes)
                                if isinstance(context.original_route, APIRoute)))
    assert others == ["/docs", "/openapi.json", "/static"]


async def test_the_console_cookie_opens_no_api_route(client, database, clock):
    """A page on another site can make a browser send the console's cookie, never a header."""
    token = await make_token(database, "admin", name="cookie-holder", now=clock.now)
    transport = httpx.ASGITransport(app=client.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                 cookies={"console_session": token}) as browser:
        forged = await browser.post("/api/v1/jobs/promote_staging/run")
        assert forged.status_code == 401
        text_plain = await browser.post("/api/v1/messages", content=b'{"x": 1}',
                                        headers={"content-type": "text/plain"})
        assert text_plain.status_code == 401
        # nor does the console: its cookie holds a session id, never a token
        assert (await browser.get("/")).status_code == 303
        no_session = await browser.post("/jobs/promote_staging/run", data={"csrf": "x"})
        assert no_session.status_code == 401
        null_origin = await browser.post("/login", data={"token": token},
                                         headers={"origin": "null"})
        assert null_origin.status_code == 403


async def test_a_host_made_of_placeholders_is_refused(client):
    response = await client.post("/api/v1/systems", json={
        "name": "sneaky", "transport": "http", "url": "http://example.org/in",
        "status_url": "http://1{version}7.0.0.1:9/s/{key}"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "status_url"


async def test_a_revoked_bootstrap_value_is_refused_loudly(database_url, database):
    first, second = "pc_" + "a" * 40, "pc_" + "c" * 40
    for value in (first, second):
        app = create_app(Settings(database_url=database_url, bootstrap_admin_token=value),
                         database=database)
        async with app.router.lifespan_context(app):
            pass
    app = create_app(Settings(database_url=database_url, bootstrap_admin_token=first),
                     database=database)
    with pytest.raises(Exception, match="revoked"):
        async with app.router.lifespan_context(app):
            pass


async def test_requests_that_miss_the_cache_together_share_one_lookup(client, database, clock):
    """32 requests with a token the process has not seen (or whose entry just expired) read
    it once, not 32 times; a wrong token is refused for all who sent it together."""
    token = await make_token(database, "viewer", name="busy-sender", now=clock.now)
    cache = client.app.state.token_cache
    for round_ in range(2):
        before = cache.lookups
        answers = await asyncio.gather(*(
            client.get("/api/v1/records", headers={"Authorization": f"Bearer {token}"})
            for _ in range(32)))
        assert [answer.status_code for answer in answers] == [200] * 32
        assert cache.lookups - before == 1, round_
        clock.advance(seconds=6)  # the entry expires: the next burst misses together again
    before = cache.lookups
    wrong = await asyncio.gather(*(
        client.get("/api/v1/records", headers={"Authorization": f"Bearer {new_token()}"})
        for _ in range(3)))
    assert [answer.status_code for answer in wrong] == [401] * 3
    assert cache.lookups - before == 3  # three different tokens: three lookups


async def test_a_caller_that_goes_away_does_not_cancel_the_shared_lookup(clock):
    cache = TokenCache(5, clock)
    release = asyncio.Event()

    async def lookup() -> KnownToken:
        await release.wait()
        return KnownToken("someone", "viewer")

    first = asyncio.create_task(cache.resolve("pc_token", lookup))
    second = asyncio.create_task(cache.resolve("pc_token", lookup))
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    assert await second == KnownToken("someone", "viewer")
    assert first.cancelled() and cache.lookups == 1
    assert cache.get("pc_token") == KnownToken("someone", "viewer")
