"""The pipeline-console command. Each command opens its own transaction(s) and calls a service."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

import typer
import uvicorn
from pydantic import ValidationError

from pipeline_console.clock import system_clock
from pipeline_console.config import Settings
from pipeline_console.db import Database, create_engine
from pipeline_console.schema import upgrade_to_head

app = typer.Typer(help="Integration Pipeline Console", no_args_is_help=True,
                  pretty_exceptions_enable=False)
jobs_app = typer.Typer(help="Run jobs on demand", no_args_is_help=True)
audit_app = typer.Typer(help="The audit log", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
reports_app = typer.Typer(help="Reports over a time range", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens (stored only as hashes)", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")
app.add_typer(audit_app, name="audit")
app.add_typer(reports_app, name="reports")

CLI_ACTOR = "cli"
DEMO_ADMIN = "demo-admin"
T = TypeVar("T")


def _with_database(work: Callable[[Database], Awaitable[T]]) -> T:
    async def run() -> T:
        database = Database(create_engine(_settings()))
        try:
            return await work(database)
        finally:
            await database.dispose()

    return asyncio.run(run())


secrets_app = typer.Typer(help="The key that encrypts downstream systems' secrets",
                          no_args_is_help=True)
app.add_typer(secrets_app, name="secrets")


def _refuse(reason: str) -> None:
    typer.echo(f"error: {reason}", err=True)
    raise typer.Exit(1)


def _settings() -> Settings:
    """The settings from the environment; a bad one is a line per problem naming its
    variable, and exit 1 — never pydantic's traceback, which repeats the input (secrets
    among it)."""
    try:
        return Settings()
    except ValidationError as error:
        for problem in error.errors(include_input=False, include_url=False):
            names = [str(part) for part in problem["loc"] if isinstance(part, str)]
            where = f"PIPELINE_CONSOLE_{names[0].upper()}: " if names else ""
            typer.echo(f"error: {where}{problem['msg']}", err=True)
        raise typer.Exit(1) from None


@app.command()
def migrate() -> None:
    """Apply pending database migrations; then move credentials found in systems' URLs
    (user:password@, from before auth existed) into their auth, encrypted."""
    from pipeline_console.clock import system_clock
    from pipeline_console.delivery.startup import StartupRefused, move_url_credentials
    from pipeline_console.delivery.vault import Vault

    _check_secret_key(_settings())

    async def work(database: Database) -> list[str]:
        await upgrade_to_head(database.engine)
        return await move_url_credentials(database, Vault.from_settings(_settings()),
                                          now=system_clock())

    try:
        moved = _with_database(work)
    except StartupRefused as refused:
        typer.echo("database schema is at the newest migration")
        _refuse(str(refused))
    typer.echo("database schema is at the newest migration")
    if moved:
        typer.echo(f"moved the credentials in the URLs of {', '.join(moved)} into their "
                   "auth (basic)")


def _check_secret_key(settings: Settings) -> None:
    """Refuse to start (one line, exit 1) when PIPELINE_CONSOLE_SECRET_KEY is set but is not
    a key: before anything else, not at the first secret stored or read."""
    from pipeline_console.delivery.startup import StartupRefused, check_key
    from pipeline_console.delivery.vault import Vault

    try:
        check_key(Vault.from_settings(settings))
    except StartupRefused as refused:
        _refuse(str(refused))


def _check_connections(settings: Settings) -> None:
    """Refuse to start (one line, exit 1) when the key cannot read the stored secrets or a
    URL still holds credentials."""
    from pipeline_console.delivery.startup import StartupRefused, check_connections
    from pipeline_console.delivery.vault import Vault

    try:
        _with_database(lambda database: check_connections(database,
                                                          Vault.from_settings(settings)))
    except StartupRefused as refused:
        _refuse(str(refused))


@secrets_app.command("new-key")
def secrets_new_key() -> None:
    """Print a new key for PIPELINE_CONSOLE_SECRET_KEY (the last line)."""
    from pipeline_console.delivery.vault import new_key

    typer.echo("a new key for PIPELINE_CONSOLE_SECRET_KEY (keep it outside the database; "
               "every serve and worker process needs the same one):")
    typer.echo(new_key())


@secrets_app.command("rotate-key")
def secrets_rotate_key() -> None:
    """Re-encrypt every stored secret from PIPELINE_CONSOLE_SECRET_KEY to
    PIPELINE_CONSOLE_NEW_SECRET_KEY, in one transaction. Stop every serve and worker first
    (a process still on the old key cannot read what is stored after it), then start them
    with the new key as PIPELINE_CONSOLE_SECRET_KEY: they refuse to start with the old one."""
    from pipeline_console.delivery.vault import KeyProblem, Vault, rotate_key

    settings = _settings()
    if settings.new_secret_key is None:
        _refuse("PIPELINE_CONSOLE_NEW_SECRET_KEY is not set (make one with "
                "`pipeline-console secrets new-key`)")
    old = Vault.from_settings(settings)
    new = Vault(settings.new_secret_key.get_secret_value())
    if old.key is None:
        _refuse("PIPELINE_CONSOLE_SECRET_KEY (the key the secrets are stored with) is not set")

    async def work(database: Database) -> int:
        return await database.run_transaction(lambda session: rotate_key(session, old, new))

    try:
        count = _with_database(work)
    except KeyProblem as problem:
        _refuse(str(problem).replace("PIPELINE_CONSOLE_SECRET_KEY",
                                     "PIPELINE_CONSOLE_SECRET_KEY or _NEW_SECRET_KEY"))
    typer.echo(f"re-encrypted {count} secrets with the new key; now set "
               "PIPELINE_CONSOLE_SECRET_KEY to it in every process and restart them")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
) -> None:
    """Apply pending schema migrations, then serve the API (and console) over HTTP. Refuses
    to start while a system's URL holds credentials (`migrate` moves them) or the secret key
    cannot read the stored secrets."""
    from pipeline_console.app import create_app
    from pipeline_console.logs import configure_logging
    from pipeline_console.process import settle_long_lived_objects

    settings = _settings()
    configure_logging(settings.log_format)
    _check_secret_key(settings)
    # The schema only: moving credentials out of URLs changes how systems authenticate, so
    # it is `pipeline-console migrate`'s, run on purpose (and the check below refuses to
    # start until it has been).
    _with_database(lambda database: upgrade_to_head(database.engine))
    typer.echo("database schema is at the newest migration")
    _check_connections(settings)
    application = create_app(settings)
    settle_long_lived_objects()
    uvicorn.run(application, host=host, port=port, log_config=None,
                timeout_graceful_shutdown=30)


@app.command()
def demo(
    batch_file: Annotated[str | None, typer.Option(
        help="write last night's batch (NDJSON, ingested twice by the story) here and keep "
        "it; by default a temporary file")] = None,
) -> None:
    """Load the demo scenario into an empty database: three hours of an ERP, a CRM and a
    shop, three downstream systems, every decision, queue and circuit state."""
    from pathlib import Path

    from pipeline_console.auth.sessions import issue_login_code
    from pipeline_console.auth.tokens import active_token_named, create_token, revoke_token
    from pipeline_console.demo import load_demo
    from pipeline_console.errors import Conflict

    settings = _settings()

    async def work(database: Database) -> tuple[list[str], str, str]:
        lines = await load_demo(database, now=system_clock(),
                                batch_file=Path(batch_file) if batch_file else None)
        async with database.transaction() as session:  # one click into the console
            if await active_token_named(session, DEMO_ADMIN) is not None:
                await revoke_token(session, DEMO_ADMIN, actor=CLI_ACTOR, now=system_clock())
            _, token = await create_token(session, name=DEMO_ADMIN, role="admin",
                                          actor=CLI_ACTOR, now=system_clock())
            code = await issue_login_code(session, DEMO_ADMIN, actor=CLI_ACTOR,
                                          now=system_clock(), ttl_s=settings.login_code_ttl_s)
        return lines, token, code

    try:
        summary, token, code = _with_database(work)
    except Conflict as error:
        typer.echo(error.detail, err=True)
        raise typer.Exit(1) from error
    for line in summary:
        typer.echo(line)
    typer.echo("")
    # The link carries a one-time code, not the token: a link ends up in browser histories,
    # screenshots and chat logs; the code is worth nothing once used or after a while.
    typer.echo(f"Sign in to the console as {DEMO_ADMIN!r} (admin) with this one-time link "
               f"(valid {settings.login_code_ttl_s // 60} min, once; "
               f"`pipeline-console tokens login-link {DEMO_ADMIN}` makes another):")
    typer.echo(f"  http://127.0.0.1:8000/login#code={code}")
    typer.echo(f"API: curl -H 'Authorization: Bearer {token}' "
               "http://127.0.0.1:8000/api/v1/dashboard")
    _print_demo_source_tokens()


def _print_demo_source_tokens() -> None:
    """The demo's source systems post with ingest tokens scoped to them (never an unscoped
    one): with the shop's token, a message claiming to be the ERP's is refused (403)."""
    from pipeline_console.demo import create_source_tokens

    async def work(database: Database) -> dict[str, str]:
        async with database.transaction() as session:
            return await create_source_tokens(session, actor=CLI_ACTOR, now=system_clock())

    tokens = _with_database(work)
    typer.echo("")
    typer.echo("Source systems post with their own ingest tokens, each only for its source:")
    for name, plain in tokens.items():
        typer.echo(f"  {name:12} {plain}")
    typer.echo(f"  curl -X POST http://127.0.0.1:8000/api/v1/messages -H 'Authorization: "
               f"Bearer {tokens['shop-ingest']}' -H 'content-type: application/json' -d "
               """'{"source_system": "shop", "entity_type": "order", "entity_id": "O-6001", """
               """"version": 1, "payload": {"total": 10}}'""")


