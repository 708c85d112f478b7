"""Decide which jobs need a new broker message, and why: the reconciler's rules in one place.

Waiting is not losing (FINDINGS, "Reconciler and queues"): re-sending every job *queued* longer than the
heartbeat timeout made 68 duplicate deliveries beside 49 real runs, and grows with the queue. So:

* **running, no heartbeat** for ``heartbeat_timeout_s`` — its worker died: re-send (today's rule).
* **queued**, its last message sent ``heartbeat_timeout_s`` ago or more, and
  - the broker can be inspected (Redis: the queue lists and the ``unacked`` hash, read in one
    transaction) and no longer holds a message for it, on two passes in a row — the message was
    lost: re-send. Held — it is waiting its turn: never re-send, however long the queue. A message
    taken by a worker (in ``unacked``) more than ``heartbeat_timeout_s`` ago while its job is still
    queued counts as lost: that worker died between taking it and claiming the job.
  - the broker cannot tell (the filesystem transport deletes a message once a worker takes it, so
    a message taken by a worker that then died leaves no trace; other transports): a message file
    still in the folder means waiting; otherwise re-send only after ``dispatch_timeout_s`` since the
    last send, a long timeout separate from the heartbeat's.

Two passes in a row guard against the instant between a worker taking a message and claiming the job.
The re-send itself is a compare-and-set on the row (``mark_requeued``), so of several workers'
reconcilers only one sends. Counts go to ``api.counters`` for ``/metrics``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from celery import Celery
from kombu.utils.json import loads

from . import counters
from .jobs.models import QUEUED, RUNNING, Job
from .jobs.repository import JobRepository
from .queue import enqueue
from .settings import Settings

log = logging.getLogger("slim.reconciler")

HEARTBEAT, LOST, DISPATCH_TIMEOUT = "heartbeat", "message-lost", "dispatch-timeout"
REASONS = (HEARTBEAT, LOST, DISPATCH_TIMEOUT)
_WHY = {HEARTBEAT: "worker stopped heart-beating; re-queued",
        LOST: "its message is no longer in the broker; re-sent",
        DISPATCH_TIMEOUT: "no sign of its message for {:.0f} s (broker cannot be inspected); re-sent"}

#: kombu's Redis transport keeps priorities 3, 6, 9 in lists named ``<queue>\x06\x16<pri>``.
_REDIS_PRIORITY_SEP, _REDIS_PRIORITIES = "\x06\x16", (0, 3, 6, 9)


class BrokerView:
    """Which task ids the broker holds now: ``held()`` is a set, or None when it cannot say."""

    def __init__(self, settings: Settings, app: Celery) -> None:
        self.settings, self.app = settings, app

    @property
    def authoritative(self) -> bool:
        """True when a message missing from :meth:`held` is really gone (Redis keeps taken ones in
        ``unacked`` until the job is acked; the filesystem transport deletes them on take)."""
        return self.settings.broker_url.startswith(("redis://", "rediss://"))

    def held(self) -> set[str] | None:
        try:
            if self.authoritative:
                return self._redis()
            if self.settings.uses_filesystem_broker:
                return self._filesystem()
        except Exception:  # a broker blink must never turn into a flood of re-sends
            log.exception("could not inspect the broker; nothing re-sent as lost this pass")
        return None

    def _redis(self) -> set[str]:
        queue = self.app.conf.task_default_queue
        names = [queue if p == 0 else f"{queue}{_REDIS_PRIORITY_SEP}{p}" for p in _REDIS_PRIORITIES]
        with self.app.connection_for_write() as conn:
            channel: Any = conn.default_channel
            pipe = channel.client.pipeline(transaction=True)  # one snapshot: a message moving from
            for name in names:                                 # list to unacked is seen in one of them
                pipe.lrange(name, 0, -1)
            pipe.hgetall(channel.unacked_key)
            pipe.zrangebyscore(channel.unacked_index_key, "-inf", time.time() - self.settings.heartbeat_timeout_s)
            *lists, unacked, old_tags = pipe.execute()
        ids = {_task_id(loads(raw)) for items in lists for raw in items}
        # A worker claims a job seconds after taking its message; one taken longer ago whose job is still
        # queued belongs to a worker that died in between (Redis would only restore it after the
        # visibility timeout, a day), so it does not count as held.
        stale = set(old_tags)
        ids |= {_task_id(loads(raw)[0]) for tag, raw in unacked.items() if tag not in stale}
        return ids

    def _filesystem(self) -> set[str]:
        ids = set()
        for path in Path(self.settings.broker_transport_options["data_folder_in"]).glob("*.msg"):
            try:
                ids.add(_task_id(loads(path.read_bytes())))
            except (OSError, ValueError):  # taken by a worker while we looked, or half-written
                continue
        return ids


def _task_id(message: dict[str, Any]) -> str:
    return str((message.get("headers") or {}).get("id") or (message.get("properties") or {}).get("correlation_id"))


class Redispatcher:
    """One reconciler's state: the queued jobs found missing from the broker on the previous pass."""

    def __init__(self, settings: Settings, repo: JobRepository, app: Celery,
                 broker: BrokerView | None = None, clock: Callable[[], datetime] | None = None) -> None:
        self.settings, self.repo, self.app = settings, repo, app
        self.broker = broker or BrokerView(settings, app)
        self.clock = clock or repo.clock
        self._missing: set[tuple[str, datetime]] = set()

    def reconcile_once(self) -> list[tuple[str, str]]:
        """Re-send what needs it; returns ``(job id, reason)`` for each message sent."""
        stale = self.repo.stale_jobs(self.settings.heartbeat_timeout_s)
        due = [(j, HEARTBEAT) for j in stale if j.status == RUNNING]
        queued = [j for j in stale if j.status == QUEUED]
        if queued:
            due += self._lost(queued)
        else:
            self._missing = set()
        sent = []
        for job, reason in due:
            if not self.repo.mark_requeued(job.id, job.updated_at):
                continue  # another reconciler re-sent it, or it moved on
            log.warning("job %s: %s", job.id, _WHY[reason].format(self.settings.dispatch_timeout_s))
            enqueue(job.id, self.app)
            counters.bump(self.repo.sessions, counters.requeued(reason))
            sent.append((job.id, reason))
        return sent

    def _lost(self, queued: list[Job]) -> list[tuple[Job, str]]:
        held = self.broker.held()
        missing = {(j.id, j.updated_at) for j in queued if held is None or j.id not in held}
        confirmed, self._missing = missing & self._missing, missing
        cutoff = self.clock() - timedelta(seconds=self.settings.dispatch_timeout_s)
        out = []
        for job in queued:
            if (job.id, job.updated_at) not in confirmed:
                continue
            if held is not None and self.broker.authoritative:
                out.append((job, LOST))
            elif job.updated_at < cutoff:
                out.append((job, DISPATCH_TIMEOUT))
        return out
