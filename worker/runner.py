"""The runner beside the Celery task: everything between 'a job id arrived' and 'the job row is final'.

It claims the job atomically (a redelivered or duplicate message for a finished, canceled or live job
is dropped, which is what breaks Celery's redelivery loop), copies the uploads from storage into a
scratch directory (a registered dataset is read from the worker's cache instead: ``worker.datasets``),
runs ``slimcore.pipeline.run_job`` with checkpoints kept in storage (so another worker can resume),
reports progress and heartbeats, honours cancellation cooperatively with a hard stop after a grace
period, and stores the result and report under the job's id.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from api.problems import problem
from slimcore.checkpoint import dumps, loads
from slimcore.errors import JobCanceled, SlimError
from slimcore.spec import parse_spec

from .store import EXTENSIONS, JobStore

log = logging.getLogger("slim.worker")

# Share of the overall progress bar per phase (training dominates).
PHASE_SPAN = {"importing": (0.0, 0.03), "sparse_training": (0.03, 0.50), "pruning": (0.50, 0.55),
              "finetuning": (0.55, 0.95), "exporting": (0.95, 1.0)}
CANCEL_GRACE_S = float(os.environ.get("SLIM_CANCEL_GRACE_S", "30"))


class StorageCheckpoints:
    """Checkpoints under ``jobs/{id}/checkpoints/state`` in the shared store, so any worker can resume."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id

    def load(self) -> dict[str, Any] | None:
        data = self.store.read_checkpoint(self.job_id)
        return loads(data) if data is not None else None

    def save(self, state: dict[str, Any]) -> None:
        self.store.write_checkpoint(self.job_id, dumps(state))


class _Liveness:
    """Heartbeat and cancellation watch on a side thread: beats during long steps (export, pruning) too,
    and kills the process if a canceled job ignores the cooperative stop for longer than the grace."""

    def __init__(self, store: JobStore, job_id: str, interval: float) -> None:
        self.store, self.job_id, self.interval = store, job_id, interval
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"liveness-{job_id}", daemon=True)

    def __enter__(self) -> _Liveness:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        cancel_seen: float | None = None
        while not self.done.wait(self.interval):
            try:
                self.store.heartbeat(self.job_id)
                if self.store.is_cancel_requested(self.job_id):
                    self.cancel.set()
                    cancel_seen = cancel_seen or time.monotonic()
            except Exception:  # a DB hiccup must not kill the job; the next beat retries
                log.exception("heartbeat failed for %s", self.job_id)
            if cancel_seen is not None and time.monotonic() - cancel_seen > CANCEL_GRACE_S:
                log.error("job %s ignored cancellation for %.0fs: hard stop", self.job_id, CANCEL_GRACE_S)
                self.store.finish(self.job_id, "canceled", error=None)
                os._exit(1)