@app.command()
def worker() -> None:
    """Deliver due deliveries until SIGTERM/SIGINT (run as many as you like on PostgreSQL)."""
    from pipeline_console.delivery.worker import run_worker
    from pipeline_console.logs import configure_logging
    from pipeline_console.process import settle_long_lived_objects

    settings = _settings()
    configure_logging(settings.log_format)
    _check_secret_key(settings)
    _check_connections(settings)
    settle_long_lived_objects()
    asyncio.run(run_worker(settings))


@app.command()
def consume(
    url: Annotated[str, typer.Argument(
        help="the broker: amqp:// or amqps:// (RabbitMQ), nats:// or tls:// (NATS JetStream); "
        "credentials in the URL or in PIPELINE_CONSOLE_BROKER_USERNAME/_PASSWORD")],
    queue: Annotated[str | None, typer.Option(help="RabbitMQ: the queue")] = None,
    stream: Annotated[str | None, typer.Option(help="NATS: the stream")] = None,
    consumer: Annotated[str | None, typer.Option(
        help="NATS: the durable consumer (created if missing)")] = None,
) -> None:
    """Take messages from a broker until SIGTERM/SIGINT, each acknowledged only after its
    decision has committed (run as many as you like on PostgreSQL)."""
    from pipeline_console.consumers.base import BrokerError
    from pipeline_console.consumers.run import run_consumer
    from pipeline_console.logs import configure_logging
    from pipeline_console.process import settle_long_lived_objects

    settings = _settings()
    configure_logging(settings.log_format)
    _check_secret_key(settings)  # consumers store no secret, but one key serves every process
    broker: Any
    try:
        urlsplit(url).port  # noqa: B018 (a port that is not a number: ValueError)
    except ValueError:
        _refuse("the broker URL cannot be read (if its password holds '/', '?', '#' or '@', "
                "percent-encode them: %2F, %3F, %23, %40)")
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("amqp", "amqps"):
        if not queue or stream or consumer:
            _refuse("a RabbitMQ URL takes --queue NAME (and neither --stream nor --consumer)")
        from pipeline_console.consumers.rabbitmq import RabbitMQ

        broker = RabbitMQ(url, queue, settings)
    elif scheme in ("nats", "tls"):
        if not stream or not consumer or queue:
            _refuse("a NATS URL takes --stream NAME and --consumer NAME (and no --queue)")
        from pipeline_console.consumers.jetstream import JetStream

        broker = JetStream(url, stream, consumer, settings)
    else:
        _refuse("the broker URL must start with amqp://, amqps:// (RabbitMQ), nats:// or "
                "tls:// (NATS)")
    settle_long_lived_objects()
    try:
        asyncio.run(run_consumer(settings, broker))
    except BrokerError as error:
        _refuse(str(error))


