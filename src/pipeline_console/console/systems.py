"""Console pages of the downstream systems: the list, a system's page (its connection as
read_view shows it to every reader, its health, a preview of what would be sent), and the
form that registers or changes one (admins).

The form's post is turned into the API's body (SystemCreate or SystemPatch) and goes through
the same service (delivery/systems.py) with the app's vault, so the console validates,
stores secrets and audits exactly as the API does. A secret is a password field that is
always empty: left empty it keeps the stored secret, typed it replaces it. No page ever
holds a secret's value, not even the form shown again after a refusal."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError
from sqlalchemy import select

from pipeline_console.api.dependencies import (
    ActorDep,
    DatabaseDep,
    KeyPage,
    NowDep,
    SettingsDep,
)
from pipeline_console.api.problems import status_of
from pipeline_console.auth.dependencies import Requires
from pipeline_console.auth.roles import allows
from pipeline_console.console.auth import (
    CONSOLE_OPERATOR_PAGE,
    CONSOLE_VIEWER,
    ConsoleAction,
)
from pipeline_console.console.forms import form_of
from pipeline_console.console.templating import done, error_page, page
from pipeline_console.delivery import systems as service
from pipeline_console.delivery.addresses import refuse_private_urls
from pipeline_console.delivery.preview import preview_request
from pipeline_console.delivery.schemas import (
    AUTH_SECRET_FIELD,
    URL_PLACEHOLDERS,
    SystemCreate,
    SystemPatch,
)
from pipeline_console.errors import DomainError, FieldError, InvalidInput, error_path
from pipeline_console.models import Circuit, Delivery
from pipeline_console.reports.service import delivery_report

router = APIRouter(include_in_schema=False)
CONSOLE_ADMIN = Depends(ConsoleAction("admin"))
CONSOLE_ADMIN_PAGE = Depends(Requires("admin", cookie=True))

AUTH_TYPES = ("none", "bearer", "basic", "header", "oauth2_client_credentials")
# Each auth type's fields that are not secret, as the form names them (auth_<field>).
AUTH_PLAIN_FIELDS = {"none": (), "bearer": (), "basic": ("username",),
                     "header": ("name",),
                     "oauth2_client_credentials": ("token_url", "client_id", "scope")}
SECRET_FIELDS = ("auth_token", "auth_password", "auth_value", "auth_client_secret",
                 "signing_secret", "tls_client_key")
METHODS = ("POST", "PUT", "PATCH")


def _text(form: Any, field: str) -> str:
    """A field as typed; a browser sends a textarea's line ends as CRLF."""
    return str(form.get(field) or "").replace("\r\n", "\n").strip()


def _number(form: Any, field: str, kind: type) -> Any:
    raw = _text(form, field)
    if not raw:
        return None
    try:
        return kind(raw)
    except ValueError:
        raise InvalidInput(f"{field} is not a number",
                           [FieldError(field, f"{raw[:40]!r} is not a number", "form")]) from None


def _headers(raw: str) -> dict[str, str]:
    headers = {}
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise InvalidInput("each header is one line, Name: value", [FieldError(
                "headers", f"line {number} is not 'Name: value'", "form")])
        headers[name.strip()] = value.strip()
    return headers


def wanted(form: Any) -> dict[str, Any]:
    """The connection the form asks for, as the API's body would hold it (secrets only where
    one was typed)."""
    values: dict[str, Any] = {
        "url": _text(form, "url") or None,
        "method": _text(form, "method") or "POST",
        "entity_types": [name for name in _text(form, "entity_types").replace(",", " ").split()],
        "headers": _headers(_text(form, "headers")),
        "body_template": _text(form, "body_template") or None,
        "max_in_flight": _number(form, "max_in_flight", int),
        "max_per_second": _number(form, "max_per_second", float),
    }
    auth_type = _text(form, "auth_type") or "none"
    auth: dict[str, Any] = {"type": auth_type}
    for field in AUTH_PLAIN_FIELDS.get(auth_type, ()):
        value = _text(form, f"auth_{field}")
        if value or field != "scope":
            auth[field] = value
    secret_field = AUTH_SECRET_FIELD.get(auth_type)
    if secret_field and str(form.get(f"auth_{secret_field}") or ""):
        auth[secret_field] = str(form.get(f"auth_{secret_field}"))
    values["auth"] = auth
    values["signing"] = None
    if form.get("signing") == "on":
        values["signing"] = {"scheme": "standard-webhooks"}
        if _text(form, "signing_secret"):
            values["signing"]["secret"] = _text(form, "signing_secret")
    tls = {"ca_bundle": _text(form, "tls_ca_bundle") or None,
           "client_cert": _text(form, "tls_client_cert") or None}
    key = _text(form, "tls_client_key")
    if key:
        tls["client_key"] = key
    values["tls"] = tls if any(tls.values()) else None
    return values


