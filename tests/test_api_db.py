"""The job repository's state machine (claim, heartbeat, stale, cancel, attempts cap) on SQLite and
PostgreSQL. Also home of the ``database_url`` fixture the other API tests reuse."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from api.db import init_db, make_engine, make_session_factory, utcnow
from api.jobs.models import Job
from api.jobs.repository import JobRepository
from api.settings import Settings, normalize_database_url

PG_URL = os.environ.get("SLIM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _postgres_problem() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as err:  # any failure means "no server to test against"
        return f"PostgreSQL at {PG_URL} not reachable: " + " ".join(f"{type(err).__name__}: {err}".split())
    return None


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.server)])
def database_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A fresh empty database: a SQLite file, or a throw-away schema in the PostgreSQL test database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'slim.db'}"
        return
    problem = _postgres_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(problem + "; CI must test PostgreSQL")
        pytest.skip(problem)
    import psycopg

    schema = "slim_test_" + uuid.uuid4().hex[:12]
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


class FakeClock:
    """A clock the test moves by hand: staleness is decided by the rows' times, never by how fast a loaded
    machine runs the test (0.1 s margins failed in CI while other work ran)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def repo(database_url: str) -> Iterator[JobRepository]:
    engine = make_engine(normalize_database_url(database_url))
    init_db(engine)
    yield JobRepository(make_session_factory(engine), heartbeat_timeout_s=60, clock=FakeClock())
    engine.dispose()


def add_job(repo: JobRepository, **fields: object) -> str:
    now = repo.clock()
    if isinstance(repo.clock, FakeClock):
        repo.clock.advance(0.001)  # distinct creation times, as real submissions have
    values: dict[str, object] = dict(
        id=uuid.uuid4().hex, owner="", spec={"version": 1}, model_sha256="a" * 64, dataset_sha256="b" * 64,
        request_hash="c" * 64, created_at=now, updated_at=now, status="queued", progress=0.0, metrics={},
        attempts=0, cancel_requested=False,
    )
    values.update(fields)
    job = Job(**values)
    assert repo.insert_job(job)
    return job.id


def test_claim_is_exclusive_and_counts_attempts(repo: JobRepository):
    jid = add_job(repo)
    job = repo.claim_job(jid, "w1", max_attempts=3)
    assert job is not None and job.status == "running" and job.attempts == 1 and job.worker == "w1"
    assert job.heartbeat_at is not None and job.heartbeat_at.tzinfo is not None
    assert repo.claim_job(jid, "w2", max_attempts=3) is None  # held by a live worker
    assert repo.get_job(jid).worker == "w1"
    assert repo.claim_job(uuid.uuid4().hex, "w1", 3) is None  # unknown id


def test_concurrent_claims_have_one_winner(repo: JobRepository):
    jid = add_job(repo)
    barrier = threading.Barrier(6)
    won: list[Job | None] = []

    def claim(name: str) -> None:
        barrier.wait()
        won.append(repo.claim_job(jid, name, 3))

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [j for j in won if j is not None]
    assert len(won) == 6 and len(winners) == 1
    assert repo.get_job(jid).attempts == 1 and repo.get_job(jid).worker == winners[0].worker


def test_dead_worker_is_taken_over_after_heartbeat_timeout(repo: JobRepository):
    jid = add_job(repo)
    assert repo.claim_job(jid, "w1", 3) is not None
    repo.clock.advance(59)
    assert repo.claim_job(jid, "w2", 3) is None  # still alive
    repo.clock.advance(2)
    job = repo.claim_job(jid, "w2", 3)
    assert job is not None and job.worker == "w2" and job.attempts == 2


def test_attempts_cap_fails_the_job(repo: JobRepository):
    jid = add_job(repo)
    assert repo.claim_job(jid, "w1", max_attempts=1) is not None
    repo.clock.advance(61)
    assert repo.claim_job(jid, "w2", max_attempts=1) is None
    job = repo.get_job(jid)
    assert job.status == "failed" and job.attempts == 1
    assert job.error["type"].endswith("attempts-exhausted") and job.error["status"] == 500


def test_finished_and_canceled_jobs_are_never_claimed(repo: JobRepository):
    done = add_job(repo)
    assert repo.claim_job(done, "w", 3)
    assert repo.finish_job(done, "succeeded", summary={"params": 1})
    assert repo.claim_job(done, "w", 3) is None
    assert repo.get_job(done).progress == 1.0 and repo.get_job(done).summary == {"params": 1}

    queued = add_job(repo)
    assert repo.request_cancel(queued) == "canceled"
    assert repo.claim_job(queued, "w", 3) is None
    assert repo.get_job(queued).status == "canceled" and repo.is_cancel_requested(queued)


def test_cancel_of_a_running_job_is_a_request_the_worker_sees(repo: JobRepository):
    jid = add_job(repo)
    repo.claim_job(jid, "w", 3)
    assert not repo.is_cancel_requested(jid)
    assert repo.request_cancel(jid) == "requested"
    assert repo.is_cancel_requested(jid) and repo.get_job(jid).status == "running"
    assert repo.finish_job(jid, "canceled")
    assert repo.request_cancel(jid) == "finished"
    assert repo.is_cancel_requested(uuid.uuid4().hex)  # a vanished job: stop too


