"""Queue load: many tiny jobs against two workers, with the default and a short heartbeat timeout.

Against a real Redis broker and PostgreSQL (started outside: 127.0.0.1:6379 and :5432), an API with no
embedded worker, and two ``slim worker`` processes started only after every job was submitted, so the
queue is long from the first second. For each heartbeat timeout it reports:

* every job ran exactly once (``attempts == 1`` and ``succeeded``);
* duplicate deliveries (``slim_deliveries_dropped_total``) and re-sends (``slim_requeues_total``) from
  ``/metrics``; goal: duplicates ≤ 1% of runs;
* the share of worker time spent on dropped deliveries, from Celery's "succeeded in Xs" log lines;
* total wall time against jobs × median job time ÷ workers, and against jobs × mean job time ÷ workers
  (the runs' total time ÷ workers);
* the gap per job outside Celery's task time: from one task's "succeeded" line to the next task's start in
  the same worker (its "succeeded" time less its run time): the child's exit, the fork of the next child
  and its start (``worker.prefork``), which the ideal leaves out.

Run: .venv/bin/python bench/bench_queue.py [--jobs 300] [--workers 2] [--timeouts default,15]
Not a test: it takes jobs × (median job + gap) ÷ workers per timeout, plus the workers' start.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.service_harness import Service, fresh_postgres_db, wait_for  # noqa: E402
from tests.zoo import digits_npz, save_model  # noqa: E402

REDIS = "redis://127.0.0.1:6379/13"
SPEC = {"input_shape": [1, 1, 8, 8], "sparse_training": {"epochs": 1}, "finetune": {"epochs": 0},
        "prune": {"target": "channels", "amount": 0.25}}
TASK_LINE = re.compile(r"Task slim\.run_job\[(\w+)\] succeeded in ([\d.]+)s: '(\w+)'")
TIMED_LINE = re.compile(r"^\[([\d-]+ [\d:]+,\d+): INFO/[^\]]*\] Task slim\.run_job\[\w+\] succeeded in ([\d.]+)s", re.M)
METRIC = re.compile(r"^(slim_requeues_total|slim_deliveries_dropped_total)(\{[^}]*\})? ([\d.e+]+)$", re.M)


def tiny_model(path: Path) -> Path:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 10)).eval()
    return save_model(net, "trace", path, torch.zeros(1, 1, 8, 8))


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {name + (labels or ""): float(v) for name, labels, v in METRIC.findall(text)}


def gaps(log: str) -> list[float]:
    """Seconds from each task's end to the next task's start in one worker's log (both from Celery's lines)."""
    ends = [(datetime.strptime(ts, "%Y-%m-%d %H:%M:%S,%f").timestamp(), float(secs))
            for ts, secs in TIMED_LINE.findall(log)]
    return [(end - secs) - prev_end for (prev_end, _), (end, secs) in itertools.pairwise(ends)]


def one_mode(tmp: Path, jobs: int, workers: int, heartbeat: str | None) -> dict[str, object]:
    import redis

    redis.Redis.from_url(REDIS).flushdb()
    db, drop = fresh_postgres_db()
    env = {"SLIM_DATABASE_URL": db, "SLIM_BROKER_URL": REDIS, "SLIM_STORAGE_URL": str(tmp / "artifacts")}
    if heartbeat:
        env["SLIM_HEARTBEAT_TIMEOUT_S"] = heartbeat
    else:
        env["SLIM_HEARTBEAT_TIMEOUT_S"] = "120"  # the harness's 4 s is for its kill tests; use the real default
    svc = Service(tmp, env, embedded=False)
    model, data = tiny_model(tmp / "m.pt").read_bytes(), digits_npz(tmp / "d.npz").read_bytes()
    try:
        svc.start_api()
        ids = []
        for _ in range(jobs):
            r = httpx.post(f"{svc.url}/jobs", files={"model": ("m.pt", model), "dataset": ("d.npz", data)},
                           data={"spec": json.dumps(SPEC)}, timeout=60)
            r.raise_for_status()
            ids.append(r.json()["id"])
        t0 = time.monotonic()
        for _ in range(workers):
            svc.start_worker()

        def done() -> bool:
            page = httpx.get(f"{svc.url}/jobs", params={"status": "queued,running", "limit": 1}, timeout=10)
            return page.status_code == 200 and not page.json()["items"]

        wait_for(done, timeout=jobs * 60, what="all jobs finished", poll=2)
        wall = time.monotonic() - t0
        time.sleep(5)  # let late duplicate deliveries arrive and be dropped
        records = [httpx.get(f"{svc.url}/jobs/{i}", timeout=10).json() for i in ids]
        m = metrics(svc.url)
    finally:
        svc.close()
        drop()
    runs, dups, gap = [], [], []
    for log in tmp.glob("worker*.log"):
        text = log.read_text()
        gap += gaps(text)
        for _, secs, outcome in TASK_LINE.findall(text):
            (dups if outcome == "skipped" else runs).append(float(secs))
    job_s = statistics.median(runs) if runs else float("nan")
    ideal = jobs * job_s / workers
    # jobs × mean job time ÷ workers = the runs' total ÷ workers: the median reads a right-skewed spread of job
    # times (a few slow ones) as overhead
    mean_s = statistics.fmean(runs) if runs else float("nan")
    return {
        "heartbeat_timeout_s": heartbeat or "120 (default)",
        "jobs": jobs, "succeeded": sum(r["status"] == "succeeded" for r in records),
        "ran_exactly_once": sum(r["status"] == "succeeded" and r.get("attempts", 1) == 1 for r in records),
        "runs_logged": len(runs), "duplicate_deliveries": len(dups),
        "dropped_metric": m.get("slim_deliveries_dropped_total", 0.0),
        "requeues": {k: v for k, v in m.items() if k.startswith("slim_requeues_total")},
        "duplicate_share_of_runs": len(dups) / max(1, len(runs)),
        "worker_time_on_duplicates": sum(dups) / max(1e-9, sum(dups) + sum(runs)),
        "median_job_s": round(job_s, 2), "wall_s": round(wall, 1), "ideal_s": round(ideal, 1),
        "wall_over_ideal": round(wall / ideal, 3) if runs else None,
        "mean_job_s": round(mean_s, 3), "wall_over_ideal_mean": round(wall / (jobs * mean_s / workers), 3)
        if runs else None,
        "gap_per_job_s": {"median": round(statistics.median(gap), 3), "mean": round(statistics.fmean(gap), 3),
                          "max": round(max(gap), 3)} if gap else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeouts", default="default,15", help="comma-separated; 'default' is 120 s")
    args = ap.parse_args()
    print(f"nproc={os.cpu_count()}", flush=True)
    for t in args.timeouts.split(","):
        with tempfile.TemporaryDirectory(prefix="slim-bench-queue-") as tmp:
            result = one_mode(Path(tmp), args.jobs, args.workers, None if t == "default" else t)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
