"""`pipeline-console consume` as a person runs it: arguments that do not fit the URL are
refused in one line before anything is reached; an unreachable broker or refused
credentials are one line too, without the password; PIPELINE_CONSOLE_BROKER_USERNAME and
_PASSWORD supply the credentials of a URL that has none."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading

import pytest
from sqlalchemy import select

from pipeline_console.consumers.registry import without_credentials
from pipeline_console.models import IngestionAttempt, IntakeConsumer
from tests.consumers.brokers import RabbitQueue, start_consumer
from tests.consumers.test_consume import _body, _count, _stop, _text, _until

PASSWORD = "wrong-" + "b7f3c1e9d2a4"


def consume(database_url: str, *args: str, timeout: float = 60,
            **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PIPELINE_CONSOLE_DATABASE_URL": database_url,
                   **{f"PIPELINE_CONSOLE_{name.upper()}": value for name, value in env.items()}}
    return subprocess.run([sys.executable, "-m", "pipeline_console.cli", "consume", *args],
                          env=environment, capture_output=True, text=True, timeout=timeout)


def said(result: subprocess.CompletedProcess[str]) -> list[str]:
    """What the command says to a person on stderr (its structured log lines aside)."""
    return [line for line in result.stderr.splitlines()
            if line.strip() and not line.lstrip().startswith("{")]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(("args", "words"), [
    (["amqp://127.0.0.1:5672/"], "--queue"),
    (["amqp://127.0.0.1:5672/", "--queue", "q", "--stream", "s"], "--queue"),
    (["nats://127.0.0.1:4222", "--stream", "S"], "--consumer"),
    (["nats://127.0.0.1:4222", "--stream", "S", "--consumer", "c", "--queue", "q"], "--stream"),
    (["http://127.0.0.1:5672/", "--queue", "q"], "amqp://"),
    (["127.0.0.1:5672", "--queue", "q"], "amqp://"),
])
def test_arguments_that_do_not_fit_the_url_are_refused_in_one_line(
        database_url, args, words) -> None:
    result = consume(database_url, *args)
    assert result.returncode == 1, result
    [line] = said(result)
    assert line.startswith("error: ") and words in line, line


def test_an_unreachable_broker_is_one_line_without_the_password(database_url) -> None:
    port = _closed_port()
    for args in ([f"amqp://guest:{PASSWORD}@127.0.0.1:{port}/", "--queue", "q"],
                 [f"nats://127.0.0.1:{port}", "--stream", "S", "--consumer", "c"]):
        result = consume(database_url, *args)
        assert result.returncode == 1, result
        [line] = said(result)
        assert line.startswith("error: ") and "could not be reached" in line, line
        assert PASSWORD not in result.stderr + result.stdout
        assert "Traceback" not in result.stderr


@pytest.fixture
async def queue() -> RabbitQueue:
    broker = RabbitQueue()
    await broker.open()
    try:
        yield broker
    finally:
        await broker.close()


async def test_refused_credentials_from_the_environment_are_not_printed(
        database_url, queue) -> None:
    url = queue.url.replace("guest:guest@", "")
    result = consume(database_url, url, "--queue", queue.name, broker_username="guest",
                     broker_password=PASSWORD)
    assert result.returncode == 1, result
    [line] = said(result)
    assert line.startswith("error: ") and "refused the credentials" in line, line
    assert PASSWORD not in result.stderr + result.stdout


@pytest.mark.backends
async def test_the_environment_supplies_the_credentials_of_a_url_without_them(
        database, database_url, queue, tmp_path) -> None:
    queue.url = queue.url.replace("guest:guest@", "")
    assert "@" not in queue.url
    await RabbitQueue.publish(_with_guest(queue), [_body(1, 1, 1)])
    log = tmp_path / "consumer.log"
    process = start_consumer(queue, database_url, log, broker_username="guest",
                             broker_password="guest")

    async def recorded() -> bool:
        return await _count(database) == 1
    await _until(recorded, "the message to be recorded")
    await _stop(process, log)
    async with database.read() as session:
        [decision] = (await session.execute(select(IngestionAttempt.decision))).scalars()
        [row] = (await session.execute(select(IntakeConsumer))).scalars()
    assert decision == "accept_new"
    assert row.source == queue.url.rstrip("/") or row.source.startswith("amqp://127.0.0.1")
    assert "guest" not in row.source and "guest" not in _text(log)


def _with_guest(queue: RabbitQueue) -> RabbitQueue:
    publisher = RabbitQueue()
    publisher.name = queue.name
    return publisher


@pytest.mark.parametrize("command", [
    ["consume", "amqp://127.0.0.1:5672/", "--queue", "q"], ["serve"], ["worker"], ["migrate"],
])
def test_a_bad_setting_is_one_line_naming_it_and_no_secret(database_url, command) -> None:
    """pydantic's own message repeats every setting's value (the broker password and the
    secret key among them)."""
    environment = {"PATH": os.environ["PATH"], "PIPELINE_CONSOLE_DATABASE_URL": database_url,
                   "PIPELINE_CONSOLE_BROKER_PASSWORD": PASSWORD,
                   "PIPELINE_CONSOLE_CONSUMER_PREFETCH": "abc",
                   "PIPELINE_CONSOLE_CONSUMER_LOST_AFTER_S": "10"}
    result = subprocess.run([sys.executable, "-m", "pipeline_console.cli", *command],
                            env=environment, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result
    lines = said(result)
    assert lines == [
        "error: PIPELINE_CONSOLE_CONSUMER_PREFETCH: Input should be a valid integer, unable "
        "to parse string as an integer"], result.stderr
    assert PASSWORD not in result.stderr + result.stdout and "Traceback" not in result.stderr


def test_a_tls_url_sends_nothing_to_a_server_that_does_not_ask_for_tls(database_url) -> None:
    """nats-py upgrades to TLS only when the server's INFO asks for it: a plain server (or
    one in the middle) at a tls:// URL would get CONNECT with the password in the clear."""
    received: list[bytes] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.settimeout(30)
        port = listener.getsockname()[1]

        def serve() -> None:
            with contextlib.suppress(OSError):
                while True:
                    connection, _ = listener.accept()
                    with connection:
                        connection.sendall(b'INFO {"server_id":"fake","version":"2.10.0",'
                                           b'"auth_required":true,"max_payload":1048576}\r\n')
                        connection.settimeout(2)
                        with contextlib.suppress(OSError):
                            while chunk := connection.recv(4096):
                                received.append(chunk)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        result = consume(database_url, f"tls://127.0.0.1:{port}", "--stream", "S",
                         "--consumer", "c", broker_username="natsuser",
                         broker_password=PASSWORD)
    assert result.returncode == 1, result
    [line] = said(result)
    assert "did not ask for TLS" in line, line
    assert PASSWORD.encode() not in b"".join(received)
    assert not any(chunk.startswith(b"CONNECT") for chunk in received), received


