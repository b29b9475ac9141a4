"""A TCP proxy on 127.0.0.1 in front of a real server (PostgreSQL, in the outage tests) that a
test can cut — every relayed connection is closed at once and new ones are refused, as when
the database goes away — and restore, on the same port. No mock: the application's driver
talks to the real server through real sockets, and sees real resets and refusals.

The proxy runs its own event loop in a thread of its own, so that whatever the test's loop
is doing (driving load, awaiting a subprocess) never stalls the traffic it relays."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0  # chosen when it first listens, kept across cuts
        self.relayed = 0  # connections relayed so far
        self.cut_connections = 0  # connections that a cut closed
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy",
                                        daemon=True)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def cut(self) -> None:
        """Close every relayed connection (the peers see a reset) and refuse new ones."""
        self._call(self._cut())

    def restore(self) -> None:
        """Accept and relay connections again, on the same port."""
        self._call(self._listen())

    def stop(self) -> None:
        self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    @property
    def listening(self) -> bool:
        return self._server is not None

    def _call(self, work: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout=10)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()  # the listening socket is gone: a connect is refused
        self.cut_connections += len(self._open)
        for writer in list(self._open):
            writer.transport.abort()  # a reset, not a polite close
        self._open.clear()
        if server is not None:
            await server.wait_closed()

    async def _relay(self, client_reader: asyncio.StreamReader,
                     client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.transport.abort()
            return
        if self._server is None:  # cut while this connection was being made
            client_writer.transport.abort()
            upstream_writer.transport.abort()
            return
        self.relayed += 1
        pair = (client_writer, upstream_writer)
        self._open.update(pair)
        try:
            await asyncio.gather(_pipe(client_reader, upstream_writer),
                                 _pipe(upstream_reader, client_writer))
        finally:
            for writer in pair:
                writer.transport.abort()
                self._open.discard(writer)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:  # the other side was reset: the pair is torn down by the caller
        pass
    finally:
        writer.transport.abort()
