"""What following jobs costs the API: N clients on ``GET /jobs/{id}/events`` (server-sent events) versus N
clients polling ``GET /jobs/{id}`` once a second (the client's fallback), against one real ``slim serve``
while a job runs. Figures: API-process CPU seconds per wall second (from /proc, the uvicorn process only,
not the worker), records delivered per client per second, and how long after a progress write the
record reached the clients (lag, p50/p99, leaving out the record current when a client connected; the
server checks the store every 0.5 s, one read per job shared by its followers).

Run: .venv/bin/python bench/bench_events.py [--clients 100] [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from api.client import SlimClient  # noqa: E402
from tests.service_harness import Service  # noqa: E402
from tests.zoo import digits_npz, save_model, trained_digits_cnn  # noqa: E402

# a strength too weak to make γ sparse, so the sparsity-plateau early stop never ends the job under the clients
LONG = {"input_shape": [1, 1, 8, 8], "method": {"name": "l1", "strength": 1e-7},
        "sparse_training": {"epochs": 400, "lr": 0.02, "batch_size": 16}, "prune": {"amount": 0.4},
        "finetune": {"epochs": 1}}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def lag_s(record: dict) -> float:
    return time.time() - datetime.fromisoformat(record["updated_at"]).timestamp()


async def watch(url: str, job_id: str, stop: float, got: list[float]) -> None:
    first = True  # the record current at connect time says nothing about delivery lag: skipped
    async with httpx.AsyncClient(timeout=None) as c, c.stream("GET", f"{url}/jobs/{job_id}/events") as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {\"id\""):
                if not first:
                    got.append(lag_s(json.loads(line[6:])))
                first = False
            if time.monotonic() > stop:
                return


async def poll(url: str, job_id: str, stop: float, got: list[float]) -> None:
    last = None
    async with httpx.AsyncClient(timeout=30) as c:
        while time.monotonic() < stop:
            rec = (await c.get(f"{url}/jobs/{job_id}")).json()
            if rec["updated_at"] != last:
                if last is not None:
                    got.append(lag_s(rec))
                last = rec["updated_at"]
            await asyncio.sleep(1.0)


def run(kind: str, url: str, job_id: str, pid: int, clients: int, seconds: float) -> dict:
    got: list[float] = []
    c0, t0 = cpu_seconds(pid), time.monotonic()

    async def main() -> None:
        stop = time.monotonic() + seconds
        fn = watch if kind == "events" else poll
        await asyncio.gather(*(fn(url, job_id, stop, got) for _ in range(clients)))

    asyncio.run(main())
    wall = time.monotonic() - t0
    lags = sorted(got)
    return {"kind": kind, "cpu_per_s": (cpu_seconds(pid) - c0) / wall,
            "records_per_client_s": len(got) / clients / wall, "lag_p50": statistics.median(lags) if lags else None,
            "lag_p99": lags[int(0.99 * (len(lags) - 1))] if lags else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        npz = digits_npz(d / "digits.npz")
        model = save_model(trained_digits_cnn(npz), "script", d / "m.pt", torch.zeros(1, 1, 8, 8))
        svc = Service(d, {}, embedded=True)
        svc.start_api()
        try:
            with SlimClient(svc.url) as c:
                job = c.submit(model, LONG, npz)
                while c.get(job["id"])["phase"] != "sparse_training":
                    time.sleep(0.5)
                rows = [run(k, svc.url, job["id"], svc.api.p.pid, args.clients, args.seconds)
                        for k in ("events", "poll")]
                if c.get(job["id"])["status"] != "running":
                    raise SystemExit("the job ended while clients were following it: the figures are void")
                c.cancel(job["id"])
        finally:
            svc.close()
    print(f"{args.clients} clients following one running job for {args.seconds:.0f} s each way:")
    print("| client | API CPU s / s | records per client per s | lag p50 | lag p99 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['cpu_per_s']:.3f} | {r['records_per_client_s']:.2f} | {r['lag_p50']:.2f} s "
              f"| {r['lag_p99']:.2f} s |")
    print(f"events ÷ polling, API CPU: {rows[0]['cpu_per_s'] / max(rows[1]['cpu_per_s'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
