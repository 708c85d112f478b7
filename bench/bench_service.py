"""Service figures, all against a real ``slim serve`` on loopback started by this script:

1. status polling latency (p50/p99) with 100 concurrent clients polling ``GET /jobs/{id}``;
2. the API process's peak RSS growth while a 1 GB model file is uploaded (streamed to storage);
3. one job's wall time through the service (submit → succeeded) ÷ ``slim run`` on the same job.

Run: .venv/bin/python bench/bench_service.py [--clients 100] [--seconds 10] [--upload-mb 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from api.client import SlimClient  # noqa: E402
from tests.service_harness import SLIM, Service  # noqa: E402
from tests.zoo import digits_npz, save_model, trained_digits_cnn  # noqa: E402

SPEC = {"input_shape": [1, 1, 8, 8], "method": {"name": "l1", "strength": 3e-3},
        "sparse_training": {"epochs": 10, "lr": 0.02}, "prune": {"target": "channels", "amount": 0.4},
        "finetune": {"epochs": 10, "lr": 0.01}}


def rss_kb(pid: int) -> int:
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


async def poll_latency(url: str, job_id: str, clients: int, seconds: float) -> list[float]:
    lat: list[float] = []
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as c:
        async def one() -> None:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = await c.get(f"/jobs/{job_id}")
                lat.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200
        await asyncio.gather(*(one() for _ in range(clients)))
    return lat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--upload-mb", type=int, default=1024)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        npz = digits_npz(d / "digits.npz")
        model = save_model(trained_digits_cnn(npz), "script", d / "digits.pt", torch.zeros(1, 1, 8, 8))
        (d / "spec.json").write_text(json.dumps(SPEC))

        # 1 + 2: API only, so the job stays queued and nothing else competes for the CPU
        svc = Service(d / "api", {"SLIM_MAX_UPLOAD_BYTES": str(4 << 30)}, embedded=False)
        (d / "api").mkdir()
        try:
            svc.start_api()
            with SlimClient(svc.url) as c:
                jid = c.submit(model, SPEC, npz)["id"]
            lat = asyncio.run(poll_latency(svc.url, jid, args.clients, args.seconds))
            q = statistics.quantiles(lat, n=100)
            print(f"polling: {len(lat)} requests by {args.clients} clients in {args.seconds:.0f}s "
                  f"({len(lat) / args.seconds:.0f} req/s)  p50 {q[49]:.1f} ms  p99 {q[98]:.1f} ms")
            wrk = shutil.which("wrk")  # a C load generator: the client no longer competes for the CPU
            if wrk:
                out = subprocess.run([wrk, "-t1", f"-c{args.clients}", f"-d{args.seconds:.0f}s", "--latency",
                                      f"{svc.url}/jobs/{jid}"], capture_output=True, text=True).stdout
                pct = dict(ln.split() for ln in out.splitlines() if ln.strip().startswith(("50%", "99%")))
                rps = next(ln.split()[1] for ln in out.splitlines() if ln.startswith("Requests/sec"))
                print(f"polling (wrk, {args.clients} connections): {rps} req/s  p50 {pct['50%']}  p99 {pct['99%']}")
            big = d / "big.bin"
            with open(big, "wb") as f:  # a sparse file: reading it costs no disk, the upload is real bytes
                f.truncate(args.upload_mb << 20)
            base = rss_kb(svc.api.p.pid)
            peak = [base]
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], rss_kb(svc.api.p.pid))
                    time.sleep(0.05)

            th = threading.Thread(target=sample)
            th.start()
            t0 = time.perf_counter()
            with SlimClient(svc.url, timeout=600) as c:
                c.submit(big, SPEC, npz)
            dt = time.perf_counter() - t0
            done.set()
            th.join()
            print(f"upload: {args.upload_mb} MB in {dt:.1f}s ({args.upload_mb / dt:.0f} MB/s); API RSS "
                  f"{base / 1024:.0f} MB → peak {peak[0] / 1024:.0f} MB (+{(peak[0] - base) / 1024:.0f} MB)")
        finally:
            svc.close()

        # 3: the same job through slim run and through the embedded service
        t0 = time.perf_counter()
        subprocess.run([SLIM, "run", str(model), "--spec", str(d / "spec.json"), "--data", str(npz), "-o",
                        str(d / "local.pt")], check=True, capture_output=True, env={**os.environ})
        t_local = time.perf_counter() - t0
        (d / "emb").mkdir()
        svc = Service(d / "emb", {}, embedded=True)
        try:
            svc.start_api()
            time.sleep(3)  # let the embedded worker come up, as a running service would be
            with SlimClient(svc.url) as c:
                t0 = time.perf_counter()
                job = c.wait(c.submit(model, SPEC, npz)["id"], poll=0.2, timeout=900)
                t_svc = time.perf_counter() - t0
            assert job["status"] == "succeeded", job
        finally:
            svc.close()
        print(f"job wall time: service {t_svc:.1f}s, slim run {t_local:.1f}s, ratio {t_svc / t_local:.2f}")


if __name__ == "__main__":
    main()