INGEST_BATCH_SIZE = 500


@app.command()
def ingest(
    path: Annotated[str, typer.Argument(
        metavar="PATH|-", help="NDJSON: one POST /api/v1/messages body per line (blank lines "
        "are skipped); - reads standard input")],
    batch_size: Annotated[int, typer.Option(
        help="lines per transaction, at most MAX_BATCH_MESSAGES")] = INGEST_BATCH_SIZE,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="decide every line in one transaction, then roll it back: the "
        "decisions are reported, nothing is written")] = False,
) -> None:
    """Decide every line as POST /messages would, in batches (one transaction each), with a
    progress bar on stderr; print the count per decision on stdout. A malformed line is
    recorded as rejected and the run goes on. Running the same input again changes nothing
    (skip_duplicate). Exit 0: every line decided, none rejected; 1: some lines were
    rejected; 2: a usage error (nothing read); 3: stopped early (the lines of the batches
    before it are recorded; running the input again is safe)."""
    import os
    import stat
    from pathlib import Path

    settings = _settings()
    if not 1 <= batch_size <= settings.max_batch_messages:
        typer.echo(f"error: --batch-size must be from 1 to {settings.max_batch_messages} "
                   f"(MAX_BATCH_MESSAGES), not {batch_size}", err=True)
        raise typer.Exit(2)
    if path == "-":
        stream, name, size = sys.stdin.buffer, "stdin", None
    else:
        try:
            stream = open(path, "rb")  # noqa: SIM115 (closed below, after the run)
        except OSError as error:
            typer.echo(f"error: cannot read {path}: {error.strerror or error}", err=True)
            raise typer.Exit(2) from error
        status = os.fstat(stream.fileno())
        name = Path(path).name
        size = status.st_size if stat.S_ISREG(status.st_mode) else None
    try:
        tally, failure = _ingest_with_progress(stream, name, size, settings, batch_size,
                                               dry_run)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    _print_ingest_summary(tally, name, batch_size, dry_run)
    if failure is not None:
        written = ("nothing was written" if dry_run or not tally.last_line else
                   f"lines 1 to {tally.last_line} are recorded")
        typer.echo(f"error: the run stopped: {failure}; {written}; running the input "
                   "again is safe (what is recorded comes back as skip_duplicate)", err=True)
        raise typer.Exit(3)
    if tally.rejected:
        raise typer.Exit(1)


