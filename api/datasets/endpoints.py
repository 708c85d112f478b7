"""HTTP surface of datasets: ``POST /datasets`` (an upload or a URL), ``GET`` list and record, ``DELETE``."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from ..auth import Owner
from ..jobs.endpoints import problems
from ..jobs.service import CURSOR_PATTERN
from ..problems import ProblemError
from .policy import MAX_URL
from .service import NAME_MAX, NAME_PATTERN, DatasetList, DatasetRecord, DatasetService, URLRegistration

JSON_LIMIT = 64 * 1024


def get_service(request: Request) -> DatasetService:
    return request.app.state.datasets


Service = Annotated[DatasetService, Depends(get_service)]


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    out = problems(*codes)
    words = {404: "no such dataset (or not yours)", 409: "a queued or running job uses the dataset"}
    for code, text in words.items():
        if code in out:
            out[code] = {**out[code], "description": text}
    return out


_REGISTER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["dataset"], "additionalProperties": False,
                "properties": {"dataset": {"type": "string", "format": "binary", "minLength": 1,
                                           "description": ".npz, or an ImageFolder / WebDataset .zip, .tar, "
                                                          ".tar.gz (name it with ?name=)"}}}},
            "application/json": {"schema": {
                "type": "object", "required": ["url"], "additionalProperties": False,
                "properties": {"url": {"type": "string", "minLength": 1, "maxLength": MAX_URL,
                                       "description": "an fsspec URL (s3://…, gs://…, file:///…) of one file or a "
                                                      "folder, under a prefix the operator allows "
                                                      "(SLIM_DATASET_URL_PREFIXES), else a 422"},
                               "name": {"anyOf": [{"type": "string", "minLength": 1, "maxLength": NAME_MAX,
                                                   "pattern": NAME_PATTERN}, {"type": "null"}],
                                        "description": "optional, for people, as ?name= (not both)"}}}},
        },
    }
}
_CREATED = {201: {"description": "the dataset record: new, or the one you had already registered with the same "
                                 "content (then with `Deduplicated: true`)",
                  "headers": {"Location": {"schema": {"type": "string"}, "description": "/datasets/{id}"},
                              "Deduplicated": {"schema": {"type": "string", "enum": ["true"]},
                                               "description": "present when the record already existed"}}}}

router = APIRouter(prefix="/datasets", tags=["datasets"], responses=problems(401))


@router.post(
    "", status_code=201, response_model=DatasetRecord, openapi_extra=_REGISTER_BODY,
    responses={**_CREATED, **_problems(400, 413, 415, 422)},
    summary="Register a dataset once, then submit jobs with its id",
    description="`multipart/form-data` with a `dataset` file (streamed to storage), or JSON `{\"url\": …}` for "
                "data already on a filesystem the operator allows; `?name=` names it for people. The same content "
                "registered again by the same owner returns the existing record (201 with `Deduplicated: true`).",
)
async def register_dataset(
    request: Request, owner: Owner, service: Service,
    name: Annotated[str | None, Query(min_length=1, max_length=NAME_MAX, pattern=NAME_PATTERN,
                                      description="optional, for people (default: the file name, or the URL's "
                                                  "last segment); no control characters")] = None,
) -> JSONResponse:
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        ds, existed = await service.register_upload(request, owner, name)
    elif kind == "application/json":
        body = await _json_body(request)
        if name is not None and body.name is not None and name != body.name:
            raise ProblemError(422, "invalid-request", "the name is given twice (?name= and in the body), "
                               "differently; give it once", fields=["name"])
        ds, existed = await run_in_threadpool(service.register_url, owner, body.url, body.name or name)
    else:
        raise ProblemError(415, "unsupported-media-type", "send multipart/form-data with a dataset file, or "
                           "application/json {\"url\": …}")
    headers = {"Location": f"{request.scope.get('root_path', '')}/datasets/{ds.id}"}
    if existed:
        headers["Deduplicated"] = "true"
    record = (await run_in_threadpool(service.records, [ds]))[0]
    return JSONResponse(record.model_dump(mode="json"), status_code=201, headers=headers)


async def _json_body(request: Request) -> URLRegistration:
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > JSON_LIMIT:
            raise ProblemError(413, "too-large", f"a dataset registration is at most {JSON_LIMIT} bytes of JSON")
    try:
        data = json.loads(raw)
    except ValueError:
        raise ProblemError(400, "malformed-body", "the body is not JSON") from None
    if not isinstance(data, dict):
        raise ProblemError(422, "invalid-request", "send a JSON object: {\"url\": \"s3://bucket/data/\"}")
    try:
        return URLRegistration.model_validate(data)
    except ValidationError as err:
        fields = [".".join(str(p) for p in e["loc"]) for e in err.errors()]
        detail = "; ".join(f"{f}: {e['msg']}" for f, e in zip(fields, err.errors(), strict=True))
        raise ProblemError(422, "invalid-request", detail, fields=fields) from None


@router.get("", response_model=DatasetList, responses=_problems(422), summary="List your datasets, newest first")
def list_datasets(
    owner: Owner, service: Service,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(
        description="opaque: the `next` of the previous page, passed back unchanged; a value not of this "
                    "shape is a 422 problem", json_schema_extra={"pattern": f"^({CURSOR_PATTERN[1:-1]})?$"})] = None,
) -> DatasetList:
    rows, nxt = service.list(owner, limit, cursor)
    return DatasetList(items=service.records(rows), next=nxt)


@router.get("/{dataset_id}", response_model=DatasetRecord, responses=_problems(404))
def get_dataset(dataset_id: str, owner: Owner, service: Service) -> DatasetRecord:
    return service.records([service.get(owner, dataset_id)])[0]


@router.delete("/{dataset_id}", status_code=204, response_class=Response, responses=_problems(404, 409),
               description="Deletes the record and, when no other record names the same bytes, the stored "
                           "upload. Refused with 409 while a queued or running job uses it.")
def delete_dataset(dataset_id: str, owner: Owner, service: Service) -> Response:
    service.delete(owner, dataset_id)
    return Response(status_code=204)
