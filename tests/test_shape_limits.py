"""Declared input shapes are checked before anything is allocated: too large, or disagreeing with the
data, is a one-line ``slim run`` error and a 4xx problem in the service — never a 500 or a 1.6 GB tensor."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper

from api.app import create_app
from api.settings import Settings
from slimcore.shape_limits import peek_npz_sample_shape
from tests.conftest import run_slim, write_spec

HUGE = [1, 1, 2147483648, 2147483648]
LARGE = [1, 1, 20000, 20000]  # 4e8 elements: 1.6 GB as float32


def relu_onnx(path: Path, dims: list[int | str]) -> Path:
    """A one-node model whose input declares ``dims``; its weights are nothing, its shape is the point."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def small_npz(path: Path, sample: tuple[int, ...] = (1, 8, 8)) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.standard_normal((20, *sample)).astype(np.float32), y=rng.integers(0, 2, 20))
    return path


_MEASURE = """import resource, subprocess, sys
rc = subprocess.run(sys.argv[2:]).returncode
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(rc)"""


def run_slim_measured(*args: str) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``slim`` under a small fresh Python that reports its one child's peak RSS in KiB. Measured from
    this pytest worker, the figure is wrong twice over: ``RUSAGE_CHILDREN`` is the maximum over every child
    the worker ever reaped (CI reaped an earlier server, 7.6 GB), and Linux carries the forking process's
    high-water mark into the child across exec (the multi-GB worker again). The wrapper is a few MB."""
    exe = Path(sys.executable).with_name("slim")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "maxrss"
        r = subprocess.run([sys.executable, "-c", _MEASURE, str(out), str(exe), *args], capture_output=True,
                           text=True, timeout=600, env=env)
        return r, int(out.read_text())


def _one_line_error(r) -> str:
    assert r.returncode != 0
    lines = [s for s in r.stderr.strip().splitlines() if s.strip()]
    errors = [s for s in lines if s.startswith("slim: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr[-2000:]  # progress lines, then one reason
    assert "Traceback" not in r.stderr
    return errors[0]


@pytest.mark.parametrize("dims", [HUGE, LARGE], ids=["2^31-sides", "20000-sides"])
def test_slim_run_refuses_a_huge_declared_input_before_allocating(tmp_path: Path, dims: list[int]):
    model = relu_onnx(tmp_path / "m.onnx", dims)
    r, peak_kib = run_slim_measured("run", str(model), "--spec", str(write_spec(tmp_path / "s.json")), "--data",
                                    str(small_npz(tmp_path / "d.npz")), "-o", str(tmp_path / "out.onnx"))
    line = _one_line_error(r)
    n = dims[2] * dims[3]
    assert f"the ONNX model's declared input {dims}" in line and f"{n} elements" in line
    assert "268435456 (SLIM_MAX_INPUT_ELEMENTS)" in line
    # a 20000² float32 example alone would be 1.6 GB; the whole run stayed far below
    assert 0 < peak_kib < 1_200_000


def test_the_limit_is_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SLIM_MAX_INPUT_ELEMENTS", "32")
    model = relu_onnx(tmp_path / "m.onnx", [1, 1, 8, 8])
    r = run_slim("run", str(model), "--spec", str(write_spec(tmp_path / "s.json")), "--data",
                 str(small_npz(tmp_path / "d.npz")), "-o", str(tmp_path / "out.onnx"))
    assert "64 elements (1 x 1 x 8 x 8), above the limit of 32 (SLIM_MAX_INPUT_ELEMENTS)" in _one_line_error(r)


def test_slim_run_refuses_a_declared_input_that_disagrees_with_the_data(tmp_path: Path):
    model = relu_onnx(tmp_path / "m.onnx", [1, 3, 16, 16])
    r = run_slim("run", str(model), "--spec", str(write_spec(tmp_path / "s.json")), "--data",
                 str(small_npz(tmp_path / "d.npz")), "-o", str(tmp_path / "out.onnx"))
    line = _one_line_error(r)
    assert "data samples have shape (1, 8, 8) but the model takes (3, 16, 16)" in line
    assert "the ONNX model's declared input [1, 3, 16, 16]" in line  # said by the check before the import


def test_a_huge_input_shape_for_a_dynamic_model_is_a_one_line_error(tmp_path: Path):
    r = run_slim("run", str(relu_onnx(tmp_path / "m.onnx", ["N", 3, "H", "W"])), "--spec",
                 str(write_spec(tmp_path / "s.json", input_shape=[1, 3, 60000, 60000])), "--data",
                 str(small_npz(tmp_path / "d.npz")), "-o", str(tmp_path / "out.onnx"))
    assert "input_shape [1, 3, 60000, 60000] has 10800000000 elements" in _one_line_error(r)


def test_peek_reads_only_the_header(tmp_path: Path):
    assert peek_npz_sample_shape(small_npz(tmp_path / "d.npz", (3, 5, 7))) == (3, 5, 7)
    np.savez(tmp_path / "multi.npz", x0=np.zeros((2, 3)))
    assert peek_npz_sample_shape(tmp_path / "multi.npz") is None
    assert peek_npz_sample_shape(tmp_path / "nope.tar") is None


def test_service_job_with_a_huge_declared_input_fails_with_a_422_problem(tmp_path: Path):
    """Over HTTP with the real worker code: the job ends ``failed`` with a 4xx problem naming the numbers."""
    from worker.runner import run
    from worker.store import JobStore

    settings = Settings.from_env({"SLIM_DATA_DIR": str(tmp_path / "svc")})
    model = relu_onnx(tmp_path / "m.onnx", HUGE).read_bytes()
    with TestClient(create_app(settings)) as client:
        r = client.post("/jobs", files={"model": ("m.onnx", model),
                                         "dataset": ("d.npz", small_npz(tmp_path / "d.npz").read_bytes())},
                        data={"spec": "{}"})
        assert r.status_code == 202, r.text
        jid = r.json()["id"]
        service = client.app.state.jobs
        assert run(jid, JobStore(settings, service.repo, service.store)) == "failed"
        job = client.get(f"/jobs/{jid}").json()
        dyn = relu_onnx(tmp_path / "dyn.onnx", ["N", 3, "H", "W"]).read_bytes()
        big = client.post("/jobs", files={"model": ("m.onnx", dyn), "dataset": ("d.npz", b"x")},
                          data={"spec": '{"input_shape": [1, 3, 60000, 60000]}'}).json()
        assert run(big["id"], JobStore(settings, service.repo, service.store)) == "failed"
        big = client.get(f"/jobs/{big['id']}").json()
    assert job["status"] == "failed" and job["error"]["status"] == 422
    assert job["error"]["type"].endswith("input-too-large")
    assert "4611686018427387904 elements" in job["error"]["detail"]
    assert big["error"]["status"] == 422 and "input_shape [1, 3, 60000, 60000] has 10800000000 elements" in \
        big["error"]["detail"]