def test_dead_worker_with_cancel_requested_ends_canceled(repo: JobRepository):
    jid = add_job(repo)
    repo.claim_job(jid, "w1", 3)
    repo.request_cancel(jid)
    repo.clock.advance(61)
    assert repo.claim_job(jid, "w2", 3) is None
    assert repo.get_job(jid).status == "canceled"


def test_progress_heartbeat_and_finish_only_while_running(repo: JobRepository):
    jid = add_job(repo)
    assert not repo.update_progress(jid, "importing", 0.1, {"x": 1})  # not claimed yet
    first = repo.claim_job(jid, "w", 3).heartbeat_at
    repo.clock.advance(1)
    assert repo.update_progress(jid, "sparse_training", 1.7, {"epoch": 2, "loss": 0.5})
    job = repo.get_job(jid)
    assert (job.phase, job.progress, job.metrics) == ("sparse_training", 1.0, {"epoch": 2, "loss": 0.5})
    assert job.heartbeat_at > first
    assert repo.update_progress(jid, None, 0.5, None)
    assert repo.get_job(jid).phase == "sparse_training" and repo.get_job(jid).metrics == {"epoch": 2, "loss": 0.5}
    assert repo.heartbeat(jid)
    err = {"type": "urn:slim:problem:bad-input", "title": "Unprocessable", "status": 422, "detail": "x"}
    assert repo.finish_job(jid, "failed", error=err)
    assert not repo.finish_job(jid, "succeeded")  # already final
    assert not repo.heartbeat(jid) and not repo.update_progress(jid, "pruning", 0.9, {})
    assert repo.get_job(jid).error == err
    with pytest.raises(ValueError):
        repo.finish_job(jid, "running")
    with pytest.raises(ValueError):
        repo.update_progress(jid, "daydreaming", 0.5, None)


def test_worker_side_construction_from_settings(database_url: str, tmp_path):
    settings = Settings.from_env({"SLIM_DATA_DIR": str(tmp_path), "SLIM_DATABASE_URL": database_url,
                                  "SLIM_HEARTBEAT_TIMEOUT_S": "7"})
    worker_repo = JobRepository.from_settings(settings)
    assert worker_repo.heartbeat_timeout_s == 7
    jid = add_job(worker_repo)
    assert worker_repo.claim_job(jid, "w", settings.max_attempts).status == "running"
    worker_repo.sessions.kw["bind"].dispose()


def test_stale_jobs_and_requeue_marking(repo: JobRepository):
    queued, running, fresh, done = add_job(repo), add_job(repo), add_job(repo), add_job(repo)
    repo.claim_job(running, "w", 3)
    repo.claim_job(done, "w", 3)
    repo.finish_job(done, "succeeded")
    repo.clock.advance(15)
    repo.claim_job(fresh, "w", 3)  # heartbeat just now
    stale = {j.id for j in repo.stale_jobs(10)}
    assert stale == {queued, running}
    assert {j.id for j in repo.stale_jobs(60)} == set()
    assert repo.mark_requeued(queued) and repo.mark_requeued(running) and not repo.mark_requeued(done)
    assert repo.stale_jobs(10) == []  # just re-enqueued: not reported again until another timeout
    repo.clock.advance(15)
    assert {j.id for j in repo.stale_jobs(10)} == {queued, running, fresh}


def test_idempotency_key_is_unique_per_owner(repo: JobRepository):
    add_job(repo, owner="alice", idempotency_key="k")
    add_job(repo, owner="bob", idempotency_key="k")
    add_job(repo, owner="alice")
    add_job(repo, owner="alice")  # NULL keys never collide
    twin = Job(id=uuid.uuid4().hex, owner="alice", idempotency_key="k", spec={}, model_sha256="", dataset_sha256="",
               request_hash="", created_at=utcnow(), updated_at=utcnow())
    assert repo.insert_job(twin) is False
    assert repo.find_by_idempotency_key("alice", "k").owner == "alice"
    assert repo.count_by_status() == {"queued": 4}


def test_list_pages_newest_first_and_filters(repo: JobRepository):
    ids = [add_job(repo, owner="o") for _ in range(5)]
    add_job(repo, owner="other")
    repo.request_cancel(ids[1])
    page = repo.list_jobs("o", None, 3)
    assert [j.id for j in page] == ids[::-1][:3]
    rest = repo.list_jobs("o", None, 3, (page[-1].created_at, page[-1].id))
    assert [j.id for j in rest] == ids[::-1][3:]
    assert [j.id for j in repo.list_jobs("o", ["canceled"], 10)] == [ids[1]]
    assert len(repo.list_jobs(None, None, 10)) == 6
    assert repo.get_owned(ids[0], "other") is None and repo.get_owned(ids[0], None) is not None
    assert all(j.created_at.tzinfo == UTC for j in page)
