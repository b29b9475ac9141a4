"""NATS JetStream (nats-py): a durable pull consumer on a stream, used as it exists or
created if missing (explicit acks, CONSUMER_ACK_WAIT_S, at most CONSUMER_PREFETCH pending).
Each message is acknowledged after its commit (base.py); while the database is down it is
kept "in progress"; on stop it is given back (nak) for another consumer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig
from yarl import URL

from pipeline_console.config import Settings
from pipeline_console.consumers.base import BrokerError, Intake, Received
from pipeline_console.consumers.registry import without_credentials

log = logging.getLogger("pipeline_console.consume")
FETCH_WAIT_S = 1.0  # how long one fetch waits for messages (and so how soon a stop is seen)
FIRST_CONNECT_S = 15.0  # the first connection, before the consumer runs


class NotEncrypted(nats.errors.Error):
    """A tls:// server that did not ask for TLS. A nats-py error, so that a reconnect that
    meets one tries again later instead of ending the reconnect task; the first connection
    stops at once (_error)."""


class _Client(NatsClient):
    """nats-py's client, which upgrades to TLS only when the server's INFO asks for it, even
    for a tls:// URL: there, a server that does not ask gets nothing, not even CONNECT (it
    carries the user and password in the clear)."""

    def _connect_command(self) -> bytes:
        server = self._current_server
        if server is not None and server.uri.scheme == "tls" \
                and not self._server_info.get("tls_required"):
            raise NotEncrypted
        return super()._connect_command()


class JetStream:
    kind = "nats"

    def __init__(self, url: str, stream: str, consumer: str, settings: Settings) -> None:
        self.stream, self.durable = stream, consumer
        self.queue, self.source = f"{stream}/{consumer}", without_credentials(url)
        self._url, self._settings = url, settings
        self._nc: Any = None
        self._sub: Any = None
        self._running, self._last_error = False, ""
        self._refused = asyncio.Event()  # a tls:// server did not ask for TLS

    async def _error(self, error: Exception) -> None:
        """nats-py's own error callback prints the whole exception; ours logs one line
        without the server URL's credentials, once running (the first connection's tries
        are summed up in its one error line)."""
        self._last_error = type(error).__name__
        if isinstance(error, NotEncrypted):
            self._refused.set()
            if self._running:
                log.warning("NATS at %s did not ask for TLS, though the URL is tls://: "
                            "nothing was sent to it", self.source)
            return
        if self._running:
            log.warning("NATS: %s", self._last_error)

    async def connect(self) -> None:
        options: dict[str, Any] = {}
        if not URL(self._url).user and self._settings.broker_username is not None:
            options["user"] = self._settings.broker_username
            if self._settings.broker_password is not None:
                options["password"] = self._settings.broker_password.get_secret_value()
        if URL(self._url).scheme == "tls":
            options["tls"] = ssl.create_default_context()
        try:
            # nats-py keeps trying a first connection for ever when reconnects are unbounded
            # (as they must be once running): the first one has a deadline of its own, so a
            # wrong URL is one line at start-up, as with RabbitMQ
            async with asyncio.timeout(FIRST_CONNECT_S):
                self._nc = _Client()
                connecting = asyncio.create_task(self._nc.connect(
                    servers=[self._url], connect_timeout=5, allow_reconnect=True,
                    max_reconnect_attempts=-1, reconnect_time_wait=1, **options,
                    error_cb=self._error, disconnected_cb=_quiet_event,
                    reconnected_cb=_quiet_event))
                refused = asyncio.create_task(self._refused.wait())
                try:
                    await asyncio.wait({connecting, refused},
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    refused.cancel()
                    if not connecting.done():
                        connecting.cancel()
                        with contextlib.suppress(BaseException):
                            await connecting
                if self._refused.is_set():
                    raise NotEncrypted
                connecting.result()
        except NotEncrypted:
            raise BrokerError(f"NATS at {self.source} did not ask for TLS, though the URL is "
                              "tls://: nothing was sent to it (credentials included)") from None
        except TimeoutError:
            raise BrokerError(f"NATS at {self.source} could not be reached within "
                              f"{FIRST_CONNECT_S:g} s ({self._last_error or 'no answer'}; is "
                              "it running there, and are the credentials right?)") from None
        except (OSError, nats.errors.Error) as error:
            raise BrokerError(f"NATS at {self.source} could not be reached: "
                              f"{type(error).__name__}") from None
        js = self._nc.jetstream()
        try:
            await js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            raise BrokerError(f"NATS at {self.source} has no stream {self.stream!r} "
                              "(create it with the subjects its publishers use)") from None
        try:
            await js.consumer_info(self.stream, self.durable)
        except nats.js.errors.NotFoundError:
            await js.add_consumer(self.stream, ConsumerConfig(
                durable_name=self.durable, ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self._settings.consumer_ack_wait_s,
                max_ack_pending=self._settings.consumer_prefetch * 4))
        self._sub = await js.pull_subscribe_bind(durable=self.durable, stream=self.stream)
        self._running = True

    async def consume(self, intake: Intake, stop: asyncio.Event) -> None:
        limit = self._settings.consumer_prefetch
        while not stop.is_set():
            await intake.wait_for_room(limit)
            room = limit - intake.in_flight
            if stop.is_set() or room <= 0:
                continue
            try:
                messages = await self._sub.fetch(batch=room, timeout=FETCH_WAIT_S)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except nats.errors.Error as error:  # reconnecting: the client tries again
                await _pause(stop, f"{type(error).__name__}")
                continue
            for message in messages:
                intake.take(Received(message.data, message.ack, message.nak,
                                     message.in_progress))

    async def backlog(self) -> int | None:
        info = await self._sub.consumer_info()
        return int(info.num_pending)

    async def close(self) -> None:
        if self._nc is None:
            return
        with contextlib.suppress(Exception):  # the acknowledgements sent, then gone
            await self._nc.flush(timeout=2)
        await self._nc.close()


async def _pause(stop: asyncio.Event, why: str) -> None:
    log.warning("NATS fetch failed (%s)", why)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), FETCH_WAIT_S)


async def _quiet_event() -> None:
    return None
