"""Re-queue jobs whose worker stopped heart-beating.

The filesystem broker never redelivers a message taken by a worker that died, and Redis only does after
the (deliberately long) visibility timeout, so the job table — not the broker — decides what is stale.
A re-queued job is claimed atomically, so a duplicate message is harmless; attempts are capped by the
claim.
"""

from __future__ import annotations

import logging
import threading

from api.queue import enqueue

from .store import JobStore

log = logging.getLogger("slim.reconciler")


def reconcile_once(store: JobStore) -> list[str]:
    ids = store.stale_job_ids()
    for job_id in ids:
        log.warning("job %s: worker stopped heart-beating; re-queued", job_id)
        enqueue(job_id)
    return ids


def start_reconciler(store: JobStore, stop: threading.Event) -> threading.Thread:
    period = max(1.0, store.heartbeat_timeout / 3)

    def loop() -> None:
        while not stop.wait(period):
            try:
                reconcile_once(store)
            except Exception:
                log.exception("reconciler pass failed; retrying")

    t = threading.Thread(target=loop, name="slim-reconciler", daemon=True)
    t.start()
    return t
