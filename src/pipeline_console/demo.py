"""The demo scenario: three hours of an ordinary bad day, replayed in simulated time so that it
ends now. Deterministic: the same steps, the same seeds, the same results on every run.

An ERP, a CRM and a web shop send customers, orders and invoices. Among them: retried POSTs
(duplicates), a batch the shop sends twice, late stale copies, same-version conflicts, partial
records (one completed later, one stuck), malformed messages, and last night's catalog batch
from the ERP's queue, ingested as an NDJSON file (`pipeline-console ingest`'s code path, no
broker) and again after the consumer restarts: all skip_duplicate. Three downstream systems receive
the promoted records through the simulated transport (no network): `warehouse` is healthy,
`crm-sync` is flaky and its circuit opens, `ledger` sometimes times out after sending and its
status query never answers, so its ambiguous outcomes wait for a person. An operator resolves
a conflict, replays dead letters (one request is refused as a whole, one executes), and takes
`ledger` through a maintenance window, leaving its circuit half-open.

At the end an admin connects six systems the way real ones are connected (CONNECTED):
one of each auth type (bearer, basic, header, OAuth2 client credentials), one that signs
its requests (Standard Webhooks), one sent with PUT to a URL template through a jq body
template, one with limits shared by every worker. They too use the simulated transport,
which ignores auth, signing and TLS (nothing leaves this machine): they show the settings,
the fingerprints of their secrets and the preview of what would be sent (connected after
the last traffic, they have no deliveries yet). Their secrets are the demo's own
(DEMO_SECRETS), encrypted with PIPELINE_CONSOLE_SECRET_KEY; without a key (make demo makes
one) they are left out.

Everything goes through the same service functions as the API and the worker."""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.anomalies.service import resolve_anomaly
from pipeline_console.auth.tokens import active_token_named, create_token, revoke_token
from pipeline_console.config import Settings
from pipeline_console.dashboard.service import attention
from pipeline_console.db import Database
from pipeline_console.delivery.circuits import operator_action
from pipeline_console.delivery.policy import CircuitEvent
from pipeline_console.delivery.schemas import SystemCreate
from pipeline_console.delivery.service import Deliverer, deliver_due
from pipeline_console.delivery.systems import create_system
from pipeline_console.delivery.transports import Transports
from pipeline_console.delivery.vault import Vault
from pipeline_console.delivery.workers import Identity, Liveness, heartbeat
from pipeline_console.entity_types.service import put_entity_type
from pipeline_console.errors import Conflict
from pipeline_console.ingestion.intake import excerpt, parse_message
from pipeline_console.ingestion.ndjson import DECISIONS, ingest_actor, ingest_ndjson, read_lines
from pipeline_console.ingestion.service import Accepted, ingest_messages
from pipeline_console.jobs.registry import run_job
from pipeline_console.models import Anomaly, AuditEvent, DeadLetter, DownstreamSystem, RecordState
from pipeline_console.replay.service import Target, create_replay, execute_replay

DEMO_ACTOR = "demo"
# the demo's source systems, each with its own ingest token that may post only its messages
DEMO_SOURCES = ("erp", "crm", "shop")
OPERATOR = "demo-operator"
ADMIN = "demo-admin"  # who connects the systems of CONNECTED (as the audit log names it)
DURATION = timedelta(hours=3)
DELIVERY_TICK = timedelta(minutes=2)

SCHEMAS: dict[str, dict[str, Any]] = {
    "customer": {
        "type": "object",
        "required": ["name", "country"],
        "properties": {"name": {"type": "string"}, "country": {"type": "string"},
                       "email": {"type": "string"}},
    },
    "order": {
        "type": "object",
        "required": ["customer_id", "total", "currency"],
        "properties": {"customer_id": {"type": "string"}, "total": {"type": "number"},
                       "currency": {"type": "string"}},
    },
    "invoice": {
        "type": "object",
        "required": ["order_id", "amount", "due"],
        "properties": {"order_id": {"type": "string"}, "amount": {"type": "number"},
                       "due": {"type": "string"}},
    },
}

