"""create_app(settings): the FastAPI application. The engine is built in the lifespan,
never at import time."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from pipeline_console import __version__
from pipeline_console.anomalies.api import router as anomalies_router
from pipeline_console.api.guards import RefuseNulInUrls
from pipeline_console.api.openapi import install_openapi
from pipeline_console.api.problems import (
    PROBLEM_MEDIA_TYPE,
    RETRY_AFTER_HEADER,
    RETRY_AFTER_S,
    install_problem_handlers,
    problem,
)
from pipeline_console.api.request_metrics import MeasureRequests
from pipeline_console.api.web_security import WebSecurity, with_browser_headers
from pipeline_console.audit.api import router as audit_router
from pipeline_console.auth.api import router as tokens_router
from pipeline_console.auth.dependencies import METRICS, PUBLIC
from pipeline_console.auth.tokens import (
    BOOTSTRAP_NAME,
    TokenCache,
    ensure_bootstrap_admin,
    find_active,
)
from pipeline_console.clock import Clock, system_clock
from pipeline_console.config import Settings
from pipeline_console.console.admin import router as console_admin
from pipeline_console.console.auth import router as console_auth
from pipeline_console.console.intake import router as console_intake
from pipeline_console.console.overview import router as console_overview
from pipeline_console.console.queues import router as console_queues
from pipeline_console.console.systems import router as console_systems
from pipeline_console.console.templating import HERE as CONSOLE_HERE
from pipeline_console.console.templating import html_error
from pipeline_console.console.tokens import router as console_tokens
from pipeline_console.console.workers import router as console_workers
from pipeline_console.consumers.api import router as intake_router
from pipeline_console.dashboard.api import router as dashboard_router
from pipeline_console.db import Database, create_engine
from pipeline_console.delivery.api import router as delivery_router
from pipeline_console.delivery.service import Deliverer
from pipeline_console.delivery.startup import StartupRefused, check_connections
from pipeline_console.delivery.transports import Transports
from pipeline_console.delivery.vault import Vault
from pipeline_console.delivery.worker import worker_identity
from pipeline_console.delivery.workers_api import router as workers_router
from pipeline_console.entity_types.api import router as entity_types_router
from pipeline_console.errors import NotFound
from pipeline_console.ingestion.api import router as ingestion_router
from pipeline_console.ingestion.group_commit import GroupCommitter
from pipeline_console.ingestion.schemas import BatchIn, MessageIn
from pipeline_console.inspector.api import router as inspector_router
from pipeline_console.jobs.api import router as jobs_router
from pipeline_console.logs import AccessLog
from pipeline_console.metrics import database_registry, render
from pipeline_console.records.api import router as records_router
from pipeline_console.replay.api import router as replay_router
from pipeline_console.reports.api import router as reports_router
from pipeline_console.schema import current_revision, head_revision

DESCRIPTION = """An idempotent integration pipeline: every message gets an explicit, stored
decision (accept_new, accept_supersede, skip_duplicate, quarantine, skip_stale) before any
write. Errors are RFC 9457 application/problem+json."""

log = logging.getLogger("pipeline_console.app")


CONSOLE_STATIC = CONSOLE_HERE / "static"


def create_app(
    settings: Settings | None = None, *, clock: Clock = system_clock,
    database: Database | None = None,
) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = database is None
        app.state.database = database or Database(create_engine(settings))
        await _prepare_auth(app.state.database, settings, clock)
        try:
            await check_connections(app.state.database, app.state.vault)
        except StartupRefused:
            raise
        except Exception as error:  # unreachable or unmigrated: /readyz says so; serve
            # itself checks before it starts (cli.py)
            log.warning("the downstream systems' secrets could not be checked: %s", error)
        app.state.group_commit = GroupCommitter(
            app.state.database, max_messages=settings.group_commit_max_messages)
        async with Transports.open() as transports:
            app.state.deliverer = Deliverer(app.state.database, transports, clock,
                                            worker_id=f"api:{worker_identity()}",
                                            lease_margin_s=settings.lease_margin_s,
                                            lease_safety_s=settings.lease_safety_s,
                                            vault=app.state.vault)
            try:
                yield
            finally:
                await app.state.group_commit.close()  # drain: every queued message answered
                if owned:
                    await app.state.database.dispose()

    app = FastAPI(title="Integration Pipeline Console", version=__version__,
                  description=DESCRIPTION, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    # signs the console's notices: one shared value, or a key of this process's own
    app.state.console_secret = (settings.console_secret_key.get_secret_value().encode()
                                if settings.console_secret_key else secrets.token_bytes(32))
    app.state.clock = clock
    app.state.vault = Vault.from_settings(settings)
    app.state.token_cache = TokenCache(settings.token_cache_s, clock)
    if database is not None:
        app.state.database = database
    install_problem_handlers(app, html=html_error)
    app.add_exception_handler(Exception, with_browser_headers(app.exception_handlers[Exception]))
    app.add_middleware(RefuseNulInUrls)
    app.add_middleware(WebSecurity, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(AccessLog)
    app.add_middleware(CorrelationIdMiddleware)  # the request id, before the access log reads it
    app.add_middleware(MeasureRequests)  # outermost: it times the refusals too

    api = APIRouter(prefix="/api/v1")  # 401/403/422/503 come from api/openapi.py's rules
    for router in (ingestion_router, records_router, anomalies_router, entity_types_router,
                   audit_router, delivery_router, replay_router, inspector_router,
                   dashboard_router, jobs_router, reports_router, workers_router,
                   intake_router, tokens_router):
        api.include_router(router)
    app.include_router(api)
    app.include_router(_operations_router())
    for router in (console_auth, console_overview, console_queues, console_systems,
                   console_admin, console_workers, console_intake, console_tokens):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=CONSOLE_STATIC), name="static")
    app.add_route("/docs", _swagger_ui, include_in_schema=False)
    install_openapi(app, hand_parsed_bodies=[MessageIn, BatchIn])
    return app


SWAGGER_UI_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Integration Pipeline Console · API</title>
<link rel="stylesheet" href="/static/swagger/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/static/swagger/swagger-ui-bundle.js"></script>
<script src="/static/swagger/init.js"></script>
</body>
</html>
"""


