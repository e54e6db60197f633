"""What the reference system's worker client (the AMI Data Companion, trapdata/antenna/schemas.py) requires
of the gateway's answers, written here from reading its pydantic schemas: every /api/v2 answer a test gets
is validated against these, so a missing or renamed field fails a test as it fails that client."""

from __future__ import annotations

import pydantic


class JobListItem(pydantic.BaseModel):
    id: int
    pipeline_slug: str


class JobsListResponse(pydantic.BaseModel):
    results: list[JobListItem]


class ProcessingTask(pydantic.BaseModel):
    id: str
    image_id: str
    image_url: str
    reply_subject: str | None = None


class TasksListResponse(pydantic.BaseModel):
    tasks: list[ProcessingTask]


class QueuedTaskAcknowledgment(pydantic.BaseModel):
    reply_subject: str
    status: str
    task_id: str


class ResultPostResponse(pydantic.BaseModel):
    status: str
    job_id: int
    results_queued: int
    tasks: list[QueuedTaskAcknowledgment] = pydantic.Field(default_factory=list)


class RegistrationResponse(pydantic.BaseModel):
    pipelines_created: list[str] = pydantic.Field(default_factory=list)
    pipelines_updated: list[str] = pydantic.Field(default_factory=list)
    processing_service_id: int | None = None
