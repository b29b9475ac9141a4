"""The HTTP transport against real servers on 127.0.0.1: what reached the system and what
may have, as the classification needs it (NOT_SENT against MAYBE_SENT), and what the
transport must not do on its own (follow redirects, carry cookies from one delivery to the
next)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from pipeline_console.delivery.policy import Failure
from pipeline_console.delivery.transports import (
    RESPONSE_EXCERPT_BYTES,
    SystemConfig,
    Transports,
    build_request,
)
from tests.sink import Answer
from tests.support import wait_for

REQUEST = build_request(SimpleNamespace(
    id=1, idempotency_key="customer:C-1", version=2, entity_type="customer", entity_id="C-1",
    payload={"a": 1}, correlation_id=None), 1)


def system(url: str, timeout_s: float = 2.0) -> SystemConfig:
    return SystemConfig("billing", "http", url, None, timeout_s, None)


@pytest.fixture
def hangs_up() -> Iterator[str]:
    """A server that reads the request and closes the connection without an answer."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connection.recv(65536)
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/receive"
    finally:
        stop.set()
        thread.join()
        listener.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def send(url: str, timeout_s: float = 2.0):
    async with Transports.open() as transports:
        return await transports.send(system(url, timeout_s), REQUEST)


async def test_an_answer_is_read_with_its_retry_after_and_an_excerpt_of_its_body(sink):
    sink.answer(Answer(503, body="x" * 5000, headers={"Retry-After": "7"}))
    result = await send(sink.base + "/receive")
    assert (result.status, result.retry_after_s, result.failure) == (503, 7.0, None)
    assert result.body == "x" * RESPONSE_EXCERPT_BYTES
    [received] = sink.received
    assert received.body["idempotency_key"] == "customer:C-1"
    assert received.headers["Idempotency-Key"] == "customer:C-1:2"
    assert received.headers["Content-Type"] == "application/json"


async def test_nothing_listening_and_an_unusable_url_were_not_sent():
    refused = await send(f"http://127.0.0.1:{free_port()}/receive")
    assert refused.failure is Failure.NOT_SENT and refused.status is None
    for url in ("ftp://127.0.0.1/receive", "http://"):
        assert (await send(url)).failure is Failure.NOT_SENT, url


async def test_a_dropped_connection_and_a_late_answer_may_have_been_sent(hangs_up, sink):
    dropped = await send(hangs_up)
    assert dropped.failure is Failure.MAYBE_SENT, dropped.error
    sink.answer(Answer(200, delay_s=1.0))
    late = await send(sink.base + "/receive", timeout_s=0.2)
    assert late.failure is Failure.MAYBE_SENT, late.error


async def test_a_redirect_is_an_answer_not_an_instruction(sink):
    sink.answer(Answer(302, headers={"Location": sink.base + "/elsewhere"}))
    result = await send(sink.base + "/receive")
    assert result.status == 302
    assert [received.path for received in sink.received] == ["/receive"]


async def test_cookies_are_not_carried_from_one_delivery_to_the_next(sink):
    sink.answer(Answer(200, headers={"Set-Cookie": "session=abc; Path=/"}))
    async with Transports.open() as transports:
        for _ in range(2):
            assert (await transports.send(system(sink.base + "/receive"), REQUEST)).status == 200
    assert [received.headers.get("Cookie") for received in sink.received] == [None, None]


async def test_no_free_connection_in_time_was_not_sent(sink):
    sink.answer(Answer(200, delay_s=1.0))
    async with Transports.open(max_connections=1) as transports:
        first = asyncio.create_task(transports.send(system(sink.base + "/a", 0.4), REQUEST))
        await wait_for(lambda: len(sink.received) == 1, 5, "the first request at the sink")
        second = await transports.send(system(sink.base + "/b", 0.2), REQUEST)
        assert (await first).failure is Failure.MAYBE_SENT
    assert second.failure is Failure.NOT_SENT, second.error
    assert [received.path for received in sink.received] == ["/a"]


async def test_the_url_is_sent_as_written_with_only_the_unsendable_escaped(sink):
    await send(sink.base + "/in box/caf\u00e9/customer%3AC-1?x=1")
    assert [received.path for received in sink.received] == [
        "/in%20box/caf%C3%A9/customer%3AC-1?x=1"]