def test_a_database_that_is_missing_or_not_migrated_is_refused_at_start_up(tmp_path) -> None:
    """Not a consumer that says "started" and then fails every heartbeat for ever (one that is
    unreachable is an outage: waited out, tests/consumers/test_consume.py)."""
    missing = "postgresql+asyncpg://postgres@127.0.0.1:5432/pc_test_does_not_exist"
    for url, words in ((f"sqlite+aiosqlite:///{tmp_path}/empty.db", "pipeline-console migrate"),
                       (missing, "cannot be used")):
        result = consume(url, "amqp://guest:guest@127.0.0.1:5672/", "--queue", "q")
        assert result.returncode == 1, result
        [line] = said(result)
        assert line.startswith("error: ") and words in line, line
        assert "started" not in result.stderr


@pytest.mark.parametrize(("url", "shown"), [
    ("amqp://user:s3cr3t/x@host/", "amqp://host/"),  # '/' in the password, not encoded
    ("amqp://user:1234/5678@host/vh", "amqp://host/vh"),
    ("amqp://guest:guest@127.0.0.1:5672/vh?token=t0k", "amqp://127.0.0.1:5672/vh"),
    ("nats://u:p@[::1]:4222", "nats://[::1]:4222"),
])
def test_a_url_is_shown_without_what_could_be_credentials(url, shown) -> None:
    assert without_credentials(url) == shown


def test_a_url_whose_password_cuts_it_short_is_refused_without_echoing_it(database_url) -> None:
    result = consume(database_url, "amqp://user:s3cr3t/x@127.0.0.1:5672/", "--queue", "q")
    assert result.returncode == 1, result
    [line] = said(result)
    assert "percent-encode" in line and "s3cr3t" not in result.stderr + result.stdout
