"""Artifact store: uploads, results, reports and checkpoints, addressed by job id; registered datasets,
addressed by their content's sha256.

It sits on fsspec so a local folder (the default) and object stores (``s3://…``, ``memory://…``) work
alike. Paths are built here from a validated job id and a fixed set of names, never from anything a
client sent, so no upload can choose where it lands. Writes go to a temporary name and are moved into
place once complete, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHECKPOINT = re.compile(r"^checkpoints/[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
MODEL_FILES = "model-files.json"  # the manifest of a model sent as several files: [{"name", "artifact"}, …]
NAMES = frozenset({"model", "dataset", "result", "report.json", MODEL_FILES})
MODEL_PART = re.compile(r"^model-files/[1-9][0-9]{0,2}$")  # a model's further files (ONNX external data)
PLOT = re.compile(r"^plots/[a-z_]{1,32}\.png$")  # the report's PNGs (slimcore/plots.py)
CHUNK = 1024 * 1024


class UploadTooLarge(Exception):
    """More bytes than the store was told to accept (the API answers 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"larger than the limit of {limit} bytes")
        self.limit = limit


def _check(job_id: str, name: str) -> None:
    if not JOB_ID.match(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    if name not in NAMES and not _CHECKPOINT.match(name) and not PLOT.match(name) and not MODEL_PART.match(name):
        raise ValueError(f"not an artifact name: {name!r}")


class ArtifactWriter:
    """Streams one artifact in, hashing as it goes; ``commit`` publishes it, ``abort`` leaves nothing."""

    def __init__(self, fs: Any, final: str, limit: int | None) -> None:
        self._fs, self._final, self._limit = fs, final, limit
        self._tmp = f"{final}.{uuid.uuid4().hex}.part"
        fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        self._file: IO[bytes] = fs.open(self._tmp, "wb")
        self._hash = hashlib.sha256()
        self.size = 0
        self._open = True

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if self._limit is not None and self.size > self._limit:
            raise UploadTooLarge(self._limit)
        self._hash.update(data)
        self._file.write(data)

    def commit(self) -> tuple[int, str]:
        self._file.close()
        self._open = False
        self._fs.mv(self._tmp, self._final)
        return self.size, self._hash.hexdigest()

    def abort(self) -> None:
        if self._open:
            self._file.close()
            self._open = False
        if self._fs.exists(self._tmp):
            self._fs.rm(self._tmp)

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None or self._open:
            self.abort()


class ArtifactStore:
    """``jobs/{id}/model``, ``dataset``, ``result``, ``report.json`` and ``checkpoints/{name}``; a model sent
    as several files also has ``model-files/{n}`` and the manifest ``model-files.json`` naming them."""

    def __init__(self, url: str) -> None:
        if "://" not in url:
            url = str(Path(url).expanduser().resolve())
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def path(self, job_id: str, name: str) -> str:
        _check(job_id, name)
        return f"{self.root}/jobs/{job_id}/{name}"

    def open_write(self, job_id: str, name: str, limit: int | None = None) -> ArtifactWriter:
        return ArtifactWriter(self.fs, self.path(job_id, name), limit)

    def put_stream(self, job_id: str, name: str, chunks: Iterable[bytes],
                   limit: int | None = None) -> tuple[int, str]:
        """Store the chunks; returns (size, sha256). Raises UploadTooLarge past ``limit``, storing nothing."""
        with self.open_write(job_id, name, limit) as w:
            for chunk in chunks:
                w.write(chunk)
            return w.commit()

    def put_file(self, job_id: str, name: str, src: str | Path) -> tuple[int, str]:
        with open(src, "rb") as f:
            return self.put_stream(job_id, name, iter(lambda: f.read(CHUNK), b""))

    def open_read(self, job_id: str, name: str) -> IO[bytes]:
        return self.fs.open(self.path(job_id, name), "rb")

    def iter_read(self, job_id: str, name: str) -> Iterator[bytes]:
        with self.open_read(job_id, name) as f:
            yield from iter(lambda: f.read(CHUNK), b"")

    def get_to_file(self, job_id: str, name: str, dest: str | Path) -> Path:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self.open_read(job_id, name) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
        return dest

    def local_path(self, job_id: str, name: str) -> Path | None:
        """A filesystem path when the store is local (for FileResponse and Range), else None."""
        return Path(self.path(job_id, name)) if self.is_local else None

    def exists(self, job_id: str, name: str) -> bool:
        return bool(self.fs.exists(self.path(job_id, name)))

    def size(self, job_id: str, name: str) -> int:
        return int(self.fs.size(self.path(job_id, name)))

    # -- registered datasets: datasets/<sha256>, one copy of each content however many records name it ---------

    def dataset_path(self, sha256: str) -> str:
        if not SHA256.match(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return f"{self.root}/datasets/{sha256}"

    def staging(self) -> DatasetStaging:
        """Where an upload to ``POST /datasets`` streams before its digest (and so its name) is known."""
        return DatasetStaging(self)

    def publish_dataset(self, upload_id: str, sha256: str) -> None:
        """Move a staged upload to its content address; when that content is already stored, drop the upload."""
        staged, final = DatasetStaging(self).path(upload_id), self.dataset_path(sha256)
        if self.fs.exists(final):
            self.fs.rm(staged)
        else:
            self.fs.mv(staged, final)

    def discard_staged(self, upload_id: str) -> None:
        staged = DatasetStaging(self).path(upload_id)
        if self.fs.exists(staged):
            self.fs.rm(staged)

    def dataset_exists(self, sha256: str) -> bool:
        return bool(self.fs.exists(self.dataset_path(sha256)))

    def open_dataset(self, sha256: str) -> IO[bytes]:
        return self.fs.open(self.dataset_path(sha256), "rb")

    def delete_dataset(self, sha256: str) -> None:
        if self.dataset_exists(sha256):
            self.fs.rm(self.dataset_path(sha256))

    def delete_job(self, job_id: str) -> None:
        _check(job_id, "model")
        folder = f"{self.root}/jobs/{job_id}"
        if self.fs.exists(folder):
            self.fs.rm(folder, recursive=True)


class DatasetStaging:
    """``receive_form``'s target for ``POST /datasets``: the ``dataset`` part of upload ``key`` is written to
    ``datasets/incoming/<key>`` and moved to its content address by :meth:`ArtifactStore.publish_dataset`."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    def path(self, key: str) -> str:
        if not JOB_ID.match(key):
            raise ValueError(f"not an upload id: {key!r}")
        return f"{self.store.root}/datasets/incoming/{key}"

    def open_write(self, key: str, name: str, limit: int | None = None) -> ArtifactWriter:
        if name != "dataset":
            raise ValueError(f"a dataset upload stores one part, not {name!r}")
        return ArtifactWriter(self.store.fs, self.path(key), limit)
