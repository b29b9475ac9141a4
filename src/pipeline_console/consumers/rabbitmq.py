"""RabbitMQ (aio-pika): a queue declared durable if it is missing and used as it is if it
exists; at most CONSUMER_PREFETCH messages unacknowledged (the channel's prefetch count);
each acknowledged after its commit (base.py). On stop the consumer is cancelled, the
messages in hand are finished, and closing the connection gives back anything else."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage
from yarl import URL

from pipeline_console.config import Settings
from pipeline_console.consumers.base import BrokerError, Intake, Received
from pipeline_console.consumers.registry import without_credentials


class RabbitMQ:
    kind = "rabbitmq"

    def __init__(self, url: str, queue: str, settings: Settings) -> None:
        self.queue, self.source = queue, without_credentials(url)
        self._url, self._settings = _with_credentials(url, settings), settings
        self._connection: Any = None
        self._channel: Any = None
        self._tag: str | None = None

    async def connect(self) -> None:
        try:
            self._connection = await aio_pika.connect_robust(self._url, timeout=10)
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as error:
            raise BrokerError(f"RabbitMQ at {self.source} could not be reached: "
                              f"{type(error).__name__}") from None
        self._channel = await self._connection.channel()
        await self._channel.set_qos(prefetch_count=self._settings.consumer_prefetch)
        if await self._exists():
            self._queue = await self._channel.declare_queue(self.queue, passive=True)
        else:
            self._queue = await self._channel.declare_queue(self.queue, durable=True)

    async def _exists(self) -> bool:
        """Whether the queue is there (a passive declare on a channel of its own: a missing
        queue closes the channel it was asked on)."""
        probe = await self._connection.channel()
        try:
            await probe.declare_queue(self.queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            if not probe.is_closed:
                await probe.close()
        return True

    async def consume(self, intake: Intake, stop: asyncio.Event) -> None:
        async def on_message(message: AbstractIncomingMessage) -> None:
            # hand it over and return at once: aio-pika awaits this before the next one
            intake.take(Received(message.body, message.ack,
                                 lambda: message.nack(requeue=True)))

        self._tag = await self._queue.consume(on_message, no_ack=False)
        await stop.wait()
        await self._queue.cancel(self._tag)

    async def backlog(self) -> int | None:
        probe = await self._connection.channel()
        try:
            queue = await probe.declare_queue(self.queue, passive=True)
            return int(queue.declaration_result.message_count)
        finally:
            if not probe.is_closed:
                await probe.close()

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()


def _with_credentials(url: str, settings: Settings) -> str:
    """The URL with BROKER_USERNAME and BROKER_PASSWORD when it has no user of its own."""
    parsed = URL(url)
    if parsed.user or settings.broker_username is None:
        return url
    password = (settings.broker_password.get_secret_value()
                if settings.broker_password is not None else None)
    return str(parsed.with_user(settings.broker_username).with_password(password))