SYSTEMS: list[dict[str, Any]] = [
    {"name": "warehouse", "transport": "simulated", "entity_types": ["customer", "order"],
     "simulation": {"seed": 11, "outcomes": {"success": 1.0}, "latency_ms": 8}},
    {"name": "crm-sync", "transport": "simulated", "entity_types": ["customer"],
     "failure_threshold": 3, "max_attempts": 5, "backoff_base_s": 20, "backoff_max_s": 600,
     "simulation": {"seed": 23, "latency_ms": 40,
                    "outcomes": {"success": 0.4, "transient": 0.55, "permanent": 0.05}}},
    {"name": "ledger", "transport": "simulated", "entity_types": ["invoice", "order"],
     "failure_threshold": 50, "max_attempts": 4, "backoff_base_s": 30,
     "simulation": {"seed": 7, "latency_ms": 120, "status_query": "unavailable",
                    "outcomes": {"success": 0.6, "ambiguous": 0.25, "permanent": 0.15}}},
]

# Stand-ins for the secrets a real system would be given; encrypted at rest like any other.
DEMO_SECRETS = {
    "erp-api": "demo-erp-bearer-token-3f9a",
    "crm-basic": "demo-crm-password-81c2",
    "shop-header": "demo-shop-api-key-5d07",
    "billing-oauth": "demo-billing-client-secret-c4e1",
    "partner-webhook": "whsec_ZGVtby1zaWduaW5nLXNlY3JldC1vZi10aGUtcGFydG5lcg==",
}
_SIMULATED = {"seed": 3, "outcomes": {"success": 1.0}, "latency_ms": 15}
CONNECTED: list[dict[str, Any]] = [
    {"name": "erp-api", "transport": "simulated", "entity_types": ["customer"],
     "method": "PUT", "url": "https://erp.example/api/v2/{entity_type}s/{entity_id}",
     "auth": {"type": "bearer", "token": DEMO_SECRETS["erp-api"]},
     "headers": {"X-Tenant": "acme-eu"},
     "body_template": "{customerNumber: .entity_id, displayName: .payload.name, "
                      "countryCode: .payload.country, revision: .version}",
     "simulation": _SIMULATED},
    {"name": "crm-basic", "transport": "simulated", "entity_types": ["customer"],
     "url": "https://crm.example/hooks/pipeline",
     "auth": {"type": "basic", "username": "pipeline",
              "password": DEMO_SECRETS["crm-basic"]}, "simulation": _SIMULATED},
    {"name": "shop-header", "transport": "simulated", "entity_types": ["order"],
     "url": "https://shop.example/integrations/orders",
     "auth": {"type": "header", "name": "X-Api-Key", "value": DEMO_SECRETS["shop-header"]},
     "simulation": _SIMULATED},
    {"name": "billing-oauth", "transport": "simulated", "entity_types": ["order"],
     "method": "PATCH", "url": "https://billing.example/v1/orders/{entity_id}",
     "auth": {"type": "oauth2_client_credentials",
              "token_url": "https://auth.billing.example/oauth2/token",
              "client_id": "integration-pipeline", "scope": "orders:write",
              "client_secret": DEMO_SECRETS["billing-oauth"]}, "simulation": _SIMULATED},
    {"name": "partner-webhook", "transport": "simulated", "entity_types": ["customer", "order"],
     "url": "https://partner.example/webhooks/pipeline",
     "signing": {"scheme": "standard-webhooks", "secret": DEMO_SECRETS["partner-webhook"]},
     "simulation": _SIMULATED},
    {"name": "tax-service", "transport": "simulated", "entity_types": ["order"],
     "url": "https://tax.example/api/orders", "max_in_flight": 2, "max_per_second": 5,
     "simulation": _SIMULATED},
]

CUSTOMERS = [("C-1001", "Acme GmbH", "DE"), ("C-1002", "Globex Ltd", "GB"),
             ("C-1003", "Initech SARL", "FR"), ("C-1004", "Umbrella AG", "DE"),
             ("C-1005", "Stark Industries", "US"), ("C-1006", "Wayne Enterprises", "US"),
             ("C-1007", "Hooli BV", "NL"), ("C-1008", "Vandelay SpA", "IT"),
             ("C-1009", "Soylent Oy", "FI"), ("C-1010", "Tyrell AB", "SE")]


def customer(source: str, entity_id: str, version: int, name: str, country: str | None,
             **extra: Any) -> dict[str, Any]:
    payload = {"name": name, "email": f"ap@{name.split()[0].lower()}.example"}
    if country is not None:
        payload["country"] = country
    return _message(source, "customer", entity_id, version, payload, **extra)


