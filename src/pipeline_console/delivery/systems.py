"""Downstream systems: create, change, read. Every change is audited with its actor, and no
secret ever leaves: auth, signing and tls are stored without theirs (vault.py holds them,
encrypted), and every reader — the API, the console, the audit log — gets the same view
(`read_view`), with {"secret_set": true, "fingerprint": "…"} in each secret's place."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic_core import to_jsonable_python
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.audit.service import AuditEntry, append_audit
from pipeline_console.db import insert_for
from pipeline_console.delivery import vault as secrets
from pipeline_console.delivery.mapping import check_template
from pipeline_console.delivery.schemas import (
    AUTH_SECRET_FIELD,
    SystemCreate,
    SystemFields,
    SystemPatch,
)
from pipeline_console.delivery.tls import check_tls
from pipeline_console.delivery.vault import Vault
from pipeline_console.errors import Conflict, FieldError, InvalidInput, NotFound
from pipeline_console.models import Circuit, DownstreamSystem, SystemSecret
from pipeline_console.pagination import Page, PageRequest, fetch_page

# The connection's fields, handled apart from the plain settings (their secrets are split off).
CONNECTION = ("auth", "signing", "tls")


def _check_consistency(values: dict[str, Any]) -> None:
    errors = []
    if values["transport"] == "http" and not values.get("url"):
        errors.append(FieldError(field="url", message="a system with transport http needs a url",
                                 type="missing"))
    if values["backoff_max_s"] < values["backoff_base_s"]:
        errors.append(FieldError(field="backoff_max_s",
                                 message="must not be below backoff_base_s"))
    status_url = values.get("status_url")
    if status_url and "{key}" not in status_url and "{version}" not in status_url:
        errors.append(FieldError(field="status_url",
                                 message="must contain {key} or {version}"))
    if errors:
        raise InvalidInput("the system's settings do not fit together", errors)


def _plain(body: SystemFields, *, exclude_unset: bool) -> dict[str, Any]:
    return body.model_dump(mode="json", exclude_unset=exclude_unset, exclude=set(CONNECTION))


async def _connection(session: AsyncSession, vault: Vault, name: str, body: SystemFields,
                      stored: DownstreamSystem | None, *, now: datetime) -> dict[str, Any]:
    """Store the secrets of the auth, signing and tls given in `body` (a field left out of a
    PATCH keeps its value; a secret left out keeps the stored one if the rest still fits
    it); returns the columns to set, without any secret."""
    given = body.model_fields_set
    rows = await secrets.secret_rows(session, name) if stored is not None else {}
    columns: dict[str, Any] = {}
    errors: list[FieldError] = []
    puts: list[tuple[str, str, str]] = []  # (field, slot, value)
    drops: list[str] = []

    if "auth" in given:
        auth = body.auth
        if auth is None or auth.type == "none":
            columns["auth"], drops = None, [*drops, "auth"]
        else:
            field = AUTH_SECRET_FIELD[auth.type]
            columns["auth"] = auth.model_dump(mode="json", exclude={field}, exclude_none=True)
            secret = getattr(auth, field)
            kept = stored is not None and (stored.auth or {}).get("type") == auth.type \
                and "auth" in rows
            if secret is not None:
                puts.append((f"auth.{field}", "auth", secret.get_secret_value()))
            elif not kept:
                errors.append(FieldError(f"auth.{field}", f"a {auth.type} auth needs its "
                                         f"{field}", type="missing"))
    if "signing" in given:
        signing = body.signing
        if signing is None:
            columns["signing"], drops = None, [*drops, "signing", "signing_previous"]
        else:
            columns["signing"] = {"scheme": signing.scheme}
            if signing.secret is not None:
                puts.append(("signing.secret", "signing", signing.secret.get_secret_value()))
                drops.append("signing_previous")  # replaced, not rotated: no overlap
            elif "signing" not in rows:
                errors.append(FieldError("signing.secret", "signing needs a secret (or POST "
                                         "/systems/{name}/signing/rotate to have one made)",
                                         type="missing"))
    if "tls" in given:
        tls = body.tls
        if tls is None:
            columns["tls"], drops = None, [*drops, "tls_client_key"]
        else:
            key = None if tls.client_key is None else tls.client_key.get_secret_value()
            if key is None and tls.client_cert and "tls_client_key" in rows:
                # the kept key is checked against the new certificate: it must be read
                secrets.require_key(vault, "tls.client_key")
                key = vault.decrypt(rows["tls_client_key"].ciphertext)
                keep_key = True
            else:
                keep_key = False
            errors.extend(check_tls(tls.ca_bundle, tls.client_cert, key))
            columns["tls"] = {"ca_bundle": tls.ca_bundle, "client_cert": tls.client_cert}
            if tls.client_cert is None:
                drops.append("tls_client_key")
            elif key is not None and not keep_key:
                puts.append(("tls.client_key", "tls_client_key", key))
    if errors:
        raise InvalidInput("the system's connection settings are incomplete or invalid", errors)
    for field, slot, value in puts:
        secrets.require_key(vault, field)
        await secrets.put_secret(session, vault, name, slot, value, now=now)
    await secrets.drop_secrets(session, name, [slot for slot in drops
                                               if slot not in {p[1] for p in puts}])
    return columns


def _check_template(values: dict[str, Any]) -> None:
    template = values.get("body_template")
    problem = template and check_template(template)
    if problem:
        raise InvalidInput("the body template is not a jq program that compiles",
                           [FieldError("body_template", problem)])


async def create_system(session: AsyncSession, body: SystemCreate, *, actor: str,
                        now: datetime, vault: Vault | None = None) -> DownstreamSystem:
    vault = vault or Vault(None)
    values = _plain(body, exclude_unset=False)
    values["method"] = values["method"] or "POST"
    values["headers"] = values["headers"] or {}
    if values["transport"] == "simulated" and values.get("simulation") is None:
        values["simulation"] = {"seed": 0, "outcomes": {"success": 1.0}, "latency_ms": 1.0,
                                "status_query": None}
    _check_consistency(values)
    _check_template(values)
    table = DownstreamSystem.__table__
    inserted = await session.execute(
        insert_for(session.bind.dialect.name)(table)
        .values(**values, created_at=now, updated_at=now)
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(table.c.name)
    )
    if inserted.scalar() is None:
        raise Conflict(f"a system named {body.name!r} already exists; PATCH it to change it")
    session.add(Circuit(system=body.name, state="closed", consecutive_failures=0,
                        changed_at=now, reason="created"))
    await session.flush()
    system = await get_system(session, body.name)
    for column, value in (await _connection(session, vault, body.name, body, None,
                                            now=now)).items():
        setattr(system, column, value)
    await session.flush()
    settings = await read_view(session, system, now=now)
    for field in ("name", "created_at", "updated_at", "throttled_until"):
        settings.pop(field, None)
    await append_audit(session, [AuditEntry("system.created", "system", body.name,
                                             {"settings": to_jsonable_python(settings)})],
                       actor=actor, now=now)
    return system


async def update_system(session: AsyncSession, name: str, patch: SystemPatch, *, actor: str,
                        now: datetime, vault: Vault | None = None) -> DownstreamSystem:
    vault = vault or Vault(None)
    system = await session.get(DownstreamSystem, name, with_for_update=True)
    if system is None:
        raise NotFound(f"no downstream system is named {name!r}")
    changes = _plain(patch, exclude_unset=True)
    if "headers" in changes and changes["headers"] is None:
        changes["headers"] = {}
    if "method" in changes and changes["method"] is None:
        changes["method"] = "POST"
    current = {column.name: getattr(system, column.key)
               for column in DownstreamSystem.__table__.columns}
    _check_consistency({**current, **changes})
    _check_template(changes)
    before_view = await read_view(session, system, now=now)
    for field, value in changes.items():
        setattr(system, field, value)
    for column, value in (await _connection(session, vault, name, patch, system,
                                            now=now)).items():
        setattr(system, column, value)
    system.updated_at = now
    await session.flush()
    after_view = await read_view(session, system, now=now)
    fields = sorted(set(changes) | (patch.model_fields_set & set(CONNECTION)))
    await append_audit(session, [AuditEntry(
        "system.updated", "system", name, to_jsonable_python(
            {"before": {field: before_view.get(field) for field in fields},
             "after": {field: after_view.get(field) for field in fields}}))],
        actor=actor, now=now)
    return system


async def read_view(session: AsyncSession, system: DownstreamSystem, *, now: datetime,
                    rows: dict[str, SystemSecret] | None = None) -> dict[str, Any]:
    """The system as every reader sees it (SystemRead): each secret as {"secret_set": true,
    "fingerprint": "…"}."""
    if rows is None:
        rows = await secrets.secret_rows(session, system.name)
    shown = secrets.views(rows, now=now)
    view = {column.name: getattr(system, column.key)
            for column in DownstreamSystem.__table__.columns
            if column.name not in ("rate_allowance", "rate_checked_at")}
    view["method"] = system.method or "POST"
    view["headers"] = system.headers or {}
    auth = dict(system.auth or {"type": "none"})
    if auth["type"] in AUTH_SECRET_FIELD:
        auth[AUTH_SECRET_FIELD[auth["type"]]] = shown.get("auth")
    view["auth"] = auth
    if system.signing:
        view["signing"] = {**system.signing, "secret": shown.get("signing"),
                           "previous": shown.get("signing_previous")}
    if system.tls:
        view["tls"] = {**system.tls, "client_key": shown.get("tls_client_key")}
    return view


async def read_views(session: AsyncSession, systems: list[DownstreamSystem], *,
                     now: datetime) -> list[dict[str, Any]]:
    names = [system.name for system in systems]
    rows: dict[str, dict[str, SystemSecret]] = {name: {} for name in names}
    if names:
        for row in (await session.execute(select(SystemSecret).where(
                SystemSecret.system.in_(names)))).scalars():
            rows[row.system][row.slot] = row
    return [await read_view(session, system, now=now, rows=rows[system.name])
            for system in systems]


async def get_system(session: AsyncSession, name: str) -> DownstreamSystem:
    system = await session.get(DownstreamSystem, name, populate_existing=True)
    if system is None:
        raise NotFound(f"no downstream system is named {name!r}")
    return system


async def list_systems(session: AsyncSession, page: PageRequest) -> Page[DownstreamSystem]:
    return await fetch_page(session, DownstreamSystem.name, page)
