"""Shared fixtures: the digits data and a trained digits CNN are built once per session (seconds on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.zoo import digits_npz

    return digits_npz(tmp_path_factory.mktemp("digits") / "digits.npz")


@pytest.fixture(scope="session")
def digits_cnn(digits: Path):
    from tests.zoo import trained_digits_cnn

    return trained_digits_cnn(digits)


def run_slim(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed ``slim`` command as a user would."""
    exe = Path(sys.executable).with_name("slim")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, env=env)


def slim_run_report(model: Path, spec: Path, data: Path, out: Path) -> dict:
    """``slim run`` as a user types it, asserted to succeed; the report it wrote (beside ``out``)."""
    report = out.with_name(out.name + ".report.json")
    r = run_slim("run", str(model), "--spec", str(spec), "--data", str(data), "-o", str(out), "--report", str(report))
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(report.read_text())


import PIL.Image  # noqa: E402

_PIL_OPEN = PIL.Image.open


@pytest.fixture(autouse=True)
def _pil_open_unpatched() -> None:
    """Importing ultralytics (the YOLO tests) monkey-patches ``PIL.Image.open`` process-wide to retry
    unidentified images through pi-heif, which is not installed: an unreadable image then raises
    ModuleNotFoundError instead of PIL's error. slim's workers never import ultralytics; keep the tests
    that read images seeing the real Pillow."""
    PIL.Image.open = _PIL_OPEN


def write_spec(path: Path, **fields: object) -> Path:
    path.write_text(json.dumps(fields))
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The full zoo matrix (marker ``zoo``, hours on 2 cores) runs only when a ``-m`` expression names it."""
    if "zoo" in (config.option.markexpr or ""):
        return
    keep = [it for it in items if it.get_closest_marker("zoo") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[it for it in items if it.get_closest_marker("zoo") is not None])
        items[:] = keep