def order(number: int, version: int = 1, total: float | None = None,
          **extra: Any) -> dict[str, Any]:
    customer_id = CUSTOMERS[number % len(CUSTOMERS)][0]
    return _message("shop", "order", f"O-{5000 + number}", version,
                    {"customer_id": customer_id, "total": total or 40.0 + 17.5 * number,
                     "currency": "EUR"},
                    correlation_id=f"evt-{5000 + number}",
                    message_id=f"shop-{5000 + number}-v{version}", **extra)


def product(number: int) -> dict[str, Any]:
    """The ERP's nightly catalog: no downstream system takes products, so last night's
    batch adds records and attempts but no deliveries (the story's deliveries, seeded by
    their ids, stay the same)."""
    return _message("erp", "product", f"P-{100 + number}", 1,
                    {"name": f"Widget {number}", "price": 5.0 + number, "currency": "EUR"},
                    message_id=f"erp-catalog-P-{100 + number}-v1")


def invoice(number: int) -> dict[str, Any]:
    return _message("erp", "invoice", f"INV-{9000 + number}", 1,
                    {"order_id": f"O-{5000 + number}", "amount": 40.0 + 17.5 * number,
                     "due": "2026-12-31"},
                    correlation_id=f"evt-{5000 + number}", message_id=f"erp-inv-{number}")


def _message(source: str, entity_type: str, entity_id: Any, version: Any,
             payload: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"source_system": source, "entity_type": entity_type, "entity_id": entity_id,
            "version": version, "payload": payload, **extra}


LAST_NIGHT = [product(number) for number in range(1, 41)]


@dataclass
class DemoClock:
    """Simulated time: the story runs from three hours ago up to now."""

    now: datetime

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Story:
    database: Database
    clock: DemoClock
    start: datetime
    deliverer: Deliverer
    lines: list[str] = field(default_factory=list)
    delivered_until: datetime | None = None

    def say(self, line: str) -> None:
        self.lines.append(f"{self.clock.now:%H:%M}  {line}")

    async def deliver_until(self, minutes: float) -> None:
        """Worker passes every DELIVERY_TICK of simulated time, one delivery at a time (so
        the outcome of each send, and the order of circuit transitions, is the same on every
        run), up to `minutes` after the start."""
        target = self.start + timedelta(minutes=minutes)
        moment = self.delivered_until or self.start
        counts: dict[str, int] = {}
        while moment + DELIVERY_TICK <= target:
            moment += DELIVERY_TICK
            self.clock.now = moment
            while True:
                result = await deliver_due(self.deliverer, limit=1, concurrency=1)
                if not result["claimed"]:
                    break
                for outcome, count in result.items():
                    if outcome not in ("claimed", "recovered_as_ambiguous") and count:
                        counts[outcome] = counts.get(outcome, 0) + count
        self.delivered_until = moment
        self.clock.now = target
        if counts:
            self.say("deliveries: " + ", ".join(f"{n} {what}" for what, n in
                                                sorted(counts.items())))

    async def send(self, what: str, *bodies: dict[str, Any], at: float) -> None:
        """Source systems post `bodies`, one transaction each, as the API would."""
        await self.deliver_until(at)
        decisions: dict[str, int] = {}
        for body in bodies:
            item = parse_message(body, excerpt(orjson.dumps(body), 4096), max_depth=32)
            async with self.database.transaction() as session:
                [result] = await ingest_messages(session, [item], now=self.clock(),
                                                 actor=DEMO_ACTOR)
            word = result.decision if isinstance(result, Accepted) else "rejected"
            if isinstance(result, Accepted) and result.staging_status == "partial":
                word += " (partial)"
            decisions[word] = decisions.get(word, 0) + 1
        self.say(f"{what} → " + ", ".join(f"{n} {word}" for word, n in decisions.items()))

    async def ingest_file(self, what: str, path: Path, settings: Settings, *,
                          at: float) -> None:
        """`pipeline-console ingest PATH`'s code path, in the story's time."""
        await self.deliver_until(at)
        with path.open("rb") as stream:
            tally = await ingest_ndjson(
                self.database, read_lines(stream, settings.max_message_bytes),
                settings=settings, actor=ingest_actor(path.name), clock=self.clock,
                batch_size=500)
        self.say(f"{what} → " + ", ".join(f"{tally.decisions[word]} {word}"
                                          for word in DECISIONS if tally.decisions[word]))

    async def job(self, name: str, settings: Settings) -> dict[str, Any] | None:
        run = await run_job(self.deliverer, settings, name, actor=OPERATOR, trigger="cli")
        self.say(f"job {name}: {run.status} {orjson.dumps(run.result).decode()}")
        return run.result


