"""The demo scenario: a small, scripted set of messages that exercises all five branches,
a partial record completed by a newer version, a record stuck partial, a same-version
conflict, a business event spanning three systems, and a rejected malformed message."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import orjson

from pipeline_console.db import Database
from pipeline_console.entity_types.service import put_entity_type
from pipeline_console.ingestion.intake import excerpt, parse_message
from pipeline_console.ingestion.service import Accepted, ingest_messages

DEMO_ACTOR = "demo"

SCHEMAS: dict[str, dict[str, Any]] = {
    "customer": {
        "type": "object",
        "required": ["name", "country"],
        "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
    },
    "order": {
        "type": "object",
        "required": ["customer_id", "total"],
        "properties": {"customer_id": {"type": "string"}, "total": {"type": "number"}},
    },
}


def _message(source: str, entity_type: str, entity_id: str, version: Any,
             payload: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"source_system": source, "entity_type": entity_type, "entity_id": entity_id,
            "version": version, "payload": payload, **extra}


# Each step: (what it shows, the message as a source system would POST it).
SCENARIO: list[tuple[str, dict[str, Any]]] = [
    ("a new customer from the ERP",
     _message("erp", "customer", "C-100", 1, {"name": "Acme", "country": "DE"},
              correlation_id="evt-1001", message_id="erp-1")),
    ("the ERP retries the same POST",
     _message("erp", "customer", "C-100", 1, {"country": "DE", "name": "Acme"},
              correlation_id="evt-1001", message_id="erp-1")),
    ("the ERP renames the customer",
     _message("erp", "customer", "C-100", 2, {"name": "Acme GmbH", "country": "DE"},
              message_id="erp-2")),
    ("the CRM's older copy arrives late",
     _message("crm", "customer", "C-100", 1, {"name": "ACME", "country": "DE"},
              message_id="crm-7")),
    ("the CRM claims something else for version 2",
     _message("crm", "customer", "C-100", 2, {"name": "Acme Corporation", "country": "AT"},
              message_id="crm-8")),
    ("the shop places an order for the customer",
     _message("shop", "order", "O-5001", 1, {"customer_id": "C-100", "total": 99.5},
              correlation_id="evt-1001", message_id="shop-31")),
    ("billing invoices the order",
     _message("billing", "invoice", "INV-9001", 1, {"order_id": "O-5001", "amount": 99.5},
              correlation_id="evt-1001", message_id="bill-4")),
    ("the CRM sends a customer without a country",
     _message("crm", "customer", "C-200", 1, {"name": "Globex"}, message_id="crm-9")),
    ("the CRM completes it with a newer version",
     _message("crm", "customer", "C-200", 2, {"name": "Globex", "country": "US"},
              message_id="crm-10")),
    ("the shop sends a customer that stays partial",
     _message("shop", "customer", "C-300", 1, {"name": "Initech"}, message_id="shop-32")),
    ("a broken message with a negative version",
     _message("shop", "customer", "C-400", -1, {"name": "Umbrella"}, message_id="shop-33")),
]


async def load_demo(database: Database, *, now: datetime) -> list[str]:
    async with database.transaction() as session:
        for name, schema in SCHEMAS.items():
            await put_entity_type(session, name, schema, actor=DEMO_ACTOR,
                                  now=now - timedelta(seconds=len(SCENARIO) + 1))
    lines = []
    # One second apart, ending now, so that timelines read in the order things happened.
    start = now - timedelta(seconds=len(SCENARIO))
    for position, (what, body) in enumerate(SCENARIO):
        raw = excerpt(orjson.dumps(body), 4096)
        item = parse_message(body, raw, max_depth=32)
        async with database.transaction() as session:
            [result] = await ingest_messages(session, [item],
                                             now=start + timedelta(seconds=position),
                                             actor=DEMO_ACTOR)
        key = f"{body['entity_type']}:{body['entity_id']}"
        if isinstance(result, Accepted):
            staged = f", staging {result.staging_status}" if result.staging_status else ""
            anomaly = f", anomaly {result.anomaly_id}" if result.anomaly_id else ""
            lines.append(f"{what:48} {key:20} → {result.decision}{staged}{anomaly}")
        else:
            lines.append(f"{what:48} {key:20} → rejected (attempt {result.attempt_id})")
    return lines
