"""A small Python client for the service (``httpx``), used by ``slim submit`` and importable by MLOps code.

Retries idempotent calls on connection errors and 5xx/429 with backoff; ``submit`` sets an
``Idempotency-Key`` for you, so retrying a submit after a dropped connection never creates two jobs.
Uploads are streamed from disk. An ONNX model whose tensors live in external data files is sent together
with them (the ``model`` field once per file), as the server expects.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from slimcore.onnx_refs import external_locations, name_problem  # stdlib only

TERMINAL = ("succeeded", "failed", "canceled")


class SlimAPIError(Exception):
    """The server answered with a problem (RFC 9457); ``problem`` holds it."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status, self.problem = status, problem
        super().__init__(f"{status} {problem.get('title', '')}: {problem.get('detail', '')}".strip())


def model_files(model: Path) -> list[Path]:
    """The model and, for ONNX with external data, the data files it names beside it (FileNotFoundError when
    one is missing). Names the server would refuse are left for it to explain."""
    with open(model, "rb") as f:
        onnx_like = f.read(1) == b"\x08"
    if not onnx_like:
        return [model]
    try:
        names = external_locations(model)
    except ValueError:  # not ONNX after all, or damaged: the server says which
        return [model]
    extra = [model.parent / n for n in names if name_problem(n) is None]
    for p in extra:
        if not p.is_file():
            raise FileNotFoundError(f"{model.name} keeps tensors in {p.name!r}, which is not beside it ({p})")
    return [model, *extra]


class SlimClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 timeout: float = 60.0, retries: int = 4) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self.retries = retries

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> SlimClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                r = self.http.request(method, url, **kw)
                if r.status_code not in (429, 502, 503, 504) or attempt == self.retries:
                    break
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 8)
            for _field, f in kw.get("files") or []:  # rewind streamed uploads before retrying
                if hasattr(f[1], "seek"):
                    f[1].seek(0)
        if r.status_code >= 400:
            try:
                prob = r.json()
            except ValueError:
                prob = {"title": r.reason_phrase, "detail": r.text[:300]}
            raise SlimAPIError(r.status_code, prob)
        return r

    def submit(self, model: Path, spec: dict[str, Any] | str | Path, data: Path | None = None, *,
               dataset_id: str | None = None, idempotency_key: str | None = None,
               callback_url: str | None = None) -> dict[str, Any]:
        """Submit a job; the data is a file sent along (``data``) or a registered dataset (``dataset_id``)."""
        if (data is None) == (dataset_id is None):
            raise ValueError("give the data as a file (data) or as a registered dataset (dataset_id): one of the two")
        text = Path(spec).read_text() if isinstance(spec, Path) else spec if isinstance(spec, str) else json.dumps(spec)
        key = idempotency_key or uuid.uuid4().hex
        parts = [*(("model", p) for p in model_files(Path(model))), *([("dataset", Path(data))] if data else [])]
        with ExitStack() as stack:
            files = [(field, (p.name, stack.enter_context(open(p, "rb")), "application/octet-stream"))
                     for field, p in parts]
            form = {"spec": text, **({"callback_url": callback_url} if callback_url else {}),
                    **({"dataset_id": dataset_id} if dataset_id else {})}
            r = self._request("POST", "/jobs", data=form, files=files, headers={"Idempotency-Key": key})
        return r.json()

    def add_dataset(self, path: Path | str | None = None, *, url: str | None = None,
                    name: str | None = None) -> dict[str, Any]:
        """Register a dataset once: a local file (uploaded, streamed) or a URL the service's operator allows.
        Registering the same content again returns the same record, so a retried call is harmless."""
        if (path is None) == (url is None):
            raise ValueError("give a file (path) or a URL (url) to register: one of the two")
        params = {"name": name} if name else {}
        if url is not None:
            return self._request("POST", "/datasets", json={"url": url}, params=params).json()
        src = Path(path or "")
        with open(src, "rb") as f:
            files = [("dataset", (src.name, f, "application/octet-stream"))]
            return self._request("POST", "/datasets", params=params, files=files).json()

    def datasets(self) -> list[dict[str, Any]]:
        """Every dataset you registered, newest first."""
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = self._request("GET", "/datasets", params={"limit": 100, **({"cursor": cursor} if cursor else {})})
            body = page.json()
            items += body["items"]
            cursor = body["next"]
            if not cursor:
                return items

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._request("GET", f"/datasets/{dataset_id}").json()

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete it (a SlimAPIError with status 409 while a queued or running job uses it)."""
        self._request("DELETE", f"/datasets/{dataset_id}")

    def get(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/jobs/{job_id}/cancel").json()

    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        """The job's webhook events with every delivery attempt."""
        return self._request("GET", f"/jobs/{job_id}/deliveries").json()["items"]

    def webhook_secret(self) -> str:
        """The secret your webhooks are signed with (Standard Webhooks)."""
        return self._request("GET", "/webhooks/secret").json()["secret"]

    def report(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/jobs/{job_id}/report").json()

    def events(self, job_id: str) -> Iterator[dict[str, Any]]:
        """The job record each time it changes, from ``GET /jobs/{id}/events`` (server-sent events), ending
        after the job has finished. Raises SlimAPIError for a problem answer, httpx errors if the stream
        breaks."""
        with self.http.stream("GET", f"/jobs/{job_id}/events", timeout=httpx.Timeout(30.0, read=60.0)) as r:
            if r.status_code >= 400:
                r.read()
                raise SlimAPIError(r.status_code, r.json() if r.content else {})
            event, data = "message", []
            for line in r.iter_lines():
                if line == "":
                    if event == "job" and data:
                        yield json.loads("\n".join(data))
                    if event == "end":
                        return
                    event, data = "message", []
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())

    def updates(self, job_id: str, *, poll: float = 1.0, events: bool = True) -> Iterator[dict[str, Any]]:
        """The job record as it changes: from its server-sent events, falling back to polling every ``poll``
        seconds if the stream is unavailable or breaks (a proxy that buffers, an older server). Endless:
        the caller stops at a terminal status."""
        if events:
            try:
                yield from self.events(job_id)
            except (httpx.TransportError, SlimAPIError):
                pass  # polling answers the same question, and raises the server's problem if there is one
        while True:
            yield self.get(job_id)
            time.sleep(poll)

    def wait(self, job_id: str, *, poll: float = 1.0, on_update: Callable[[dict[str, Any]], None] | None = None,
             timeout: float | None = None, events: bool = True) -> dict[str, Any]:
        """Until the job has finished; ``on_update`` sees every record on the way."""
        t0 = time.monotonic()
        for job in self.updates(job_id, poll=poll, events=events):
            if on_update is not None:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f}s")
        raise AssertionError("unreachable: updates() never ends")

    def download(self, job_id: str, dest: Path) -> Path:
        with self.http.stream("GET", f"/jobs/{job_id}/model") as r:
            if r.status_code >= 400:
                r.read()
                raise SlimAPIError(r.status_code, r.json() if r.content else {})
            tmp = Path(dest).with_suffix(Path(dest).suffix + ".part")
            with open(tmp, "wb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    f.write(chunk)
            tmp.replace(dest)
        return Path(dest)
