"""The Celery task: thin by design — a job id in, the runner does the work."""

from __future__ import annotations

from api.queue import TASK_NAME, celery_app


@celery_app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    from .runner import run
    from .store import JobStore

    # The store (DB engine, storage handle) is built here, in the child, after the fork.
    return run(job_id, JobStore.from_env())
