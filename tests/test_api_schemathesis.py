"""Schemathesis (its CLI; its pytest plugin does not load under pytest 9) against a running API's own
OpenAPI: generated requests to every operation, stateful sequences included, get no 5xx and answers that
match the documented status codes, content types and schemas (problem+json included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.service_harness import Service

CHECKS = "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance"


def test_schemathesis_finds_no_5xx_or_schema_violation(tmp_path):
    svc = Service(tmp_path, {"SLIM_MAX_UPLOAD_BYTES": "65536"}, embedded=False)
    try:
        svc.start_api()
        exe = str(Path(sys.executable).with_name("schemathesis"))
        r = subprocess.run([exe, "run", f"{svc.url}/openapi.json", "--checks", CHECKS, "--max-examples", "15",
                            "--seed", "1"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-4000:]
        assert " passed" in r.stdout and "failed" not in r.stdout.split("SUMMARY")[-1]
    finally:
        svc.close()
