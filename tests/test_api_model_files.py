"""A model sent as several files (an ONNX model and its external data): the ``model`` field repeated, as
stored by the API without a worker. What the API can judge from names and sizes alone is a problem at once;
the model's content is left to the worker (tests/test_onnx_external_service.py)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from tests.test_api_jobs import SPEC, Api, assert_problem
from tests.test_api_jobs import api as api  # noqa: F401  (fixtures)
from tests.test_api_jobs import database_url as database_url  # noqa: F401
from tests.test_api_jobs import make_api as make_api  # noqa: F401


def _post(api: Api, parts: list[tuple[str, bytes]]):
    files = [("model", p) for p in parts] + [("dataset", ("digits.npz", b"D" * 10))]
    return api.client.post("/jobs", files=files, data={"spec": json.dumps(SPEC)})


def test_repeated_model_parts_are_stored_under_their_names(api: Api):
    r = _post(api, [("model.onnx", b"\x08" * 50), ("model.onnx.data", b"W" * 300)])
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["model_name"] == "model.onnx"
    digest = hashlib.sha256(json.dumps([["model.onnx", hashlib.sha256(b"\x08" * 50).hexdigest()],
                                        ["model.onnx.data", hashlib.sha256(b"W" * 300).hexdigest()]]).encode())
    assert job["model_sha256"] == digest.hexdigest()
    with api.store.open_read(job["id"], "model-files.json") as f:
        manifest = json.load(f)
    assert manifest == [{"name": "model.onnx", "artifact": "model"},
                        {"name": "model.onnx.data", "artifact": "model-files/1"}]
    with api.store.open_read(job["id"], "model-files/1") as f:
        assert f.read() == b"W" * 300
    single = _post(api, [("net.onnx", b"\x08" * 50)]).json()  # one part: stored as before, no manifest
    assert not api.store.exists(single["id"], "model-files.json")


def test_model_parts_the_api_can_judge_are_refused_and_leave_nothing(make_api: Callable[..., Api]):
    api = make_api(SLIM_MAX_UPLOAD_BYTES="1000")
    before = api.stored_jobs()
    for parts, status, needle in [
        ([("a.onnx", b"x"), ("b.onnx", b"y")], 422, "with 2 .onnx among them"),
        ([("w.data", b"x"), ("v.data", b"y")], 422, "with 0 .onnx among them"),
        ([("m.onnx", b"x"), ("m.onnx", b"y")], 422, "repeated names"),
        ([("m.onnx", b"x"), ("-rf", b"y")], 422, "not starting with . or -"),
        ([("m.onnx", b"x"), ("m.onnx.data", b"")], 422, "is empty"),
        ([("m.onnx", b"x" * 600), ("m.onnx.data", b"y" * 600)], 413, "together larger than the limit of 1000"),
        ([("m.onnx", b"x")] * 65, 422, "more than 64 times"),
    ]:
        body = assert_problem(_post(api, parts), status, needle)
        assert "\n" not in body["detail"]
    assert api.stored_jobs() == before and api.rows() == 0
