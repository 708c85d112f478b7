"""HTTP surface of jobs, exactly as ``CONTRACT.md`` lists it; the logic lives in ``service``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..auth import Owner
from ..problems import ProblemError
from .report_html import CSP, render_report
from .schemas import JobList, JobRecord
from .service import CURSOR_PATTERN, IDEMPOTENCY_KEY_MAX, MAX_MODEL_FILES, JobService


def get_service(request: Request) -> JobService:
    return request.app.state.jobs


Service = Annotated[JobService, Depends(get_service)]


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem+json answers a route can give."""
    ref = {"schema": {"$ref": "#/components/schemas/Problem"}}
    words = {400: "the multipart body could not be parsed, or the upload was interrupted",
             401: "missing or invalid API key", 404: "no such job (or not yours)", 409: "not in a state for this",
             413: "upload too large", 415: "not multipart/form-data", 422: "invalid input",
             503: "queue unavailable"}
    return {c: {"description": words[c], "content": {"application/problem+json": ref}} for c in codes}


_SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["model", "spec"],
                # the data: a file, or a registered dataset's id, never both (a 422 otherwise)
                "oneOf": [{"required": ["dataset"]}, {"required": ["dataset_id"]}],
                # the parser refuses any other part with a 422 (``api.uploads``)
                "additionalProperties": False,
                "properties": {
                    # One part as far as the schema goes: the extra parts of an ONNX model with external data
                    # must carry distinct file names and be one .onnx plus its data files, which JSON Schema
                    # cannot say, so a generated array of them would be "valid" yet refused.
                    "model": {"type": "string", "format": "binary", "minLength": 1,
                              "description": "TorchScript, ONNX or torch.export (.pt2) file. An ONNX model with "
                                             f"external data: repeat this part (up to {MAX_MODEL_FILES}) for the "
                                             ".onnx and each data file, under their own file names, or send one "
                                             ".zip/.tar.gz bundle of them"},
                    "spec": {"$ref": "#/components/schemas/JobSpec"},
                    "dataset": {"type": "string", "format": "binary", "minLength": 1,
                                "description": ".npz, or an ImageFolder .zip / .tar.gz; or send dataset_id instead"},
                    "dataset_id": {"type": "string", "pattern": "^[0-9a-f]{32}$",
                                   "description": "instead of a dataset file: the id of a dataset you registered "
                                                  "(POST /datasets); none of yours is a 422 unknown-dataset"},
                    "callback_url": {"type": "string", "format": "uri", "maxLength": 2048,
                                     "description": "optional: every status change is POSTed here, signed the "
                                                    "Standard Webhooks way (GET /webhooks/secret); only hosts the "
                                                    "operator allows (SLIM_WEBHOOK_ALLOWED_HOSTS), else a 422"},
                },
            },
            "encoding": {"spec": {"contentType": "application/json"}},
        }},
    }
}

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=problems(401))


