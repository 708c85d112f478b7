"""All reads and writes of the ``datasets`` table, for the API (``service``, ``api.jobs.service``) and the worker.

Deleting is one conditional ``DELETE … WHERE NOT EXISTS (a queued or running job using it)``, so a dataset in
use is never removed by a delete that raced the job's start. A job submitted in the instant between a delete's
check and its commit can still name a dataset that is gone; its worker then fails it saying so.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import case, delete, exists, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ..db import newest_first
from ..jobs.models import QUEUED, RUNNING, Job
from .models import Dataset

ACTIVE = (QUEUED, RUNNING)


class DatasetRepository:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def get(self, dataset_id: str) -> Dataset | None:
        with self.sessions() as s:
            return s.get(Dataset, dataset_id)

    def get_owned(self, dataset_id: str, owner: str | None) -> Dataset | None:
        """The dataset if ``owner`` may see it; ``owner`` None means no auth, every dataset visible."""
        ds = self.get(dataset_id)
        if ds is None or (owner is not None and ds.owner != owner):
            return None
        return ds

    def find(self, owner: str, sha256: str) -> Dataset | None:
        with self.sessions() as s:
            return s.scalars(select(Dataset).where(Dataset.owner == owner, Dataset.sha256 == sha256)).first()

    def insert(self, ds: Dataset) -> tuple[Dataset, bool]:
        """Write ``ds``, or return the owner's record of the same content: (record, it already existed)."""
        try:
            with self.sessions.begin() as s:
                s.add(ds)
        except IntegrityError:  # the same content registered concurrently: the first insert wins
            existing = self.find(ds.owner, ds.sha256)
            if existing is None:
                raise
            return existing, True
        return ds, False

    def list(self, owner: str | None, limit: int, before: tuple[datetime, str] | None = None) -> list[Dataset]:
        """Newest first; ``before`` is the (created_at, id) of the last row of the previous page."""
        query = select(Dataset)
        if owner is not None:
            query = query.where(Dataset.owner == owner)
        with self.sessions() as s:
            return list(s.scalars(newest_first(query, Dataset, limit, before)))

    def usage(self, ids: Iterable[str]) -> dict[str, tuple[int, int]]:
        """Per dataset id: (jobs that used it, those of them queued or running)."""
        ids = list(ids)
        if not ids:
            return {}
        active = func.sum(case((Job.status.in_(ACTIVE), 1), else_=0))
        with self.sessions() as s:
            rows = s.execute(select(Job.dataset_id, func.count(), active).where(Job.dataset_id.in_(ids))
                             .group_by(Job.dataset_id)).all()
        return {str(r[0]): (int(r[1]), int(r[2] or 0)) for r in rows}

    def active_jobs(self, dataset_id: str, limit: int = 5) -> list[str]:
        with self.sessions() as s:
            return list(s.scalars(select(Job.id).where(Job.dataset_id == dataset_id, Job.status.in_(ACTIVE))
                                  .order_by(Job.created_at).limit(limit)))

    def delete_unused(self, dataset_id: str) -> bool:
        """Delete the record unless a queued or running job uses it; True if it was deleted."""
        busy = exists(select(Job.id).where(Job.dataset_id == dataset_id, Job.status.in_(ACTIVE)))
        with self.sessions.begin() as s:
            return bool(s.execute(delete(Dataset).where(Dataset.id == dataset_id, ~busy)
                                  .execution_options(synchronize_session=False)).rowcount)

    def uploads_sharing(self, sha256: str) -> int:
        """How many records (any owner) still name these stored bytes."""
        with self.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(Dataset).where(
                Dataset.sha256 == sha256, Dataset.kind == "upload")) or 0)
