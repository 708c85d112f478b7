"""Webhooks: signed status changes POSTed to a job's ``callback_url``, against a real receiver on loopback.

The repository and sender run on SQLite and PostgreSQL with an injected clock (retries and backoff are
decided by row times, never by sleeping); the whole service runs once as users start it (``slim serve``)
with a job whose receiver answers, one whose receiver is down, and a URL the operator does not allow.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from standardwebhooks import Webhook

from api.client import SlimAPIError, SlimClient
from api.db import init_db, make_engine, make_session_factory
from api.jobs.models import SUCCEEDED
from api.jobs.repository import JobRepository
from api.problems import ProblemError
from api.settings import Settings, normalize_database_url
from api.webhooks import signing
from api.webhooks.models import WebhookDelivery
from api.webhooks.policy import check_url, refused_address
from api.webhooks.sender import WebhookSender, secret_for
from tests.service_harness import Service, free_port, wait_for
from tests.test_api_db import FakeClock, add_job, database_url  # noqa: F401  (the fixture)


class Receiver:
    """A real HTTP receiver on loopback that records what it got; ``status`` is what it answers."""

    def __init__(self, status: int = 204) -> None:
        self.status, self.got = status, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.got.append((dict(self.headers), body))
                self.send_response(outer.status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _setup(database_url: str, **over: object) -> tuple[JobRepository, WebhookSender, FakeClock]:  # noqa: F811
    engine = make_engine(normalize_database_url(database_url))
    init_db(engine)
    clock = FakeClock()
    repo = JobRepository(make_session_factory(engine), heartbeat_timeout_s=60, clock=clock)
    settings = Settings.from_env({"SLIM_DATA_DIR": "/tmp/unused", "SLIM_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"})
    settings = dataclasses.replace(settings, **over)
    return repo, WebhookSender(repo.sessions, settings, clock=clock), clock


def _subscribe(repo: JobRepository, url: str) -> str:
    """A queued job with a callback, inserted the way the API does."""
    from api.jobs.models import Job

    now = repo.clock()
    job = Job(id=f"job{now.timestamp():.0f}x", owner="alice", status="queued", progress=0.0, metrics={},
              attempts=0, cancel_requested=False, spec={}, model_sha256="0" * 64, dataset_sha256="0" * 64,
              request_hash="0" * 64, created_at=now, updated_at=now)
    assert repo.insert_job(job, url)
    return job.id


def _events(repo: JobRepository, job_id: str) -> list[WebhookDelivery]:
    with repo.sessions() as s:
        return sorted(s.query(WebhookDelivery).filter_by(job_id=job_id), key=lambda d: d.sequence)


def test_every_status_change_is_delivered_signed(database_url, receiver):  # noqa: F811
    repo, sender, clock = _setup(database_url)
    job_id = _subscribe(repo, receiver.url)
    assert repo.claim_job(job_id, "w1", 3) is not None
    assert repo.update_progress(job_id, "pruning", 0.5, None)  # progress is not a status change
    assert repo.finish_job(job_id, SUCCEEDED, summary={"after": {"params": 10}})
    assert sender.run_once() == 3
    assert [json.loads(b)["type"] for _, b in receiver.got] == ["job.queued", "job.running", "job.succeeded"]
    verifier = Webhook(secret_for(repo.sessions, "alice"))  # the Standard Webhooks reference library
    for headers, body in receiver.got:
        low = {k.lower(): v for k, v in headers.items()}
        payload = verifier.verify(body, {"webhook-id": low["webhook-id"], "webhook-timestamp":
                                         low["webhook-timestamp"], "webhook-signature": low["webhook-signature"]})
        assert payload["data"]["id"] == job_id
    last = json.loads(receiver.got[-1][1])["data"]
    assert last["sequence"] == 3 and last["summary"] == {"after": {"params": 10}}
    events = _events(repo, job_id)
    assert all(e.status == "delivered" and e.attempts == 1 and e.log[0]["status_code"] == 204 for e in events)
    assert sender.run_once() == 0, "a delivered event is never sent again"
    # another owner's secret signs nothing of alice's
    other = signing.sign(secret_for(repo.sessions, "bob"), "msg_x", 1, b"{}")
    assert other != signing.sign(secret_for(repo.sessions, "alice"), "msg_x", 1, b"{}")


def test_a_receiver_that_is_down_gets_retries_with_backoff_then_the_event_fails(database_url):  # noqa: F811
    repo, sender, clock = _setup(database_url, webhook_max_attempts=4, webhook_backoff_s=10.0)
    dead = f"http://127.0.0.1:{free_port()}/hook"
    job_id = _subscribe(repo, dead)
    gaps = []
    for attempt in range(1, 5):
        assert sender.run_once() == 1, attempt
        (event,) = _events(repo, job_id)
        assert event.attempts == attempt and event.log[-1]["error"]
        if attempt < 4:
            gap = (event.next_attempt_at - clock()).total_seconds()
            gaps.append(gap)
            assert sender.run_once() == 0, "not before its time"
            clock.advance(gap)
    assert gaps == [10.0, 20.0, 40.0]
    assert event.status == "failed" and len(event.log) == 4
    clock.advance(10_000)
    assert sender.run_once() == 0


def test_receiver_errors_are_retried_and_a_later_success_delivers(database_url, receiver):  # noqa: F811
    repo, sender, clock = _setup(database_url, webhook_backoff_s=1.0)
    receiver.status = 503
    job_id = _subscribe(repo, receiver.url)
    sender.run_once()
    (event,) = _events(repo, job_id)
    assert event.status == "pending" and event.log[0]["status_code"] == 503
    receiver.status = 200
    clock.advance(1.0)
    assert sender.run_once() == 1
    (event,) = _events(repo, job_id)
    assert event.status == "delivered" and [e["status_code"] for e in event.log] == [503, 200]


def test_policy_allows_only_what_the_operator_lists():
    with pytest.raises(ProblemError) as e:
        check_url("http://example.com/hook", ())
    assert e.value.status == 422 and "none" in e.value.body["detail"]
    with pytest.raises(ProblemError):
        check_url("file:///etc/passwd", ("*",))
    with pytest.raises(ProblemError):
        check_url("http://user:pw@hooks.example.com/", ("hooks.example.com",))
    assert check_url("https://hooks.example.com/x", ("hooks.example.com",)) == "https://hooks.example.com/x"
    with pytest.raises(ProblemError):
        check_url("https://hooks.example.com:8443/x", ("hooks.example.com:443",))
    # "*" is any *public* address: loopback behind it is refused at send time, named hosts are trusted
    assert "internal address" in (refused_address("http://127.0.0.1:9/x", ("*",)) or "")
    assert "internal address" in (refused_address("http://localhost:9/x", ("*",)) or "")
    assert refused_address("http://127.0.0.1:9/x", ("127.0.0.1",)) is None


def test_service_end_to_end_with_callbacks(tmp_path, receiver, digits, digits_cnn):
    """``slim serve`` (embedded: SQLite, the local worker): a job's status changes reach a real receiver,
    signed; a job whose receiver is down runs as fast and records its retries; a host the operator did not
    allow is a 422 problem and no job."""
    import torch

    from tests.test_service_e2e import QUICK
    from tests.zoo import save_model

    model = save_model(digits_cnn, "script", tmp_path / "digits.pt", torch.zeros(1, 1, 8, 8))
    svc = Service(tmp_path, {"SLIM_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", "SLIM_WEBHOOK_BACKOFF_S": "0.5",
                             "SLIM_WEBHOOK_MAX_ATTEMPTS": "3"}, embedded=True)
    try:
        svc.start_api()
        with SlimClient(svc.url) as c:
            ok = c.wait(c.submit(model, QUICK, digits, callback_url=receiver.url)["id"], poll=0.3, timeout=300)
            dead_url = f"http://127.0.0.1:{free_port()}/hook"
            down = c.wait(c.submit(model, QUICK, digits, callback_url=dead_url)["id"], poll=0.3, timeout=300)
            assert ok["status"] == down["status"] == "succeeded", svc.logs()
            types = wait_for(lambda: [json.loads(b)["type"] for _, b in receiver.got]
                             if len(receiver.got) >= 3 else None, 30, "three deliveries")
            assert types == ["job.queued", "job.running", "job.succeeded"]
            secret = c.webhook_secret()
            for headers, body in receiver.got:
                low = {k.lower(): v for k, v in headers.items()}
                Webhook(secret).verify(body, {k: low[k] for k in ("webhook-id", "webhook-timestamp",
                                                                   "webhook-signature")})
            assert all(d["status"] == "delivered" for d in c.deliveries(ok["id"]))
            failed = wait_for(lambda: (lambda ds: ds if all(d["status"] == "failed" for d in ds) else None)(
                c.deliveries(down["id"])), 60, "the dead receiver's events to use their attempts")
            assert len(failed) == 3 and all(d["attempts"] == 3 and d["log"][0]["error"] for d in failed)
            r = httpx.post(f"{svc.url}/jobs", files={"model": ("m.pt", model.read_bytes()),
                                                     "dataset": ("d.npz", digits.read_bytes())},
                           data={"spec": json.dumps(QUICK), "callback_url": "http://169.254.169.254/latest"})
            assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["type"].endswith("callback-not-allowed")
            with pytest.raises(SlimAPIError):
                c.deliveries("0" * 32)
    finally:
        svc.close()
