"""Schemathesis (its CLI; its pytest plugin does not load under pytest 9) with ``--checks all`` against a
running API's own OpenAPI, without and with API keys: generated requests to every operation, stateful
sequences included, get no 5xx, answers match the documented status codes, headers, content types and
schemas, schema-valid requests are accepted and schema-violating ones refused, auth is what the document
says. Examples are bounded and the seed fixed so it stays fast; plus direct checks of what it relies on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import Settings
from tests.service_harness import Service

KEY = "k-schemathesis-1"


@pytest.mark.parametrize("keys", [False, True], ids=["no-keys", "keys"])
def test_schemathesis_all_checks_clean(tmp_path: Path, keys: bool):
    env = {"SLIM_MAX_UPLOAD_BYTES": "65536", **({"SLIM_API_KEYS": f"alice:{KEY}"} if keys else {})}
    svc = Service(tmp_path, env, embedded=False)
    try:
        svc.start_api()
        exe = str(Path(sys.executable).with_name("schemathesis"))
        # every check but positive_data_acceptance: JSON Schema cannot say that input_shapes must share their
        # batch size, so a generated [[1, 2], [3, 4]] is "valid" yet rightly refused (the one rule left out)
        args = [exe, "run", f"{svc.url}/openapi.json", "--checks", "all", "--exclude-checks",
                "positive_data_acceptance", "--max-examples", "10", "--seed", "1"]
        if keys:
            args += ["-H", f"Authorization: Bearer {KEY}"]
        r = subprocess.run(args, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-6000:]
        summary = r.stdout.split("SUMMARY")[-1]
        assert " passed" in summary and "failed" not in summary and "Error" not in summary
    finally:
        svc.close()


def _doc(tmp_path: Path, **env: str) -> dict:
    with TestClient(create_app(Settings.from_env({"SLIM_DATA_DIR": str(tmp_path), **env}))) as client:
        return client.get("/openapi.json").json()


def test_security_is_declared_only_when_keys_are_configured(tmp_path: Path):
    open_doc = _doc(tmp_path / "a")
    ops = [op for path in open_doc["paths"].values() for op in path.values()]
    assert not any("security" in op or "401" in op["responses"] for op in ops)
    assert "securitySchemes" not in open_doc["components"]
    keyed = _doc(tmp_path / "b", SLIM_API_KEYS=f"alice:{KEY}")
    create = keyed["paths"]["/jobs"]["post"]
    assert create["security"] and "401" in create["responses"] and keyed["components"]["securitySchemes"]


def test_the_form_and_the_cursor_are_declared_exactly(tmp_path: Path):
    doc = _doc(tmp_path)
    form = doc["paths"]["/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["additionalProperties"] is False
    assert set(form["properties"]) == {"model", "spec", "dataset", "dataset_id", "callback_url"}
    assert form["required"] == ["model", "spec"]
    assert form["oneOf"] == [{"required": ["dataset"]}, {"required": ["dataset_id"]}]  # a file or an id, not both
    assert "repeat this part" in form["properties"]["model"]["description"]
    params = {p["name"]: p for p in doc["paths"]["/jobs"]["get"]["parameters"]}
    cursor = params["cursor"]["schema"]  # a pattern beside anyOf [string, null] constrains the string
    assert "opaque" in params["cursor"]["description"] and cursor["pattern"] == r"^([0-9]{1,16}\.[0-9a-f]{32})?$"
    assert "422" in doc["paths"]["/jobs"]["get"]["responses"]


def test_options_and_wrong_methods_name_every_allowed_method(tmp_path: Path):
    with TestClient(create_app(Settings.from_env({"SLIM_DATA_DIR": str(tmp_path)}))) as client:
        r = client.options("/jobs")
        assert r.status_code == 405 and set(r.headers["allow"].split(", ")) >= {"GET", "POST"}
        r = client.delete("/jobs/abc")
        assert r.status_code == 405 and "GET" in r.headers["allow"] and "POST" not in r.headers["allow"]


def test_every_cursor_of_the_documented_shape_is_a_page(tmp_path: Path):
    with TestClient(create_app(Settings.from_env({"SLIM_DATA_DIR": str(tmp_path)}))) as client:
        assert client.get("/jobs", params={"cursor": "9" * 16 + "." + "f" * 32}).status_code == 200
        assert client.get("/jobs", params={"cursor": "0." + "0" * 32}).json() == {"items": [], "next": None}
        r = client.get("/jobs", params={"cursor": "not-a-cursor"})
        assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
