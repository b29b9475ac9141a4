"""pipeline-console ingest PATH|-, run as the real command: NDJSON through the same intake
and batch service as POST /messages, with a progress bar on stderr and the count per
decision on stdout."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select

from pipeline_console.models import AuditEvent, IngestionAttempt, RecordState, StagingRecord
from tests.support import message

DECISIONS = ("accept_new", "accept_supersede", "skip_duplicate", "quarantine", "skip_stale",
             "rejected")


def run_ingest(database_url: str, *args: str, stdin: bytes | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline_console.cli", "ingest", *args],
        env={**os.environ, "PIPELINE_CONSOLE_DATABASE_URL": database_url, **(env or {})},
        input=stdin if stdin is not None else b"", capture_output=True, timeout=120,
    )


async def ingest(database_url: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(run_ingest, database_url, *args, **kwargs)


def summary(result: subprocess.CompletedProcess) -> dict[str, int]:
    """The count per decision: the stdout lines `decision count`, all six, in this order."""
    lines = result.stdout.decode().splitlines()[1:]
    assert [line.split()[0] for line in lines] == list(DECISIONS), result.stdout
    return {word: int(count) for word, count in (line.split() for line in lines)}


def ndjson(*bodies: dict[str, Any] | bytes) -> bytes:
    return b"".join((body if isinstance(body, bytes) else orjson.dumps(body)) + b"\n"
                    for body in bodies)


def customers(count: int, version: int = 1) -> list[dict[str, Any]]:
    return [message(version, {"name": f"Customer {n}", "country": "DE"},
                    entity_id=f"C-{n}") for n in range(count)]


async def count(database, model, *where) -> int:
    async with database.read() as session:
        return await session.scalar(select(func.count()).select_from(model).where(*where))


async def attempts(database) -> list[Any]:
    async with database.read() as session:
        return list((await session.execute(
            select(IngestionAttempt).order_by(IngestionAttempt.id))).scalars())


class TestTheSameFileTwice:
    async def test_the_second_run_is_all_skip_duplicate_and_every_line_is_logged(
            self, database_url, database, tmp_path):
        path = tmp_path / "last-night.ndjson"
        path.write_bytes(ndjson(*customers(7)))
        first = await ingest(database_url, str(path), "--batch-size", "3")
        assert first.returncode == 0, first.stderr
        assert summary(first) == {**dict.fromkeys(DECISIONS, 0), "accept_new": 7}
        assert first.stdout.decode().splitlines()[0] == (
            "7 lines of last-night.ndjson recorded in 3 batches of at most 3")
        second = await ingest(database_url, str(path))
        assert second.returncode == 0, second.stderr
        assert summary(second) == {**dict.fromkeys(DECISIONS, 0), "skip_duplicate": 7}
        logged = await attempts(database)
        assert [a.decision for a in logged] == ["accept_new"] * 7 + ["skip_duplicate"] * 7
        assert {a.actor for a in logged} == {"cli:ingest:last-night.ndjson"}
        assert [a.entity_id for a in logged] == [f"C-{n}" for n in range(7)] * 2
        assert await count(database, RecordState) == 7

    async def test_the_progress_bar_is_on_stderr_with_lines_and_percent(self, database_url,
                                                                        tmp_path):
        path = tmp_path / "orders.ndjson"
        path.write_bytes(ndjson(*customers(5)))
        result = await ingest(database_url, str(path))
        assert result.returncode == 0, result.stderr
        # not a terminal: rich draws the bar once, when it is done
        [bar] = result.stderr.decode().splitlines()
        assert re.fullmatch(r"ingesting orders\.ndjson ━{20} 100% 5 lines, 0 rejected "
                            r"0:00:\d\d", bar), bar
        assert "━" not in result.stdout.decode()

    async def test_on_a_terminal_the_bar_moves_with_each_batch(self, database_url, tmp_path):
        path = tmp_path / "orders.ndjson"
        path.write_bytes(ndjson(*customers(6)))
        result = await ingest(database_url, str(path), "--batch-size", "2",
                              env={"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1",
                                   "COLUMNS": "100", "NO_COLOR": "1"})
        assert result.returncode == 0, result.stderr
        frames = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", frame).strip()
                  for frame in result.stderr.decode().split("\r")]
        shown = [re.search(r"(\d+)% (\d) lines", frame) for frame in frames]
        progress = [(int(m[1]), int(m[2])) for m in shown if m]
        for lines in (2, 4, 6):  # a frame after each batch, by bytes read
            assert any(n == lines and 0 < percent <= 100 for percent, n in progress), frames
        assert progress[-1] == (100, 6)


class TestMalformedLines:
    async def test_are_rejected_with_their_excerpt_counted_and_the_run_goes_on(
            self, database_url, database, tmp_path):
        path = tmp_path / "mixed.ndjson"
        huge = orjson.dumps(message(1, {"blob": "x" * 5000}, entity_id="C-huge"))
        path.write_bytes(ndjson(
            message(1, entity_id="C-1"), b"{not json", b"", b"   ",
            {"source_system": "erp", "entity_type": "customer", "version": 1,
             "payload": {}}, huge, message(1, entity_id="C-2")).replace(b"\n", b"\r\n", 1))
        result = await ingest(database_url, str(path), "--batch-size", "2",
                              env={"PIPELINE_CONSOLE_MAX_MESSAGE_BYTES": "1024"})
        assert result.returncode == 1, result.stderr
        assert summary(result) == {**dict.fromkeys(DECISIONS, 0), "accept_new": 2,
                                   "rejected": 3}
        logged = await attempts(database)
        assert [a.decision for a in logged] == ["accept_new", "rejected", "rejected",
                                                "rejected", "accept_new"]
        bad, missing, oversized = logged[1:4]
        assert bad.raw_body == "{not json" and bad.errors[0]["type"] == "json_invalid"
        assert missing.errors[0]["field"] == "entity_id"
        assert oversized.errors[0]["type"] == "too_large"
        assert oversized.raw_body.startswith(huge[:100].decode())
        assert len(oversized.raw_body) < len(huge)
        stderr = result.stderr.decode()
        # numbered as an editor numbers them: the blank lines count
        assert f"line 2: rejected (attempt {bad.id}): the body is not valid JSON" in stderr
        assert f"line 5: rejected (attempt {missing.id}): the message is not valid" in stderr
        assert f"line 6: rejected (attempt {oversized.id}): the message is larger" in stderr
        assert "Traceback" not in stderr


class TestDryRun:
    async def test_reports_the_decisions_and_writes_nothing(self, database_url, database,
                                                            tmp_path):
        path = tmp_path / "batch.ndjson"
        path.write_bytes(ndjson(*customers(2)))
        assert (await ingest(database_url, str(path))).returncode == 0
        tables = (IngestionAttempt, RecordState, StagingRecord, AuditEvent)
        before = [await count(database, table) for table in tables]
        path.write_bytes(ndjson(
            *customers(2),                            # recorded before: skip_duplicate
            message(1, entity_id="C-new"),            # accept_new
            message(2, {"name": "B", "country": "FR"}, entity_id="C-new"),  # sees the line
            message(1, entity_id="C-new"),            # before it: skip_stale
            b"[]"))
        result = await ingest(database_url, "--dry-run", str(path), "--batch-size", "2")
        assert result.returncode == 1, result.stderr  # a line was rejected
        assert summary(result) == {**dict.fromkeys(DECISIONS, 0), "skip_duplicate": 2,
                                   "accept_new": 1, "accept_supersede": 1, "skip_stale": 1,
                                   "rejected": 1}
        assert result.stdout.decode().splitlines()[0].startswith(
            "dry run: 6 lines of batch.ndjson decided in 3 batches")
        assert "line 6: rejected: " in result.stderr.decode()  # no attempt id: none is kept
        assert [await count(database, table) for table in tables] == before


class TestStandardInput:
    async def test_dash_reads_stdin(self, database_url, database):
        result = await ingest(database_url, "-", stdin=ndjson(*customers(3)))
        assert result.returncode == 0, result.stderr
        assert summary(result)["accept_new"] == 3
        assert result.stdout.decode().splitlines()[0] == (
            "3 lines of stdin recorded in 1 batch of at most 500")
        assert "ingesting stdin" in result.stderr.decode()  # no total: no percentage
        assert {a.actor for a in await attempts(database)} == {"cli:ingest:stdin"}

    async def test_a_byte_order_mark_before_the_first_line_is_not_the_message(
            self, database_url, database):
        result = await ingest(database_url, "-", stdin=b"\xef\xbb\xbf" + ndjson(*customers(2)))
        assert result.returncode == 0, result.stderr
        assert summary(result)["accept_new"] == 2


class TestUsageErrors:
    async def test_a_missing_file_is_one_line_and_exit_2(self, database_url, database,
                                                         tmp_path):
        result = await ingest(database_url, str(tmp_path / "nope.ndjson"))
        assert result.returncode == 2
        assert result.stderr.decode().splitlines() == [
            f"error: cannot read {tmp_path / 'nope.ndjson'}: No such file or directory"]
        assert result.stdout == b""
        assert await count(database, IngestionAttempt) == 0

    @pytest.mark.parametrize("size", ["0", "1001"])
    async def test_a_batch_size_out_of_range_is_one_line_and_exit_2(self, database_url,
                                                                    size, tmp_path):
        path = tmp_path / "batch.ndjson"
        path.write_bytes(ndjson(*customers(1)))
        result = await ingest(database_url, str(path), "--batch-size", size)
        assert result.returncode == 2
        assert result.stderr.decode().splitlines() == [
            f"error: --batch-size must be from 1 to 1000 (MAX_BATCH_MESSAGES), not {size}"]


class TestOneTransactionPerBatch:
    async def test_killed_after_a_batch_the_committed_batches_stay_and_a_rerun_finishes(
            self, database_url, database, tmp_path):
        path = tmp_path / "batch.ndjson"
        path.write_bytes(ndjson(*customers(7)))
        killed = await ingest(database_url, str(path), "--batch-size", "3",
                              env={"PIPELINE_CONSOLE_FAILPOINTS": "ingest.batch_committed=1"})
        assert killed.returncode == -9
        assert await count(database, IngestionAttempt) == 3
        again = await ingest(database_url, str(path), "--batch-size", "3")
        assert summary(again) == {**dict.fromkeys(DECISIONS, 0), "skip_duplicate": 3,
                                  "accept_new": 4}

    async def test_a_failing_database_stops_the_run_with_one_line_and_exit_3(self, tmp_path):
        path = tmp_path / "batch.ndjson"
        path.write_bytes(ndjson(*customers(2)))
        unmigrated = f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        result = await ingest(unmigrated, str(path))
        assert result.returncode == 3
        [error] = [line for line in result.stderr.decode().splitlines()
                   if line.startswith("error:")]
        assert error.startswith("error: the run stopped: OperationalError: no such table")
        assert "nothing was written" in error and "Traceback" not in result.stderr.decode()

