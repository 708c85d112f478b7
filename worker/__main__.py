"""``slim worker``: a Celery worker for the configured broker, one job at a time.

Prefork with one child, one task per child and no prefetch (FINDINGS: the only combination with
working revoke, time limits and requeue after a killed child). Each job runs in a fresh child. The
parent imports torch and slimcore before Celery forks (``SLIM_WORKER_PRELOAD``, on by default), so every
child starts with them loaded instead of paying 3–5 s of imports per job (bench/README.md, queue load);
importing does not initialise CUDA, and the parent never touches it. The pool is Celery's prefork pool
less the waits it adds around each child's exit and fork (``worker.prefork``: 1.8 s a job before, 0.1 s
now). A reconciler thread in the parent re-queues jobs whose worker died.
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

    if os.environ.get("SLIM_WORKER_PRELOAD", "1") != "0":
        preload()
    settings = get_settings()
    prepare_broker(settings)
    JobStore.from_env().init()
    stop = threading.Event()
    if os.environ.get("SLIM_RECONCILER", "1") != "0":
        start_reconciler(JobStore.from_env(), stop)
    # Celery's CLI only names built-in pools; a configured worker_pool replaces its default, prefork.
    celery_app.conf.worker_pool = "worker.prefork:TaskPool"
    args = ["worker", "--concurrency", "1", "--max-tasks-per-child", "1",
            "--prefetch-multiplier", "1", "--without-gossip", "--without-mingle", "--loglevel",
            os.environ.get("SLIM_LOG_LEVEL", "INFO"), *(argv or [])]
    try:
        celery_app.worker_main(args)
    finally:
        stop.set()
    return 0


def preload() -> None:
    """Import what every job imports (no tensor is made, no device is touched: a forked child may still
    choose CUDA)."""
    import slimcore.lift.torchscript  # noqa: F401
    import slimcore.pipeline  # noqa: F401
    import slimcore.plots

    slimcore.plots.backend()  # matplotlib with the Agg backend: about 1 s per job when each child imported it

    from . import runner  # noqa: F401


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
