"""The console's system form and page, over plain HTTP (the HTML is what is checked; no
browser adds anything here): secrets typed into the form are stored, shown as "set" with a
fingerprint, kept when the form is saved again without them, replaced when retyped, and
never appear in any page's HTML, not even the form shown again after a refusal."""

from __future__ import annotations

import html
import re
from datetime import timedelta
from html.parser import HTMLParser

import pytest
from sqlalchemy import func, select

from pipeline_console.delivery.vault import Vault, load_secrets
from pipeline_console.models import AuditEvent, DownstreamSystem
from tests.conftest import TEST_SECRET_KEY, make_token

pytestmark = pytest.mark.backends

TOKEN = "tok-console-form-4f1c9e"
SIGNING = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
NEW_TOKEN = "tok-console-form-replaced-77"


class FormFields(HTMLParser):
    """What a browser would post for the page's form #system-form, as it was rendered (a
    checkbox only when checked, a select's selected option, a textarea's text)."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}
        self.inside = False
        self.select: str | None = None
        self.first_option: str | None = None
        self.textarea: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "form":
            self.inside = attributes.get("id") == "system-form"
        if not self.inside:
            return
        if tag == "input" and attributes.get("name"):
            if attributes.get("type") != "checkbox" or "checked" in attributes:
                self.fields[attributes["name"]] = attributes.get("value", "")
        elif tag == "select":
            self.select, self.first_option = attributes["name"], None
        elif tag == "option" and self.select:
            self.option_selected = "selected" in attributes
        elif tag == "textarea":
            self.textarea = attributes["name"]
            self.fields[self.textarea] = ""

    def handle_data(self, data: str) -> None:
        if self.textarea:
            self.fields[self.textarea] += data
        elif self.select and getattr(self, "option_selected", None) is not None:
            if self.first_option is None:
                self.first_option = data
                self.fields.setdefault(self.select, data)
            if self.option_selected:
                self.fields[self.select] = data
            self.option_selected = None

    def handle_endtag(self, tag: str) -> None:
        if tag == "textarea":
            self.textarea = None
        elif tag == "select":
            self.select = None
        elif tag == "form":
            self.inside = False


def form_fields(page: str) -> dict[str, str]:
    parser = FormFields()
    parser.feed(page)
    return parser.fields


async def register(client, **fields) -> object:
    form = {"name": "erp-api", "transport": "http", "method": "PUT",
            "url": "http://127.0.0.1:9/customers/{entity_id}", "entity_types": "customer",
            "auth_type": "bearer", "auth_token": TOKEN, "signing": "on",
            "signing_secret": SIGNING, "headers": "X-Tenant: t1",
            "body_template": "{id: .entity_id, name: .payload.name}",
            "max_in_flight": "4", "max_per_second": "2.5", **fields}
    return await client.post("/systems/new", data=form)


async def every_page(client, name: str) -> str:
    pages = [await client.get(path) for path in (
        "/systems", f"/systems/{name}", f"/systems/{name}/edit", "/audit")]
    assert all(page.status_code == 200 for page in pages), [p.status_code for p in pages]
    return "".join(page.text for page in pages)


async def stored(database, name: str) -> dict[str, str]:
    async with database.read() as session:
        return (await load_secrets(session, Vault(TEST_SECRET_KEY), [name]))[name]


async def test_a_system_registered_through_the_form_shows_its_secrets_as_set(client, database):
    created = await register(client)
    assert created.status_code == 303, created.text
    assert created.headers["location"] == "/systems/erp-api"
    api = (await client.get("/api/v1/systems/erp-api")).json()
    assert api["method"] == "PUT" and api["auth"]["type"] == "bearer"
    assert api["headers"] == {"X-Tenant": "t1"} and api["max_in_flight"] == 4
    assert api["max_per_second"] == 2.5 and api["signing"]["scheme"] == "standard-webhooks"
    assert await stored(database, "erp-api") == {"auth": TOKEN, "signing": SIGNING}

    system_page = (await client.get("/systems/erp-api")).text
    token_print = api["auth"]["token"]["fingerprint"]
    signing_print = api["signing"]["secret"]["fingerprint"]
    assert f"token <span class=\"secret-set\">set · fingerprint <code title=\"{token_print}\">" \
           f"{token_print[:8]}…</code>" in system_page
    assert f"{signing_print[:8]}…" in system_page
    assert "PUT http://127.0.0.1:9/customers/{entity_id}" in html.unescape(system_page)
    assert "at most 4 sends at once" in system_page and "at most 2.5 per second" in system_page
    assert "{id: .entity_id, name: .payload.name}" in html.unescape(system_page)

    edit = (await client.get("/systems/erp-api/edit")).text
    assert 'data-secret="auth_token"' in edit and 'data-secret="signing_secret"' in edit
    assert 'type="password" name="auth_token" value=""' in edit
    shown = await every_page(client, "erp-api")
    assert TOKEN not in shown and SIGNING not in shown and SIGNING[6:] not in shown


async def test_saving_the_form_without_retyping_a_secret_keeps_it(client, database):
    assert (await register(client)).status_code == 303
    before = (await client.get("/api/v1/systems/erp-api")).json()
    fields = form_fields((await client.get("/systems/erp-api/edit")).text)
    assert fields["auth_token"] == "" and fields["signing_secret"] == ""
    assert fields["auth_type"] == "bearer" and fields["method"] == "PUT"

    unchanged = await client.post("/systems/erp-api/edit", data=fields)
    assert unchanged.status_code == 303
    async with database.read() as session:
        updates = await session.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.action == "system.updated"))
    assert updates == 0  # saved as it was: nothing changed, nothing audited

    changed = await client.post("/systems/erp-api/edit", data={**fields, "max_in_flight": "9"})
    assert changed.status_code == 303
    after = (await client.get("/api/v1/systems/erp-api")).json()
    assert after["max_in_flight"] == 9
    assert after["auth"]["token"] == before["auth"]["token"]
    assert after["signing"]["secret"] == before["signing"]["secret"]
    assert await stored(database, "erp-api") == {"auth": TOKEN, "signing": SIGNING}

    replaced = await client.post("/systems/erp-api/edit",
                                 data={**fields, "auth_token": NEW_TOKEN})
    assert replaced.status_code == 303
    again = (await client.get("/api/v1/systems/erp-api")).json()
    assert again["auth"]["token"]["fingerprint"] != before["auth"]["token"]["fingerprint"]
    assert (await stored(database, "erp-api"))["auth"] == NEW_TOKEN
    shown = await every_page(client, "erp-api")
    assert TOKEN not in shown and NEW_TOKEN not in shown


async def test_changing_the_auth_type_without_its_secret_is_refused_naming_the_field(client):
    assert (await register(client)).status_code == 303
    fields = form_fields((await client.get("/systems/erp-api/edit")).text)
    refused = await client.post("/systems/erp-api/edit", data={
        **fields, "auth_type": "basic", "auth_username": "svc"})
    assert refused.status_code == 422
    assert "auth.password" in refused.text
    assert (await client.get("/api/v1/systems/erp-api")).json()["auth"]["type"] == "bearer"


async def test_a_refused_form_comes_back_without_the_secrets_typed(client, database):
    refused = await register(client, body_template="{id: .entity_id")
    assert refused.status_code == 422
    assert "body_template" in refused.text and "Not saved" in refused.text
    assert TOKEN not in refused.text and SIGNING not in refused.text
    fields = form_fields(refused.text)
    assert fields["name"] == "erp-api" and fields["auth_type"] == "bearer"
    assert fields["body_template"] == "{id: .entity_id" and fields["auth_token"] == ""
    async with database.read() as session:
        assert await session.get(DownstreamSystem, "erp-api") is None
    bad_header = await register(client, headers="no colon here")
    assert bad_header.status_code == 422 and "headers: line 1" in bad_header.text
    bad_limit = await register(client, max_in_flight="many")
    assert bad_limit.status_code == 422 and "max_in_flight" in bad_limit.text


async def test_tls_and_every_auth_type_show_their_fields_and_only_fingerprints(client):
    key_pem = ("-----BEGIN PRIVATE KEY-----\nnot-a-real-key-but-secret-0x55\n"
               "-----END PRIVATE KEY-----")
    answers = {}
    for name, auth in {
            "a-basic": {"auth_type": "basic", "auth_username": "svc",
                        "auth_password": "pw-basic-31337"},
            "a-header": {"auth_type": "header", "auth_name": "X-Api-Key",
                         "auth_value": "hv-header-31337"},
            "a-oauth": {"auth_type": "oauth2_client_credentials",
                        "auth_token_url": "http://127.0.0.1:9/token",
                        "auth_client_id": "pipeline", "auth_scope": "write",
                        "auth_client_secret": "cs-oauth-31337"}}.items():
        answers[name] = await register(client, name=name, signing="", auth_token="", **auth)
        assert answers[name].status_code == 303, answers[name].text
    page = html.unescape((await client.get("/systems/a-oauth")).text)
    assert "token URL http://127.0.0.1:9/token" in re.sub(r"<[^>]+>", "", page)
    assert "client id pipeline" in re.sub(r"<[^>]+>", "", page)
    header_page = (await client.get("/systems/a-header")).text
    assert "X-Api-Key" in header_page
    # A key that is not PEM is refused, and not shown back.
    refused = await client.post("/systems/a-basic/edit", data={
        **form_fields((await client.get("/systems/a-basic/edit")).text),
        "tls_client_cert": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----",
        "tls_client_key": key_pem})
    assert refused.status_code == 422 and "tls" in refused.text
    assert "not-a-real-key" not in refused.text
    shown = "".join([await every_page(client, name) for name in answers])
    for secret in ("pw-basic-31337", "hv-header-31337", "cs-oauth-31337", "not-a-real-key"):
        assert secret not in shown


async def test_the_system_page_says_until_when_a_system_is_throttled(client, database, clock):
    assert (await register(client, signing="")).status_code == 303
    page = (await client.get("/systems/erp-api")).text
    assert "throttled until" not in page
    until = clock.now + timedelta(minutes=2, seconds=3)
    async with database.transaction() as session:
        (await session.get(DownstreamSystem, "erp-api")).throttled_until = until
    page = (await client.get("/systems/erp-api")).text
    assert f"throttled until {until:%H:%M:%S}, 2 min from now" in page
    clock.advance(seconds=180)
    assert "throttled until" not in (await client.get("/systems/erp-api")).text


async def test_only_admins_change_systems(client, database):
    assert (await register(client)).status_code == 303
    operator = {"Authorization": f"Bearer {await make_token(database, 'operator')}"}
    assert (await client.get("/systems/erp-api/edit", headers=operator)).status_code == 403
    refused = await client.post("/systems/erp-api/edit", headers=operator,
                                data={"max_in_flight": "1"})
    assert refused.status_code == 403
    page = (await client.get("/systems/erp-api", headers=operator)).text
    assert "/systems/erp-api/edit" not in page
    assert (await client.get("/api/v1/systems/erp-api")).json()["max_in_flight"] == 4


async def test_the_preview_shows_what_would_be_sent_with_secrets_as_stars(client, database):
    from tests.delivery.test_delivery import ingest
    from tests.support import message

    assert (await register(client)).status_code == 303
    await ingest(client, message(1, entity_id="C 100/ü"))
    page = await client.get("/systems/erp-api/preview", params={"key": "customer:C 100/ü"})
    assert page.status_code == 200
    api = (await client.post("/api/v1/systems/erp-api/preview",
                             json={"key": "customer:C 100/ü"})).json()
    shown = html.unescape(page.text)
    assert api["method"] == "PUT" and api["url"].endswith("/customers/C%20100%2F%C3%BC")
    assert f"{api['method']} {api['url']}" in shown
    assert api["headers"]["Authorization"] == "Bearer ***"
    for name, value in api["headers"].items():
        if name != "webhook-timestamp":
            assert f"<code>{name}</code></th><td><code>{value}</code>" in shown
    assert api["body"] == {"id": "C 100/ü", "name": "Acme"}
    assert '"id": "C 100/ü"' in shown and '"name": "Acme"' in shown
    assert TOKEN not in page.text and SIGNING not in page.text and SIGNING[6:] not in page.text

    missing = await client.get("/systems/erp-api/preview", params={"key": "customer:NOPE"})
    assert missing.status_code == 200 and "no record in production" in missing.text
    viewer = {"Authorization": f"Bearer {await make_token(database, 'viewer')}"}
    assert (await client.get("/systems/erp-api/preview", headers=viewer,
                             params={"key": "customer:C 100/ü"})).status_code == 403
    assert 'id="preview-form"' not in (await client.get("/systems/erp-api",
                                                        headers=viewer)).text
