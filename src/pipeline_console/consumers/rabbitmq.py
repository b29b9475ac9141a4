"""RabbitMQ (aio-pika): a queue declared durable if it is missing and used as it is if it
exists; at most CONSUMER_PREFETCH messages unacknowledged (the channel's prefetch count);
each acknowledged after its commit (base.py), a whole group with one `multiple` ack where it
can be (Acknowledger). On stop the consumer is cancelled, the messages in hand are finished,
and closing the connection gives back anything else."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
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
        self._acknowledgers: dict[Any, Acknowledger] = {}  # by channel (a new one after a
        # reconnection: delivery tags count from 1 again on it)

    async def connect(self) -> None:
        try:
            self._connection = await aio_pika.connect_robust(self._url, timeout=10)
        except aiormq.exceptions.ProbableAuthenticationError:
            raise BrokerError(f"RabbitMQ at {self.source} refused the credentials (or the "
                              "user may not use that virtual host)") from None
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
            channel, tag = message.channel, message.delivery_tag
            acknowledger = self._acknowledgers.get(channel)
            if acknowledger is None:
                acknowledger = self._acknowledgers[channel] = Acknowledger(channel)
            acknowledger.delivered(tag)
            intake.take(Received(message.body, lambda: acknowledger.ack(tag),
                                 lambda: acknowledger.release(tag)))

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
        for acknowledger in self._acknowledgers.values():
            await acknowledger.close()
        if self._connection is not None:
            await self._connection.close()


class Acknowledger:
    """One channel's acknowledgements, in as few frames as it can: a message is acknowledged
    once it and every message delivered before it on the channel are settled (recorded, or
    to be given back), all of them with one `multiple` ack. A group commit settles hundreds
    at once, so instead of a frame (a socket write, and work for the broker) per message
    there is about one per group. A message given back is nacked on its own, after the ack of
    those before it and before any ack that covers later ones: one task sends every frame,
    one at a time, so they leave in that order. Each caller's ack or release returns once
    the frame that settles its message was handed to the connection (or raises what sending
    it raised: the channel is gone, and the broker redelivers)."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel  # aiormq's channel
        self._tags: deque[int] = deque()  # delivered and not yet covered by a frame, in order
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._releases: dict[int, asyncio.Future[None]] = {}
        self._wakeup = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None

    def delivered(self, tag: int) -> None:
        # A multiple ack of N covers every tag up to N: safe only if tags are noted in the
        # order the broker numbered them (aio-pika calls on_message in delivery order, and
        # on_message notes the tag before any await)
        if self._tags and tag <= self._tags[-1]:
            raise RuntimeError(f"delivery tag {tag} after {self._tags[-1]}: out of order")
        self._tags.append(tag)

    async def ack(self, tag: int) -> None:
        await self._settle(self._acks, tag)

    async def release(self, tag: int) -> None:
        await self._settle(self._releases, tag)

    async def _settle(self, waiting: dict[int, asyncio.Future[None]], tag: int) -> None:
        future = asyncio.get_running_loop().create_future()
        waiting[tag] = future
        self._wakeup.set()
        if self._sender is None:
            self._sender = asyncio.create_task(self._send(), name="rabbitmq acknowledgements")
        await future

    async def _send(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            covered: list[asyncio.Future[None]] = []
            last: int | None = None
            while self._tags:
                tag = self._tags[0]
                if tag in self._acks:
                    self._tags.popleft()
                    covered.append(self._acks.pop(tag))
                    last = tag
                    continue
                if tag not in self._releases:
                    break  # not settled yet: nothing after it may be acknowledged
                if last is not None:
                    await _frame(covered, self._channel.basic_ack(last, multiple=True))
                    covered, last = [], None
                self._tags.popleft()
                await _frame([self._releases.pop(tag)],
                             self._channel.basic_nack(tag, requeue=True))
            if last is not None:
                await _frame(covered, self._channel.basic_ack(last, multiple=True))

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender


async def _frame(futures: list[asyncio.Future[None]], sending: Any) -> None:
    try:
        await sending
    except Exception as error:
        for future in futures:
            if not future.done():
                future.set_exception(error)
    else:
        for future in futures:
            if not future.done():
                future.set_result(None)


def _with_credentials(url: str, settings: Settings) -> str:
    """The URL with BROKER_USERNAME and BROKER_PASSWORD when it has no user of its own."""
    parsed = URL(url)
    if parsed.user or settings.broker_username is None:
        return url
    password = (settings.broker_password.get_secret_value()
                if settings.broker_password is not None else None)
    return str(parsed.with_user(settings.broker_username).with_password(password))