@router.post(
    "", status_code=202, response_model=JobRecord, openapi_extra=_SUBMIT_BODY,
    responses=problems(400, 409, 413, 415, 422, 503),
    summary="Submit a model to slim",
    description="The `spec` part is a JSON document following the JobSpec schema (unknown fields are errors). "
                "With `Idempotency-Key`, repeating the same request returns the same job; reusing the key for "
                "a different request is a 409.",
)
async def create_job(
    request: Request, owner: Owner, service: Service,
    idempotency_key: Annotated[str | None, Header(
        alias="Idempotency-Key", json_schema_extra={"minLength": 1, "maxLength": IDEMPOTENCY_KEY_MAX})] = None,
) -> JSONResponse:
    job, replayed = await service.submit(request, owner, idempotency_key)
    headers = {"Location": f"{request.scope.get('root_path', '')}/jobs/{job.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    else:
        request.app.state.metrics.submitted.inc()
    return JSONResponse(JobRecord.of(job).model_dump(mode="json"), status_code=202, headers=headers)


@router.get("", response_model=JobList, responses=problems(422), summary="List jobs, newest first")
def list_jobs(
    owner: Owner, service: Service,
    status: Annotated[str | None, Query(description="one status or several, comma-separated")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(
        description="opaque: the `next` of the previous page, passed back unchanged; a value not of this "
                    "shape is a 422 problem", json_schema_extra={"pattern": f"^({CURSOR_PATTERN[1:-1]})?$"})] = None,
) -> JobList:
    rows, nxt = service.list_jobs(owner, status, limit, cursor)
    return JobList(items=[JobRecord.of(j) for j in rows], next=nxt)


@router.get("/{job_id}", response_model=JobRecord, responses=problems(404))
def get_job(job_id: str, owner: Owner, service: Service) -> JobRecord:
    return JobRecord.of(service.get(owner, job_id))


SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0


class _SharedReads:
    """One store read per (owner, job) per quarter poll interval, shared by every client following that job:
    the cost of server-sent events grows with the jobs being watched, not with the watchers
    (bench/bench_events.py). Keyed by owner too, so a cached record is only ever served to its owner."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.cache: dict[tuple[str | None, str], tuple[float, str, str]] = {}

    async def get(self, service: JobService, owner: str | None, job_id: str) -> tuple[str, str]:
        """(status, record as JSON)."""
        now = time.monotonic()
        hit = self.cache.get((owner, job_id))
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1], hit[2]
        rec = JobRecord.of(await run_in_threadpool(service.get, owner, job_id))
        if len(self.cache) > 10_000:  # followers of long-gone jobs
            self.cache = {k: v for k, v in self.cache.items() if now - v[0] < 60}
        self.cache[(owner, job_id)] = (now, rec.status, rec.model_dump_json())
        return rec.status, self.cache[(owner, job_id)][2]


_reads = _SharedReads(ttl=SSE_POLL_S / 4)


@router.get("/{job_id}/events", response_class=StreamingResponse, responses={
    200: {"description": "server-sent events: `job` (the job record, whenever it changes) until `end`",
          "content": {"text/event-stream": {}}}, **problems(404)},
    summary="Follow a job's progress without polling")
async def job_events(job_id: str, request: Request, owner: Owner, service: Service) -> StreamingResponse:
    """One `job` event at once, one per change (status, phase, progress, metrics), then `end` once the job has
    finished. The server watches the store, so it works the same with the embedded worker and remote ones."""
    first = JobRecord.of(await run_in_threadpool(service.get, owner, job_id))  # 404 before the stream starts

    async def stream() -> AsyncIterator[str]:
        status, body = first.status, first.model_dump_json()
        last_sent, quiet = None, 0.0
        while True:
            if body != last_sent:
                yield f"event: job\ndata: {body}\n\n"
                last_sent, quiet = body, 0.0
            if status in ("succeeded", "failed", "canceled"):
                yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
                return
            if quiet >= SSE_KEEPALIVE_S:
                yield ": keep-alive\n\n"
                quiet = 0.0
            await asyncio.sleep(SSE_POLL_S)
            quiet += SSE_POLL_S
            if await request.is_disconnected():
                return
            try:
                status, body = await _reads.get(service, owner, job_id)
            except ProblemError as e:  # deleted while watched: say so and end, headers are long gone
                yield f"event: end\ndata: {json.dumps({'status': 'gone', 'detail': e.detail})}\n\n"
                return

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/{job_id}/cancel", status_code=202, response_model=JobRecord, responses=problems(404, 409),
             description="A queued job is canceled at once; a running one is stopped by its worker shortly.")
def cancel_job(job_id: str, owner: Owner, service: Service) -> JobRecord:
    return JobRecord.of(service.cancel(owner, job_id))


@router.get("/{job_id}/model", response_class=Response, responses={
    200: {"description": "the slimmed model", "content": {"application/octet-stream": {}}}, **problems(404, 409)})
def download_model(job_id: str, owner: Owner, service: Service) -> Response:
    job, filename = service.result(owner, job_id)
    path = service.store.local_path(job.id, "result")
    if path is not None:  # FileResponse answers Range requests, so big downloads can resume
        return FileResponse(path, filename=filename, media_type="application/octet-stream")
    size = service.store.size(job.id, "result")
    return StreamingResponse(service.store.iter_read(job.id, "result"), media_type="application/octet-stream",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"',
                                      "Content-Length": str(size)})


@router.get("/{job_id}/report", responses=problems(404, 409), summary="The gamma report (JSON, version 1)")
def get_report(job_id: str, owner: Owner, service: Service) -> JSONResponse:
    return JSONResponse(service.report(owner, job_id))


@router.get("/{job_id}/report.html", response_class=HTMLResponse, responses=problems(404, 409))
def get_report_html(job_id: str, owner: Owner, service: Service) -> HTMLResponse:
    report = service.report(owner, job_id)
    return HTMLResponse(render_report(job_id, report, service.plots(owner, job_id)),
                        headers={"Content-Security-Policy": CSP})


@router.get("/{job_id}/plots/{name}.png", response_class=Response, responses={
    200: {"description": "one of the report's plots", "content": {"image/png": {}}}, **problems(404, 409)},
    summary="A plot of the gamma report: stages, channels or gamma")
def get_plot(job_id: str, name: str, owner: Owner, service: Service) -> Response:
    data = service.plots(owner, job_id).get(name)
    if data is None:
        raise ProblemError(404, "no-such-plot", f"job {job_id} has no plot {name!r}; plots: stages, channels, gamma")
    return Response(data, media_type="image/png")
