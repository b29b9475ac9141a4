"""A downstream system that echoes the request (its error body quoting the Authorization
header, every header as JSON, the headers form-encoded) puts none of our secrets into what
we keep: the attempt's response excerpt and error, the dead letter's reason, the delivery's
last error and the log lines show [secret] in their place. Against a real echoing sink and
a real OAuth2 token endpoint on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from urllib.parse import quote_plus

import pytest

from pipeline_console.delivery.masking import MASK, mask, secret_forms
from pipeline_console.delivery.oauth import client_basic
from pipeline_console.delivery.transports import SystemConfig
from tests.delivery.test_auth_tls import CLIENT_ID, CLIENT_SECRET, AuthServer, run, serve
from tests.delivery.test_delivery import add_system, attempts, deliveries, ingest
from tests.sink import Answer
from tests.support import message

pytestmark = pytest.mark.backends

# A '"' (JSON-escaped in an echo as JSON), '+', '/' and '=' (changed by quote_plus).
BEARER = 'echo"bearer+7/a1='
PASSWORD = "echo-basic-pw-b2"
API_KEY = "echo-header+c3/="


@pytest.fixture
def token_endpoint() -> Iterator[tuple[AuthServer, str]]:
    owner = AuthServer()
    for base in serve(owner):
        yield owner, base


def forms_of(*values: str) -> list[str]:
    return [form for value in values
            for form in (value, quote_plus(value), json.dumps(value)[1:-1])]


async def everything_kept(client) -> str:
    """What the API shows of every attempt, dead letter and delivery."""
    shown = [await attempts(client, delivery["id"]) for delivery in await deliveries(client)]
    return (json.dumps(shown) + (await client.get("/api/v1/dlq")).text
            + (await client.get("/api/v1/deliveries")).text)


async def test_an_echoing_system_gets_its_credentials_masked_in_what_is_kept(
        client, sink, token_endpoint, caplog) -> None:
    server, token_base = token_endpoint
    sink.answer(Answer(status=400, echo=True))  # permanent: dead-lettered with the echo
    auth = {"bearer": {"type": "bearer", "token": BEARER},
            "basic": {"type": "basic", "username": "svc", "password": PASSWORD},
            "header": {"type": "header", "name": "X-Api-Key", "value": API_KEY},
            "oauth": {"type": "oauth2_client_credentials", "token_url": token_base + "/token",
                      "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}}
    for name, settings in auth.items():
        await add_system(client, sink, name=name, url=f"{sink.base}/{name}", auth=settings)
    await ingest(client, message(1))
    with caplog.at_level(logging.DEBUG):
        assert (await run(client))["dead_lettered"] == 4
    echoed = "".join(received.headers.get("Authorization", "") + received.headers.get(
        "X-Api-Key", "") for received in sink.received)
    [access_token] = server.issued
    basic = base64.b64encode(f"svc:{PASSWORD}".encode()).decode()
    assert BEARER in echoed and basic in echoed and API_KEY in echoed  # it did echo them
    assert access_token in echoed

    kept = await everything_kept(client)
    for form in forms_of(BEARER, PASSWORD, API_KEY, access_token, basic):
        assert form not in kept, form
        assert form not in caplog.text, form
    for delivery in await deliveries(client):
        [attempt] = await attempts(client, delivery["id"])
        assert MASK in attempt["response_body"], attempt
        assert '"headers"' in attempt["response_body"]  # the rest of the echo stays
    assert MASK in (await client.get("/api/v1/dlq")).text


async def test_a_token_endpoint_echoing_the_client_credentials_gets_them_masked(
        client, sink, token_endpoint) -> None:
    server, token_base = token_endpoint
    sent = client_basic(CLIENT_ID, CLIENT_SECRET)
    server.token_answer = (400, {"error": "invalid_request",
                                 "error_description": f"you sent Authorization: {sent}"})
    await add_system(client, sink, name="oauth", url=sink.base + "/oauth", auth={
        "type": "oauth2_client_credentials", "token_url": token_base + "/token",
        "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
    await ingest(client, message(1))
    assert (await run(client))["dead_lettered"] == 1
    kept = await everything_kept(client)
    assert "you sent Authorization: Basic " + MASK in kept
    for form in forms_of(CLIENT_SECRET, sent.removeprefix("Basic ")):
        assert form not in kept, form
    assert sink.received == []


class TestTheFormsMasked:
    def test_short_forms_are_left_alone_and_longer_ones_cut_out_whole(self) -> None:
        system = SystemConfig("s", "http", "http://x/", None, 1.0, None,
                              auth={"type": "bearer"}, secrets={"auth": "abc", "signing": "abcd"})
        forms = secret_forms(system, ["abcdef"])
        assert forms == ("abcdef", "abcd")  # "abc" (three characters) is not masked
        assert mask("abc abcd abcdef", forms) == f"abc {MASK} {MASK}"
        assert mask(None, forms) is None and mask("", forms) == ""

    def test_a_secret_cut_by_the_excerpt_and_one_with_escaped_slashes_are_masked(self) -> None:
        token = "tok_ab/cd+ef/ghIJKLMNOPQRSTUVWXYZ0123456789"
        system = SystemConfig("s", "http", "http://x/", None, 1.0, None,
                              auth={"type": "bearer"}, secrets={"auth": token})
        forms = secret_forms(system)
        # an answer cut to its excerpt in the middle of the token keeps its beginning
        assert mask("x" * 2020 + token[:28], forms) == "x" * 2020 + MASK
        assert mask(json.dumps({"echo": token}).replace("/", "\\/"), forms) == (
            '{"echo": "' + MASK + '"}')
        assert mask("token=" + token.replace("+", "%2B"), forms) == "token=" + MASK
        assert mask("all fine", forms) == "all fine"
