"""Delivering webhook events: a thread in the API process takes due events from the outbox and POSTs them.

Each event is claimed with a compare-and-set (``pending`` → ``sending`` with a lease), so several API
processes share the outbox without sending an event twice, and an event whose sender died mid-send is
taken again when its lease ends. A 2xx answer delivers; anything else (an error status, a timeout, a
refused connection) is retried after ``backoff · 2^(attempt-1)`` seconds (at most an hour) until
``webhook_max_attempts``, then the event is ``failed``. A URL the policy refuses at send time fails at
once. Every attempt is logged on the event (``GET /jobs/{id}/deliveries``). Nothing here runs in a
worker: a receiver that is down slows no job.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ..db import utcnow
from ..settings import Settings
from . import signing
from .models import DELIVERED, FAILED, PENDING, SENDING, WebhookDelivery, WebhookSecret
from .policy import refused_address

log = logging.getLogger("slim.webhooks")
MAX_GAP_S = 3600.0
BATCH = 20


def secret_for(sessions: sessionmaker[Session], owner: str) -> str:
    """The owner's signing secret, made on first use (two racing makers: the first insert wins)."""
    with sessions() as s:
        row = s.get(WebhookSecret, owner)
        if row is not None:
            return row.secret
    try:
        with sessions.begin() as s:
            s.add(WebhookSecret(owner=owner, secret=signing.new_secret(), created_at=utcnow()))
    except IntegrityError:
        pass
    with sessions() as s:
        return s.get(WebhookSecret, owner).secret  # type: ignore[union-attr]


class WebhookSender:
    def __init__(self, sessions: sessionmaker[Session], settings: Settings, clock: Callable[[], datetime] = utcnow,
                 client: httpx.Client | None = None) -> None:
        self.sessions, self.settings, self.clock = sessions, settings, clock
        self.client = client or httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False)
        self.lease_s = 3 * settings.webhook_timeout_s + 10
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one pass ----------------------------------------------------------------------------------
    def run_once(self) -> int:
        """Send every due event once; returns how many were attempted."""
        now = self.clock()
        with self.sessions() as s:
            ids = list(s.scalars(select(WebhookDelivery.id).where(
                WebhookDelivery.status.in_((PENDING, SENDING)), WebhookDelivery.next_attempt_at <= now)
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.sequence).limit(BATCH)))
        sent = 0
        for id in ids:
            event = self._claim(id, now)
            if event is not None:
                self._deliver(event)
                sent += 1
        return sent

    def _claim(self, id: str, now: datetime) -> WebhookDelivery | None:
        lease = now + timedelta(seconds=self.lease_s)
        with self.sessions.begin() as s:
            won = s.execute(update(WebhookDelivery).where(
                WebhookDelivery.id == id, or_(WebhookDelivery.status == PENDING, WebhookDelivery.status == SENDING),
                WebhookDelivery.next_attempt_at <= now).values(status=SENDING, next_attempt_at=lease)
                .execution_options(synchronize_session=False)).rowcount
        if not won:
            return None
        with self.sessions() as s:
            return s.get(WebhookDelivery, id)

    def _deliver(self, event: WebhookDelivery) -> None:
        attempt = event.attempts + 1
        started, t0 = self.clock(), time.perf_counter()
        code: int | None = None
        error = refused_address(event.url, self.settings.webhook_allowed_hosts)
        permanent = error is not None
        if error is None:
            body = json.dumps(event.payload, separators=(",", ":")).encode()
            # the wall clock, not the injected one: receivers check it against theirs to refuse replays
            headers = signing.headers(secret_for(self.sessions, event.owner), event.id, int(time.time()), body)
            try:
                code = self.client.post(event.url, content=body, headers=headers).status_code
                error = None if 200 <= code < 300 else f"HTTP {code}"
            except httpx.HTTPError as e:
                error = f"{type(e).__name__}: {e}"[:300]
        entry: dict[str, Any] = {"attempt": attempt, "at": started.isoformat(), "status_code": code, "error": error,
                                 "duration_ms": round((time.perf_counter() - t0) * 1000, 1)}
        now = self.clock()
        values: dict[str, Any] = {"attempts": attempt, "log": [*(event.log or []), entry]}
        if error is None:
            values.update(status=DELIVERED, delivered_at=now)
        elif permanent or attempt >= self.settings.webhook_max_attempts:
            values.update(status=FAILED)
            log.warning("webhook %s for job %s failed after %d attempt(s): %s", event.id, event.job_id, attempt, error)
        else:
            gap = min(self.settings.webhook_backoff_s * 2 ** (attempt - 1), MAX_GAP_S)
            values.update(status=PENDING, next_attempt_at=now + timedelta(seconds=gap))
        with self.sessions.begin() as s:
            s.execute(update(WebhookDelivery).where(WebhookDelivery.id == event.id, WebhookDelivery.status == SENDING)
                      .values(**values).execution_options(synchronize_session=False))

    # -- the thread --------------------------------------------------------------------------------
    def start(self, poll_s: float = 0.5) -> None:
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(poll_s):
                try:
                    self.run_once()
                except Exception:  # a database hiccup must not end deliveries for the process's life
                    log.exception("webhook pass failed")

        self._thread = threading.Thread(target=loop, name="slim-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.client.close()
