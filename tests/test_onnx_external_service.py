"""ONNX with external data through the real service (``slim serve``, embedded default) and ``slim submit``:
the model with its data file as repeated ``model`` parts or as one zip bundle, the result as a zip bundle,
and unsafe uploads refused as problems (422 at once for what the API can see, a failed job with a 422
problem for what only the worker, which reads the model, can) without losing what is already stored."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from api.client import SlimClient
from tests.conftest import run_slim, write_spec
from tests.service_harness import Service
from tests.test_onnx_external import SPEC, _relocate, _zip, default_export, locations

pytestmark = pytest.mark.heavy


def _unzip(blob: bytes, dest: Path) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        z.extractall(dest)
        return sorted(z.namelist())


def _post(svc: Service, parts: list[tuple[str, bytes]], digits: Path) -> httpx.Response:
    files = [("model", p) for p in parts] + [("dataset", ("digits.npz", digits.read_bytes()))]
    return httpx.post(f"{svc.url}/jobs", files=files, data={"spec": json.dumps(SPEC)}, timeout=60)


def test_external_data_through_the_service(tmp_path, digits):
    model = default_export(tmp_path / "export")
    data = Path(f"{model}.data")
    svc = Service(tmp_path, {}, embedded=True)
    try:
        svc.start_api()
        # slim submit finds model.onnx.data beside model.onnx and sends both; the result is one zip bundle
        out = tmp_path / "slim-model.zip"
        r = run_slim("submit", str(model), "--spec", str(write_spec(tmp_path / "spec.json", **SPEC)), "--data",
                     str(digits), "--url", svc.url, "-o", str(out))
        assert r.returncode == 0, (r.stderr[-2000:], svc.logs())
        job = json.loads(r.stdout.strip().splitlines()[-1])
        assert job["summary"]["filename"] == "slim-model.zip"
        assert _unzip(out.read_bytes(), tmp_path / "first") == ["model.onnx", "model.onnx.data"]
        assert locations(tmp_path / "first" / "model.onnx") == {"model.onnx.data"}
        sess = ort.InferenceSession(str(tmp_path / "first" / "model.onnx"), providers=["CPUExecutionProvider"])
        assert sess.run(None, {"x": np.zeros((1, 1, 8, 8), np.float32)})[0].shape == (1, 10)
        first = out.read_bytes()

        with SlimClient(svc.url) as c:
            # a zip bundle upload gives a zip bundle back, named after the upload
            bundle = _zip(tmp_path / "mine.zip", {model.name: model.read_bytes(), data.name: data.read_bytes()})
            r2 = _post(svc, [("mine.zip", bundle.read_bytes())], digits)
            assert r2.status_code == 202, r2.text
            done = c.wait(r2.json()["id"], poll=0.5, timeout=300, events=False)
            assert done["status"] == "succeeded", (done, svc.logs())
            dl = httpx.get(f"{svc.url}/jobs/{done['id']}/model", timeout=60)
            assert 'filename="slim-mine.zip"' in dl.headers["content-disposition"]
            assert _unzip(dl.content, tmp_path / "second") == ["model.onnx", "model.onnx.data"]

            # what the API can check without reading the model: a 422 problem at once, nothing stored
            listed = len(c.http.get("/jobs").json()["items"])
            for parts, needle in [([("a.onnx", b"\x08\x07"), ("b.onnx", b"\x08\x07")], "with 2 .onnx among them"),
                                  ([("model.onnx", model.read_bytes()), ("model.onnx", b"xx")], "repeated names"),
                                  ([("model.onnx", model.read_bytes()), (".data", b"xx")], "not starting with .")]:
                bad = _post(svc, parts, digits)
                assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
                assert needle in bad.json()["detail"] and "\n" not in bad.json()["detail"], bad.json()
            assert len(c.http.get("/jobs").json()["items"]) == listed

            # what only the worker can see: the job fails with a one-line 422 problem naming the cause
            evil = _relocate(model, tmp_path / "evil" / "model.onnx", "../model.onnx.data")
            cases = [
                ([("model.onnx", model.read_bytes()), ("model.onnx.data", data.read_bytes()[:4096])],
                 "truncated upload"),
                ([("model.onnx", evil.read_bytes()), ("model.onnx.data", data.read_bytes())], "has a folder in it"),
                ([("evil.zip", _zip(tmp_path / "evil.zip", {"model.onnx": model.read_bytes()},
                                    link="model.onnx.data").read_bytes())], "symlink"),
                ([("up.zip", _zip(tmp_path / "up.zip", {"model.onnx": model.read_bytes(),
                                                        "../../model.onnx.data": data.read_bytes()}).read_bytes())],
                 "escapes the archive root"),
            ]
            for parts, needle in cases:
                sub = _post(svc, parts, digits)
                assert sub.status_code == 202, sub.text
                failed = c.wait(sub.json()["id"], poll=0.5, timeout=300, events=False)
                err = failed["error"]
                assert failed["status"] == "failed" and err["status"] == 422, failed
                assert needle in err["detail"] and "\n" not in err["detail"], err
                assert httpx.get(f"{svc.url}/jobs/{failed['id']}/model").status_code == 409
            # nothing already stored was lost: the first result downloads byte for byte
            assert c.http.get(f"/jobs/{job['id']}/model").content == first
    finally:
        svc.close()
