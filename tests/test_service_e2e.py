"""The service end to end over real HTTP: ``POST /jobs`` → poll → download, as users run it.

Embedded default (SQLite, filesystem broker, local storage, the worker started by ``slim serve``) and
the distributed configuration (Redis + PostgreSQL, a separate ``slim worker``), plus the faults users
will meet: a worker SIGKILLed mid-training, an API restart, a Redis restart, a cancel.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from api.client import SlimAPIError, SlimClient
from tests.conftest import run_slim
from tests.service_harness import Proc, Service, free_port, fresh_postgres_db, need_server, wait_for
from tests.zoo import save_model

QUICK = {"input_shape": [1, 1, 8, 8], "method": {"name": "l1", "strength": 3e-3},
         "sparse_training": {"epochs": 2, "lr": 0.02}, "prune": {"target": "channels", "amount": 0.4},
         "finetune": {"epochs": 2, "lr": 0.01}}
LONG = {**QUICK, "sparse_training": {"epochs": 12, "lr": 0.02, "batch_size": 32}}


@pytest.fixture(scope="module")
def ts_model(tmp_path_factory, digits_cnn) -> Path:
    return save_model(digits_cnn, "script", tmp_path_factory.mktemp("ts") / "digits.pt", torch.zeros(1, 1, 8, 8))


def _check_success(c: SlimClient, job: dict, tmp: Path, original_params: int) -> None:
    assert job["status"] == "succeeded", job
    out = c.download(job["id"], tmp / "slim.pt")
    m = torch.jit.load(str(out))
    assert m(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert sum(p.numel() for p in m.parameters()) < original_params
    rep = c.report(job["id"])
    assert rep["version"] == 1 and rep["stages"]["finetuned"]["params"] < rep["stages"]["baseline"]["params"]
    assert httpx.get(f"{c.http.base_url}/jobs/{job['id']}/report.html").status_code == 200


def test_embedded_default(tmp_path, ts_model, digits, digits_cnn):
    svc = Service(tmp_path, {}, embedded=True)
    try:
        svc.start_api()
        with SlimClient(svc.url) as c:
            # fine-tuning long enough (~1 s) for a 0.3 s poll to see it
            job = c.submit(ts_model, {**QUICK, "finetune": {"epochs": 4, "lr": 0.01, "batch_size": 16}}, digits)
            assert job["status"] == "queued"
            phases: set[str] = set()
            done = c.wait(job["id"], poll=0.3, timeout=300, events=False,
                          on_update=lambda j: phases.add(j.get("phase") or ""))
            _check_success(c, done, tmp_path, sum(p.numel() for p in digits_cnn.parameters()))
            assert {"sparse_training", "finetuning"} <= phases
            # the command-line client on the same job
            r = run_slim("status", done["id"], "--url", svc.url)
            assert r.returncode == 0 and json.loads(r.stdout)["status"] == "succeeded"
            r = run_slim("download", done["id"], "--url", svc.url, "-o", str(tmp_path / "cli.pt"))
            assert r.returncode == 0 and (tmp_path / "cli.pt").read_bytes() == (tmp_path / "slim.pt").read_bytes()
            r = run_slim("cancel", done["id"], "--url", svc.url)
            assert r.returncode == 2 and "409" in r.stderr  # a finished job cannot be canceled
            # an ONNX upload with BatchNorm folded (what exporters write) comes back as a drop-in ONNX
            onnx_in = tmp_path / "digits.onnx"
            torch.onnx.export(digits_cnn, (torch.zeros(2, 1, 8, 8),), str(onnx_in), dynamo=False,
                              input_names=["pixels"], output_names=["scores"],
                              dynamic_axes={"pixels": {0: "batch"}, "scores": {0: "batch"}})
            spec = {"method": {"name": "l1", "strength": 3e-3}, "sparse_training": {"epochs": 8, "lr": 0.02},
                    "prune": {"target": "params", "amount": 0.62}, "finetune": {"epochs": 8, "lr": 0.01}}
            oj = c.wait(c.submit(onnx_in, spec, digits)["id"], poll=0.3, timeout=300)
            assert oj["status"] == "succeeded", (oj, svc.logs())
            before, after = oj["summary"]["before"], oj["summary"]["after"]
            assert after["params"] <= 0.4 * before["params"]  # ≥ 60% fewer parameters
            assert after["accuracy"] >= before["accuracy"] - 0.01  # within a point
            assert oj["summary"]["filename"].endswith(".onnx")
            out = c.download(oj["id"], tmp_path / "slim.onnx")
            import onnxruntime as ort

            sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            assert [i.name for i in sess.get_inputs()] == ["pixels"]
            assert sess.run(None, {"pixels": np.zeros((3, 1, 8, 8), "float32")})[0].shape == (3, 10)
            assert c.report(oj["id"])["reinserted_bn"]
            # bad input the API cannot see (it never opens model files) fails the job, not the server
            garbage = tmp_path / "garbage.pt"
            garbage.write_bytes(b"\x00garbage" * 100)
            bad = c.wait(c.submit(garbage, QUICK, digits)["id"], poll=0.3, timeout=120)
            assert bad["status"] == "failed" and "unrecognised model file" in bad["error"]["detail"], (bad, svc.logs())
            evil = tmp_path / "evil.zip"
            with zipfile.ZipFile(evil, "w") as z:
                z.writestr("../../escape.png", b"x")
            bad = c.wait(c.submit(ts_model, QUICK, evil)["id"], poll=0.3, timeout=120)
            assert bad["status"] == "failed" and "escapes" in bad["error"]["detail"], (bad, svc.logs())
            assert not (tmp_path / "escape.png").exists()
            with pytest.raises(SlimAPIError) as e:
                c.get("0" * 32)
            assert e.value.status == 404
            assert httpx.get(f"{svc.url}/healthz").status_code == 200
    finally:
        svc.close()


@pytest.fixture
def distributed(tmp_path):
    need_server("PostgreSQL", 5432)
    need_server("Redis", 6379)
    db, drop = fresh_postgres_db()
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=11).flushdb()
    svc = Service(tmp_path, {"SLIM_DATABASE_URL": db, "SLIM_BROKER_URL": "redis://127.0.0.1:6379/11",
                             "SLIM_STORAGE_URL": str(tmp_path / "shared")}, embedded=False)
    try:
        yield svc
    finally:
        svc.close()
        drop()


def test_redis_postgres_separate_worker(distributed, ts_model, digits, digits_cnn, tmp_path):
    svc = distributed
    svc.start_api()
    svc.start_worker()
    with SlimClient(svc.url) as c:
        job = c.wait(c.submit(ts_model, QUICK, digits)["id"], poll=0.3, timeout=300)
        _check_success(c, job, tmp_path, sum(p.numel() for p in digits_cnn.parameters()))
        assert job["attempts"] == 1


def _running_epoch(c: SlimClient, job_id: str, phase: str, epoch: float):
    def ok():
        j = c.get(job_id)
        return j if j.get("phase") == phase and (j.get("metrics") or {}).get("epoch", 0) >= epoch else None
    return ok


@pytest.mark.heavy
def test_worker_sigkill_resumes_from_checkpoint(distributed, ts_model, digits, tmp_path):
    svc = distributed
    svc.start_api()
    w = svc.start_worker()
    with SlimClient(svc.url) as c:
        jid = c.submit(ts_model, LONG, digits)["id"]
        wait_for(_running_epoch(c, jid, "sparse_training", 2), 240, "sparse training epoch 2")
        w.kill(signal.SIGKILL)  # the whole worker, parent and child, without warning
        svc.start_worker()
        job = c.wait(jid, poll=0.5, timeout=400)
        assert job["status"] == "succeeded", svc.logs()
        assert job["attempts"] == 2
        assert job["summary"]["resumed_from"].startswith("sparse_training:")
        assert int(job["summary"]["resumed_from"].split(":")[1]) >= 2
        results = list((tmp_path / "shared").rglob("result*"))
        assert len(results) == 1, results


@pytest.mark.heavy
def test_api_restart_loses_nothing(distributed, ts_model, digits):
    svc = distributed
    svc.start_api()
    svc.start_worker()
    with SlimClient(svc.url) as c:
        first = c.submit(ts_model, QUICK, digits)["id"]
        jid = c.submit(ts_model, LONG, digits)["id"]
        wait_for(_running_epoch(c, jid, "sparse_training", 1), 240, "the job to run")
        svc.api.kill(signal.SIGKILL)
        svc.start_api()
        assert c.wait(jid, poll=0.5, timeout=400)["status"] == "succeeded"
        ids = {j["id"] for j in c.http.get("/jobs").json()["items"]}
        assert {first, jid} <= ids
        assert c.get(first)["status"] == "succeeded"


@pytest.mark.heavy
def test_redis_restart_mid_job(tmp_path, ts_model, digits):
    """A private Redis on its own port (the machine's shared one is never restarted)."""
    need_server("PostgreSQL", 5432)
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server binary not installed")
    port = free_port()
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    redis_proc = Proc(args, {}, tmp_path / "redis.log").start()
    wait_for(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode == 0,
             20, "redis")
    db, drop = fresh_postgres_db()
    svc = Service(tmp_path, {"SLIM_DATABASE_URL": db, "SLIM_BROKER_URL": f"redis://127.0.0.1:{port}/0",
                             "SLIM_STORAGE_URL": str(tmp_path / "shared")}, embedded=False)
    try:
        svc.start_api()
        svc.start_worker()
        with SlimClient(svc.url) as c:
            jid = c.submit(ts_model, LONG, digits)["id"]
            wait_for(_running_epoch(c, jid, "sparse_training", 1), 240, "the job to run")
            redis_proc.kill(signal.SIGKILL)
            redis_proc = Proc(args, {}, tmp_path / "redis.log").start()
            assert c.wait(jid, poll=0.5, timeout=400)["status"] == "succeeded", svc.logs()
            # the broker works again for new jobs
            assert c.wait(c.submit(ts_model, QUICK, digits)["id"], poll=0.5, timeout=300)["status"] == "succeeded"
    finally:
        svc.close()
        redis_proc.kill()
        drop()


@pytest.mark.heavy
def test_cancel_running_job_frees_worker(distributed, ts_model, digits):
    svc = distributed
    svc.start_api()
    svc.start_worker()
    with SlimClient(svc.url) as c:
        jid = c.submit(ts_model, LONG, digits)["id"]
        wait_for(_running_epoch(c, jid, "sparse_training", 1), 240, "the job to run")
        c.cancel(jid)
        wait_for(lambda: c.get(jid)["status"] == "canceled", 15, "canceled within seconds")
        nxt = c.wait(c.submit(ts_model, QUICK, digits)["id"], poll=0.5, timeout=300)
        assert nxt["status"] == "succeeded"
        assert json.dumps(c.get(jid)["error"]) == "null"
