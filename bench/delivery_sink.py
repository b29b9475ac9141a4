"""The downstream system of benchmarks 6 and 7: a small asyncio HTTP/1.1 server (keep-alive,
no framework, so that it costs the least CPU of anything in the measurement) that answers
every POST with 200 and counts the requests per Idempotency-Key. POST /latency/MS/… waits
MS milliseconds before it answers (many requests wait at once); POST /tail/N/MS/… answers
at once except every Nth request, which waits MS milliseconds (a slow tail).

  python -m bench.delivery_sink PORT_FILE

writes the port it listens on to PORT_FILE. GET /counts answers {"key:version": n, …} (every
request ever received), POST /reset forgets them."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from pathlib import Path

counts: Counter[str] = Counter()
tails: Counter[str] = Counter()


def _response(status: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\n"
            "content-type: application/json\r\n\r\n").encode() + body


OK = _response("200 OK", b'{"ok":true}')


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if length:
                await reader.readexactly(length)
            if method == "POST" and path == "/reset":
                counts.clear()
                writer.write(_response("200 OK", b"{}"))
            elif method == "GET" and path == "/counts":
                writer.write(_response("200 OK", json.dumps(counts).encode()))
            else:
                counts[headers.get("idempotency-key", "")] += 1
                if path.startswith("/latency/"):
                    await asyncio.sleep(float(path.split("/")[2]) / 1000)
                elif path.startswith("/tail/"):  # /tail/N/MS/…: every Nth waits MS
                    _, _, every, wait_ms = path.split("/")[:4]
                    tails[path] += 1
                    if tails[path] % int(every) == 0:
                        await asyncio.sleep(float(wait_ms) / 1000)
                writer.write(OK)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def main(port_file: Path) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    port_file.write_text(str(port))  # noqa: ASYNC240 (once, before serving)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
