"""Standard Webhooks signatures (https://www.standardwebhooks.com), and the rotation of a
system's signing secret.

Every request to a system with `signing` carries `webhook-id` ("msg_" and the delivery's id:
the same for every try of one delivery, whether a retry, a replay or a resend after an
ambiguous outcome is resolved), `webhook-timestamp` (Unix seconds, read right before the
send, so each try has its own) and `webhook-signature`: "v1," and the base64 of
HMAC-SHA256(secret, f"{id}.{timestamp}.{body}"), the secret being the base64 after
"whsec_". While a rotation's overlap lasts, the previous secret signs too and both
signatures go, separated by a space, so a receiver that still knows only the old secret
keeps accepting.

The timestamp comes from the machine's clock, not from the Deliverer's `clock`: the
receiver compares it with its own clock (five minutes either way, in the reference
verifier)."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import secrets as random_secrets
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.audit.service import AuditEntry, append_audit
from pipeline_console.delivery import vault as secrets
from pipeline_console.delivery.transports import DeliveryRequest, SystemConfig, changed
from pipeline_console.delivery.vault import Vault
from pipeline_console.errors import NotFound
from pipeline_console.models import DownstreamSystem

SCHEME = "standard-webhooks"
SECRET_PREFIX = "whsec_"
MAX_OVERLAP_S = 30 * 86_400
SHOWN_SIGNATURE = "v1,***"


def message_id(delivery_id: int) -> str:
    return f"msg_{delivery_id}"


@functools.lru_cache(maxsize=1024)
def _key(secret: str) -> bytes:
    """The HMAC key of a whsec_ secret (decoded once per secret and process)."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the signing secret is not whsec_ and base64") from None


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    # hmac.new, not the one-shot hmac.digest: that one let go of the GIL and waited to get
    # it back from the database driver's thread, five times slower in the worker.
    mac = hmac.new(_key(secret), b"%s.%d.%s" % (msg_id.encode(), timestamp, body),
                   hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def signing_secrets(system: SystemConfig) -> list[str]:
    """The secrets that sign this system's requests now: the current one, and the previous
    one while its overlap lasts (vault.load_secrets leaves it out once it has expired)."""
    if not system.signing:
        return []
    return [system.secrets[slot] for slot in ("signing", "signing_previous")
            if slot in system.secrets]


def sign(system: SystemConfig, request: DeliveryRequest, timestamp: int) -> DeliveryRequest:
    """The request with its Standard Webhooks headers (itself, for a system without
    signing). A signing system whose secret this process cannot read sends nothing
    unsigned: the request becomes unsendable, a permanent failure that says why."""
    if not system.signing or request.unsendable:
        return request
    keys = signing_secrets(system)
    if not keys:
        return changed(request, unsendable=(
            "signing is on but its secret could not be read (is PIPELINE_CONSOLE_SECRET_KEY "
            "set in this process?)"))
    msg_id = message_id(request.delivery_id)
    signatures = [signature(key, msg_id, timestamp, request.body) for key in keys]
    headers = {**request.headers, "webhook-id": msg_id, "webhook-timestamp": str(timestamp),
               "webhook-signature": " ".join(signatures)}
    return changed(request, headers=headers, shown={
        **request.shown, "webhook-signature": " ".join([SHOWN_SIGNATURE] * len(signatures))})


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(random_secrets.token_bytes(32)).decode()


async def rotate_signing_secret(session: AsyncSession, vault: Vault, name: str, *,
                                overlap_s: int, actor: str, now: datetime) -> str:
    """A new signing secret for the system, returned once (never readable again). The
    current one becomes the previous one, signing alongside it for `overlap_s` seconds
    (0: it stops at once); a previous one still overlapping is replaced. A system without
    signing gets it. Audited with fingerprints only."""
    system = await session.get(DownstreamSystem, name, with_for_update=True)
    if system is None:
        raise NotFound(f"no downstream system is named {name!r}")
    secrets.require_key(vault, "signing.secret")
    rows = await secrets.secret_rows(session, name)
    current = rows.get("signing") if system.signing else None
    details: dict[str, Any] = {"overlap_s": overlap_s, "enabled": not system.signing}
    if current is not None and overlap_s > 0:
        expires_at = now + timedelta(seconds=overlap_s)
        details["previous"] = await secrets.put_secret(
            session, vault, name, "signing_previous", vault.decrypt(current.ciphertext),
            now=now, expires_at=expires_at)
        details["previous_expires_at"] = expires_at.isoformat()
    else:
        await secrets.drop_secrets(session, name, ["signing_previous"])
    value = new_secret()
    details["secret"] = await secrets.put_secret(session, vault, name, "signing", value,
                                                 now=now)
    system.signing = {**(system.signing or {}), "scheme": SCHEME}
    system.updated_at = now
    await session.flush()
    await append_audit(session, [AuditEntry("system.signing_rotated", "system", name,
                                            details)], actor=actor, now=now)
    return value

