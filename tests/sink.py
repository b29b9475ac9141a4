"""A real HTTP server on 127.0.0.1, answering from a script: the downstream system of the
delivery tests. No mock of httpx anywhere; requests cross a real socket."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlencode


@dataclass(frozen=True)
class Answer:
    status: int = 200
    delay_s: float = 0.0
    body: str = "ok"
    headers: dict[str, str] = field(default_factory=dict)
    hold: threading.Event | None = None  # answer only once the test sets it
    # answer with what was received instead of `body`, as a debugging endpoint or a chatty
    # error page does: the headers and the body as JSON, and the headers form-encoded
    echo: bool = False


@dataclass(frozen=True)
class Received:
    path: str  # as sent: percent-escapes kept
    headers: dict[str, str]
    body: dict
    at: float = 0.0  # time.monotonic() when the request arrived
    method: str = "POST"
    raw: bytes = b""  # the body's bytes (what a signature covers)


class ScriptedServer:
    """POST, PUT or PATCH /<anything>: answers are taken from `script` in order (the last one
    repeats).
    GET /status/<key>/<version>: `status_answers[(key, version)]`, default 404."""

    def __init__(self) -> None:
        self.script: list[Answer] = [Answer()]
        self.status_answers: dict[tuple[str, int], int] = {}
        self.received: list[Received] = []
        self.status_queries: list[str] = []
        self.status_query_headers: list[dict[str, str]] = []
        # POSTs received and not yet answered, and the most at once. A request stops counting
        # before its answer is written: the client may send its next one as soon as it has
        # read the answer, so counting until after the write would overlap the two.
        self.in_flight = self.most_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                raw = self.rfile.read(length)
                body = json.loads(raw or b"{}")
                with server._lock:
                    server.received.append(Received(self.path, dict(self.headers), body,
                                                    time.monotonic(), self.command, raw))
                    answer = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                try:
                    if answer.hold is not None:
                        answer.hold.wait(120)
                    time.sleep(answer.delay_s)
                finally:
                    with server._lock:
                        server.in_flight -= 1
                body = answer.body
                if answer.echo:
                    body = json.dumps({"headers": dict(self.headers), "body": raw.decode(),
                                       "form": urlencode(dict(self.headers))})
                self._answer(answer.status, body, answer.headers)

            do_PUT = do_PATCH = do_POST

            def do_GET(self) -> None:
                parts = self.path.split("/")
                with server._lock:
                    server.status_queries.append(self.path)
                    server.status_query_headers.append(dict(self.headers))
                if len(parts) == 4 and parts[1] == "status":
                    status = server.status_answers.get((unquote(parts[2]), int(parts[3])), 404)
                    self._answer(status, "status")
                else:
                    self._answer(404, "no such path")

            def _answer(self, status: int, body: str, headers: dict | None = None) -> None:
                try:
                    data = body.encode()
                    self.send_response(status)
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout under test)

        class Server(ThreadingHTTPServer):
            # The default backlog of 5 refuses connections when many workers send at once.
            request_queue_size = 256

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> ScriptedServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, *answers: Answer) -> None:
        with self._lock:
            self.script = list(answers)

    def keys_received(self) -> Counter:
        with self._lock:
            return Counter(r.headers.get("Idempotency-Key") for r in self.received)

    @property
    def status_url(self) -> str:
        return self.base + "/status/{key}/{version}"
