"""The deterministic ingestion workload of issue 8: 70 % new keys, 15 % supersede, 8 %
duplicate, 5 % stale, 2 % same-version conflict; payloads of about 1 KB; 10 % with a
correlation id."""

from __future__ import annotations

import random
from typing import Any

FILLER = "lorem ipsum dolor sit amet " * 36  # about 1 KB with the other fields


def messages(count: int, seed: int = 8) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    known: list[tuple[str, int, dict[str, Any]]] = []  # (entity id, version, payload)
    for n in range(count):
        roll = rng.random()
        if roll < 0.70 or len(known) < 10:
            entity_id, version = f"E-{n:08d}", 1
            payload = {"name": f"customer {n}", "n": n, "notes": FILLER}
            known.append((entity_id, version, payload))
            body = payload
        else:
            index = rng.randrange(len(known))
            entity_id, version, payload = known[index]
            if roll < 0.85:  # supersede
                version += 1
                payload = {**payload, "n": payload["n"] + 1}
                known[index] = (entity_id, version, payload)
                body = payload
            elif roll < 0.93:  # duplicate
                body = payload
            elif roll < 0.98:  # stale
                body, version = {**payload, "old": True}, max(version - 1, 0)
                if version == known[index][1]:
                    body = payload
            else:  # same-version conflict
                body = {**payload, "name": "someone else"}
        message = {"source_system": "erp" if rng.random() < 0.8 else "crm",
                   "entity_type": "customer", "entity_id": entity_id, "version": version,
                   "payload": body}
        if rng.random() < 0.10:
            message["correlation_id"] = f"evt-{n // 3}"
        out.append(message)
    return out
