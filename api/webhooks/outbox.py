"""Writing a job's webhook events: called by ``JobRepository`` inside the transaction that changes the job's
status, so an event exists exactly when its change does (the outbox pattern). The worker's share of a
webhook is this one insert; delivery is the API process's sender's business."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..jobs.models import Job
from .models import WebhookDelivery, WebhookSubscription


def subscribe(s: Session, job: Job, url: str, now: datetime) -> None:
    s.add(WebhookSubscription(job_id=job.id, owner=job.owner, url=url, events=0, created_at=now))
    s.flush()
    emit(s, job.id, now)


def emit(s: Session, job_id: str, now: datetime) -> None:
    """One event for the job's current status, when the job has a callback."""
    sub = s.get(WebhookSubscription, job_id, populate_existing=True)
    if sub is None:
        return
    job = s.execute(select(Job).where(Job.id == job_id).execution_options(populate_existing=True)).scalar_one()
    sub.events += 1
    s.add(WebhookDelivery(id="msg_" + uuid.uuid4().hex, job_id=job_id, owner=sub.owner, url=sub.url,
                          sequence=sub.events, type=f"job.{job.status}", payload=payload(job, sub.events, now),
                          status="pending", attempts=0, next_attempt_at=now, log=[], created_at=now))


def payload(job: Job, sequence: int, now: datetime) -> dict[str, Any]:
    """The body (Standard Webhooks' ``type``/``timestamp``/``data``); ``sequence`` orders a job's events,
    which may arrive out of order when one of them is being retried."""
    return {"type": f"job.{job.status}", "timestamp": now.isoformat(),
            "data": {"id": job.id, "status": job.status, "phase": job.phase, "progress": job.progress,
                     "error": job.error, "summary": job.summary, "sequence": sequence,
                     "links": {"self": f"/jobs/{job.id}", "report": f"/jobs/{job.id}/report",
                               "model": f"/jobs/{job.id}/model"}}}