async def load_demo(database: Database, *, now: datetime, settings: Settings | None = None,
                    batch_file: Path | None = None) -> list[str]:
    """Load the scenario into an empty database; return what happened, one line per step.
    Last night's batch is written to `batch_file` as NDJSON (kept, for `pipeline-console
    ingest`), or to a temporary file."""
    settings = settings or Settings()
    async with database.read() as session:
        # The story runs in the past: into a database in use it would write history (and
        # audit events) older than what is there.
        for table, condition in ((DownstreamSystem, True), (RecordState, True),
                                 (AuditEvent, AuditEvent.subject_type != "token")):
            if await session.scalar(select(func.count()).select_from(table).where(condition)):
                raise Conflict("this database is not empty; load the demo into an empty "
                               "database (make demo starts from a fresh demo.db)")
    start = now - DURATION
    clock = DemoClock(start)
    async with Transports.open() as transports:
        deliverer = Deliverer(database, transports, clock, worker_id="demo-worker",
                              rng=random.Random(5), vault=Vault.from_settings(settings))
        story = Story(database, clock, start, deliverer)
        await _setup(story)
        with tempfile.TemporaryDirectory() as scratch:
            path = batch_file or Path(scratch) / "last-night.ndjson"
            path.write_bytes(b"".join(orjson.dumps(body) + b"\n" for body in LAST_NIGHT))
            await _traffic(story, path, settings, kept=batch_file is not None)
        await _operators(story, settings)
    return story.lines


async def create_source_tokens(session: AsyncSession, *, actor: str,
                               now: datetime) -> dict[str, str]:
    """An ingest token per demo source, named `{source}-ingest` and scoped to it (replacing
    one of that name from an earlier run): name → the token, shown once."""
    tokens = {}
    for source in DEMO_SOURCES:
        name = f"{source}-ingest"
        if await active_token_named(session, name) is not None:
            await revoke_token(session, name, actor=actor, now=now)
        _, tokens[name] = await create_token(session, name=name, role="ingest", actor=actor,
                                             now=now, sources=[source])
    return tokens


async def _setup(story: Story) -> None:
    async with story.database.transaction() as session:
        for name, schema in SCHEMAS.items():
            await put_entity_type(session, name, schema, actor=DEMO_ACTOR, now=story.clock())
        for system in SYSTEMS:
            await create_system(session, SystemCreate.model_validate(system), actor=DEMO_ACTOR,
                                now=story.clock())
    story.say("(times are UTC) entity types customer, order, invoice; downstream systems warehouse "
              "(healthy), crm-sync (flaky), ledger (status query times out)")


