"""Streaming ``multipart/form-data`` straight into the artifact store.

Model and data files can be gigabytes: Starlette's ``request.form()`` spools every file to a temporary
file and we would then copy it again. Here python-multipart's push parser is fed from
``request.stream()`` and each file part is written to its final place in the store as it arrives,
hashed on the way, with the size limit enforced per chunk; memory stays at one read buffer.
Small text fields (the spec) are kept in memory under their own cap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from .problems import ProblemError
from .storage import ArtifactWriter, UploadTooLarge

#: Bytes gathered from the socket before one hop to a worker thread (parsing and disk writes block).
BATCH = 1024 * 1024


class WriteTarget(Protocol):
    """Where file parts go: ``ArtifactStore`` (a job's uploads) or ``DatasetStaging`` (``POST /datasets``)."""

    def open_write(self, key: str, name: str, limit: int | None = None, /) -> ArtifactWriter: ...


@dataclass
class StoredFile:
    filename: str
    size: int
    sha256: str
    artifact: str = ""


@dataclass
class FormPlan:
    """What the form may contain: file fields (field name → artifact name) and capped text fields; a field in
    ``repeat`` may come up to N times, its further parts stored as ``PREFIX/1``, ``PREFIX/2``, … and all its
    parts together held to ``file_limit`` (one model in several files is still one upload's worth)."""

    files: dict[str, str]
    texts: dict[str, int]
    file_limit: int
    repeat: dict[str, tuple[str, int]] = field(default_factory=dict)


@dataclass
class ReceivedForm:
    files: dict[str, StoredFile] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    repeats: dict[str, list[StoredFile]] = field(default_factory=dict)  # a repeated field's 2nd, 3rd, … parts

    def all_files(self, name: str) -> list[StoredFile]:
        return [self.files[name], *self.repeats.get(name, [])] if name in self.files else []


def _display_name(raw: bytes | None) -> str:
    """Keep a client file name for display only: last path segment, printable, bounded."""
    if not raw:
        return ""
    name = raw.decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(c for c in name if c.isprintable())[:255]


class _Receiver:
    """python-multipart callbacks; they run in a worker thread, one part at a time."""

    def __init__(self, store: WriteTarget, job_id: str, plan: FormPlan,
                 on_text: Callable[[str, str], None]) -> None:
        self.store, self.job_id, self.plan, self.on_text = store, job_id, plan, on_text
        self.form = ReceivedForm()
        self.ended = False
        self._headers: dict[str, bytes] = {}
        self._hname = bytearray()
        self._hvalue = bytearray()
        self._field = ""
        self._filename = ""
        self._writer: ArtifactWriter | None = None
        self._artifact = ""
        self._text: bytearray | None = None

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._hname.decode("latin-1").strip().lower()] = bytes(self._hvalue)
        self._hname.clear()
        self._hvalue.clear()

    def _headers_finished(self) -> None:
        _kind, options = parse_options_header(self._headers.get("content-disposition"))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        known = sorted([*self.plan.files, *self.plan.texts])
        if name not in self.plan.files and name not in self.plan.texts:
            raise ProblemError(422, "invalid-form", f"unexpected form field {name!r}; the fields are {known}")
        artifact = self.plan.files.get(name, "")
        if name in self.form.files or name in self.form.texts:
            if name not in self.plan.repeat:
                raise ProblemError(422, "invalid-form", f"form field {name!r} given twice")
            prefix, most = self.plan.repeat[name]
            n = len(self.form.repeats.get(name, [])) + 1
            if n >= most:
                raise ProblemError(422, "invalid-form", f"form field {name!r} given more than {most} times; "
                                   "send that many files at most, or one .zip bundle")
            artifact = f"{prefix}/{n}"
        self._field, self._filename = name, _display_name(options.get(b"filename"))
        if name in self.plan.files:
            used = sum(f.size for f in self.form.all_files(name))
            self._writer = self.store.open_write(self.job_id, artifact, self.plan.file_limit - used)
            self._artifact = artifact
        else:
            self._text = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._writer is not None:
            try:
                self._writer.write(memoryview(data)[start:end])
            except UploadTooLarge as err:
                what = f"{self._field} is {err}" if self._field not in self.form.files else (
                    f"{self._field}'s files are together larger than the limit of {self.plan.file_limit} bytes")
                raise ProblemError(413, "too-large", f"{what}; the server's SLIM_MAX_UPLOAD_BYTES sets the "
                                   "limit") from None
        elif self._text is not None:
            self._text += data[start:end]
            if len(self._text) > self.plan.texts[self._field]:
                raise ProblemError(413, "too-large",
                                   f"{self._field} is longer than {self.plan.texts[self._field]} bytes")

    def _part_end(self) -> None:
        if self._writer is not None:
            size, digest = self._writer.commit()
            self._writer = None
            stored = StoredFile(self._filename, size, digest, self._artifact)
            if self._field in self.form.files:
                self.form.repeats.setdefault(self._field, []).append(stored)
            else:
                self.form.files[self._field] = stored
        elif self._text is not None:
            try:
                text = self._text.decode("utf-8")
            except UnicodeDecodeError:
                raise ProblemError(422, "invalid-form", f"{self._field} is not UTF-8 text") from None
            self._text = None
            self.form.texts[self._field] = text
            self.on_text(self._field, text)

    def _end(self) -> None:
        self.ended = True

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


def _boundary(request: Request) -> bytes:
    kind, options = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise ProblemError(415, "unsupported-media-type",
                           "send the job as multipart/form-data with parts model, spec and dataset")
    return options[b"boundary"]


def _check_length(request: Request, plan: FormPlan) -> None:
    """Refuse a body that announces itself larger than every allowed part together, before reading it."""
    raw = request.headers.get("content-length")
    if raw is None or not raw.isdigit():
        return
    ceiling = plan.file_limit * len(plan.files) + sum(plan.texts.values()) + 64 * 1024
    if int(raw) > ceiling:
        raise ProblemError(413, "too-large", f"the request body ({raw} bytes) exceeds what the upload limits "
                           f"allow ({plan.file_limit} bytes per file, SLIM_MAX_UPLOAD_BYTES)")


async def receive_form(request: Request, store: WriteTarget, job_id: str, plan: FormPlan,
                       on_text: Callable[[str, str], None]) -> ReceivedForm:
    """Stream the body into ``store`` under ``job_id``; ``on_text`` may raise to stop early.

    On failure a partially written part is removed; completed parts stay and the caller deletes the
    job's folder (it knows whether the job will exist).
    """
    boundary = _boundary(request)
    _check_length(request, plan)
    receiver = _Receiver(store, job_id, plan, on_text)
    try:
        parser = MultipartParser(boundary, receiver.callbacks())  # type: ignore[arg-type]
    except FormParserError:
        raise ProblemError(400, "malformed-body", "the multipart boundary is invalid") from None
    pending: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            pending.append(chunk)
            size += len(chunk)
            if size >= BATCH:
                data, pending, size = b"".join(pending), [], 0
                await run_in_threadpool(parser.write, data)
        if size:
            await run_in_threadpool(parser.write, b"".join(pending))
        parser.finalize()
    except FormParserError as err:
        raise ProblemError(400, "malformed-body", f"the multipart body could not be parsed: {err}") from None
    except ClientDisconnect:
        raise ProblemError(400, "client-disconnected", "the upload was interrupted") from None
    finally:
        receiver.abort()
    if not receiver.ended:
        raise ProblemError(400, "malformed-body", "the multipart body ended before its closing boundary")
    return receiver.form
