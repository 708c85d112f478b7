"""The service as people look at it: ``slim submit --wait`` in a terminal, server-sent events, the report
page with its plots, and the jobs dashboard in a real headless Chromium, all against one running service
with API keys (the embedded default: SQLite, filesystem broker, the worker started by ``slim serve``).

Screenshots go to ``$SLIM_TEST_ARTIFACTS`` (default ``test-artifacts/``) for a person to look at.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from api.client import SlimAPIError, SlimClient
from tests.conftest import run_slim
from tests.service_harness import Service
from tests.zoo import save_model

KEY, OTHER = "k-alice-123", "k-bob-456"
SPEC = {"input_shape": [1, 1, 8, 8], "method": {"name": "polarization", "strength": 0.05},
        "sparse_training": {"epochs": 10, "lr": 0.02, "batch_size": 16}, "prune": {"target": "channels", "amount": 0.5},
        "finetune": {"epochs": 2, "lr": 0.01}}
ARTIFACTS = Path(os.environ.get("SLIM_TEST_ARTIFACTS", "test-artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash")
    s = Service(tmp, {"SLIM_API_KEYS": f"alice:{KEY},bob:{OTHER}"}, embedded=True)
    s.start_api()
    yield s
    s.close()


@pytest.fixture(scope="module")
def submitted(svc, tmp_path_factory, digits_cnn, digits):
    """One job through ``slim submit --wait`` as a user types it: (completed process, downloaded file)."""
    tmp = tmp_path_factory.mktemp("submit")
    model = save_model(digits_cnn, "script", tmp / "digits.pt", torch.zeros(1, 1, 8, 8))
    (tmp / "spec.json").write_text(json.dumps(SPEC))
    out = tmp / "slim.pt"
    r = run_slim("submit", str(model), "--spec", str(tmp / "spec.json"), "--data", str(digits), "--wait",
                 "-o", str(out), "--url", svc.url, "--api-key", KEY, timeout=600)
    return r, out


def test_submit_wait_shows_phases_and_a_summary_and_downloads(submitted):
    r, out = submitted
    assert r.returncode == 0, r.stderr
    err = r.stderr
    for phase in ("sparse_training", "pruning", "finetuning", "exporting"):
        assert phase in err
    assert "[" + "#" * 24 + "]" in err and "/10  loss " in err and "ETA " in err and "took " in err
    assert "parameters" in err and "accuracy" in err and "change" in err  # the summary table
    job = json.loads(r.stdout)
    assert job["status"] == "succeeded"
    m = torch.jit.load(str(out))
    assert m(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    params = sum(p.numel() for p in m.parameters())
    assert params == job["summary"]["after"]["params"] < job["summary"]["before"]["params"]


def test_failed_job_exits_nonzero_with_the_servers_detail(svc, tmp_path, digits_cnn, digits):
    d = np.load(digits)
    bad = tmp_path / "labels.npz"
    np.savez(bad, x=d["x"], y=np.where(d["y"] == 3, 12, d["y"]))  # label 12 on a 10-class model
    model = save_model(digits_cnn, "script", tmp_path / "m.pt", torch.zeros(1, 1, 8, 8))
    (tmp_path / "spec.json").write_text(json.dumps(SPEC))
    r = run_slim("submit", str(model), "--spec", str(tmp_path / "spec.json"), "--data", str(bad), "--wait",
                 "--url", svc.url, "--api-key", KEY, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "failed" in r.stderr and "labels go up to 12 but the model outputs 10 classes" in r.stderr
    assert "Traceback" not in r.stderr


def test_events_stream_the_record_until_the_end(svc, submitted):
    job_id = json.loads(submitted[0].stdout)["id"]
    with SlimClient(svc.url, KEY) as c:
        seen = list(c.events(job_id))  # a finished job: its record once, then the end
        assert [j["status"] for j in seen] == ["succeeded"] and seen[0]["id"] == job_id
    with SlimClient(svc.url, OTHER) as c, pytest.raises(SlimAPIError) as e:
        list(c.events(job_id))  # another owner's job does not exist for bob
    assert e.value.status == 404
    r = httpx.get(f"{svc.url}/jobs/{job_id}/events")
    assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json")
    with httpx.stream("GET", f"{svc.url}/jobs/{job_id}/events", headers={"Authorization": f"Bearer {KEY}"}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        text = s.read().decode()
    assert text.startswith("event: job\ndata: {") and text.rstrip().endswith('data: {"status": "succeeded"}')


def test_events_follow_a_running_job(svc, tmp_path, digits_cnn, digits):
    model = save_model(digits_cnn, "pt2", tmp_path / "m.pt2", torch.zeros(1, 1, 8, 8))
    with SlimClient(svc.url, KEY) as c:
        job = c.submit(model, {**SPEC, "finetune": {"epochs": 8, "lr": 0.01, "batch_size": 16}}, digits)
        seen = list(c.events(job["id"]))
    assert seen[-1]["status"] == "succeeded" and len(seen) >= 3
    phases = [j["phase"] for j in seen if j["phase"]]
    assert "sparse_training" in phases and "finetuning" in phases
    progress = [j["progress"] for j in seen]
    assert progress == sorted(progress)  # never goes backwards


def test_report_page_plots_are_stored_and_served(svc, submitted):
    job_id = json.loads(submitted[0].stdout)["id"]
    h = {"Authorization": f"Bearer {KEY}"}
    for name in ("stages", "channels", "gamma"):
        r = httpx.get(f"{svc.url}/jobs/{job_id}/plots/{name}.png", headers=h)
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG") and len(r.content) > 5000
    r = httpx.get(f"{svc.url}/jobs/{job_id}/plots/nope.png", headers=h)
    assert r.status_code == 404 and "stages, channels, gamma" in r.json()["detail"]
    page = httpx.get(f"{svc.url}/jobs/{job_id}/report.html", headers=h).text
    assert page.count("data:image/png;base64,") == 3 and "<script" not in page


@pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI") != "true",
                    reason="Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
def _open(pw, height: int) -> tuple:
    """Debian's chromium, headless, one page that records script errors."""
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--no-first-run"])
    page = browser.new_page(viewport={"width": 1280, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    return browser, page, errors


def _sign_in(page, url: str) -> None:
    """Load the dashboard and enter the key once: the first 401 asks for it."""
    page.goto(url + "/")
    page.wait_for_selector("#keybox", state="visible")
    page.fill("#key", KEY)
    page.click("#save")


def test_dashboard_and_report_in_chromium(svc, submitted):
    """Open the dashboard, enter the key once, see the finished job, open its report: the images load and
    the numbers on the page are the JSON report's."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium is required under CI"
    job_id = json.loads(submitted[0].stdout)["id"]
    with SlimClient(svc.url, KEY) as c:
        report = c.report(job_id)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser, page, errors = _open(pw, 800)
        _sign_in(page, svc.url)
        row = page.wait_for_selector(f'tr[data-id="{job_id}"].succeeded', timeout=15_000)
        assert "digits.pt" in row.inner_text() and "100%" in row.inner_text()
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        page.reload()  # the key is remembered
        page.wait_for_selector(f'tr[data-id="{job_id}"]', timeout=15_000)
        assert not page.is_visible("#keybox")
        with page.expect_popup() as popup:
            row = page.query_selector(f'tr[data-id="{job_id}"]')
            row.query_selector("button.report").click()
        rp = popup.value
        rp.wait_for_load_state("load")
        widths = rp.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        assert len(widths) == 3 and all(w > 0 for w in widths), widths
        cells = rp.eval_on_selector_all("#summary td[data-k]", "tds => tds.map(t => [t.dataset.k, t.dataset.value])")
        values = {k: float(v) for k, v in cells}
        base, fin = report["stages"]["baseline"], report["stages"]["finetuned"]
        assert values["params-before"] == base["params"] and values["params-after"] == fin["params"]
        assert values["flops-after"] == fin["flops"] and values["accuracy-after"] == pytest.approx(fin["accuracy"])
        assert values["size-after"] == report["model_bytes"]["after"]
        rp.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        browser.close()
    assert errors == []


def test_dashboard_submits_validates_and_compares_in_chromium(svc, submitted, tmp_path, digits_cnn, digits):
    """From the page people watch jobs on: a spec mistake is shown next to the spec before anything is sent
    (checked against /openapi.json's JobSpec schema), a fixed spec submits a job that finishes, and two
    finished jobs open side by side with their numbers and γ plots."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium is required under CI"
    first = json.loads(submitted[0].stdout)["id"]
    model = save_model(digits_cnn, "script", tmp_path / "from-form.pt", torch.zeros(1, 1, 8, 8))
    before = {j["id"] for j in httpx.get(f"{svc.url}/jobs?limit=100", headers={"Authorization": f"Bearer {KEY}"})
              .json()["items"]}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser, page, errors = _open(pw, 1000)
        posts: list[str] = []
        page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
        _sign_in(page, svc.url)
        page.wait_for_selector(f'tr[data-id="{first}"].succeeded', timeout=15_000)
        page.click("#new-job summary")
        page.set_input_files("#model", str(model))
        page.set_input_files("#dataset", str(digits))
        bad = {**SPEC, "sparse_training": {"epochs": 3, "lr": 0.02, "batch_size": 16},
               "prune": {"target": "channels", "amount": 1.5}, "finetun": {"epochs": 1}}
        page.fill("#spec", json.dumps(bad))
        page.click("#send")
        page.wait_for_selector('.field-err[data-for="spec"] .err[data-path="prune.amount"]', timeout=10_000)
        shown = page.inner_text('.field-err[data-for="spec"]')
        assert "prune.amount: must be < 1" in shown and "finetun: unknown field" in shown, shown
        assert posts == [], "nothing is sent while the spec is invalid"
        page.screenshot(path=str(ARTIFACTS / "dashboard-spec-error.png"), full_page=True)
        good = {**bad, "prune": {"target": "channels", "amount": 0.5}}
        del good["finetun"]
        page.fill("#spec", json.dumps(good))
        page.click("#send")
        page.wait_for_selector("#submit-status[data-job]", state="attached", timeout=30_000)
        new = page.eval_on_selector("#submit-status", "s => s.dataset.job")
        assert new and new != first and page.inner_text('.field-err[data-for="spec"]') == ""
        page.wait_for_selector(f'tr[data-id="{new}"].succeeded', timeout=300_000)
        page.check(f'tr[data-id="{first}"] input.pick')
        page.check(f'tr[data-id="{new}"] input.pick')
        page.click("#compare-btn")
        page.wait_for_selector("#compare-table img.gamma", timeout=15_000)
        # polled from here: wait_for_function evaluates a string in the page, which its CSP (no eval) refuses
        for _ in range(60):
            widths = page.eval_on_selector_all("#compare-table img", "imgs => imgs.map(i => i.complete ? "
                                               "i.naturalWidth : 0)")
            if widths and all(w > 0 for w in widths):
                break
            page.wait_for_timeout(250)
        assert widths and all(w > 0 for w in widths), widths
        cells = page.eval_on_selector_all('#compare-table td[data-row="parameters"]',
                                          "tds => tds.map(t => [t.dataset.job, t.dataset.value])")
        with SlimClient(svc.url, KEY) as c:
            want = {j: c.report(j)["stages"]["finetuned"]["params"] for j in (first, new)}
        assert {j: json.loads(v) for j, v in cells} == want
        page.screenshot(path=str(ARTIFACTS / "dashboard-compare.png"), full_page=True)
        browser.close()
    assert errors == []
    assert new not in before


def test_dashboard_submits_on_a_registered_dataset_in_chromium(svc, submitted, tmp_path, digits_cnn, digits):
    """The New job form's data choice: a dataset registered once (here with the client, as a pipeline
    would) is offered in the select; choosing it hides the file input and the job runs on it, sending no
    data bytes."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium is required under CI"
    with SlimClient(svc.url, KEY) as c:
        ds = c.add_dataset(path=digits)
    model = save_model(digits_cnn, "script", tmp_path / "on-dataset.pt", torch.zeros(1, 1, 8, 8))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser, page, errors = _open(pw, 1000)
        sent: list[str] = []
        page.on("request", lambda r: sent.append(r.url) if r.method == "POST" else None)
        _sign_in(page, svc.url)
        page.click("#new-job summary")
        page.wait_for_selector(f'#dataset_id option[value="{ds["id"]}"]', state="attached", timeout=15_000)
        page.select_option("#dataset_id", ds["id"])
        assert page.is_hidden("#dataset-file")
        page.set_input_files("#model", str(model))
        page.fill("#spec", json.dumps({**SPEC, "sparse_training": {"epochs": 2, "lr": 0.02, "batch_size": 16},
                                       "finetune": {"epochs": 1, "batch_size": 16}}))
        page.click("#send")
        page.wait_for_selector("#submit-status[data-job]", state="attached", timeout=30_000)
        new = page.eval_on_selector("#submit-status", "s => s.dataset.job")
        page.wait_for_selector(f'tr[data-id="{new}"].succeeded', timeout=300_000)
        page.screenshot(path=str(ARTIFACTS / "dashboard-registered-dataset.png"), full_page=True)
        browser.close()
    assert errors == []
    assert len(sent) == 1  # one POST /jobs
    with SlimClient(svc.url, KEY) as c:  # the service refuses a dataset_id beside a file (422): none was sent
        assert c.get(new)["dataset_id"] == ds["id"]


def test_client_commands_fail_in_one_line(svc, submitted, tmp_path):
    from tests.service_harness import free_port

    r = run_slim("status", "abc", "--url", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 2 and r.stderr.startswith("slim: error: cannot reach") and len(r.stderr.splitlines()) == 1
    r = run_slim("status", "0" * 32, "--url", svc.url, "--api-key", KEY)
    assert r.returncode == 2 and "404" in r.stderr and "no job" in r.stderr
    job_id = json.loads(submitted[0].stdout)["id"]
    r = run_slim("download", job_id, "--url", svc.url, "--api-key", KEY, "-o", str(tmp_path / "no" / "such" / "x.pt"))
    assert r.returncode == 2 and "No such file or directory" in r.stderr and "cannot reach" not in r.stderr
    r = run_slim("download", job_id, "--url", svc.url, "--api-key", KEY, "-o", str(tmp_path / "x.pt"))
    assert r.returncode == 0 and (tmp_path / "x.pt").stat().st_size > 0
