"""The real brokers on 127.0.0.1 for the consumer tests: a RabbitMQ queue or a NATS JetStream
stream of the test's own (deleted afterwards), messages published to it, and what the broker
still holds unacknowledged once the consumers are gone. Unreachable: skipped locally, a
failure under CI=true (like PostgreSQL)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path

import aio_pika
import nats
import pytest

from tests.conftest import IN_CI

RABBITMQ_URL = os.environ.get("PIPELINE_CONSOLE_TEST_RABBITMQ_URL",
                              "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("PIPELINE_CONSOLE_TEST_NATS_URL", "nats://127.0.0.1:4222")


def unreachable(what: str, error: BaseException) -> None:
    message = f"{what} is unreachable: {error!r}"
    if IN_CI:
        pytest.fail(message + " (CI=true: the broker tests must not be skipped)")
    pytest.skip(message)


class RabbitQueue:
    kind = "rabbitmq"

    def __init__(self) -> None:
        self.name = f"pc-test-{uuid.uuid4().hex[:10]}"
        self.url = RABBITMQ_URL

    def arguments(self) -> list[str]:
        return [self.url, "--queue", self.name]

    async def open(self) -> None:
        try:
            connection = await aio_pika.connect(self.url, timeout=5)
        except Exception as error:
            unreachable(f"RabbitMQ at {self.url}", error)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(self.name, durable=True)

    async def publish(self, bodies: Iterable[bytes]) -> None:
        async with await aio_pika.connect(self.url) as connection:
            channel = await connection.channel(publisher_confirms=True)
            for body in bodies:
                await channel.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=self.name)

    async def held(self) -> tuple[int, int]:
        """(messages waiting, consumers attached)."""
        async with await aio_pika.connect(self.url) as connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(self.name, passive=True)
            result = queue.declaration_result
            return int(result.message_count), int(result.consumer_count)

    async def unacknowledged(self) -> int:
        """What the broker still holds, once no consumer is attached (a killed one's
        unacknowledged messages are back in the queue as soon as its connection is gone)."""
        for _ in range(100):
            waiting, consumers = await self.held()
            if consumers == 0:
                return waiting
            await asyncio.sleep(0.1)
        raise AssertionError("a consumer is still attached")

    async def close(self) -> None:
        async with await aio_pika.connect(self.url) as connection:
            channel = await connection.channel()
            await channel.queue_delete(self.name)


class NatsStream:
    kind = "nats"

    def __init__(self) -> None:
        suffix = uuid.uuid4().hex[:10]
        self.name, self.subject, self.consumer = f"PCTEST{suffix}", f"pctest.{suffix}", "pc"
        self.url = NATS_URL

    def arguments(self) -> list[str]:
        return [self.url, "--stream", self.name, "--consumer", self.consumer]

    async def open(self) -> None:
        try:
            nc = await nats.connect(self.url, connect_timeout=5, max_reconnect_attempts=0)
        except Exception as error:
            unreachable(f"NATS at {self.url}", error)
        try:
            await nc.jetstream().add_stream(name=self.name, subjects=[self.subject])
        finally:
            await nc.close()

    async def publish(self, bodies: Iterable[bytes]) -> None:
        nc = await nats.connect(self.url)
        try:
            js = nc.jetstream()
            for body in bodies:
                await js.publish(self.subject, body)
        finally:
            await nc.close()

    async def unacknowledged(self) -> int:
        """Not yet delivered, or delivered and not acknowledged (a killed consumer's stay so
        until their ack_wait runs out; then they are delivered again)."""
        nc = await nats.connect(self.url)
        try:
            js = nc.jetstream()
            try:
                info = await js.consumer_info(self.name, self.consumer)
            except nats.js.errors.NotFoundError:
                return (await js.stream_info(self.name)).state.messages
            return int(info.num_pending + info.num_ack_pending)
        finally:
            await nc.close()

    async def close(self) -> None:
        nc = await nats.connect(self.url)
        try:
            await nc.jetstream().delete_stream(self.name)
        finally:
            await nc.close()


BROKERS = {"rabbitmq": RabbitQueue, "nats": NatsStream}


def start_consumer(broker: RabbitQueue | NatsStream, database_url: str, log: Path,
                   **settings: object) -> subprocess.Popen[bytes]:
    """`pipeline-console consume` as its own process, its output in `log`."""
    env = {**os.environ, "PIPELINE_CONSOLE_DATABASE_URL": database_url,
           "PIPELINE_CONSOLE_CONSUMER_HEARTBEAT_S": "0.5",
           "PIPELINE_CONSOLE_CONSUMER_LOST_AFTER_S": "3",
           # a killed NATS consumer's messages come back after this
           "PIPELINE_CONSOLE_CONSUMER_ACK_WAIT_S": "2",
           **{f"PIPELINE_CONSOLE_{name.upper()}": str(value)
              for name, value in settings.items()}}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline_console.cli", "consume", *broker.arguments()],
        env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