def _without_secret(value: dict[str, Any] | None, *fields: str) -> dict[str, Any] | None:
    if value is None:
        return None
    return {name: item.strip() if isinstance(item, str) else item
            for name, item in value.items() if name not in fields and item is not None}


def changes(asked: dict[str, Any], view: dict[str, Any]) -> dict[str, Any]:
    """Only what differs from the system as it is (so that saving the form unchanged changes
    nothing and audits nothing), and every secret that was typed."""
    patch = {}
    for field, value in asked.items():
        if field == "auth":
            secret = AUTH_SECRET_FIELD.get(value["type"], "")
            same = (_without_secret(value, secret)
                    == _without_secret(view["auth"], secret)) and secret not in value
        elif field == "signing":
            same = (value is None) == (view.get("signing") is None) and (
                value is None or (value["scheme"] == view["signing"]["scheme"]
                                  and "secret" not in value))
        elif field == "tls":
            same = (_without_secret(value, "client_key")
                    == _without_secret(view.get("tls"), "client_key")) and (
                value is None or "client_key" not in value)
        else:
            same = value == view.get(field)
        if not same:
            patch[field] = value
    return patch


def _invalid(error: ValidationError, document: dict[str, Any]) -> InvalidInput:
    return InvalidInput("the system's settings are not valid", [
        FieldError(".".join(error_path(problem, document)) or "form", problem["msg"], "form")
        for problem in error.errors()])


def shown_again(form: Any) -> dict[str, str]:
    """The form as it was posted, for showing it again after a refusal: never a secret."""
    return {name: _text(form, name) for name in form if name not in SECRET_FIELDS
            and name != "csrf"}


def form_values(view: dict[str, Any]) -> dict[str, str]:
    """A stored system as the form's fields (secrets are never among them)."""
    auth = view["auth"]
    values = {
        "name": view["name"], "transport": view["transport"], "url": view.get("url") or "",
        "method": view["method"], "entity_types": ", ".join(view["entity_types"]),
        "headers": "\n".join(f"{name}: {value}" for name, value in view["headers"].items()),
        "body_template": view.get("body_template") or "",
        "max_in_flight": "" if view.get("max_in_flight") is None else str(view["max_in_flight"]),
        "max_per_second": ("" if view.get("max_per_second") is None
                           else f"{view['max_per_second']:g}"),
        "auth_type": auth["type"], "signing": "on" if view.get("signing") else "",
        "tls_ca_bundle": (view.get("tls") or {}).get("ca_bundle") or "",
        "tls_client_cert": (view.get("tls") or {}).get("client_cert") or "",
    }
    for field in AUTH_PLAIN_FIELDS.get(auth["type"], ()):
        values[f"auth_{field}"] = auth.get(field) or ""
    return values


