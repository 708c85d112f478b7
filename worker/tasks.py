"""The Celery task: thin by design — a job id in, the runner does the work."""

from __future__ import annotations

import multiprocessing

from api.queue import TASK_NAME, celery_app


@celery_app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    from .runner import run
    from .store import JobStore

    # Celery's prefork child is daemonic, and a daemonic process may not start children: the data loader's
    # worker processes would fail (or, as slimcore falls back, decode in the training process). This child
    # runs one task and exits (max-tasks-per-child 1), and loader workers exit when their parent dies, so
    # lifting the flag leaves nothing behind.
    multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]
    # The store (DB engine, storage handle) is built here, in the child, after the fork.
    return run(job_id, JobStore.from_env())
