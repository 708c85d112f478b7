"""The webhook routes: a job's delivery log, and the caller's signing secret."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel
from sqlalchemy import select

from ..auth import Owner
from ..jobs.endpoints import Service, problems
from .models import WebhookDelivery
from .sender import secret_for

router = APIRouter(tags=["webhooks"], responses=problems(401))


class Delivery(BaseModel):
    id: str
    type: str
    sequence: int
    url: str
    status: str  # pending | sending | delivered | failed
    attempts: int
    next_attempt_at: str | None
    delivered_at: str | None
    log: list[dict[str, Any]]


class DeliveryList(BaseModel):
    items: list[Delivery]


class Secret(BaseModel):
    secret: str
    scheme: str = "Standard Webhooks (webhook-id, webhook-timestamp, webhook-signature: v1,HMAC-SHA256)"


@router.get("/jobs/{job_id}/deliveries", response_model=DeliveryList, responses=problems(404),
            summary="The job's webhook events and every delivery attempt, oldest first")
def deliveries(job_id: str, owner: Owner, service: Service) -> DeliveryList:
    service.get(owner, job_id)  # 404 for a job that is not the caller's
    with service.repo.sessions() as s:
        rows = list(s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                              .order_by(WebhookDelivery.sequence)))
    return DeliveryList(items=[Delivery(
        id=r.id, type=r.type, sequence=r.sequence, url=r.url, status=r.status, attempts=r.attempts,
        next_attempt_at=r.next_attempt_at.isoformat() if r.status in ("pending", "sending") else None,
        delivered_at=r.delivered_at.isoformat() if r.delivered_at else None, log=r.log or []) for r in rows])


@router.get("/webhooks/secret", response_model=Secret,
            summary="The secret that signs your webhooks (made on first use); verify every delivery with it")
def secret(request: Request, owner: Owner, service: Service) -> Secret:
    return Secret(secret=secret_for(service.repo.sessions, owner or ""))
