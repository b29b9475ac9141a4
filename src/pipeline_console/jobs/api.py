"""Jobs on demand."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from pipeline_console.api.dependencies import ActorDep, SettingsDep
from pipeline_console.api.problems import problem_responses
from pipeline_console.delivery.api import DelivererDep
from pipeline_console.jobs.registry import JOBS, run_job

router = APIRouter(tags=["jobs"])


class JobRead(BaseModel):
    name: str
    description: str


class JobList(BaseModel):
    items: list[JobRead]
    next_cursor: str | None = None


class JobRunRead(BaseModel):
    job: str
    status: str
    result: dict[str, Any]


@router.get("/jobs", response_model=JobList)
async def list_jobs() -> JobList:
    return JobList(items=[JobRead(name=job.name, description=job.description)
                          for job in JOBS.values()])


@router.post("/jobs/{name}/run", response_model=JobRunRead, responses=problem_responses(404),
             summary="Run one pass of a job now, in this process")
async def run(name: str, deliverer: DelivererDep, settings: SettingsDep,
              actor: ActorDep) -> JobRunRead:
    result = await run_job(deliverer, settings, name, actor=actor.name)
    return JobRunRead(job=name, status="succeeded", result=result)