async def _traffic(story: Story, last_night: Path, settings: Settings, *, kept: bool) -> None:
    send = story.send
    await send("the ERP's sync: 10 customers",
               *[customer("erp", cid, 1, name, country, message_id=f"erp-{cid}-v1")
                 for cid, name, country in CUSTOMERS], at=1)
    await story.ingest_file(f"last night's batch from the ERP's catalog queue "
                            f"({len(LAST_NIGHT)} products; `pipeline-console ingest` of "
                            f"{last_night.name})", last_night, settings, at=2)
    await send("the ERP retries two POSTs whose answers it never saw",
               customer("erp", "C-1009", 1, "Soylent Oy", "FI", message_id="erp-C-1009-v1"),
               customer("erp", "C-1010", 1, "Tyrell AB", "SE", message_id="erp-C-1010-v1"),
               at=3)
    await send("the shop: orders O-5001…O-5008, one business event each",
               *[order(number) for number in range(1, 9)], at=5)
    await send("the shop retries order O-5003", order(3), at=6)
    await send("the ERP invoices orders O-5001…O-5006 (same business events)",
               *[invoice(number) for number in range(1, 7)], at=8)
    await send("the ERP moves Globex to Ireland (version 2)",
               customer("erp", "C-1002", 2, "Globex Ltd", "IE", message_id="erp-C-1002-v2"),
               at=9)
    await send("the CRM's nightly export arrives: the same Initech, an old Globex, and two "
               "customers it disagrees about",
               customer("crm", "C-1003", 1, "Initech SARL", "FR", message_id="crm-77"),
               customer("crm", "C-1002", 1, "Globex Ltd", "GB", message_id="crm-78"),
               customer("crm", "C-1004", 1, "Umbrella AG", "AT", message_id="crm-79"),
               customer("crm", "C-1005", 1, "Stark Industries Inc.", "US", message_id="crm-80"),
               at=10)
    await send("the shop registers two customers without a country",
               customer("shop", "C-2001", 1, "Dunder Mifflin", None, message_id="shop-c-1"),
               customer("shop", "C-2002", 1, "Prestige Worldwide", None,
                        message_id="shop-c-2"), at=12)
    await send("malformed: the shop sends a negative version, the CRM forgets the entity id",
               order(9, version=-1),
               {"source_system": "crm", "entity_type": "customer", "version": 1,
                "payload": {"name": "Nobody"}, "message_id": "crm-81"}, at=20)
    await send("the shop's integration restarts and sends its last batch again",
               *[order(number) for number in range(1, 6)], at=30)
    await send("the shop completes Prestige Worldwide (version 2)",
               customer("shop", "C-2002", 2, "Prestige Worldwide", "US",
                        message_id="shop-c-3"), at=40)
    await send("the shop changes order O-5002 (version 2, a new total)",
               order(2, version=2, total=99.0), at=45)
    await send("the ERP updates Wayne Enterprises (version 2)",
               customer("erp", "C-1006", 2, "Wayne Enterprises", "CA",
                        message_id="erp-C-1006-v2"), at=50)
    await send("the CRM's copy of Wayne Enterprises, version 1, arrives late",
               customer("crm", "C-1006", 1, "Wayne Enterprises", "US", message_id="crm-90"),
               at=60)
    await story.ingest_file("the catalog consumer restarts and last night's batch arrives "
                            f"again (`pipeline-console ingest` of {last_night.name}, once "
                            "more): nothing changes", last_night, settings, at=90)
    if kept:
        story.say(f"the batch is kept in {last_night}: `pipeline-console ingest --dry-run "
                  f"{last_night}` reports {len(LAST_NIGHT)} skip_duplicate")
    await send("the CRM insists on its Umbrella (the same conflict again)",
               customer("crm", "C-1004", 1, "Umbrella AG", "AT", message_id="crm-91"), at=95)
    await send("more orders and invoices",
               order(7, version=2, total=310.0), invoice(7), invoice(8), at=120)
    await story.deliver_until(148)


