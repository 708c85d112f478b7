"""Job use cases: submit, look up, list, cancel, fetch artifacts.

Ordering on submit is what makes the service crash-safe: files are stored first, then the job row is
committed as ``queued``, and only then is the broker told. A worker can never receive an id with no
row, and a row whose message was lost is found again by ``JobRepository.stale_jobs``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from slimcore.onnx_refs import name_problem  # stdlib only
from slimcore.plots import PLOTS  # torch-free, like slimcore.spec
from slimcore.spec import JobSpec, format_validation_error

from ..datasets.models import Dataset
from ..datasets.repository import DatasetRepository
from ..db import utcnow
from ..problems import ProblemError
from ..queue import enqueue
from ..redispatch import Redispatcher
from ..settings import Settings
from ..storage import JOB_ID, MODEL_FILES, ArtifactStore
from ..uploads import FormPlan, ReceivedForm, StoredFile, receive_form
from ..webhooks.policy import MAX_URL, check_url
from .models import QUEUED, STATUSES, SUCCEEDED, Job
from .repository import JobRepository

log = logging.getLogger("slim.api")

SPEC_LIMIT = 1024 * 1024
IDEMPOTENCY_KEY_MAX = 255
EXTENSIONS = {"torchscript": ".pt", "pt2": ".pt2", "onnx": ".onnx"}
MAX_MODEL_FILES = 64


def validate_spec(text: str) -> JobSpec:
    """The spec as JobSpec, or a 422 naming the field at fault (before anything is queued)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ProblemError(422, "invalid-spec", f"spec is not valid JSON: {err.msg} "
                           f"(line {err.lineno}, column {err.colno})") from None
    if not isinstance(data, dict):
        raise ProblemError(422, "invalid-spec", "spec must be a JSON object, e.g. {\"version\": 1}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        fields = [".".join(str(p) for p in e["loc"]) or "spec" for e in err.errors()]
        raise ProblemError(422, "invalid-spec", format_validation_error(err), fields=fields) from None


def request_hash(spec: JobSpec, model_sha256: str, dataset_sha256: str) -> str:
    """Identity of a submission for Idempotency-Key: the normalized spec and both files' contents."""
    doc = {"spec": spec.model_dump(mode="json"), "model": model_sha256, "dataset": dataset_sha256}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


#: ``<created_at in µs since 1970>.<job id>``. Opaque to clients, but every string of this shape is a valid
#: position (a page, maybe empty), so the OpenAPI pattern is the whole truth: anything else is a 422.
CURSOR_PATTERN = r"^[0-9]{1,16}\.[0-9a-f]{32}$"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def encode_cursor(job: Job) -> str:
    return f"{(job.created_at - _EPOCH) // timedelta(microseconds=1)}.{job.id}"


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    if re.fullmatch(CURSOR_PATTERN, cursor):
        micros, job_id = cursor.split(".")
        return _EPOCH + timedelta(microseconds=int(micros)), job_id
    try:  # the base64 form earlier versions returned: a client mid-way through a listing keeps paging
        t, i = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        when = datetime.fromisoformat(t)
        if when.tzinfo is None or not isinstance(i, str):
            raise ValueError
        return when, i
    except (ValueError, TypeError, binascii.Error):
        raise ProblemError(422, "invalid-cursor", "cursor is not one this service returned") from None


def parse_statuses(raw: str | None) -> list[str] | None:
    """Statuses joined by commas, spaces around them allowed (``STATUS_PATTERN``, what OpenAPI says); blank: all.
    Only spaces are stripped: another character, a control one included, or an empty item is a 422."""
    if raw is None or not raw.strip(" "):
        return None
    wanted = [s.strip(" ") for s in raw.split(",")]
    bad = [s for s in wanted if s not in STATUSES]
    if bad:
        raise ProblemError(422, "invalid-request", f"status {bad[0]!r} is not one of {', '.join(STATUSES)}")
    return wanted


class JobService:
    def __init__(self, settings: Settings, repo: JobRepository, store: ArtifactStore, celery: Celery) -> None:
        self.settings, self.repo, self.store, self.celery = settings, repo, store, celery
        self.datasets = DatasetRepository(repo.sessions)
        self._redispatcher = Redispatcher(settings, repo, celery)  # one: it remembers the previous pass

    # -- submit ------------------------------------------------------------------------------------

    async def submit(self, request: Request, owner: str | None, idempotency_key: str | None) -> tuple[Job, bool]:
        """Store the uploads, record the job, queue it. Returns (job, replayed)."""
        if idempotency_key is not None and not (0 < len(idempotency_key) <= IDEMPOTENCY_KEY_MAX):
            raise ProblemError(422, "invalid-request", f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} chars")
        job_id = uuid.uuid4().hex
        specs: list[JobSpec] = []

        callbacks: list[str] = []
        datasets: list[Dataset] = []

        def on_text(name: str, text: str) -> None:
            if name == "spec":  # checked as soon as it arrives, so a bad spec stops the upload early
                specs.append(validate_spec(text))
            elif name == "callback_url":  # likewise a URL this service may not call
                callbacks.append(check_url(text, self.settings.webhook_allowed_hosts))
            elif name == "dataset_id":  # and a dataset the caller cannot use
                datasets.append(self.registered_dataset(owner, text))

        plan = FormPlan(files={"model": "model", "dataset": "dataset"},
                        texts={"spec": SPEC_LIMIT, "callback_url": 4 * MAX_URL, "dataset_id": 1024},
                        file_limit=self.settings.max_upload_bytes, repeat={"model": ("model-files", MAX_MODEL_FILES)})
        keep = False
        try:
            form = await receive_form(request, self.store, job_id, plan, on_text)
            job = self._new_job(job_id, owner, idempotency_key, form, specs, datasets)
            if len(form.all_files("model")) > 1:  # before the row: a worker must never miss the manifest
                manifest = [{"name": f.filename, "artifact": f.artifact} for f in form.all_files("model")]
                await run_in_threadpool(self.store.put_stream, job_id, MODEL_FILES, [json.dumps(manifest).encode()])
            stored, replayed = await run_in_threadpool(self._record, job, callbacks[0] if callbacks else None)
            keep = not replayed
            return stored, replayed
        finally:
            if not keep:
                await run_in_threadpool(self.store.delete_job, job_id)

    def registered_dataset(self, owner: str | None, dataset_id: str) -> Dataset:
        """The caller's dataset named by a job's ``dataset_id``: a 422 when it is none of theirs (the request is
        at fault, not its URL, hence not 404; another owner's dataset is indistinguishable from none)."""
        ds = self.datasets.get_owned(dataset_id, owner) if JOB_ID.match(dataset_id) else None
        if ds is None:
            raise ProblemError(422, "unknown-dataset", f"dataset_id {dataset_id[:64]!r} names none of your datasets "
                               "(GET /datasets lists them; POST /datasets registers one)", fields=["dataset_id"])
        return ds

    def _new_job(self, job_id: str, owner: str | None, key: str | None, form: ReceivedForm,
                 specs: list[JobSpec], datasets: list[Dataset]) -> Job:
        if "dataset" in form.files and datasets:
            raise ProblemError(422, "invalid-form", "give the data either as a dataset file or as a dataset_id of a "
                               "registered dataset, not both", fields=["dataset", "dataset_id"])
        missing = [f for f in ("model", "spec") if f not in form.files and f not in form.texts]
        if "dataset" not in form.files and not datasets:
            missing.append("dataset")
        if missing:
            raise ProblemError(422, "invalid-form", f"missing form field(s): {', '.join(missing)}"
                               + (" (or dataset_id, a registered dataset)" if "dataset" in missing else ""),
                               fields=missing)
        for name in ("model", "dataset"):
            if name in form.files and form.files[name].size == 0:
                raise ProblemError(422, "empty-upload", f"{name} is empty", fields=[name])
        spec, model = specs[0], model_of(form.all_files("model"))
        if datasets:
            data_sha, data_name, data_id = datasets[0].sha256, datasets[0].filename, datasets[0].id
        else:
            data = form.files["dataset"]
            data_sha, data_name, data_id = data.sha256, data.filename or "dataset", None
        now = utcnow()
        return Job(created_at=now, updated_at=now,
            id=job_id, owner=owner or "", status=QUEUED, progress=0.0, metrics={}, attempts=0,
            cancel_requested=False, spec=spec.model_dump(mode="json"),
            model_sha256=model.sha256, dataset_sha256=data_sha, model_name=model.filename or "model",
            dataset_name=data_name, dataset_id=data_id,
            idempotency_key=key, request_hash=request_hash(spec, model.sha256, data_sha),
        )

    def _replay(self, job: Job) -> tuple[Job, bool]:
        existing = self.repo.find_by_idempotency_key(job.owner, job.idempotency_key or "")
        if existing is None:
            raise ProblemError(409, "idempotency-conflict", "a request with this Idempotency-Key is in flight")
        if existing.request_hash != job.request_hash:
            raise ProblemError(409, "idempotency-conflict",
                               f"Idempotency-Key was already used for a different request (job {existing.id}); "
                               "use a new key for a new job")
        return existing, True

    def _record(self, job: Job, callback_url: str | None = None) -> tuple[Job, bool]:
        if job.idempotency_key is not None and self.repo.find_by_idempotency_key(job.owner, job.idempotency_key):
            return self._replay(job)
        if not self.repo.insert_job(job, callback_url):
            return self._replay(job)
        try:
            enqueue(job.id, self.celery)
        except Exception:
            log.exception("could not queue job %s", job.id)
            self.repo.delete_job(job.id)
            raise ProblemError(503, "queue-unavailable", "the job queue is unavailable; try again shortly",
                               headers={"Retry-After": "10"}) from None
        return job, False

    # -- look up -----------------------------------------------------------------------------------

    def get(self, owner: str | None, job_id: str) -> Job:
        job = self.repo.get_owned(job_id, owner) if JOB_ID.match(job_id) else None
        if job is None:  # another owner's job is indistinguishable from none at all
            raise ProblemError(404, "not-found", f"no job {job_id!r}")
        return job

    def list_jobs(self, owner: str | None, status: str | None, limit: int,
                  cursor: str | None) -> tuple[list[Job], str | None]:
        statuses = parse_statuses(status)
        before = decode_cursor(cursor) if cursor else None
        rows = self.repo.list_jobs(owner, statuses, limit + 1, before)
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (encode_cursor(rows[-1]) if more and rows else None)

    def cancel(self, owner: str | None, job_id: str) -> Job:
        self.get(owner, job_id)
        outcome = self.repo.request_cancel(job_id)
        job = self.get(owner, job_id)
        if outcome == "finished":
            raise ProblemError(409, "job-finished", f"job {job_id} is already {job.status}; nothing to cancel",
                               job_status=job.status)
        return job

    def requeue_stale(self) -> list[str]:
        """Send a new message for every job whose message or worker was lost (rules: ``api.redispatch``)."""
        return [job_id for job_id, _ in self._redispatcher.reconcile_once()]

    # -- artifacts ---------------------------------------------------------------------------------

    def result(self, owner: str | None, job_id: str) -> tuple[Job, str]:
        """The finished job and the download's file name; 409 until the job has succeeded."""
        job = self.get(owner, job_id)
        if job.status != SUCCEEDED:
            raise ProblemError(409, "not-ready", f"job {job_id} is {job.status}; the model is available once it "
                               "has succeeded", job_status=job.status)
        if not self.store.exists(job_id, "result"):
            raise ProblemError(404, "artifact-missing", f"job {job_id} succeeded but its model is no longer stored")
        return job, download_name(job)

    def report(self, owner: str | None, job_id: str) -> dict[str, Any]:
        job = self.get(owner, job_id)
        if not self.store.exists(job_id, "report.json"):
            raise ProblemError(409, "not-ready", f"job {job_id} is {job.status}; it has no report yet",
                               job_status=job.status)
        with self.store.open_read(job_id, "report.json") as f:
            return json.load(f)


    def plots(self, owner: str | None, job_id: str) -> dict[str, bytes]:
        """The report's stored PNGs by name (none for jobs that ran before plots existed)."""
        self.report(owner, job_id)  # same 404/409 as the report
        out = {}
        for name in PLOTS:
            if self.store.exists(job_id, f"plots/{name}.png"):
                with self.store.open_read(job_id, f"plots/{name}.png") as f:
                    out[name] = f.read()
        return out


def model_of(parts: list[StoredFile]) -> StoredFile:
    """The model as one record: the upload, or for several files (an ONNX model and its external data) the
    .onnx one's name with a digest of all of them. Their names become file names in the worker's folder, so
    they are checked here; what the model refers to is checked by the worker, which reads it."""
    if len(parts) == 1:
        return parts[0]
    names = [p.filename for p in parts]
    for p in parts:
        bad = "it has no file name" if not p.filename else name_problem(p.filename)
        if bad:
            raise ProblemError(422, "invalid-model-files", f"model file {p.filename!r} cannot be stored: {bad}",
                               fields=["model"])
        if p.size == 0:
            raise ProblemError(422, "empty-upload", f"model file {p.filename!r} is empty", fields=["model"])
    if len(set(names)) != len(names):
        raise ProblemError(422, "invalid-model-files", f"model files have repeated names ({', '.join(names)}); "
                           "each file of a model needs its own name", fields=["model"])
    onnx = [n for n in names if n.lower().endswith(".onnx")]
    if len(onnx) != 1:
        raise ProblemError(422, "invalid-model-files", f"{len(parts)} model files were sent ({', '.join(names)}) "
                           f"with {len(onnx)} .onnx among them; several model files must be exactly one .onnx "
                           "model and its external data files", fields=["model"])
    digest = hashlib.sha256(json.dumps([[p.filename, p.sha256] for p in parts]).encode()).hexdigest()
    return StoredFile(onnx[0], sum(p.size for p in parts), digest, "model")


def download_name(job: Job) -> str:
    """``slim-<upload name>``, with the extension of the exported format when it differs."""
    if job.summary and isinstance(job.summary.get("filename"), str):
        return _safe_name(job.summary["filename"])
    stem, dot, ext = job.model_name.rpartition(".")
    if not dot:
        stem, ext = job.model_name, ""
    fmt = (job.spec.get("export") or {}).get("format", "same")
    suffix = EXTENSIONS.get(fmt, f".{ext}" if ext else "")
    return _safe_name(f"slim-{stem or 'model'}{suffix}")


def _safe_name(name: str) -> str:
    """A file name that needs no quoting in Content-Disposition."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:200] or "model"