def stored_secrets(view: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Form field → the view of the secret stored behind it ("set", its fingerprint)."""
    if view is None:
        return {}
    found = {}
    auth = view["auth"]
    secret = AUTH_SECRET_FIELD.get(auth["type"])
    if secret and isinstance(auth.get(secret), dict):
        found[f"auth_{secret}"] = auth[secret]
    if view.get("signing") and view["signing"].get("secret"):
        found["signing_secret"] = view["signing"]["secret"]
    if view.get("tls") and view["tls"].get("client_key"):
        found["tls_client_key"] = view["tls"]["client_key"]
    return found


def _form_page(request: Request, *, view: dict[str, Any] | None, values: dict[str, str],
               problem: DomainError | None = None) -> HTMLResponse:
    return page(request, "system_form.html",
                status_code=200 if problem is None else status_of(problem),
                title=f"Change {view['name']}" if view else "New system", nav="/systems",
                view=view, values=values, secrets=stored_secrets(view), problem=problem,
                problem_fields=[f"{e.field}: {e.message}"
                                for e in getattr(problem, "errors", [])],
                auth_types=AUTH_TYPES, methods=METHODS, placeholders=URL_PLACEHOLDERS)


@router.get("/systems", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def systems(request: Request, database: DatabaseDep, page_request: KeyPage,
                  now: NowDep) -> Response:
    async with database.read() as session:
        found = await service.list_systems(session, page_request)
        views = await service.read_views(session, list(found.items), now=now)
        circuits = {c.system: c for c in (await session.execute(select(Circuit))).scalars()}
    return page(request, "systems.html", title="Systems", nav="/systems", systems=views,
                next_cursor=found.next_cursor, circuits=circuits, may_admin=_admin(request))


def _admin(request: Request) -> bool:
    actor = getattr(request.state, "actor", None)
    return actor is not None and allows(actor.role, "admin")


@router.get("/systems/new", response_class=HTMLResponse, dependencies=[CONSOLE_ADMIN_PAGE])
async def new_system(request: Request) -> Response:
    return _form_page(request, view=None, values={"transport": "http", "method": "POST",
                                                  "auth_type": "none"})


@router.post("/systems/new", dependencies=[CONSOLE_ADMIN])
async def create_system(request: Request, database: DatabaseDep, now: NowDep, actor: ActorDep,
                        settings: SettingsDep) -> Response:
    form = await form_of(request)
    try:
        asked = wanted(form)
        document = {"name": _text(form, "name"), "transport": _text(form, "transport"),
                    **asked}
        try:
            body = SystemCreate.model_validate(document)
        except ValidationError as error:
            raise _invalid(error, document) from None
        if settings.refuse_private_system_urls:
            await refuse_private_urls(body.model_dump(mode="json"))
        async with database.transaction() as session:
            await service.create_system(session, body, actor=actor.label, now=now,
                                        vault=request.app.state.vault)
    except DomainError as error:
        return _form_page(request, view=None, values=shown_again(form), problem=error)
    return done(request, f"/systems/{body.name}", f"System {body.name} registered.")


@router.get("/systems/{name}/edit", response_class=HTMLResponse,
            dependencies=[CONSOLE_ADMIN_PAGE])
async def edit_system(request: Request, name: str, database: DatabaseDep,
                      now: NowDep) -> Response:
    try:
        async with database.read() as session:
            view = await service.read_view(session, await service.get_system(session, name),
                                           now=now)
    except DomainError as error:
        return error_page(request, error)
    return _form_page(request, view=view, values=form_values(view))


@router.post("/systems/{name}/edit", dependencies=[CONSOLE_ADMIN])
async def update_system(request: Request, name: str, database: DatabaseDep, now: NowDep,
                        actor: ActorDep, settings: SettingsDep) -> Response:
    form = await form_of(request)
    view = None
    try:
        async with database.transaction() as session:
            view = await service.read_view(session, await service.get_system(session, name),
                                           now=now)
            document = changes(wanted(form), view)
            try:
                patch = SystemPatch.model_validate(document)
            except ValidationError as error:
                raise _invalid(error, document) from None
            if not patch.model_fields_set:
                return done(request, f"/systems/{name}", f"System {name}: nothing changed.")
            if settings.refuse_private_system_urls:
                await refuse_private_urls(patch.model_dump(mode="json", exclude_unset=True))
            await service.update_system(session, name, patch, actor=actor.label, now=now,
                                        vault=request.app.state.vault)
    except DomainError as error:
        if view is None:
            return error_page(request, error)
        return _form_page(request, view=view, values=shown_again(form), problem=error)
    changed = ", ".join(sorted(patch.model_fields_set))
    return done(request, f"/systems/{name}", f"System {name} changed: {changed}.")


@router.get("/systems/{name}", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def system(request: Request, name: str, database: DatabaseDep, now: NowDep) -> Response:
    return await _system_page(request, name, database, now)


@router.get("/systems/{name}/preview", response_class=HTMLResponse,
            dependencies=[CONSOLE_OPERATOR_PAGE])
async def preview(request: Request, name: str, database: DatabaseDep, now: NowDep,
                  key: Annotated[str, Query(max_length=321)] = "") -> Response:
    """The system's page with what it would be sent now for the record `key` (operators, as
    the API's preview): the same preview_request, secrets as ***."""
    shown, problem = None, None
    try:
        async with database.read() as session:
            shown = await preview_request(session, request.app.state.vault, name, key, now)
    except DomainError as error:
        problem = error.detail + "".join(f"; {e.field}: {e.message}"
                                         for e in getattr(error, "errors", []))
    return await _system_page(request, name, database, now, preview=shown, preview_key=key,
                              preview_problem=problem)


async def _system_page(request: Request, name: str, database: Any, now: datetime, *,
                       preview: dict[str, Any] | None = None, preview_key: str = "",
                       preview_problem: str | None = None) -> Response:
    try:
        async with database.read() as session:
            view = await service.read_view(session, await service.get_system(session, name),
                                           now=now)
            circuit = await session.get(Circuit, name)
            health = await delivery_report(session, now - timedelta(hours=24), now)
            recent = list((await session.execute(
                select(Delivery).where(Delivery.system == name)
                .order_by(Delivery.id.desc()).limit(20))).scalars())
            example = await session.scalar(
                select(Delivery.idempotency_key).where(Delivery.system == name)
                .order_by(Delivery.id.desc()).limit(1))
    except DomainError as error:
        return error_page(request, error)
    row = next((row for row in health.rows if row["system"] == name), None)
    return page(request, "system.html", title=name, nav="/systems", system=view,
                circuit=circuit, health=row, recent=recent, may_admin=_admin(request),
                throttled_for=_throttled_for(view.get("throttled_until"), now),
                preview=preview, preview_key=preview_key, preview_problem=preview_problem,
                example_key=example or "customer:C-1001")


def _throttled_for(until: datetime | None, now: datetime) -> float | None:
    """Seconds the system is still throttled for (None when it is not)."""
    if until is None or until <= now:
        return None
    return (until - now).total_seconds()
