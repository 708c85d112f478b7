"""Datasets as a resource, over real HTTP: ``slim serve`` with a separate ``slim worker`` (so a job can be held in
the queue on purpose), on the embedded SQLite and on PostgreSQL.

A dataset registered once serves two jobs that upload nothing and are read from the worker's content-keyed cache;
the same bytes twice are one record and one stored copy; owners see only their own; a dataset in use cannot be
deleted; a URL outside the operator's prefixes is refused before anything is requested; a ``file://`` URL runs a
job end to end, and one whose data changed after registration fails the job saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from api.client import SlimAPIError, SlimClient
from tests.conftest import run_slim
from tests.service_harness import Service, free_port, fresh_postgres_db, need_server, wait_for
from tests.test_service_e2e import QUICK, ts_model  # noqa: F401  (the fixture)

ALICE, BOB = "k-alice-datasets", "k-bob-datasets"


class Env:
    """One running service plus the folders the tests look into."""

    def __init__(self, svc: Service, root: Path) -> None:
        self.svc, self.url = svc, svc.url
        self.allowed, self.outside = root / "allowed", root / "outside"
        self.cache = root / "cache" / "datasets"
        self.artifacts = root / "var" / "artifacts"

    def worker(self) -> None:
        if not self.svc.workers:
            self.svc.start_worker()

    def client(self, key: str = ALICE) -> SlimClient:
        return SlimClient(self.url, key)

    def stored(self) -> list[str]:
        """The dataset bytes in artifact storage (content addresses), staging excluded."""
        folder = self.artifacts / "datasets"
        return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.exists() else []


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.server)])
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp(f"datasets-{request.param}")
    extra: dict[str, str] = {}
    drop = None
    if request.param == "postgresql":
        need_server("PostgreSQL", 5432)
        extra["SLIM_DATABASE_URL"], drop = fresh_postgres_db()
    (root / "allowed").mkdir()
    (root / "outside").mkdir()
    svc = Service(root, {"SLIM_API_KEYS": f"alice:{ALICE},bob:{BOB}", "SLIM_CACHE_DIR": str(root / "cache"),
                         "SLIM_DATASET_URL_PREFIXES": f"file://{root / 'allowed'}/", **extra}, embedded=False)
    try:
        svc.start_api()
        yield Env(svc, root)
    finally:
        svc.close()
        if drop is not None:
            drop()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _problem(r: httpx.Response, status: int, kind: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["type"] == f"urn:slim:problem:{kind}", body
    return body


def test_one_registered_dataset_serves_two_jobs_that_upload_no_data(env: Env, ts_model, digits):  # noqa: F811
    sent: list[httpx.Request] = []
    with env.client() as c:
        ds = c.add_dataset(digits, name="digits")
        assert (ds["kind"], ds["name"], ds["filename"], ds["url"]) == ("upload", "digits", "digits.npz", None)
        assert ds["sha256"] == _sha(digits) and ds["bytes"] == digits.stat().st_size and ds["jobs_using"] == 0
        assert env.stored() == [ds["sha256"]]
        c.http.event_hooks["request"].append(sent.append)
        first = c.submit(ts_model, QUICK, dataset_id=ds["id"])
        assert first["status"] == "queued" and first["dataset_id"] == ds["id"]
        assert first["dataset_sha256"] == ds["sha256"] and first["dataset_name"] == "digits.npz"
        # no worker yet, so the job is certainly queued: the dataset cannot be deleted under it
        r = httpx.delete(f"{env.url}/datasets/{ds['id']}", headers={"Authorization": f"Bearer {ALICE}"})
        assert first["id"] in _problem(r, 409, "dataset-in-use")["detail"]
        assert c.dataset(ds["id"])["jobs_active"] == 1
        env.worker()
        one = c.wait(first["id"], poll=0.3, timeout=600)
        second = c.wait(c.submit(ts_model, QUICK, dataset_id=ds["id"])["id"], poll=0.3, timeout=600)
        assert one["status"] == second["status"] == "succeeded", (one, second, env.svc.logs())
        # what went over the wire: the model and the spec, never the data
        posts = [r for r in sent if r.method == "POST" and r.url.path == "/jobs"]
        assert len(posts) == 2
        for req in posts:  # the model and a few form fields; the data alone would be another 475 kB
            assert ts_model.stat().st_size < int(req.headers["content-length"]) < ts_model.stat().st_size + 4096
        # storage: one copy of the bytes, none in either job's folder; the worker cache: one copy, by content
        assert env.stored() == [ds["sha256"]]
        for job in (one, second):
            assert not (env.artifacts / "jobs" / job["id"] / "dataset").exists()
        cached = env.cache / ds["sha256"]
        assert [p.name for p in cached.iterdir()] == ["digits.npz"]
        assert (cached / "digits.npz").read_bytes() == digits.read_bytes()
        used = c.dataset(ds["id"])
        assert (used["jobs_using"], used["jobs_active"]) == (2, 0)
        # nothing uses it now: deleting removes the record and the stored bytes
        c.delete_dataset(ds["id"])
        with pytest.raises(SlimAPIError) as e:
            c.dataset(ds["id"])
        assert e.value.status == 404
        assert env.stored() == []
        with pytest.raises(SlimAPIError) as e:
            c.submit(ts_model, QUICK, dataset_id=ds["id"])
        assert e.value.status == 422 and e.value.problem["type"].endswith("unknown-dataset")


def test_the_same_bytes_twice_are_one_dataset_and_one_stored_copy(env: Env, tmp_path: Path):
    data = tmp_path / "blob.npz"
    data.write_bytes(os.urandom(50_000))
    auth = {"Authorization": f"Bearer {ALICE}"}

    def post(name: str) -> httpx.Response:
        return httpx.post(f"{env.url}/datasets", headers=auth, files={"dataset": (name, data.read_bytes())})

    r = httpx.post(f"{env.url}/datasets", headers=auth, params={"name": "bad\x01name"},
                   files={"dataset": ("blob.npz", data.read_bytes())})
    assert _problem(r, 422, "invalid-request")["errors"][0]["field"] == "query.name"
    first, again = post("blob.npz"), post("renamed.npz")
    assert first.status_code == again.status_code == 201, (first.text, again.text)
    assert "deduplicated" not in first.headers and again.headers["deduplicated"] == "true"
    assert again.json() == first.json() and again.headers["location"] == f"/datasets/{first.json()['id']}"
    sha = first.json()["sha256"]
    assert sha == _sha(data) and env.stored().count(sha) == 1
    # another owner's record of the same bytes is theirs, the stored copy is still one
    with env.client(BOB) as bob:
        theirs = bob.add_dataset(data)
        assert theirs["id"] != first.json()["id"] and env.stored().count(sha) == 1
        bob.delete_dataset(theirs["id"])
    assert env.stored().count(sha) == 1, "alice's record still names the bytes"
    assert httpx.delete(f"{env.url}/datasets/{first.json()['id']}", headers=auth).status_code == 204
    assert sha not in env.stored()


def test_owners_see_and_use_only_their_own_datasets(env: Env, ts_model, tmp_path: Path):  # noqa: F811
    data = tmp_path / "mine.npz"
    data.write_bytes(os.urandom(1000))
    with env.client(ALICE) as alice, env.client(BOB) as bob:
        ds = alice.add_dataset(data)
        assert ds["id"] in [d["id"] for d in alice.datasets()]
        assert ds["id"] not in [d["id"] for d in bob.datasets()]
        for call in (lambda: bob.dataset(ds["id"]), lambda: bob.delete_dataset(ds["id"])):
            with pytest.raises(SlimAPIError) as e:
                call()
            assert e.value.status == 404
        with pytest.raises(SlimAPIError) as e:
            bob.submit(ts_model, QUICK, dataset_id=ds["id"])
        assert e.value.status == 422 and e.value.problem["fields"] == ["dataset_id"]
        assert alice.dataset(ds["id"])["jobs_using"] == 0  # bob's attempt made no job
        alice.delete_dataset(ds["id"])
    _problem(httpx.get(f"{env.url}/datasets"), 401, "unauthorized")


def test_a_job_names_its_data_once(env: Env, ts_model, digits, tmp_path: Path):  # noqa: F811
    auth = {"Authorization": f"Bearer {ALICE}"}
    form = {"model": ("m.pt", ts_model.read_bytes()), "dataset": ("d.npz", digits.read_bytes())}
    r = httpx.post(f"{env.url}/jobs", headers=auth, files=form, data={"spec": json.dumps(QUICK),
                                                                         "dataset_id": "0" * 32})
    assert r.status_code == 422 and r.json()["type"].endswith(("invalid-form", "unknown-dataset")), r.text
    ds = httpx.post(f"{env.url}/datasets", headers=auth, files={"dataset": ("x.npz", b"x" * 64)}).json()
    r = httpx.post(f"{env.url}/jobs", headers=auth, files=form, data={"spec": json.dumps(QUICK),
                                                                         "dataset_id": ds["id"]})
    assert "not both" in _problem(r, 422, "invalid-form")["detail"]
    r = httpx.post(f"{env.url}/jobs", headers=auth, files={"model": form["model"]}, data={"spec": json.dumps(QUICK)})
    assert "dataset_id" in _problem(r, 422, "invalid-form")["detail"]
    assert httpx.delete(f"{env.url}/datasets/{ds['id']}", headers=auth).status_code == 204


class Recorder:
    """A real HTTP server on loopback that records every request it gets."""

    def __init__(self) -> None:
        self.got: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.got.append(self.path)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"data")

            do_HEAD = do_GET  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_urls_outside_the_allowed_prefixes_are_refused_before_any_request(env: Env, digits):
    recorder = Recorder()
    shutil.copy(digits, env.outside / "digits.npz")
    (env.allowed / "escape").symlink_to(env.outside, target_is_directory=True)
    (env.allowed / "escape.npz").symlink_to(env.outside / "digits.npz")
    allowed = f"file://{env.allowed}"
    with env.client() as c:
        before = c.datasets()
    try:
        refused = [f"{recorder.url}/digits.npz", f"file://{env.outside}/digits.npz",
                   f"{allowed}/../outside/digits.npz", f"{allowed}/%2e%2e/outside/digits.npz",
                   f"{allowed}/escape/digits.npz", f"{allowed}/escape.npz", f"{allowed}2/digits.npz",
                   f"file://localhost{env.allowed}/digits.npz", f"{allowed}/digits.npz?x=1",
                   f"simplecache::{allowed}/digits.npz", "s3://bucket/digits.npz"]
        for url in refused:
            r = httpx.post(f"{env.url}/datasets", json={"url": url}, headers={"Authorization": f"Bearer {ALICE}"})
            assert _problem(r, 422, "dataset-url-not-allowed")["fields"] == ["url"], url
        # a folder below the prefix with a link leading out is refused whole: its listing would leave the prefix
        r = httpx.post(f"{env.url}/datasets", json={"url": allowed}, headers={"Authorization": f"Bearer {ALICE}"})
        assert "symbolic link" in _problem(r, 422, "dataset-url-not-allowed")["detail"]
        assert recorder.got == [], "a refused URL was requested"
        with env.client() as c:
            assert c.datasets() == before
    finally:
        recorder.close()
        (env.allowed / "escape").unlink()
        (env.allowed / "escape.npz").unlink()


def test_a_file_url_dataset_runs_a_job_and_changed_data_fails_one(env: Env, ts_model, digits):  # noqa: F811
    env.worker()
    shutil.copy(digits, env.allowed / "digits.npz")
    with env.client() as c:
        ds = c.add_dataset(url=f"file://{env.allowed}/digits.npz")
        assert (ds["kind"], ds["filename"], ds["files"]) == ("url", "digits.npz", 1)
        assert ds["url"] == f"file://{env.allowed}/digits.npz" and ds["bytes"] == digits.stat().st_size
        assert c.add_dataset(url=f"file://{env.allowed}/digits.npz/")["id"] == ds["id"]  # the same URL, unchanged
        job = c.wait(c.submit(ts_model, QUICK, dataset_id=ds["id"])["id"], poll=0.3, timeout=600)
        assert job["status"] == "succeeded", (job, env.svc.logs())
        assert (env.cache / ds["sha256"] / "digits.npz").read_bytes() == digits.read_bytes()
        # the file changes after registration: the job asked for the data as registered, so it fails, saying so
        shutil.copy(digits, env.allowed / "later.npz")
        later = c.add_dataset(url=f"file://{env.allowed}/later.npz")
        with open(env.allowed / "later.npz", "ab") as f:
            f.write(b"\0" * 10)
        failed = c.wait(c.submit(ts_model, QUICK, dataset_id=later["id"])["id"], poll=0.3, timeout=600)
        assert failed["status"] == "failed" and failed["error"]["type"].endswith("dataset-changed"), failed
        assert "register the URL again" in failed["error"]["detail"]
        for d in (ds, later):
            c.delete_dataset(d["id"])


def _image_folder(root: Path, digits: Path) -> Path:
    """The digits as an ImageFolder tree of 8x8 grayscale PNGs: train/<class>/<i>.png and val/<class>/<i>.png."""
    d = np.load(digits)
    for split, xs, ys, per_class in (("train", d["x"], d["y"], 40), ("val", d["x_val"], d["y_val"], 8)):
        counts: dict[int, int] = {}
        for x, y in zip(xs, ys, strict=True):
            if counts.get(int(y), 0) >= per_class:
                continue
            counts[int(y)] = counts.get(int(y), 0) + 1
            folder = root / split / str(int(y))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[0] * 255).astype("uint8"), "L").save(folder / f"{counts[int(y)]}.png")
    return root


def test_a_folder_url_is_mirrored_into_the_cache_and_trains(env: Env, ts_model, digits):  # noqa: F811
    env.worker()
    tree = _image_folder(env.allowed / "digits-images", digits)
    files = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file())
    with env.client() as c:
        ds = c.add_dataset(url=f"file://{tree}/")
        assert (ds["kind"], ds["filename"], ds["files"]) == ("url", "digits-images", len(files)) and ds["files"] > 400
        job = c.wait(c.submit(ts_model, QUICK, dataset_id=ds["id"])["id"], poll=0.3, timeout=600)
        mirror = env.cache / ds["sha256"] / "digits-images"
        assert sorted(p.relative_to(mirror).as_posix() for p in mirror.rglob("*") if p.is_file()) == files
        assert all((mirror / f).read_bytes() == (tree / f).read_bytes() for f in files)
        assert job["status"] == "succeeded", (job, env.svc.logs())
        c.delete_dataset(ds["id"])


def test_the_command_line_registers_lists_submits_and_deletes(env: Env, ts_model, tmp_path: Path):  # noqa: F811
    data = tmp_path / "cli.npz"
    data.write_bytes(os.urandom(2000))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(QUICK))
    opts = ["--url", env.url, "--api-key", ALICE]
    r = run_slim("datasets", "add", str(data), "--name", "from the cli", *opts)
    assert r.returncode == 0, r.stderr
    ds = json.loads(r.stdout)
    assert ds["name"] == "from the cli" and ds["sha256"] == _sha(data)
    r = run_slim("datasets", "ls", *opts)
    assert r.returncode == 0 and ds["id"] in r.stdout
    for bad in (["datasets", "add", str(tmp_path / "missing.npz")], ["datasets", "rm", "0" * 32],
                ["submit", str(ts_model), "--spec", str(spec), "--data", str(data), "--dataset-id", ds["id"]],
                ["submit", str(ts_model), "--spec", str(spec)], ["datasets", "add", "s3://bucket/x.npz"]):
        r = run_slim(*bad, *opts)
        assert r.returncode == 2 and r.stderr.startswith("slim: error:") and len(r.stderr.splitlines()) == 1, r.stderr
    r = run_slim("submit", str(ts_model), "--spec", str(spec), "--dataset-id", ds["id"], *opts)
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert job["dataset_id"] == ds["id"]
    assert run_slim("cancel", job["id"], *opts).returncode in (0, 2)  # 2: it had already finished
    with env.client() as c:
        wait_for(lambda: c.get(job["id"])["status"] in ("succeeded", "failed", "canceled"), 600, "the job to end")
    r = run_slim("datasets", "rm", ds["id"], *opts)
    assert r.returncode == 0, r.stderr
    assert ds["id"] not in run_slim("datasets", "ls", *opts).stdout


def test_an_s3_prefix_runs_a_job_through_s3fs(tmp_path: Path, ts_model, digits):  # noqa: F811
    """The same over S3 (moto's server on loopback, s3fs as the operator installs it): a prefix allows one file
    and refuses a key beside it, a job reads the object through the cache, a changed object is a new dataset."""
    pytest.importorskip("s3fs", reason="s3fs is not installed (an optional dev extra: pip install s3fs)")
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (an optional dev extra)")
    import s3fs

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_ENDPOINT_URL": endpoint}
    svc = Service(tmp_path, {**creds, "SLIM_DATASET_URL_PREFIXES": "s3://slim-data/sets/",
                             "SLIM_CACHE_DIR": str(tmp_path / "cache")}, embedded=True)
    try:
        bucket = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint)
        bucket.mkdir("slim-data")
        bucket.put(str(digits), "slim-data/sets/digits.npz")
        bucket.put(str(digits), "slim-data/private/digits.npz")
        svc.start_api()
        with SlimClient(svc.url) as c:
            ds = c.add_dataset(url="s3://slim-data/sets/digits.npz")
            assert (ds["kind"], ds["files"], ds["bytes"]) == ("url", 1, digits.stat().st_size)
            folder = c.add_dataset(url="s3://slim-data/sets/")
            assert folder["files"] == 1 and folder["sha256"] != ds["sha256"]
            with pytest.raises(SlimAPIError) as e:
                c.add_dataset(url="s3://slim-data/private/digits.npz")
            assert e.value.status == 422 and e.value.problem["type"].endswith("dataset-url-not-allowed")
            job = c.wait(c.submit(ts_model, QUICK, dataset_id=ds["id"])["id"], poll=0.3, timeout=600)
            assert job["status"] == "succeeded", (job, svc.logs())
            cached = tmp_path / "cache" / "datasets" / ds["sha256"] / "digits.npz"
            assert cached.read_bytes() == digits.read_bytes()
            bucket.pipe("slim-data/sets/digits.npz", digits.read_bytes()[:-1] + b"!")  # same size, new ETag
            assert c.add_dataset(url="s3://slim-data/sets/digits.npz")["id"] != ds["id"]
    finally:
        svc.close()
        server.stop()
