"""What a browser must be told, on every answer, and the Host allow-list.

- Every HTML answer: a Content-Security-Policy without inline scripts or styles (the
  console's scripts and styles are files under /static), `frame-ancestors 'none'` and
  X-Frame-Options: DENY (no page of another site, or of another port of this host, may frame
  the console: clickjacking), Referrer-Policy, Cross-Origin-Opener-Policy, and
  Cache-Control: no-store (a signed-in page is not kept by the browser or a proxy).
- Every answer: X-Content-Type-Options: nosniff and X-Frame-Options: DENY.
- A request whose Host is not in ALLOWED_HOSTS gets 400 (DNS rebinding: a name the attacker
  controls, pointed at 127.0.0.1, would otherwise reach the console as a same-origin page of
  their site). /healthz and /readyz answer any host: load balancers probe them by address.

A pure ASGI middleware: it sees every answer, the problem pages included."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from pipeline_console.api.problems import problem

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
EVERY_ANSWER = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                (b"referrer-policy", b"same-origin")]
HTML_ANSWERS = [(b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
                (b"cross-origin-opener-policy", b"same-origin"),
                (b"cache-control", b"no-store")]
ANY_HOST_PATHS = frozenset({"/healthz", "/readyz"})


def host_name(header: str) -> str:
    """The host of a Host header, without its port: 'h:8000' → 'h', '[::1]:8000' → '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        rest = header[end + 1:] if end > 0 else ""
        if end < 0 or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return header  # '[::1]evil.example' is no address: it matches nothing
        return header[1:end]
    if header.count(":") == 1:
        header = header.partition(":")[0]
    return header.rstrip(".")


class WebSecurity:
    def __init__(self, app: Any, allowed_hosts: Iterable[str]) -> None:
        self.app = app
        # the same reading as a request's Host: 'name.example.:443' allows 'name.example'
        self.allowed = frozenset(host if host == "*" else host_name(host)
                                 for host in allowed_hosts)

    def host_allowed(self, header: str) -> bool:
        return "*" in self.allowed or host_name(header) in self.allowed

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                content_type = next((value for name, value in headers
                                     if name.lower() == b"content-type"), b"")
                added = EVERY_ANSWER + (HTML_ANSWERS if content_type.startswith(b"text/html")
                                        else [])
                headers += [(name, value) for name, value in added if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        host = next((value.decode("latin-1") for name, value in scope.get("headers", [])
                     if name == b"host"), "")
        if scope.get("path") not in ANY_HOST_PATHS and not self.host_allowed(host):
            shown = host if len(host) <= 100 else host[:100] + "…"
            response = problem(400, f"this server does not answer to the host {shown!r}; "
                               "name it in PIPELINE_CONSOLE_ALLOWED_HOSTS",
                               host=shown)
            await response(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


def add_browser_headers(response: Any) -> Any:
    """The same headers on a response made outside this middleware: Starlette answers an
    unexpected error (500) in its outermost layer, past every middleware."""
    content_type = response.headers.get("content-type", "")
    for name, value in EVERY_ANSWER + (HTML_ANSWERS if content_type.startswith("text/html")
                                       else []):
        response.headers.setdefault(name.decode(), value.decode())
    return response


def with_browser_headers(handler: Callable[[Any, Exception], Awaitable[Any]]
                         ) -> Callable[[Any, Exception], Awaitable[Any]]:
    async def answer(request: Any, error: Exception) -> Any:
        return add_browser_headers(await handler(request, error))

    return answer
