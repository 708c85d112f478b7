"""The pool ``slim worker`` runs: Celery's prefork pool, less the dead time between one job's child and the next.

With one child and one task per child every job pays for a child exit and a fork, so whatever Celery spends
there is paid per job. Timestamped worker logs (12-job queue runs, bench/bench_queue.py) put 0.4 s to 5.1 s,
mean 1.8 s, between one task's end and the next one's start, with the next message already in the parent:

* **the exit went unnoticed until the pool's 5 s maintenance timer** in 21 of 38 cases: the parent hears
  of a child's exit from its sentinel pipe, which closes with the child's files a moment *before* the
  child becomes a reapable zombie; when the parent wins that race ``maintain_pool`` finds no exited child
  and starts no replacement. Here the parent looks again every few milliseconds until the child is reaped.
* **0.25 s of ``gc.collect()`` before every fork** (Celery issue #2927) over the ~390k objects of torch
  and slimcore that the parent preloads. They live as long as the parent, so they are frozen once
  (``gc.freeze``) before the first fork and later collections skip them (the children's too, which also
  keeps their pages shared).
* **0.1 s in the child after its last task**, polling every 0.1 s until the parent has read its result;
  polled every 2 ms here, with billiard's same 30 s cap.

What is left is about 0.1 s a job (child exit, the parent's flush of its pipe, fork, Celery's child init).
Everything else is Celery's prefork pool unchanged (late ack, no prefetch, revoke, time limits, a killed
child's job rejected and re-queued): only these three waits differ, and a killed, revoked or timed-out
child is replaced as quickly.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from billiard import pool as billiard_pool
from celery.concurrency import asynpool
from celery.concurrency.prefork import TaskPool as PreforkTaskPool
from celery.utils.log import get_logger

log = get_logger(__name__)

#: How often the parent looks again for a child whose sentinel closed but which is not reapable yet, and for
#: how long (the pool's 5 s maintenance timer remains the fallback).
REAP_POLL_S = 0.005
REAP_PATIENCE_S = 2.0
#: How often a finished child checks that the parent has read its result; billiard's overall cap is kept.
CONSUMED_POLL_S = 0.002
CONSUMED_CAP_S = (billiard_pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT
                  * billiard_pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_INTERVAL)


class SlimPoolWorker(asynpool.Worker):
    """The code run in each child: Celery's, with a finer poll before the child exits."""

    def _ensure_messages_consumed(self, completed: int) -> bool:
        """Wait until the parent has read every result this child sent (billiard's guarantee: a child that
        exits earlier may take its last result with it), polling every 2 ms instead of every 100 ms."""
        if not self.on_ready_counter:
            return False
        deadline = time.monotonic() + CONSUMED_CAP_S
        while self.on_ready_counter.value < completed:
            if time.monotonic() >= deadline:
                log.warning("could not ensure all messages were consumed prior to exiting")
                return False
            time.sleep(CONSUMED_POLL_S)
        return True


class SlimAsynPool(asynpool.AsynPool):
    """Celery's event-loop pool; a child's exit starts its replacement at once, not at the next 5 s tick."""

    Worker = SlimPoolWorker

    def _event_process_exit(self, hub: Any, proc: Any) -> None:
        """Called when ``proc``'s sentinel turns readable. The sentinel closes with the child's files, just
        before the kernel makes it a zombie, so ``maintain_pool`` may not see it exited yet; then look again
        every few ms until it is reaped and replaced."""
        super()._event_process_exit(hub, proc)
        if proc in self._pool:  # still listed: not reaped, so no replacement was started
            self._maintain_when_reaped(hub, proc, time.monotonic() + REAP_PATIENCE_S)

    def _maintain_when_reaped(self, hub: Any, proc: Any, deadline: float) -> None:
        def check() -> None:
            if proc not in self._pool:  # reaped meanwhile (the maintenance timer, a shutdown)
                return
            if proc.exitcode is None and time.monotonic() < deadline:
                hub.call_later(REAP_POLL_S, check)
                return
            self.maintain_pool()

        hub.call_later(REAP_POLL_S, check)


class TaskPool(PreforkTaskPool):
    """``worker_pool`` for ``slim worker``: the prefork pool with :class:`SlimAsynPool`."""

    Pool = SlimAsynPool

    def on_start(self) -> None:
        """Freeze what the parent has loaded so far (torch, slimcore, Celery) before the first fork: Celery
        runs ``gc.collect()`` before every fork, and over the preloaded modules that took 0.25 s a job."""
        gc.collect()
        gc.freeze()
        super().on_start()
