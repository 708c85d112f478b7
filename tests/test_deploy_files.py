"""Docker has no engine on these machines (FINDINGS), so check what can be checked without one: the
compose file's shape, the image's non-root user, and that the commands both run are real commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SLIM = str(Path(sys.executable).with_name("slim"))


def test_compose_services_and_health():
    c = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    s = c["services"]
    assert {"api", "worker", "redis", "postgres"} <= set(s)
    for name in ("api", "worker", "redis", "postgres"):
        assert "healthcheck" in s[name], name
    gpu = s["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert "gpu" in gpu["capabilities"]
    assert s["worker"]["command"] == ["slim", "worker"]
    assert any(v.startswith("artifacts:") for v in s["api"]["volumes"])
    assert s["api"]["volumes"] == s["worker"]["volumes"]
    env = s["api"]["environment"]
    assert env["SLIM_BROKER_URL"].startswith("redis://") and env["SLIM_DATABASE_URL"].startswith("postgresql://")


def test_dockerfile_non_root_and_cuda_base():
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM nvidia/cuda" in text
    assert "\nUSER slim" in text
    assert "PIP_FIND_LINKS=" in text  # the +cpu torch trap (FINDINGS)


def test_image_command_refuses_public_bind_without_keys(tmp_path):
    """The Dockerfile's CMD binds 0.0.0.0: without SLIM_API_KEYS it must refuse to start."""
    env = {"PATH": "/usr/bin:/bin", "SLIM_DATA_DIR": str(tmp_path), "HOME": str(tmp_path)}
    r = subprocess.run([SLIM, "serve", "--host", "0.0.0.0", "--port", "8999", "--no-worker"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "SLIM_API_KEYS" in r.stderr or "key" in r.stderr.lower()
