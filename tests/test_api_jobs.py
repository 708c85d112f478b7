"""The HTTP API as the contract states it, on SQLite and PostgreSQL, with a real kombu filesystem broker
in tmp_path and no worker (job state changes a worker would make go through the repository)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.jobs.repository import JobRepository
from api.settings import Settings
from api.storage import ArtifactStore
from tests import test_api_db

database_url = test_api_db.database_url  # the SQLite / PostgreSQL fixture

PROBLEM = "application/problem+json"
SPEC = {"version": 1, "input_shape": [1, 1, 8, 8], "prune": {"amount": 0.3}}


class Api:
    """A client plus handles on what the app wrote: rows, artifacts, broker messages."""

    def __init__(self, client: TestClient, settings: Settings) -> None:
        self.client, self.settings = client, settings
        self.repo: JobRepository = client.app.state.jobs.repo
        self.store: ArtifactStore = client.app.state.jobs.store

    def submit(self, model: bytes = b"model-bytes", dataset: bytes = b"data-bytes", spec: object = SPEC,
               key: str | None = None, token: str | None = None, **kw: object):
        headers = {}
        if key is not None:
            headers["Idempotency-Key"] = key
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        files = {"model": ("net.pt", model), "dataset": ("digits.npz", dataset)}
        text = spec if isinstance(spec, str) else json.dumps(spec)
        return self.client.post("/jobs", files=files, data={"spec": text}, headers=headers, **kw)

    def messages(self) -> list[dict]:
        folder = Path(self.settings.broker_transport_options["data_folder_out"])
        return [json.loads(p.read_text()) for p in sorted(folder.glob("*.msg"))]

    def stored_jobs(self) -> list[str]:
        root = Path(self.store.root) / "jobs"
        return sorted(p.name for p in root.iterdir()) if root.exists() else []

    def rows(self) -> int:
        return sum(self.repo.count_by_status().values())


@pytest.fixture
def make_api(database_url: str, tmp_path: Path) -> Iterator[Callable[..., Api]]:
    clients: list[TestClient] = []

    def make(**env: str) -> Api:
        settings = Settings.from_env({"SLIM_DATA_DIR": str(tmp_path / f"data{len(clients)}"),
                                      "SLIM_DATABASE_URL": database_url, **env})
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return Api(client, settings)

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:
    return make_api()


def assert_problem(resp, status: int, *words: str) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    body = resp.json()
    assert {"type", "title", "status", "detail"} <= body.keys() and body["status"] == status
    for word in words:
        assert word in body["detail"], body
    assert "Traceback" not in resp.text
    return body


def test_create_answers_202_with_location_and_record_and_queues_a_message(api: Api):
    r = api.submit(model=b"M" * 1000, dataset=b"D" * 10)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/jobs/{job['id']}"
    assert job["status"] == "queued" and job["progress"] == 0 and job["phase"] is None and job["attempts"] == 0
    assert job["model_sha256"] == hashlib.sha256(b"M" * 1000).hexdigest()
    assert job["dataset_sha256"] == hashlib.sha256(b"D" * 10).hexdigest()
    assert job["spec"]["prune"]["amount"] == 0.3 and job["spec"]["finetune"]["epochs"] == 5  # defaults filled
    assert job["created_at"].endswith("Z") and job["error"] is None and job["summary"] is None
    assert (job["model_name"], job["dataset_name"]) == ("net.pt", "digits.npz")
    with api.store.open_read(job["id"], "model") as f:
        assert f.read() == b"M" * 1000
    (msg,) = api.messages()
    assert msg["headers"]["task"] == "slim.run_job" and msg["headers"]["id"] == job["id"]
    assert api.client.get(f"/jobs/{job['id']}").json() == job


def test_row_is_committed_before_the_message_is_sent(api: Api, monkeypatch: pytest.MonkeyPatch):
    seen = []
    celery = api.client.app.state.jobs.celery
    real = celery.send_task

    def spy(name: str, args: list, **kw: object):
        seen.append(api.repo.get_job(args[0]))
        return real(name, args=args, **kw)

    monkeypatch.setattr(celery, "send_task", spy)
    job = api.submit().json()
    assert seen and seen[0] is not None and seen[0].status == "queued" and seen[0].id == job["id"]


def test_broker_down_is_503_and_leaves_nothing(api: Api, monkeypatch: pytest.MonkeyPatch):
    def down(*_a: object, **_k: object) -> None:
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(api.client.app.state.jobs.celery, "send_task", down)
    assert_problem(api.submit(), 503, "queue")
    assert api.rows() == 0 and api.stored_jobs() == []


def test_unknown_ids_are_404_problems(api: Api):
    for path in ("/jobs/" + "0" * 32, "/jobs/not-an-id", "/jobs/../etc", "/jobs/" + "0" * 32 + "/model",
                 "/jobs/" + "0" * 32 + "/report", "/jobs/" + "0" * 32 + "/report.html", "/nowhere"):
        assert_problem(api.client.get(path), 404)
    assert_problem(api.client.post("/jobs/" + "f" * 32 + "/cancel"), 404)


def test_list_filters_limits_and_pages_newest_first(api: Api):
    ids = [api.submit().json()["id"] for _ in range(5)]
    for jid in ids[:2]:
        assert api.client.post(f"/jobs/{jid}/cancel").status_code == 202
    canceled = api.client.get("/jobs", params={"status": "canceled"}).json()
    assert [j["id"] for j in canceled["items"]] == ids[:2][::-1] and canceled["next"] is None
    both = api.client.get("/jobs", params={"status": "queued,canceled", "limit": 100}).json()
    assert len(both["items"]) == 5
    seen, cursor = [], None
    while True:
        page = api.client.get("/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        assert len(page["items"]) <= 2
        seen += [j["id"] for j in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert_problem(api.client.get("/jobs", params={"status": "bogus"}), 422, "bogus")
    assert_problem(api.client.get("/jobs", params={"limit": 0}), 422, "limit")
    assert_problem(api.client.get("/jobs", params={"limit": 101}), 422, "limit")
    assert_problem(api.client.get("/jobs", params={"cursor": "garbage!"}), 422, "cursor")


def test_idempotency_key_replays_or_conflicts(api: Api):
    first = api.submit(key="abc")
    again = api.submit(key="abc")
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    assert api.rows() == 1 and len(api.messages()) == 1 and api.stored_jobs() == [first.json()["id"]]
    assert_problem(api.submit(key="abc", spec={**SPEC, "seed": 7}), 409, "Idempotency-Key")
    assert_problem(api.submit(key="abc", model=b"other model"), 409)
    other = api.submit(key="xyz")
    assert other.json()["id"] != first.json()["id"]
    assert api.rows() == 2 and len(api.stored_jobs()) == 2


def test_cancel_queued_running_and_finished(api: Api):
    queued = api.submit().json()["id"]
    r = api.client.post(f"/jobs/{queued}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "canceled"
    assert_problem(api.client.post(f"/jobs/{queued}/cancel"), 409, "canceled")

    running = api.submit().json()["id"]
    api.repo.claim_job(running, "w", 3)
    r = api.client.post(f"/jobs/{running}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "running" and r.json()["cancel_requested"] is True
    assert api.repo.is_cancel_requested(running)

    done = api.submit().json()["id"]
    api.repo.claim_job(done, "w", 3)
    api.repo.finish_job(done, "succeeded", summary={"params_before": 10, "params_after": 5})
    assert_problem(api.client.post(f"/jobs/{done}/cancel"), 409, "succeeded")


def test_model_and_report_are_409_until_ready_then_served(api: Api):
    jid = api.submit().json()["id"]
    for suffix in ("model", "report", "report.html"):
        assert_problem(api.client.get(f"/jobs/{jid}/{suffix}"), 409, "queued")
    api.repo.claim_job(jid, "w", 3)
    api.repo.update_progress(jid, "finetuning", 0.8, {"epoch": 1, "accuracy": 0.97})
    job = api.client.get(f"/jobs/{jid}").json()
    assert (job["status"], job["phase"], job["progress"], job["metrics"]["accuracy"]) == \
        ("running", "finetuning", 0.8, 0.97)
    report = {"version": 1, "method": {"name": "l1"}, "threshold": 0.05, "warnings": ["<b>careful</b>"],
              "stages": {"baseline": {"accuracy": 0.99, "params": 1000}, "finetuned": {"accuracy": 0.98}},
              "model_bytes": {"before": 4000, "after": 2000}, "output_deviation": 0.1,
              "layers": [{"name": "<script>alert(1)</script>", "channels_before": 16, "channels_after": 8,
                          "gamma_before": {"mean": 0.5, "histogram": {"edges": [0, 0.5, 1], "counts": [3, 13]}},
                          "gamma_after": {"mean": 0.2, "below_threshold": 8,
                                          "histogram": {"edges": [0, 0.5, 1], "counts": [10, 6]}}}]}
    api.store.put_stream(jid, "report.json", [json.dumps(report).encode()])
    api.store.put_stream(jid, "result", [b"0123456789" * 100])
    assert_problem(api.client.get(f"/jobs/{jid}/model"), 409, "running")  # a report alone is not success
    assert api.client.get(f"/jobs/{jid}/report").json() == report
    page = api.client.get(f"/jobs/{jid}/report.html")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script>" not in page.text and "&lt;script&gt;" in page.text and "<svg" in page.text
    assert "script-src" not in page.headers["content-security-policy"]
    api.repo.finish_job(jid, "succeeded", summary={"accuracy_before": 0.99, "accuracy_after": 0.98})
    r = api.client.get(f"/jobs/{jid}/model")
    assert r.status_code == 200 and r.content == b"0123456789" * 100
    assert 'filename="slim-net.pt"' in r.headers["content-disposition"]
    part = api.client.get(f"/jobs/{jid}/model", headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == b"0123456789"
    assert api.client.get(f"/jobs/{jid}").json()["summary"]["accuracy_after"] == 0.98


def test_auth_isolates_owners(make_api: Callable[..., Api]):
    api = make_api(SLIM_API_KEYS="alice:k-alice, bob:k-bob")
    r = api.submit()
    assert_problem(r, 401, "Bearer")
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert_problem(api.submit(token="wrong"), 401)
    assert_problem(api.client.get("/jobs"), 401)
    assert api.rows() == 0 and api.stored_jobs() == []
    jid = api.submit(token="k-alice").json()["id"]
    alice, bob = {"Authorization": "Bearer k-alice"}, {"Authorization": "Bearer k-bob"}
    assert api.client.get(f"/jobs/{jid}", headers=alice).status_code == 200
    assert_problem(api.client.get(f"/jobs/{jid}", headers=bob), 404)
    assert_problem(api.client.post(f"/jobs/{jid}/cancel", headers=bob), 404)
    assert_problem(api.client.get(f"/jobs/{jid}/report", headers=bob), 404)
    assert api.client.get("/jobs", headers=bob).json() == {"items": [], "next": None}
    assert [j["id"] for j in api.client.get("/jobs", headers=alice).json()["items"]] == [jid]
    assert api.repo.get_job(jid).owner == "alice"
    # the same Idempotency-Key belongs to each owner separately
    a = api.submit(token="k-alice", key="k").json()["id"]
    b = api.submit(token="k-bob", key="k").json()["id"]
    assert a != b
    assert api.client.get("/healthz").status_code == 200  # probes need no key


def test_bad_specs_are_422_naming_the_field_and_leave_nothing(api: Api):
    body = assert_problem(api.submit(spec={"version": 1, "bogus": 1}), 422, "bogus", "unknown field")
    assert body["type"].endswith("invalid-spec") and body["fields"] == ["bogus"]
    assert_problem(api.submit(spec={"prune": {"amount": 2}}), 422, "prune")
    assert_problem(api.submit(spec={"method": {"name": "magic"}}), 422, "method.name")
    assert_problem(api.submit(spec="{not json"), 422, "JSON")
    assert_problem(api.submit(spec="[1, 2]"), 422, "object")
    assert api.rows() == 0 and api.stored_jobs() == [] and api.messages() == []


def test_missing_empty_or_unexpected_parts_are_422(api: Api):
    assert_problem(api.submit(model=b""), 422, "model is empty")
    assert_problem(api.submit(dataset=b""), 422, "dataset is empty")
    r = api.client.post("/jobs", files={"model": ("m.pt", b"x")}, data={"spec": "{}"})
    assert assert_problem(r, 422, "dataset")["fields"] == ["dataset"]
    r = api.client.post("/jobs", files={"model": ("m.pt", b"x"), "dataset": ("d", b"y"), "extra": ("e", b"z")},
                        data={"spec": "{}"})
    assert_problem(r, 422, "extra")
    assert_problem(api.client.post("/jobs", json={"spec": {}}), 415, "multipart")
    assert_problem(api.client.post("/jobs", content=b"--x\r\nbroken", headers={
        "content-type": "multipart/form-data; boundary=x"}), 400)
    assert api.rows() == 0 and api.stored_jobs() == []


def _multipart(boundary: str, model: bytes, dataset: bytes) -> list[bytes]:
    parts = []
    for name, filename, data in (("spec", None, json.dumps(SPEC).encode()), ("model", "m.pt", model),
                                 ("dataset", "d.npz", dataset)):
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n")
    return [*parts, f"--{boundary}--\r\n".encode()]


def test_oversize_upload_is_413_and_leaves_nothing(make_api: Callable[..., Api]):
    api = make_api(SLIM_MAX_UPLOAD_BYTES="1000")
    # announced by Content-Length: refused before the body is read
    assert_problem(api.submit(model=b"x" * 200_000), 413, "SLIM_MAX_UPLOAD_BYTES")
    # within the announced total but one file over the limit: caught while streaming
    assert_problem(api.submit(model=b"x" * 1001, dataset=b"y" * 10), 413, "model")
    assert_problem(api.submit(model=b"x" * 10, dataset=b"y" * 1001), 413, "dataset")
    # chunked, no Content-Length at all
    chunks = _multipart("bnd", b"x" * 5000, b"y")
    r = api.client.post("/jobs", content=iter(chunks), headers={"content-type": "multipart/form-data; boundary=bnd"})
    assert_problem(r, 413)
    assert api.rows() == 0 and api.stored_jobs() == [] and api.messages() == []
    ok = api.client.post("/jobs", content=iter(_multipart("bnd", b"x" * 1000, b"y")),
                         headers={"content-type": "multipart/form-data; boundary=bnd"})
    assert ok.status_code == 202 and api.rows() == 1


def test_every_error_is_problem_json_and_never_a_traceback(api: Api, monkeypatch: pytest.MonkeyPatch):
    jid = api.submit().json()["id"]
    assert_problem(api.client.delete(f"/jobs/{jid}"), 405)
    assert_problem(api.client.put("/jobs"), 405)

    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(api.client.app.state.jobs, "get", boom)
    body = assert_problem(api.client.get(f"/jobs/{jid}"), 500)
    assert "secret" not in json.dumps(body)


def test_healthz_and_metrics(api: Api):
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ids = [api.submit().json()["id"] for _ in range(3)]
    api.client.post(f"/jobs/{ids[0]}/cancel")
    api.client.get(f"/jobs/{ids[1]}")
    text = api.client.get("/metrics").text
    assert 'slim_jobs{status="queued"} 2.0' in text and 'slim_jobs{status="canceled"} 1.0' in text
    assert 'slim_jobs{status="running"} 0.0' in text and "slim_queue_depth 2.0" in text
    assert 'route="/jobs/{job_id}"' in text and ids[1] not in text
    assert "slim_jobs_submitted_total 3.0" in text
