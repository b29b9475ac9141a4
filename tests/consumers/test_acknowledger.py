"""The RabbitMQ consumer's acknowledgements against the real broker: a group settled at once
leaves as one `multiple` ack, a message given back is nacked on its own between the acks of
those before and after it, and nothing is acknowledged while a message delivered before it
is still unsettled. Afterwards the broker holds exactly the messages given back."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika

from pipeline_console.consumers.rabbitmq import Acknowledger
from tests.consumers.brokers import RabbitQueue


class RecordingChannel:
    """aio-pika's real channel, with the frames the acknowledger asks it for written down."""

    def __init__(self, channel: Any) -> None:
        self.channel, self.frames = channel, []

    async def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.frames.append(("ack", tag, multiple))
        await self.channel.basic_ack(tag, multiple=multiple)

    async def basic_nack(self, tag: int, requeue: bool = True) -> None:
        self.frames.append(("nack", tag, requeue))
        await self.channel.basic_nack(tag, requeue=requeue)


async def _delivered(queue: RabbitQueue, count: int) -> tuple[Any, list[Any]]:
    connection = await aio_pika.connect(queue.url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=count)
    declared = await channel.declare_queue(queue.name, passive=True)
    messages: list[Any] = []
    got_all = asyncio.Event()

    async def on_message(message: Any) -> None:
        messages.append(message)
        if len(messages) == count:
            got_all.set()

    await declared.consume(on_message)
    await got_all.wait()
    return connection, messages


async def test_a_group_is_one_ack_and_a_given_back_message_is_nacked_in_order() -> None:
    queue = RabbitQueue()
    await queue.open()
    try:
        await queue.publish(f"m-{n}".encode() for n in range(1, 8))
        connection, messages = await _delivered(queue, 7)
        recorder = RecordingChannel(messages[0].channel)
        acknowledger = Acknowledger(recorder)
        for message in messages:
            acknowledger.delivered(message.delivery_tag)
        tags = [message.delivery_tag for message in messages]

        # the second message is acknowledged first: it waits for the first one
        early = asyncio.create_task(acknowledger.ack(tags[1]))
        for _ in range(5):
            await asyncio.sleep(0)
        assert recorder.frames == [] and not early.done()
        await acknowledger.release(tags[0])
        await early
        assert recorder.frames == [("nack", tags[0], True), ("ack", tags[1], True)]

        # five settled together, the fourth of them given back: three frames
        recorder.frames.clear()
        await asyncio.gather(acknowledger.ack(tags[2]), acknowledger.release(tags[3]),
                             acknowledger.ack(tags[4]), acknowledger.ack(tags[5]),
                             acknowledger.ack(tags[6]))
        assert recorder.frames == [("ack", tags[2], True), ("nack", tags[3], True),
                                   ("ack", tags[6], True)]
        bodies = {message.delivery_tag: message.body for message in messages}
        await acknowledger.close()
        await connection.close()
        assert await queue.unacknowledged() == 2  # exactly the two given back
        connection, again = await _delivered(queue, 2)
        assert sorted(message.body for message in again) == sorted(
            [bodies[tags[0]], bodies[tags[3]]])
        await connection.close()
    finally:
        await queue.close()


async def test_acknowledging_on_a_closed_channel_fails_the_callers() -> None:
    """The connection gone before the frame could be sent: each caller gets the error (and
    the broker, which still holds the messages, redelivers them)."""
    queue = RabbitQueue()
    await queue.open()
    try:
        await queue.publish([b"m-1", b"m-2"])
        connection, messages = await _delivered(queue, 2)
        channel = messages[0].channel
        acknowledger = Acknowledger(channel)
        for message in messages:
            acknowledger.delivered(message.delivery_tag)
        await connection.close()
        results = await asyncio.gather(
            *(acknowledger.ack(message.delivery_tag) for message in messages),
            return_exceptions=True)
        assert all(isinstance(result, Exception) for result in results), results
        await acknowledger.close()
        assert await queue.unacknowledged() == 2
    finally:
        await queue.close()
