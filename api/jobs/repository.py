"""All reads and writes of the ``jobs`` table, for the API and the worker.

Every state change is one conditional ``UPDATE … WHERE <expected state>`` (compare-and-set) whose row
count says whether it happened, so two workers, or a worker and a cancel request, can race on SQLite
or PostgreSQL without row locks. Returned ``Job`` rows are detached snapshots: read their attributes
freely, but change state only through these methods.

Times come from the calling process's clock (UTC); hosts sharing a database must keep clocks in sync
to well within ``heartbeat_timeout_s``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ..db import newest_first, session_factory_from_settings, utcnow
from ..problems import problem
from ..settings import Settings
from ..webhooks.outbox import emit, subscribe
from .models import CANCELED, FAILED, PHASES, QUEUED, RUNNING, SUCCEEDED, TERMINAL, Job


class JobRepository:
    """Job persistence over a session factory (see ``api.db.session_factory_from_settings``).

    ``heartbeat_timeout_s`` is how long a running job may go without a heartbeat before
    :meth:`claim_job` treats its worker as dead and lets another take the job over. ``clock`` gives
    every time this repository writes or compares, so tests move time instead of sleeping.
    """

    def __init__(self, sessions: sessionmaker[Session], heartbeat_timeout_s: float = 120.0,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.sessions = sessions
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: Settings) -> JobRepository:
        """What a worker process needs: engine, tables and the configured heartbeat timeout.

        Call it in the process that will use it (after any fork): database connections must not be
        shared between parent and child processes.
        """
        return cls(session_factory_from_settings(settings), settings.heartbeat_timeout_s)

    # -- worker side -------------------------------------------------------------------------------

    def get_job(self, id: str) -> Job | None:
        with self.sessions() as s:
            return s.get(Job, id)

    def claim_job(self, id: str, worker_name: str, max_attempts: int) -> Job | None:
        """Take the job for ``worker_name``, or return None when it must not run now.

        Claimable: queued, or running whose heartbeat is older than ``heartbeat_timeout_s`` (its
        worker died; this is a redelivery). A claimable job with its cancel requested becomes
        ``canceled``; one that has used ``max_attempts`` becomes ``failed``. Finished jobs and jobs
        held by a live worker are left alone.
        """
        now = self.clock()
        claimable = self._claimable(now)
        with self.sessions.begin() as s:
            claimed = s.execute(
                update(Job)
                .where(Job.id == id, claimable, Job.attempts < max_attempts, Job.cancel_requested.is_(False))
                .values(status=RUNNING, attempts=Job.attempts + 1, heartbeat_at=now, worker=worker_name,
                        updated_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount
            if claimed:
                emit(s, id, now)
        if claimed:
            return self.get_job(id)
        with self.sessions.begin() as s:
            ended = s.execute(
                update(Job).where(Job.id == id, claimable, Job.cancel_requested.is_(True))
                .values(status=CANCELED, updated_at=now).execution_options(synchronize_session=False)
            ).rowcount
            ended += s.execute(
                update(Job).where(Job.id == id, claimable, Job.attempts >= max_attempts)
                .values(status=FAILED, updated_at=now,
                        error=problem(500, "attempts-exhausted",
                                      f"the job was started {max_attempts} times and never finished "
                                      "(its worker died or was killed each time); giving up"))
                .execution_options(synchronize_session=False)
            ).rowcount
            if ended:
                emit(s, id, now)
        return None

    def update_progress(self, id: str, phase: str | None, progress: float,
                        metrics: dict[str, Any] | None) -> bool:
        """Record progress of a running job and count as a heartbeat; False if it is no longer running.

        ``phase`` None keeps the current phase, ``metrics`` None keeps the current metrics.
        """
        if phase is not None and phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; one of {PHASES}")
        now = self.clock()
        values: dict[str, Any] = {"progress": min(max(float(progress), 0.0), 1.0), "heartbeat_at": now,
                                  "updated_at": now}
        if phase is not None:
            values["phase"] = phase
        if metrics is not None:
            values["metrics"] = metrics
        return self._set(id, Job.status == RUNNING, **values)

    def heartbeat(self, id: str) -> bool:
        """Prove the worker is alive; False if the job is no longer running (stop working on it)."""
        return self._set(id, Job.status == RUNNING, heartbeat_at=self.clock())

    def finish_job(self, id: str, status: str, summary: dict[str, Any] | None = None,
                   error: dict[str, Any] | None = None) -> bool:
        """Move the job to a final status; False (and no change) if it had already finished."""
        if status not in TERMINAL:
            raise ValueError(f"finish_job needs one of {sorted(TERMINAL)}, got {status!r}")
        values: dict[str, Any] = {"status": status, "summary": summary, "error": error, "updated_at": self.clock()}
        if status == SUCCEEDED:
            values["progress"] = 1.0
        return self._set(id, Job.status.not_in(TERMINAL), **values)

    def is_cancel_requested(self, id: str) -> bool:
        """True when the worker should stop: cancel asked for, job canceled, or job gone."""
        with self.sessions() as s:
            row = s.execute(select(Job.status, Job.cancel_requested).where(Job.id == id)).first()
        return row is None or row.status == CANCELED or bool(row.cancel_requested)

    def stale_jobs(self, timeout_s: float) -> list[Job]:
        """Jobs whose message was probably lost: they need enqueuing again.

        Running with no heartbeat for ``timeout_s``, or queued (never started, or put back) for
        ``timeout_s``. Both also require ``updated_at`` to be that old, so a job already re-enqueued
        through :meth:`mark_requeued` is not reported again until another timeout passes.
        """
        cutoff = self.clock() - timedelta(seconds=timeout_s)
        dead = and_(Job.status == RUNNING, or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff))
        waiting = Job.status == QUEUED
        with self.sessions() as s:
            rows = s.scalars(select(Job).where(or_(dead, waiting), Job.updated_at < cutoff)
                             .order_by(Job.created_at, Job.id))
            return list(rows)

    def mark_requeued(self, id: str, seen_updated_at: datetime | None = None) -> bool:
        """Note that a fresh message is being sent for the job (see :meth:`stale_jobs`).

        With ``seen_updated_at`` (the row's ``updated_at`` when it was found stale) it is a
        compare-and-set: of several reconcilers that found the same job only one wins and sends.
        For a queued job ``updated_at`` is therefore the time its latest message was sent.
        """
        condition = Job.status.in_((QUEUED, RUNNING))
        if seen_updated_at is not None:
            condition = and_(condition, Job.updated_at == seen_updated_at)
        return self._set(id, condition, updated_at=self.clock())

    # -- API side ----------------------------------------------------------------------------------

    def insert_job(self, job: Job, callback_url: str | None = None) -> bool:
        """Write a new job (with its webhook subscription and first event when it has a ``callback_url``);
        False if its (owner, idempotency_key) is already taken (a concurrent twin)."""
        try:
            with self.sessions.begin() as s:
                s.add(job)
                if callback_url is not None:
                    s.flush()
                    subscribe(s, job, callback_url, job.created_at)
        except IntegrityError:
            if job.idempotency_key is None:
                raise
            return False
        return True

    def delete_job(self, id: str) -> None:
        with self.sessions.begin() as s:
            job = s.get(Job, id)
            if job is not None:
                s.delete(job)

    def get_owned(self, id: str, owner: str | None) -> Job | None:
        """The job if ``owner`` may see it; ``owner`` None means no auth, every job visible."""
        job = self.get_job(id)
        if job is None or (owner is not None and job.owner != owner):
            return None
        return job

    def find_by_idempotency_key(self, owner: str, key: str) -> Job | None:
        with self.sessions() as s:
            return s.scalars(select(Job).where(Job.owner == owner, Job.idempotency_key == key)).first()

    def list_jobs(self, owner: str | None, statuses: Iterable[str] | None, limit: int,
                  before: tuple[datetime, str] | None = None) -> list[Job]:
        """Newest first; ``before`` is the (created_at, id) of the last row of the previous page."""
        query = select(Job)
        if owner is not None:
            query = query.where(Job.owner == owner)
        if statuses:
            query = query.where(Job.status.in_(list(statuses)))
        with self.sessions() as s:
            return list(s.scalars(newest_first(query, Job, limit, before)))

    def request_cancel(self, id: str) -> str:
        """Cancel: ``canceled`` (was queued, now final), ``requested`` (running; the worker stops it) or
        ``finished`` (too late). Retries when the job moves between our read and write."""
        for _ in range(5):
            now = self.clock()
            if self._set(id, Job.status == QUEUED, status=CANCELED, cancel_requested=True, updated_at=now):
                return "canceled"
            if self._set(id, Job.status == RUNNING, cancel_requested=True, updated_at=now):
                return "requested"
            job = self.get_job(id)
            if job is None or job.status in TERMINAL:
                return "finished"
        return "finished"  # pragma: no cover  (five state changes in a row)

    def count_by_status(self) -> dict[str, int]:
        with self.sessions() as s:
            rows = s.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        return {status: int(n) for status, n in rows}

    # -- helpers -----------------------------------------------------------------------------------

    def _claimable(self, now: datetime) -> ColumnElement[bool]:
        cutoff = now - timedelta(seconds=self.heartbeat_timeout_s)
        dead = and_(Job.status == RUNNING, or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff))
        return or_(Job.status == QUEUED, dead)

    def _set(self, id: str, condition: ColumnElement[bool], **values: Any) -> bool:
        """Compare-and-set; a status change writes its webhook event in the same transaction."""
        with self.sessions.begin() as s:
            result = s.execute(update(Job).where(Job.id == id, condition).values(**values)
                               .execution_options(synchronize_session=False))
            if result.rowcount and "status" in values:
                emit(s, id, self.clock())
        return bool(result.rowcount)
