"""The worker's reconciler thread: re-sends messages for jobs whose message or worker was lost.

The filesystem broker never redelivers a message taken by a worker that died, and Redis only does after
the (deliberately long) visibility timeout, so the job table and a look at the broker — not the broker
alone — decide what is stale; the rules are in ``api.redispatch``. A re-sent job is claimed atomically,
so a duplicate message is harmless (the worker drops it and counts it); attempts are capped by the claim.
"""

from __future__ import annotations

import logging
import threading

from api.queue import celery_app
from api.redispatch import Redispatcher

from .store import JobStore

log = logging.getLogger("slim.reconciler")


def make_redispatcher(store: JobStore) -> Redispatcher:
    return Redispatcher(store.settings, store.repo, celery_app)


def reconcile_once(store: JobStore, redispatcher: Redispatcher | None = None) -> list[str]:
    """One pass; returns the ids re-sent. Keep one ``redispatcher`` across passes (it remembers which
    queued jobs were already missing from the broker last time)."""
    return [job_id for job_id, _ in (redispatcher or make_redispatcher(store)).reconcile_once()]


def start_reconciler(store: JobStore, stop: threading.Event) -> threading.Thread:
    period = max(1.0, store.heartbeat_timeout / 3)
    redispatcher = make_redispatcher(store)

    def loop() -> None:
        while not stop.wait(period):
            try:
                redispatcher.reconcile_once()
            except Exception:
                log.exception("reconciler pass failed; retrying")

    t = threading.Thread(target=loop, name="slim-reconciler", daemon=True)
    t.start()
    return t
