"""The reconciler re-sends a job's message only when it is lost, never because the job waits in a queue.

Against a real Redis (db 12, one queue name per test) and the filesystem transport, with the job table on
SQLite or PostgreSQL and an injected clock, so "an hour later" takes no time and no margin is sub-second.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.counters import read_counters
from api.db import init_db, make_engine, make_session_factory
from api.jobs.repository import JobRepository
from api.queue import enqueue, make_celery
from api.redispatch import DISPATCH_TIMEOUT, HEARTBEAT, LOST, Redispatcher
from api.settings import Settings
from tests.service_harness import reachable
from tests.test_api_db import FakeClock, add_job
from tests.test_api_db import database_url as database_url  # noqa: F401  (fixture)

REDIS = "redis://127.0.0.1:6379/12"
HEARTBEAT_S, DISPATCH_S = 15.0, 600.0


def _settings(tmp_path: Path, database_url: str, broker: str) -> Settings:
    return Settings.from_env({"SLIM_DATA_DIR": str(tmp_path), "SLIM_DATABASE_URL": database_url,
                              "SLIM_BROKER_URL": broker, "SLIM_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_S),
                              "SLIM_DISPATCH_TIMEOUT_S": str(DISPATCH_S)})


class World:
    """A job table with a hand-moved clock, a broker, and the reconciler under test."""

    def __init__(self, settings: Settings, queue: str) -> None:
        self.settings = settings
        self.engine = make_engine(settings.database_url)
        init_db(self.engine)
        self.clock = FakeClock()
        self.repo = JobRepository(make_session_factory(self.engine), HEARTBEAT_S, clock=self.clock)
        self.app = make_celery(settings)
        self.app.conf.task_default_queue = queue
        self.queue = queue
        self.reconciler = Redispatcher(settings, self.repo, self.app)

    def submit(self, n: int) -> list[str]:
        ids = [add_job(self.repo) for _ in range(n)]
        for job_id in ids:
            enqueue(job_id, self.app)
        return ids

    def passes(self, n: int, seconds_between: float) -> list[tuple[str, str]]:
        sent = []
        for _ in range(n):
            self.clock.advance(seconds_between)
            sent += self.reconciler.reconcile_once()
        return sent

    def counters(self) -> dict[str, int]:
        return read_counters(self.repo.sessions)


@pytest.fixture
def redis_world(tmp_path: Path, database_url: str) -> Iterator[World]:  # noqa: F811
    if not reachable("127.0.0.1", 6379):
        pytest.skip("no Redis on 127.0.0.1:6379")
    import redis

    world = World(_settings(tmp_path, database_url, REDIS), "slim-test-" + uuid.uuid4().hex[:8])
    yield world
    redis.Redis.from_url(REDIS).delete(world.queue)
    world.engine.dispose()


def _said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "slim.reconciler"]


def _redis_queue(world: World) -> list[bytes]:
    import redis

    return redis.Redis.from_url(REDIS).lrange(world.queue, 0, -1)


def test_a_long_queue_without_workers_is_never_re_sent(redis_world: World, caplog: pytest.LogCaptureFixture):
    ids = redis_world.submit(60)
    with caplog.at_level(logging.WARNING, logger="slim.reconciler"):
        sent = redis_world.passes(6, seconds_between=DISPATCH_S)  # an hour of passes, every message waiting
    assert sent == [] and not _said(caplog)
    assert len(_redis_queue(redis_world)) == len(ids)
    assert redis_world.counters().get("requeued:message-lost", 0) == 0


def test_a_message_gone_from_redis_is_re_sent_once(redis_world: World, caplog: pytest.LogCaptureFixture):
    import redis

    ids = redis_world.submit(5)
    lost = ids[2]
    client = redis.Redis.from_url(REDIS)
    raw = next(m for m in _redis_queue(redis_world) if lost.encode() in m)
    assert client.lrem(redis_world.queue, 1, raw) == 1
    with caplog.at_level(logging.WARNING, logger="slim.reconciler"):
        assert redis_world.passes(1, seconds_between=1) == []  # younger than the heartbeat timeout
        assert redis_world.passes(1, seconds_between=HEARTBEAT_S) == []  # missing once: could be mid-take
        assert redis_world.passes(1, seconds_between=5) == [(lost, LOST)]
        assert redis_world.passes(4, seconds_between=HEARTBEAT_S) == []  # the new message waits like the rest
    assert _said(caplog) == [
        f"job {lost}: its message is no longer in the broker; re-sent"]
    assert sum(lost.encode() in m for m in _redis_queue(redis_world)) == 1
    assert len(_redis_queue(redis_world)) == 5
    assert redis_world.counters() == {"requeued:message-lost": 1}


def test_a_message_taken_by_a_worker_is_held_in_unacked(redis_world: World):
    """A worker that took the message but has not yet claimed the job: Redis keeps it in ``unacked``."""
    import redis

    (job_id,) = redis_world.submit(1)
    client = redis.Redis.from_url(REDIS)
    raw = client.rpop(redis_world.queue)
    tag = uuid.uuid4().hex
    client.hset("unacked", tag, b'[' + raw + b', "", "' + redis_world.queue.encode() + b'"]')
    client.zadd("unacked_index", {tag: time.time()})  # as kombu records a delivery
    try:
        assert redis_world.passes(4, seconds_between=HEARTBEAT_S) == []
        # the same entry, taken long ago by a worker that never claimed the job: that worker died
        client.zadd("unacked_index", {tag: time.time() - 10 * HEARTBEAT_S})
        assert redis_world.passes(2, seconds_between=HEARTBEAT_S) == [(job_id, LOST)]
    finally:
        client.hdel("unacked", tag)
        client.zrem("unacked_index", tag)


def test_a_running_job_without_heartbeat_keeps_the_heartbeat_rule(redis_world: World,
                                                                  caplog: pytest.LogCaptureFixture):
    running, waiting = redis_world.submit(2)
    redis_world.repo.claim_job(running, "w", 3)
    with caplog.at_level(logging.WARNING, logger="slim.reconciler"):
        assert redis_world.passes(1, seconds_between=HEARTBEAT_S - 1) == []
        assert redis_world.passes(1, seconds_between=2) == [(running, HEARTBEAT)]
    assert _said(caplog) == [f"job {running}: worker stopped heart-beating; re-queued"]
    assert redis_world.counters() == {"requeued:heartbeat": 1}


def test_two_reconcilers_send_one_message(redis_world: World):
    (job_id,) = redis_world.submit(1)
    other = Redispatcher(redis_world.settings, redis_world.repo, redis_world.app)
    redis_world.repo.claim_job(job_id, "w", 3)
    redis_world.clock.advance(HEARTBEAT_S + 1)
    assert redis_world.reconciler.reconcile_once() == [(job_id, HEARTBEAT)]
    assert other.reconcile_once() == []


def test_filesystem_broker_waits_for_the_dispatch_timeout(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    world = World(_settings(tmp_path, f"sqlite:///{tmp_path / 'slim.db'}", "filesystem://"), "celery")
    from api.queue import prepare_broker

    prepare_broker(world.settings)
    ids = world.submit(4)
    folder = Path(world.settings.broker_transport_options["data_folder_in"])
    assert world.passes(8, seconds_between=DISPATCH_S / 2) == []  # files in the folder: waiting
    gone = next(p for p in folder.glob("*.msg") if ids[0] in p.read_text())
    gone.unlink()  # a worker took it and died before claiming
    with caplog.at_level(logging.WARNING, logger="slim.reconciler"):
        assert world.passes(1, seconds_between=1) == []
        # last sent long ago: the second pass that misses it re-sends
        assert world.passes(1, seconds_between=1) == [(ids[0], DISPATCH_TIMEOUT)]
        assert world.passes(3, seconds_between=DISPATCH_S / 3) == []
    assert _said(caplog) == [
        f"job {ids[0]}: no sign of its message for {DISPATCH_S:.0f} s (broker cannot be inspected); re-sent"]
    assert len(list(folder.glob("*.msg"))) == 4
    assert world.counters() == {"requeued:dispatch-timeout": 1}
    world.engine.dispose()


def test_filesystem_broker_missing_message_of_a_recent_send_waits(tmp_path: Path):
    world = World(_settings(tmp_path, f"sqlite:///{tmp_path / 'slim.db'}", "filesystem://"), "celery")
    from api.queue import prepare_broker

    prepare_broker(world.settings)
    (job_id,) = world.submit(1)
    for p in Path(world.settings.broker_transport_options["data_folder_in"]).glob("*.msg"):
        p.unlink()
    assert world.passes(3, seconds_between=HEARTBEAT_S) == []  # 45 s: far below the dispatch timeout
    assert world.passes(1, seconds_between=DISPATCH_S) == [(job_id, DISPATCH_TIMEOUT)]
    world.engine.dispose()