async def _swagger_ui(request: Request) -> HTMLResponse:
    """/docs: Swagger UI from the package's own files (works offline, no inline script, so
    the Content-Security-Policy holds)."""
    return HTMLResponse(SWAGGER_UI_PAGE)


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    database: str
    schema_revision: str | None
    expected_revision: str | None


async def _prepare_auth(database: Database, settings: Settings, clock: Clock) -> None:
    if settings.auth == "disabled":
        log.warning("AUTHENTICATION IS DISABLED (PIPELINE_CONSOLE_AUTH=disabled): anyone who "
                    "can reach this server may do anything. Use it for local experiments only.")
    if settings.bootstrap_admin_token is None:
        return
    token = settings.bootstrap_admin_token.get_secret_value()

    async def ensure(session: Any) -> bool:
        return await ensure_bootstrap_admin(session, token, now=clock())

    try:
        created = await database.run_transaction(ensure)
    except (IntegrityError, NotFound):  # another process replaced it at the same moment
        async with database.read() as session:
            if await find_active(session, token) is None:
                raise
        created = False
    if created:
        log.info("created the bootstrap admin token (named %s)", BOOTSTRAP_NAME)


def _operations_router() -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", dependencies=[PUBLIC], response_model=Health,
                summary="The process is up")
    async def healthz() -> Health:
        return Health(status="ok")

    @router.get("/readyz", dependencies=[PUBLIC], response_model=Readiness,
                summary="The database answers and its schema is at the newest migration",
                responses={503: {
                    "model": Readiness, "headers": {"Retry-After": RETRY_AFTER_HEADER},
                    "description": "Not ready: migrations are pending (a Readiness body), "
                    "or the database is unreachable (a problem, with Retry-After)",
                    "content": {PROBLEM_MEDIA_TYPE: {
                        "schema": {"$ref": "#/components/schemas/Problem"}}}}})
    async def readyz(request: Request) -> Any:
        database: Database = request.app.state.database
        expected = head_revision()
        try:
            async with database.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
            revision = await current_revision(database.engine)
        except Exception as error:  # any failure to reach the database means "not ready"
            response = problem(503, f"the database is unreachable: {type(error).__name__}")
            response.headers["Retry-After"] = str(RETRY_AFTER_S["unreachable"])
            return response
        ready = revision == expected
        body = Readiness(status="ready" if ready else "migrations pending", database="ok",
                         schema_revision=revision, expected_revision=expected)
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    @router.get("/metrics", dependencies=[METRICS], response_class=Response,
                summary="Prometheus metrics: this process's counters and the shared state, "
                "read from the database now",
                responses={200: {"description": "Prometheus text exposition format",
                                 "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics(request: Request) -> Response:
        database: Database = request.app.state.database
        try:
            async with database.read() as session:
                registry = await database_registry(
                    session, now=request.app.state.clock(),
                    consumer_lost_after_s=request.app.state.settings.consumer_lost_after_s)
        except Exception:  # the counters are still worth a scrape without the database
            log.warning("metrics: the database could not be read", exc_info=True)
            registry = None
        return Response(render(registry), media_type=CONTENT_TYPE_LATEST)

    return router
