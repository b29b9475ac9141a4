"""Jobs: every run, from the API, the CLI or the worker, is in the run history."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, time, timedelta

import pytest
from pydantic import ValidationError

from pipeline_console.config import Settings
from pipeline_console.db import Database, create_engine
from pipeline_console.jobs.registry import JOBS, Job
from pipeline_console.jobs.schedule import (
    Scheduled,
    claim_scheduled_run,
    next_daily,
    release_failed_run,
    worker_schedule,
)
from tests.delivery.test_delivery import ingest
from tests.support import message
from tests.test_operations import run_cli


async def test_api_runs_are_recorded_with_their_outcome_and_result(client):
    run = (await client.post("/api/v1/jobs/promote_staging/run")).json()
    assert (run["job"], run["trigger"], run["status"], run["actor"]) == (
        "promote_staging", "api", "succeeded", "tester (admin)")
    assert run["result"]["checked"] == 0 and run["finished_at"] is not None
    runs = (await client.get("/api/v1/jobs/runs?job=promote_staging")).json()["items"]
    assert [r["id"] for r in runs] == [run["id"]]


async def test_a_failing_job_is_recorded_as_failed_with_its_error(client):
    async def broken(*_args):
        raise RuntimeError("the report folder is not writable")

    JOBS["broken_for_test"] = Job("broken_for_test", "always fails", broken)
    try:
        run = (await client.post("/api/v1/jobs/broken_for_test/run")).json()
    finally:
        del JOBS["broken_for_test"]
    assert run["status"] == "failed"
    assert "not writable" in run["error"]
    failed = (await client.get("/api/v1/jobs/runs?status=failed")).json()["items"]
    assert [r["job"] for r in failed] == ["broken_for_test"]


async def test_cli_runs_are_recorded_too(client, database_url):
    result = await asyncio.to_thread(run_cli, database_url, "jobs", "run", "deliver_due")
    assert result.returncode == 0, result.stderr
    [run] = (await client.get("/api/v1/jobs/runs")).json()["items"]
    assert (run["job"], run["trigger"], run["actor"]) == ("deliver_due", "cli", "cli")


async def test_every_registered_job_is_listed(client):
    names = [job["name"] for job in (await client.get("/api/v1/jobs")).json()["items"]]
    assert names == ["deliver_due", "promote_staging", "query_ambiguous",
                     "stale_partial_sweep", "audit_anchor", "daily_report"]


async def run(client, name):
    response = await client.post(f"/api/v1/jobs/{name}/run")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded", response.json()
    return response.json()["result"]


class TestStalePartialSweep:
    async def test_marks_a_long_waiting_partial_once_and_explains_it(self, client, clock):
        await client.put("/api/v1/entity-types/customer",
                         json={"schema": {"required": ["name", "country"]}})
        await ingest(client, message(1, {"name": "Globex"}))
        clock.advance(minutes=30)
        assert (await run(client, "stale_partial_sweep"))["newly_stale"] == 0  # not yet
        clock.advance(hours=2)
        result = await run(client, "stale_partial_sweep")
        assert (result["newly_stale"], result["stale_total"]) == (1, 1)
        again = await run(client, "stale_partial_sweep")
        assert (again["newly_stale"], again["stale_total"]) == (0, 1)  # once per record
        inspected = (await client.get("/api/v1/inspect/customer:C-100")).json()
        [stale] = [entry for entry in inspected["timeline"]
                   if entry["kind"] == "audit.record.partial_stale"]
        assert stale["summary"] == (
            "version 1 from erp is still partial after 9000 s, missing: \"country\" is a "
            "required property (by tester (admin))")
        [staged] = inspected["staging"]
        assert staged["status"] == "partial"  # marked, never changed or deleted
        assert staged["stale_since"] == "2026-11-24T12:30:00Z"

    async def test_a_newer_complete_version_clears_it(self, client, clock):
        await client.put("/api/v1/entity-types/customer", json={"schema": {"required": ["x"]}})
        await ingest(client, message(1, {"name": "A"}))
        clock.advance(hours=2)
        await run(client, "stale_partial_sweep")
        await ingest(client, message(2, {"name": "A", "x": 1}))
        assert (await run(client, "stale_partial_sweep"))["stale_total"] == 0
        dashboard = (await client.get("/api/v1/dashboard")).json()
        [item] = [item for item in dashboard["items"] if item["name"] == "stale_partials"]
        assert item["count"] == 0


class TestDailyReport:
    async def test_the_day_before_with_the_path_of_each_full_report(self, client, clock):
        clock.advance(days=-1)
        await ingest(client, message(1), message(1), message(2, entity_id="C-2"))
        clock.advance(days=1)
        await ingest(client, message(3))  # today: not in yesterday's report
        result = await run(client, "daily_report")
        assert (result["day"], result["from"], result["to"]) == (
            "2026-11-23", "2026-11-23T00:00:00Z", "2026-11-24T00:00:00Z")
        ingestion = result["reports"]["ingestion"]
        assert (ingestion["totals"]["total"], ingestion["totals"]["accept_new"],
                ingestion["totals"]["skip_duplicate"]) == (3, 2, 1)
        full = (await client.get(ingestion["path"])).json()
        assert full["totals"] == ingestion["totals"]
        assert set(result["reports"]) == {"ingestion", "delivery", "anomalies", "replays"}
        [kept] = (await client.get("/api/v1/jobs/runs?job=daily_report")).json()["items"]
        assert kept["result"] == result


class TestSharedSchedule:
    def test_next_daily(self):
        at = time(0, 5)
        assert next_daily(datetime(2026, 11, 24, 0, 4, tzinfo=UTC), at) == datetime(
            2026, 11, 24, 0, 5, tzinfo=UTC)
        assert next_daily(datetime(2026, 11, 24, 0, 5, tzinfo=UTC), at) == datetime(
            2026, 11, 25, 0, 5, tzinfo=UTC)

    async def test_of_many_workers_claiming_at_once_exactly_one_runs_the_job(
            self, settings, database):
        now = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
        scheduled = Scheduled("promote_staging", interval_s=60)
        databases = [Database(create_engine(settings)) for _ in range(6)]
        try:
            claims = await asyncio.gather(*[
                claim_scheduled_run(db, scheduled, now=now, worker=f"w{n}")
                for n, db in enumerate(databases)])
        finally:
            for db in databases:
                await db.dispose()
        assert sorted(claim.claimed for claim in claims) == [False] * 5 + [True]
        assert {claim.due for claim in claims} == {now + timedelta(seconds=60)}
        soon = await claim_scheduled_run(database, scheduled, now=now + timedelta(seconds=59),
                                         worker="late")
        assert (soon.claimed, soon.due) == (False, now + timedelta(seconds=60))
        later = await claim_scheduled_run(database, scheduled,
                                          now=now + timedelta(seconds=60), worker="late")
        assert (later.claimed, later.due) == (True, now + timedelta(seconds=120))

    async def test_the_time_is_read_after_the_schedule_is_locked(self, database):
        """A worker that read the time, then waited while another claimed the run, must not
        take the other's next run for one set by a fast clock (the job ran twice)."""
        now = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
        scheduled = Scheduled("stale_partial_sweep", interval_s=60)
        assert (await claim_scheduled_run(database, scheduled, now=now, worker="a")).claimed
        readings = iter([now - timedelta(milliseconds=70), now + timedelta(milliseconds=1)])
        late = await claim_scheduled_run(database, scheduled, now=lambda: next(readings),
                                         worker="b")
        assert not late.claimed
        assert late.due == now + timedelta(seconds=60)

    async def test_a_worker_with_a_fast_clock_or_a_longer_interval_holds_no_one_back(
            self, database):
        now = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
        every_minute = Scheduled("promote_staging", interval_s=60)
        skewed = await claim_scheduled_run(database, every_minute,
                                           now=now + timedelta(days=1), worker="skewed")
        assert skewed.claimed
        assert (await claim_scheduled_run(database, every_minute, now=now + timedelta(
            minutes=1), worker="right")).claimed
        hourly = Scheduled("promote_staging", interval_s=3600)
        assert (await claim_scheduled_run(database, hourly, now=now + timedelta(minutes=3),
                                          worker="slow")).claimed
        assert (await claim_scheduled_run(database, every_minute, now=now + timedelta(
            minutes=4), worker="right")).claimed

    async def test_each_day_is_reported_once_whatever_time_each_worker_has(self, database):
        early = Scheduled("daily_report", daily_at=time(0, 5))
        noon = Scheduled("daily_report", daily_at=time(12, 0))
        runs = []
        moment = datetime(2026, 11, 24, 0, 0, tzinfo=UTC)
        while moment < datetime(2026, 11, 26, 0, 0, tzinfo=UTC):
            for worker, scheduled in (("early", early), ("noon", noon)):
                claim = await claim_scheduled_run(database, scheduled, now=moment,
                                                  worker=worker)
                if claim.claimed:
                    runs.append((moment, worker))
            moment += timedelta(minutes=5)
        days = [run.date() - timedelta(days=1) for run, _ in runs]
        assert len(days) == len(set(days)) == 2, runs

    async def test_a_failed_run_is_tried_again_soon_with_its_day(self, database):
        now = datetime(2026, 11, 24, 0, 5, tzinfo=UTC)
        daily = Scheduled("daily_report", daily_at=time(0, 5))
        await claim_scheduled_run(database, daily, now=now - timedelta(minutes=1), worker="w")
        claim = await claim_scheduled_run(database, daily, now=now, worker="w")
        assert claim.claimed
        assert not (await claim_scheduled_run(database, daily, now=now + timedelta(minutes=6),
                                              worker="w")).claimed
        await release_failed_run(database, daily, claim, now=now, worker="w")
        retry = await claim_scheduled_run(database, daily, now=now + timedelta(minutes=6),
                                          worker="w")
        assert retry.claimed and retry.previous_period is None

    async def test_a_daily_job_first_runs_at_its_time_not_at_once(self, database):
        now = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
        scheduled = Scheduled("daily_report", daily_at=time(0, 5))
        claim = await claim_scheduled_run(database, scheduled, now=now, worker="w")
        assert (claim.claimed, claim.due) == (False, datetime(2026, 11, 25, 0, 5, tzinfo=UTC))

    def test_the_settings_turn_jobs_off(self):
        jobs = [s.job for s in worker_schedule(Settings(stale_partial_sweep_interval_s=0,
                                                        audit_anchor_interval_s=0,
                                                        daily_report_at_utc=""))]
        assert jobs == ["promote_staging", "query_ambiguous"]
        assert "audit_anchor" in [s.job for s in worker_schedule(Settings())]
        with pytest.raises(ValidationError):
            Settings(daily_report_at_utc="25:00")