async def _operators(story: Story, settings: Settings) -> None:
    database = story.database
    await story.deliver_until(150)
    async with database.transaction() as session:
        anomaly = await session.scalar(
            select(Anomaly).where(Anomaly.idempotency_key == "customer:C-1005",
                                  Anomaly.status == "open"))
        if anomaly is not None:
            await resolve_anomaly(session, anomaly.id, "keep_current",
                                  "the ERP is the master for customer names", actor=OPERATOR,
                                  now=story.clock())
            story.say(f"an operator resolves anomaly {anomaly.id} (C-1005): keep_current")
    await story.deliver_until(155)
    await story.job("query_ambiguous", settings)

    await story.deliver_until(160)
    async with database.read() as session:
        dead = list((await session.execute(
            select(DeadLetter.id).where(DeadLetter.system == "ledger",
                                        DeadLetter.status == "open",
                                        DeadLetter.idempotency_key.like("invoice:%"))
            .order_by(DeadLetter.id))).scalars())
    if dead:
        async with database.transaction() as session:
            request, items = await create_replay(
                session, [Target(dlq_id=dead[0]),
                          Target(key="order:O-5001", system="warehouse")],
                reason="ledger says it fixed its validation",
                selection={"items": [{"dlq_id": dead[0]},
                                     {"key": "order:O-5001", "system": "warehouse"}]},
                allow_delivered=False, actor=OPERATOR, now=story.clock())
        story.say(f"replay {request.id} (a dead letter and a delivered order) is "
                  f"{request.status}: {items[-1].reason}")
        await story.deliver_until(161)
        async with database.transaction() as session:
            request, _ = await create_replay(
                session, [Target(dlq_id=dlq_id) for dlq_id in dead],
                reason="ledger says it fixed its validation",
                selection={"items": [{"dlq_id": dlq_id} for dlq_id in dead]},
                allow_delivered=False, actor=OPERATOR, now=story.clock())
        done = await execute_replay(story.deliverer, request.id, actor=OPERATOR)
        story.say(f"replay {request.id} of the {len(dead)} open invoice dead letter(s) of "
                  f"ledger: {done.status}")

    await story.deliver_until(165)
    await _circuit(story, "ledger", CircuitEvent.FORCE_OPEN,
                   "ledger maintenance window, the vendor asked us to stop for 15 minutes")
    await story.send("late traffic: a new customer and an order for it",
                     customer("erp", "C-1011", 1, "Cyberdyne KK", "JP",
                              message_id="erp-C-1011-v1"),
                     order(11), at=176)
    await story.deliver_until(178)
    for job in ("promote_staging", "stale_partial_sweep"):
        await story.job(job, settings)
    await story.deliver_until(179)
    await _connect(story, settings)
    await _circuit(story, "ledger", CircuitEvent.RESET,
                   "maintenance over; one trial delivery will tell")
    gone = Identity("worker:edge-2:4242:demo", "edge-2", 4242)
    await heartbeat(story.database, gone, Liveness(settings.worker_lost_after_s,
                                                   settings.lease_safety_s), story.clock)
    story.say(f"a worker on edge-2 (pid 4242) heartbeats at {story.clock():%H:%M} and is "
              "never heard from again: it is lost (GET /api/v1/workers); what it held would "
              "become ambiguous as worker_lost, without touching a circuit")
    story.clock.now = story.start + DURATION  # now; the trial waits for a worker
    async with database.read() as session:
        items = await attention(session, now=story.clock(),
                                stale_partial_after_s=settings.stale_partial_after_s,
                                worker_lost_after_s=settings.worker_lost_after_s,
                                consumer_lost_after_s=settings.consumer_lost_after_s,
                                consumer_backlog_alert_s=settings.consumer_backlog_alert_s)
    story.say("the dashboard now: " + ", ".join(
        f"{item.name}{f' ({item.system})' if item.system else ''} {item.count}"
        for item in items if item.count))
    story.say("try: /api/v1/inspect/customer:C-1004 (a conflict), customer:C-1006 (stale), "
              "customer:C-2001 (stuck partial), /api/v1/inspect?correlation_id=evt-5002")


async def _connect(story: Story, settings: Settings) -> None:
    """An admin connects the systems of CONNECTED, after the last traffic: the story's
    deliveries (and their simulated outcomes, seeded by delivery id) are the same with or
    without them, and they wait for the next records (the preview shows what they would
    be sent)."""
    vault = Vault.from_settings(settings)
    if vault.key is None:
        story.say("PIPELINE_CONSOLE_SECRET_KEY is not set: the connected systems (auth, "
                  "signing, limits) are left out; make demo sets a key")
        return
    async with story.database.transaction() as session:
        for system in CONNECTED:
            await create_system(session, SystemCreate.model_validate(system), actor=ADMIN,
                                now=story.clock(), vault=vault)
    story.say("an admin connects " + ", ".join(
        f"{system['name']} ({_connection_of(system)})" for system in CONNECTED)
        + "; all simulated (the simulated transport ignores auth and signing): see what each "
        "would be sent with the preview at /systems/NAME")


def _connection_of(system: dict[str, Any]) -> str:
    if "signing" in system:
        return "Standard Webhooks signing"
    if "max_in_flight" in system:
        return f"at most {system['max_in_flight']} at once, {system['max_per_second']}/s"
    words = [system["auth"]["type"]]
    if system.get("method", "POST") != "POST":
        words.append(system["method"])
    if "body_template" in system:
        words.append("jq body")
    return ", ".join(words)


async def _circuit(story: Story, system: str, event: CircuitEvent, reason: str) -> None:
    async with story.database.transaction() as session:
        circuit = await operator_action(session, system, event, reason, actor=OPERATOR,
                                        now=story.clock())
    story.say(f"an operator: {event.value} the circuit of {system} → {circuit.state} "
              f"({reason})")
