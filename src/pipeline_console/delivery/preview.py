"""What a system would be sent now for one record: the request of the record's production
version, built, mapped and signed by the same functions a send uses (transports.build_request,
signing.sign), and shown as an attempt's summary shows it — every secret as *** ("Bearer
***", "v1,***"). The API (POST /systems/{name}/preview) and the console both call it."""

from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.delivery.base import needs_secrets, system_config
from pipeline_console.delivery.signing import sign
from pipeline_console.delivery.systems import get_system
from pipeline_console.delivery.transports import build_request
from pipeline_console.delivery.vault import Vault, load_secrets
from pipeline_console.errors import FieldError, InvalidInput, NotFound
from pipeline_console.models import Delivery, ProductionRecord


async def preview_request(session: AsyncSession, vault: Vault, system_name: str, key: str,
                          now: datetime) -> dict[str, Any]:
    """{"method", "url", "headers", "body"} as `system_name` would be sent the production
    version of `key` at `now` (NotFound for either; InvalidInput naming body_template when
    the template fails on this record, or signing.secret when the secret cannot be read).

    The webhook-id is the one of this version's delivery to the system, when it has one
    (the latest); a version not yet queued for it shows "msg_new" in its place."""
    system = await get_system(session, system_name)
    record = await session.get(ProductionRecord, key)
    if record is None:
        raise NotFound(f"no record in production has the key {key!r}")
    delivery = (await session.execute(
        select(Delivery.id, Delivery.attempts)
        .where(Delivery.system == system.name, Delivery.idempotency_key == key,
               Delivery.version == record.version)
        .order_by(Delivery.id.desc()).limit(1))).first()
    held = (await load_secrets(session, vault, [system.name], now=now)
            if needs_secrets(system) and vault.key is not None else {})
    config = system_config(system, held.get(system.name))
    request = build_request(SimpleNamespace(
        id=delivery.id if delivery else "new", idempotency_key=key, version=record.version,
        entity_type=record.entity_type, entity_id=record.entity_id, payload=record.payload,
        correlation_id=record.correlation_id), (delivery.attempts if delivery else 0) + 1,
        config)
    if request.unsendable:
        raise InvalidInput("the body template fails on this record", [
            FieldError("body_template", request.unsendable, type="mapping_error")])
    signed = sign(config, request, int(now.timestamp()))
    if signed.unsendable:
        raise InvalidInput("this request cannot be signed", [
            FieldError("signing.secret", signed.unsendable, type="unreadable_secret")])
    summary = signed.summary(config)
    return {"method": summary["method"], "url": summary["url"],
            "headers": summary["headers"], "body": orjson.loads(signed.body)}