def run(job_id: str, store: JobStore, *, worker_name: str | None = None, device: str | None = None) -> str:
    """Run one job to a final state; returns that state (or 'skipped' when the claim is refused)."""
    worker_name = worker_name or f"{socket.gethostname()}:{os.getpid()}"
    job = store.claim(job_id, worker_name)
    if job is None:
        log.info("job %s not claimable (finished, canceled, live elsewhere or out of attempts): delivery dropped",
                 job_id)
        try:
            store.count_dropped()
        except Exception:  # a counter must never turn a dropped duplicate into a failed task
            log.exception("could not count the dropped delivery of %s", job_id)
        return "skipped"
    scratch = Path(tempfile.mkdtemp(prefix=f"slim-{job_id}-"))
    last = {"t": 0.0, "phase": ""}

    def progress(phase: str, frac: float, metrics: dict[str, Any]) -> None:
        now = time.monotonic()
        if phase == last["phase"] and now - last["t"] < 1 and frac < 1:  # one store write a second at most
            return
        lo, hi = PHASE_SPAN.get(phase, (0.0, 1.0))
        last.update(t=now, phase=phase)
        store.progress(job_id, phase, lo + (hi - lo) * max(0.0, min(frac, 1.0)), metrics)

    try:
        with _Liveness(store, job_id, interval=store.heartbeat_interval) as live:
            if job.get("dataset_id"):  # a registered dataset: read in place from the cache, never copied here
                data = store.local_dataset(job["dataset_id"])
                model = store.fetch_inputs(job_id, scratch / "model", None)
            else:
                data = scratch / f"dataset{data_suffix(job.get('dataset_name'))}"
                model = store.fetch_inputs(job_id, scratch / "model", data)
            spec = parse_spec(job["spec"])
            out = scratch / "result"
            report = _run_pipeline(model, spec, data, out, scratch, progress, live, store, job_id, device)
            if live.cancel.is_set() or store.is_cancel_requested(job_id):
                # the contract: an accepted cancel ends the job canceled, even one that landed during export
                raise JobCanceled("exporting")
            plots = _draw(report)
            store.save_outputs(job_id, out, json.dumps(report).encode())
            store.save_plots(job_id, plots)
            summary = summary_of(report)
            summary["filename"] = result_name(job.get("model_name"), report["format"])
            store.finish(job_id, "succeeded", summary=summary)
            return "succeeded"
    except JobCanceled:
        store.finish(job_id, "canceled")
        return "canceled"
    except SlimError as e:
        store.finish(job_id, "failed", error=problem(422, e.kind, e.detail, title="the job cannot be done"))
        return "failed"
    except Exception as e:
        log.exception("job %s crashed", job_id)
        first = (str(e).splitlines() or [""])[0][:300]
        store.finish(job_id, "failed", error=problem(500, "internal", f"{type(e).__name__}: {first}",
                                                     title="internal error"))
        return "failed"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _draw(report: dict[str, Any]) -> dict[str, bytes]:
    """Render the report's PNGs; a failure to draw is a report warning, never a failed job."""
    try:
        from slimcore.plots import render_plots

        return render_plots(report)
    except Exception as e:  # a plotting bug must not throw away a finished model
        log.exception("plots failed")
        report["warnings"].append(f"the report's plots could not be drawn ({type(e).__name__}: {e})")
        return {}


def _run_pipeline(model: Path, spec: Any, data: Path, out: Path, scratch: Path, progress: Any, live: _Liveness,
                  store: JobStore, job_id: str, device: str | None) -> dict[str, Any]:
    from slimcore.pipeline import run_job  # torch is imported here, in the child, never in the parent

    # one download: a result with external data comes back as a zip bundle unless the upload was another bundle
    return run_job(model, spec, data, out, workdir=scratch, progress=progress, should_stop=live.cancel.is_set,
                   checkpoints=StorageCheckpoints(store, job_id), device=device, bundle_as="zip")


def data_suffix(name: str | None) -> str:
    """The upload's data-format suffix (the loader dispatches on it); anything else maps to none."""
    low = (name or "").lower()
    for suf in (".tar.gz", ".tgz", ".tar", ".zip", ".npz"):
        if low.endswith(suf):
            return suf
    return ""


def result_name(upload: str | None, fmt: dict[str, Any]) -> str:
    """``slim-<upload stem>`` with the result's extension (``.zip`` etc. when it is a bundle)."""
    stem = Path(upload or "model").name
    for suf in (".tar.gz", ".tgz", ".tar", ".zip"):
        if stem.lower().endswith(suf):
            stem = stem[: -len(suf)]
            break
    else:
        stem = Path(stem).stem
    bundle = fmt.get("bundle")
    return f"slim-{stem or 'model'}{'.' + bundle if bundle else EXTENSIONS.get(fmt['out'], '')}"


def summary_of(report: dict[str, Any]) -> dict[str, Any]:
    st = report["stages"]
    keys = ("accuracy", "distillation_error", "params", "flops", "latency_ms")
    return {
        "before": {k: st["baseline"].get(k) for k in keys},
        "after": {k: st["finetuned"].get(k) for k in keys},
        "pruned_before_finetune": {k: st["pruned"].get(k) for k in ("accuracy", "distillation_error")},
        "model_bytes": report["model_bytes"], "removed_channels": report.get("removed_channels"),
        "warnings": report["warnings"], "resumed_from": report.get("resumed_from"),
    }
