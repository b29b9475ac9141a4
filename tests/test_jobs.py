"""Jobs: every run, from the API, the CLI or the worker, is in the run history."""

from __future__ import annotations

import asyncio

from pipeline_console.jobs.registry import JOBS, Job
from tests.test_operations import run_cli


async def test_api_runs_are_recorded_with_their_outcome_and_result(client):
    run = (await client.post("/api/v1/jobs/promote_staging/run")).json()
    assert (run["job"], run["trigger"], run["status"], run["actor"]) == (
        "promote_staging", "api", "succeeded", "anonymous")
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
    assert names == ["deliver_due", "promote_staging", "query_ambiguous"]
