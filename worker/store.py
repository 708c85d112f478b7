"""The worker's view of the job table and the artifact store, in one object the runner can be handed.

Built inside the Celery child after the fork (a database engine must never cross a fork). The
heartbeat interval is a third of the timeout after which the reconciler calls a worker dead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api import counters
from api.datasets.repository import DatasetRepository
from api.db import init_db, make_engine
from api.jobs.repository import JobRepository
from api.settings import Settings, get_settings
from api.storage import MODEL_FILES, ArtifactStore
from slimcore.errors import SlimError
from slimcore.onnx_refs import name_problem

from .datasets import local_copy

CHECKPOINT = "checkpoints/state"
EXTENSIONS = {"torchscript": ".pt", "pt2": ".pt2", "onnx": ".onnx"}


@dataclass
class JobStore:
    settings: Settings
    repo: JobRepository
    artifacts: ArtifactStore

    @classmethod
    def from_env(cls) -> JobStore:
        s = get_settings()
        return cls(s, JobRepository.from_settings(s), ArtifactStore(s.storage_url))

    def init(self) -> None:
        init_db(make_engine(self.settings.database_url))

    @property
    def heartbeat_timeout(self) -> float:
        return self.settings.heartbeat_timeout_s

    @property
    def heartbeat_interval(self) -> float:
        return max(0.5, self.settings.heartbeat_timeout_s / 3)

    def claim(self, job_id: str, worker_name: str) -> dict[str, Any] | None:
        job = self.repo.claim_job(job_id, worker_name, self.settings.max_attempts)
        if job is None:
            return None
        return {"id": job.id, "spec": job.spec, "attempts": job.attempts, "model_name": job.model_name,
                "dataset_name": job.dataset_name, "dataset_id": job.dataset_id}

    def heartbeat(self, job_id: str) -> None:
        self.repo.heartbeat(job_id)

    def is_cancel_requested(self, job_id: str) -> bool:
        return self.repo.is_cancel_requested(job_id)

    def progress(self, job_id: str, phase: str, fraction: float, metrics: dict[str, Any]) -> None:
        clean = json.loads(json.dumps(metrics, default=float))  # numpy/torch scalars → plain JSON
        self.repo.update_progress(job_id, phase, fraction, clean)

    def finish(self, job_id: str, status: str, *, summary: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None) -> None:
        self.repo.finish_job(job_id, status, summary=summary, error=error)

    def fetch_inputs(self, job_id: str, model: Path, dataset: Path | None) -> Path:
        """Copy the uploads to local files (the data only when it came with the job: a registered dataset is read
        from the cache, :meth:`local_dataset`); returns the model's path: the file, or a folder of the files a
        model came as (an ONNX model and its external data), under their uploaded names, checked again."""
        if dataset is not None:
            self.artifacts.get_to_file(job_id, "dataset", dataset)
        if not self.artifacts.exists(job_id, MODEL_FILES):
            return self.artifacts.get_to_file(job_id, "model", model)
        with self.artifacts.open_read(job_id, MODEL_FILES) as f:
            parts = json.load(f)
        model.mkdir(parents=True)
        for part in parts:
            bad = name_problem(part["name"])
            if bad:
                raise SlimError(f"model file {part['name']!r} cannot be stored: {bad}")
            self.artifacts.get_to_file(job_id, part["artifact"], model / part["name"])
        return model

    def local_dataset(self, dataset_id: str) -> Path:
        """The registered dataset as a local file or folder in this machine's cache, copied there once."""
        ds = DatasetRepository(self.repo.sessions).get(dataset_id)
        if ds is None:
            raise SlimError(f"dataset {dataset_id} no longer exists (it was deleted after this job was submitted)",
                            kind="dataset-gone")
        return local_copy(ds, self.artifacts)

    def save_outputs(self, job_id: str, result: Path, report: bytes) -> None:
        self.artifacts.put_file(job_id, "result", result)
        self.artifacts.put_stream(job_id, "report.json", [report])

    def save_plots(self, job_id: str, plots: dict[str, bytes]) -> None:
        for name, data in plots.items():
            self.artifacts.put_stream(job_id, f"plots/{name}.png", [data])

    def read_checkpoint(self, job_id: str) -> bytes | None:
        if not self.artifacts.exists(job_id, CHECKPOINT):
            return None
        with self.artifacts.open_read(job_id, CHECKPOINT) as f:
            return f.read()

    def write_checkpoint(self, job_id: str, data: bytes) -> None:
        # put_stream writes to a temporary name and renames on commit: a crash never leaves half a file
        self.artifacts.put_stream(job_id, CHECKPOINT, [data])

    def count_dropped(self) -> None:
        """A delivery for a job that could not be claimed (a duplicate, or finished meanwhile)."""
        counters.bump(self.repo.sessions, counters.DROPPED)
