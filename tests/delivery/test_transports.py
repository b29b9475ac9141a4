"""The transports' pure parts: the simulation, the Idempotency-Key header, Retry-After."""

from types import SimpleNamespace

from pipeline_console.delivery.policy import Failure
from pipeline_console.delivery.transports import (
    SystemConfig,
    _retry_after,
    build_request,
    idempotency_header,
    simulate_send,
    status_query_url,
)

SIM = SystemConfig("sim", "simulated", None, None, 1.0,
                   {"seed": 7, "outcomes": {"success": 1, "transient": 1, "ambiguous": 1}})


def request(delivery_id: int, attempt: int):
    delivery = SimpleNamespace(id=delivery_id, idempotency_key="customer:C-1", version=2,
                               entity_type="customer", entity_id="C-1", payload={"a": 1},
                               correlation_id=None)
    return build_request(delivery, attempt)


def test_the_simulation_is_deterministic_and_varied():
    runs = [[simulate_send(SIM, request(d, a)) for d in range(40) for a in (1, 2)]
            for _ in range(2)]
    assert runs[0] == runs[1]
    kinds = {(r.status, r.failure) for r in runs[0]}
    assert kinds == {(200, None), (503, None), (None, Failure.MAYBE_SENT)}


def test_the_idempotency_key_header_is_ascii_and_plain_keys_are_unchanged():
    assert idempotency_header("customer:C-100", 3) == "customer:C-100:3"
    assert idempotency_header("customer:Müller 1", 3) == "customer:M%C3%BCller%201:3"
    assert idempotency_header("customer:50%", 1) == "customer:50%25:1"


def test_the_status_query_url_encodes_the_key():
    assert status_query_url("http://x/s/{key}/{version}", "customer:A/B", 4) == (
        "http://x/s/customer%3AA%2FB/4")


def test_retry_after_in_seconds_or_as_a_date_and_nonsense_is_ignored():
    assert _retry_after("120") == 120
    assert _retry_after("²") is None
    assert _retry_after("soon") is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
