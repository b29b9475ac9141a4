"""Jobs on demand."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

from pipeline_console.api.dependencies import ActorDep, DatabaseDep, IdPage, SettingsDep
from pipeline_console.api.filters import JOB_RUN_STATUS_WORDS, Statuses, status_filter
from pipeline_console.api.problems import problem_responses
from pipeline_console.auth.dependencies import OPERATOR, VIEWER
from pipeline_console.delivery.api import DelivererDep
from pipeline_console.jobs.registry import JOBS, run_job
from pipeline_console.models import JobRun
from pipeline_console.pagination import fetch_page

router = APIRouter(tags=["jobs"])


class JobRead(BaseModel):
    name: str
    description: str


class JobList(BaseModel):
    items: list[JobRead]
    next_cursor: str | None = None


class JobRunRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    job: str
    trigger: Literal["api", "cli", "worker"]
    actor: str
    status: Literal["running", "succeeded", "failed"]
    started_at: datetime
    finished_at: datetime | None
    result: dict[str, Any] | None
    error: str | None


class JobRunPage(BaseModel):
    items: list[JobRunRead]
    next_cursor: str | None


@router.get("/jobs", dependencies=[VIEWER], response_model=JobList)
async def list_jobs() -> JobList:
    return JobList(items=[JobRead(name=job.name, description=job.description)
                          for job in JOBS.values()])


@router.get("/jobs/runs", dependencies=[VIEWER],
            response_model=JobRunPage, summary="The job run history")
async def list_runs(database: DatabaseDep, page: IdPage,
                    status: Annotated[Statuses | None, status_filter(JOB_RUN_STATUS_WORDS)],
                    job: Annotated[str | None, Query(max_length=64)] = None) -> Any:
    async with database.read() as session:
        result = await fetch_page(session, JobRun.id, page,
                                  equal=[(JobRun.job, job), (JobRun.status, status)])
        return {"items": [JobRunRead.model_validate(run) for run in result.items],
                "next_cursor": result.next_cursor}


@router.post("/jobs/{name}/run", dependencies=[OPERATOR],
             response_model=JobRunRead, responses=problem_responses(404),
             summary="Run one pass of a job now, in this process; the run is recorded",
             description="A job that fails is answered with its run, status `failed` and the "
             "error; the run history keeps it.")
async def run(name: str, deliverer: DelivererDep, database: DatabaseDep, settings: SettingsDep,
              actor: ActorDep) -> Any:
    record = await run_job(deliverer, settings, name, actor=actor.label, trigger="api")
    async with database.read() as session:
        return JobRunRead.model_validate(await session.get(JobRun, record.id))
