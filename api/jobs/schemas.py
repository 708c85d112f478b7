"""What the jobs endpoints return; the request's spec part is ``slimcore.spec.JobSpec`` itself."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .models import Job

Status = Literal["queued", "running", "succeeded", "failed", "canceled"]
Phase = Literal["importing", "sparse_training", "pruning", "finetuning", "exporting"]


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=["urn:slim:problem:not-found"])
    title: str
    status: int
    detail: str


class JobRecord(BaseModel):
    id: str
    status: Status
    phase: Phase | None = None
    progress: float = Field(ge=0, le=1)
    metrics: dict[str, Any] = Field(default_factory=dict, description="latest numbers: loss, accuracy, epoch…")
    error: dict[str, Any] | None = Field(None, description="a problem object when the job failed")
    created_at: datetime
    updated_at: datetime
    summary: dict[str, Any] | None = Field(None, description="params, FLOPs, accuracy before/after, once done")
    attempts: int
    cancel_requested: bool
    model_sha256: str
    dataset_sha256: str
    model_name: str = Field(description="the uploaded model's file name, for display only")
    dataset_name: str = Field(description="the uploaded data's file name, for display only")
    dataset_id: str | None = Field(None, description="the registered dataset the job reads (POST /datasets), "
                                                     "or null when the data was uploaded with the job")
    spec: dict[str, Any] = Field(description="the JobSpec with every default filled in")

    @classmethod
    def of(cls, job: Job) -> JobRecord:
        return cls(
            id=job.id, status=job.status, phase=job.phase, progress=job.progress,  # type: ignore[arg-type]
            metrics=job.metrics or {}, error=job.error, created_at=job.created_at, updated_at=job.updated_at,
            summary=job.summary, attempts=job.attempts, cancel_requested=job.cancel_requested,
            model_sha256=job.model_sha256, dataset_sha256=job.dataset_sha256, model_name=job.model_name,
            dataset_name=job.dataset_name, dataset_id=job.dataset_id, spec=job.spec,
        )


class JobList(BaseModel):
    items: list[JobRecord]
    next: str | None = Field(description="pass as ?cursor= for the next (older) page; null on the last page")
