"""Optionally refuse downstream systems on private, loopback or reserved addresses
(PIPELINE_CONSOLE_REFUSE_PRIVATE_SYSTEM_URLS): a guard against an admin token being used to
make the pipeline send records into the internal network. Off by default, for local use."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

from pipeline_console.errors import FieldError, InvalidInput


async def _addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, None,
                                                         type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


async def refuse_private_urls(values: dict[str, Any]) -> None:
    """Every address the system's URLs resolve to must be public: its url, its status_url
    and its OAuth2 token endpoint (auth.token_url), which is sent the client secret. Checked
    when the system is saved; a name that later resolves elsewhere is a limit of this check,
    see docs/security.md."""
    errors = []
    auth = values.get("auth")
    urls = {"url": values.get("url"), "status_url": values.get("status_url"),
            "auth.token_url": auth.get("token_url") if isinstance(auth, dict) else None}
    for field, url in urls.items():
        if not url:
            continue
        host = urlsplit(str(url).replace("{key}", "k").replace("{version}", "1")).hostname
        if not host:
            continue
        try:
            addresses = await _addresses(host.strip("[]"))
        except OSError:
            errors.append(FieldError(field, f"{host} cannot be resolved"))
            continue
        private = [address for address in addresses if not address.is_global]
        if private:
            errors.append(FieldError(field, f"{host} is a private, loopback or reserved "
                                            f"address ({private[0]}); this server refuses them"))
    if errors:
        raise InvalidInput("the system's URL points into a private network", errors)