def _ingest_with_progress(stream: Any, name: str, size: int | None, settings: Settings,
                          batch_size: int, dry_run: bool) -> tuple[Any, str | None]:
    """Run ingest_ndjson under a rich progress bar on stderr (by bytes of a file, without a
    total for a pipe); the rejected lines are named above it. Returns the tally and, when
    the run stopped early, why."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from pipeline_console.db import unavailability
    from pipeline_console.ingestion.ndjson import (
        REJECTIONS_KEPT,
        Tally,
        ingest_actor,
        ingest_ndjson,
        read_lines,
    )

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(bar_width=20), TaskProgressColumn(),
        TextColumn("{task.fields[lines]:,} lines, {task.fields[rejected]:,} rejected"),
        TimeElapsedColumn(), console=console)
    shown_name = name if len(name) <= 32 else f"{name[:31]}…"
    task = progress.add_task(f"{'dry run' if dry_run else 'ingesting'} {shown_name}",
                             total=size, lines=0, rejected=0)
    shown, told = 0, False

    def on_batch(tally: Tally) -> None:
        nonlocal shown, told
        for line in tally.rejections[shown:]:
            attempt = "" if line.attempt_id is None else f" (attempt {line.attempt_id})"
            progress.console.print(f"line {line.number}: rejected{attempt}: {line.detail}",
                                   markup=False, highlight=False)
        shown = len(tally.rejections)
        if tally.rejected > REJECTIONS_KEPT and not told:
            progress.console.print(f"more than {REJECTIONS_KEPT} lines rejected: the others "
                                   "are counted, not named here (GET "
                                   "/api/v1/attempts?decision=rejected lists them all)")
            told = True
        progress.update(task, completed=tally.bytes_read, lines=tally.lines,
                        rejected=tally.rejected, refresh=True)  # a frame per batch

    tally, failure = Tally(), None
    actor = ingest_actor(name)

    async def work(database: Database) -> Tally:
        return await ingest_ndjson(
            database, read_lines(stream, settings.max_message_bytes), settings=settings,
            actor=actor, clock=system_clock, batch_size=batch_size, dry_run=dry_run,
            on_batch=on_batch, tally=tally)

    with progress:
        try:
            _with_database(work)
        except Exception as error:  # the tally says how far it got
            why, cause = unavailability(error), getattr(error, "orig", None) or error
            failure = f"the database {why}" if why else f"{type(cause).__name__}: {cause}"
            failure = failure[:300]
        if size is not None and failure is None:
            progress.update(task, completed=size)  # trailing blank lines
    return tally, failure


def _print_ingest_summary(tally: Any, name: str, batch_size: int, dry_run: bool) -> None:
    """The count per decision on stdout, one `decision count` line each, always all six."""
    from pipeline_console.ingestion.ndjson import DECISIONS

    batches = f"{tally.batches} batch{'es' if tally.batches != 1 else ''} of at most " \
              f"{batch_size}"
    if dry_run:
        typer.echo(f"dry run: {tally.lines} lines of {name} decided in {batches}; nothing "
                   "was written (the decisions below were rolled back)")
    else:
        typer.echo(f"{tally.lines} lines of {name} recorded in {batches}")
    for decision in DECISIONS:
        typer.echo(f"{decision:16} {tally.decisions[decision]}")


@jobs_app.command("run")
def run_job_command(name: str) -> None:
    """Run one pass of the job NAME and print its result as JSON."""
    from pipeline_console.delivery.service import Deliverer
    from pipeline_console.delivery.transports import Transports
    from pipeline_console.delivery.vault import Vault
    from pipeline_console.delivery.worker import worker_identity
    from pipeline_console.errors import NotFound
    from pipeline_console.jobs.registry import run_job
    from pipeline_console.logs import configure_logging

    configure_logging(_settings().log_format)  # a job's log lines (audit_anchor's) as serve's

    async def work(database: Database) -> dict[str, Any]:
        settings = _settings()
        async with Transports.open() as transports:
            deliverer = Deliverer(database, transports, system_clock,
                                  worker_id=f"cli:{worker_identity()}",
                                  lease_margin_s=settings.lease_margin_s,
                                  lease_safety_s=settings.lease_safety_s,
                                  vault=Vault.from_settings(settings))
            record = await run_job(deliverer, settings, name, actor=CLI_ACTOR, trigger="cli")
            return record.__dict__

    try:
        result = _with_database(work)
    except NotFound as error:
        typer.echo(error.detail, err=True)
        raise typer.Exit(2) from error
    typer.echo(json.dumps(result))
    if result["status"] != "succeeded":
        raise typer.Exit(1)


@reports_app.command("show")
def reports_show(
    name: Annotated[str, typer.Argument(help="ingestion, delivery, anomalies or replays")],
    since: Annotated[str | None, typer.Option("--from", help="ISO 8601 with a zone; "
                                              "default: 24 hours before --to")] = None,
    until: Annotated[str | None, typer.Option("--to", help="ISO 8601 with a zone; "
                                              "default: now")] = None,
    output: Annotated[str, typer.Option("--format", help="json or csv")] = "json",
) -> None:
    """Print a report, the same as GET /api/v1/reports/NAME."""
    from datetime import UTC, datetime, timedelta

    from pipeline_console.reports.api import ReportRead, to_csv
    from pipeline_console.reports.service import REPORTS

    def moment(value: str | None, option: str) -> datetime | None:
        if value is None:
            return None
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError as error:
            raise typer.BadParameter(f"{value!r} is not an ISO 8601 time",
                                     param_hint=option) from error
        if parsed.tzinfo is None:
            raise typer.BadParameter(f"{value!r} has no time zone", param_hint=option)
        return parsed.astimezone(UTC)

    build = REPORTS.get(name)
    if build is None:
        raise typer.BadParameter(f"no report is named {name!r}; reports: {', '.join(REPORTS)}",
                                 param_hint="NAME")
    if output not in ("json", "csv"):
        raise typer.BadParameter("json or csv", param_hint="--format")
    end = moment(until, "--to") or system_clock()
    try:
        start = moment(since, "--from") or end - timedelta(hours=24)
    except OverflowError as error:
        raise typer.BadParameter("give --from: 24 hours before --to is not a representable "
                                 "time", param_hint="--from") from error
    if start >= end:
        raise typer.BadParameter("must be before --to", param_hint="--from")

    async def work(database: Database) -> Any:
        async with database.read() as session:
            return await build(session, start, end)

    report = _with_database(work)
    if output == "csv":
        typer.echo(to_csv(report), nl=False)
    else:
        typer.echo(ReportRead(**report.__dict__).model_dump_json(by_alias=True, indent=2))


@tokens_app.command("create")
def tokens_create(
    role: Annotated[str, typer.Option(help="ingest, viewer, operator or admin")],
    name: Annotated[str, typer.Option(help="who or what uses it; the audit log shows it")],
    source: Annotated[list[str] | None, typer.Option(
        "--source", help="ingest tokens only, and required for them: a source system whose "
        "messages it may post (repeat for several); others are refused with 403")] = None,
) -> None:
    """Create a token and print it as the last line (it is shown only this once). A token
    never changes: to change its role or sources, revoke it and create another."""
    from pipeline_console.auth.tokens import create_token
    from pipeline_console.errors import DomainError

    async def work(database: Database) -> tuple[str, list[str] | None]:
        async with database.transaction() as session:
            row, plain = await create_token(session, name=name, role=role, actor=CLI_ACTOR,
                                            now=system_clock(), sources=source)
            return plain, row.sources

    try:
        plain, sources = _with_database(work)
    except DomainError as error:
        typer.echo(error.detail, err=True)
        raise typer.Exit(2) from error
    scope = f" for {', '.join(sources)}" if sources else ""
    typer.echo(f"created token {name!r} with the role {role}{scope}; store it now, it is not "
               "shown again:")
    typer.echo(plain)


@tokens_app.command("list")
def tokens_list() -> None:
    """Every token: name, role, sources, when created, whether revoked (never the token
    itself). UNSCOPED marks an ingest token without sources (made before scoping): it may
    post for any source, so replace it (revoke, create with --source)."""
    from pipeline_console.auth.tokens import list_tokens, unscoped

    async def work(database: Database) -> list[Any]:
        async with database.read() as session:
            return await list_tokens(session)

    for row in _with_database(work):
        state = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}Z" if row.revoked_at else "active"
        if unscoped(row):
            scope = "UNSCOPED"
        elif row.sources:
            scope = "sources " + ",".join(row.sources)
        else:
            scope = {"ingest": "no source (may post nothing)", "viewer": "posts nothing"}.get(
                row.role, "any source")
        typer.echo(f"{row.name:32} {row.role:9} {row.prefix}…  {scope}  created "
                   f"{row.created_at:%Y-%m-%d %H:%M}Z by {row.created_by}  {state}")


@tokens_app.command("revoke")
def tokens_revoke(name: str) -> None:
    """Revoke the active token NAME: it is refused (401) from now on."""
    from pipeline_console.auth.tokens import revoke_token
    from pipeline_console.errors import DomainError

    async def work(database: Database) -> None:
        async with database.transaction() as session:
            await revoke_token(session, name, actor=CLI_ACTOR, now=system_clock())

    try:
        _with_database(work)
    except DomainError as error:
        typer.echo(error.detail, err=True)
        raise typer.Exit(2) from error
    typer.echo(f"revoked token {name!r}")


@tokens_app.command("login-link")
def tokens_login_link(
    name: Annotated[str, typer.Argument(help="the active token to sign in as")],
    base_url: Annotated[str, typer.Option(help="where the console is reached")] =
        "http://127.0.0.1:8000",
) -> None:
    """Print a link that signs one browser in to the console as the token NAME: a one-time
    code (valid LOGIN_CODE_TTL_S seconds, 15 min by default), never the token itself."""
    from pipeline_console.auth.sessions import issue_login_code
    from pipeline_console.errors import DomainError

    settings = _settings()
    if urlsplit(base_url).scheme not in ("http", "https") or not urlsplit(base_url).netloc:
        typer.echo(f"--base-url must be an http:// or https:// address, not {base_url!r}",
                   err=True)
        raise typer.Exit(2)

    async def work(database: Database) -> str:
        async with database.transaction() as session:
            return await issue_login_code(session, name, actor=CLI_ACTOR, now=system_clock(),
                                          ttl_s=settings.login_code_ttl_s)

    try:
        code = _with_database(work)
    except DomainError as error:
        typer.echo(error.detail, err=True)
        raise typer.Exit(2) from error
    typer.echo(f"a one-time sign-in link for {name!r}, valid "
               f"{settings.login_code_ttl_s // 60} min:")
    typer.echo(f"{base_url.rstrip('/')}/login#code={code}")


@tokens_app.command("new")
def tokens_new() -> None:
    """Print a fresh random token (for PIPELINE_CONSOLE_BOOTSTRAP_ADMIN_TOKEN); stores nothing."""
    from pipeline_console.auth.tokens import new_token

    typer.echo(new_token())


@audit_app.command("verify")
def audit_verify(
    anchor: Annotated[str | None, typer.Option(
        help="ID:HASH, a head printed (or written by the audit_anchor job) earlier: fail "
        "unless that row still has that hash and the chain through it to the head "
        "verifies (detects deleted newest rows and a rewritten, rehashed log)")] = None,
) -> None:
    """Recompute the audit hash chain; exit 1 and say why if it is broken or does not extend
    --anchor. The last line is always the head, `head ID:HASH`: keep it outside the
    database and pass it as --anchor next time."""
    from pipeline_console.audit.chain import parse_anchor
    from pipeline_console.audit.service import verify_audit_chain

    try:
        kept = None if anchor is None else parse_anchor(anchor)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--anchor") from error

    async def work(database: Database) -> Any:
        async with database.read() as session:
            return await verify_audit_chain(session, anchor=kept)

    report = _with_database(work)
    broken = report.first_broken
    if broken is not None:
        typer.echo(
            f"audit chain BROKEN at row {broken.id}: {broken.reason} "
            f"({report.checked} rows before it are intact)",
            err=True,
        )
    elif report.anchor_problem is not None:
        typer.echo(f"audit chain does NOT extend the anchor {kept}: {report.anchor_problem} "
                   f"({report.checked} rows verify)", err=True)
    else:
        through = f", through the anchor row {kept.id}" if kept else ""
        typer.echo(f"audit chain ok: {report.checked} rows checked{through}")
    typer.echo(f"head {report.head}" if report.head else "head none (the log is empty)")
    if not report.ok:
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="pipeline-console")


if __name__ == "__main__":
    main()
    sys.exit(0)
