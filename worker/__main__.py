"""``slim worker``: a Celery worker for the configured broker, one job at a time.

Prefork with one child, one task per child and no prefetch (FINDINGS: the only combination with
working revoke, time limits and requeue after a killed child). The parent never imports torch or
touches CUDA; each job runs in a fresh child. A reconciler thread in the parent re-queues jobs whose
worker died.
"""

from __future__ import annotations

import os
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    from api.queue import celery_app, prepare_broker
    from api.settings import get_settings

    from . import tasks  # noqa: F401  (registers slim.run_job)
    from .reconcile import start_reconciler
    from .store import JobStore

    settings = get_settings()
    prepare_broker(settings)
    JobStore.from_env().init()
    stop = threading.Event()
    if os.environ.get("SLIM_RECONCILER", "1") != "0":
        start_reconciler(JobStore.from_env(), stop)
    args = ["worker", "--pool", "prefork", "--concurrency", "1", "--max-tasks-per-child", "1",
            "--prefetch-multiplier", "1", "--without-gossip", "--without-mingle", "--loglevel",
            os.environ.get("SLIM_LOG_LEVEL", "INFO"), *(argv or [])]
    try:
        celery_app.worker_main(args)
    finally:
        stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
