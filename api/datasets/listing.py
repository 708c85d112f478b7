"""What a dataset URL holds, read through fsspec: its files and the fingerprint that names that state.

The API lists a URL once at registration (the record's ``sha256`` is the fingerprint, ``bytes`` and ``files``
the totals); a worker lists it again before copying it into its cache and refuses a listing whose
fingerprint differs, because the job asked for the data as registered, not for whatever the bucket holds now.
The fingerprint hashes the normalised URL and, per file, its relative path, size and version (the first of
etag, md5/crc, version id, last-modified or mtime that the filesystem reports), so any change of the listing
is a new dataset without reading a byte of data.

Torch-free: the API imports it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import fsspec

from .policy import DatasetURLError, confined, local_path

#: More files than this cannot be registered (the listing is held in memory, twice): pack them as WebDataset
#: ``.tar`` shards, which the loader streams.
MAX_FILES = 1_000_000
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "crc32c", "VersionId", "version_id", "generation", "LastModified",
                 "last_modified", "updated", "mtime", "modified")


class DatasetUnreadable(Exception):
    """The URL is allowed but could not be listed (missing, no permission, no driver for its scheme)."""


@dataclass(frozen=True)
class Entry:
    rel: str  # the path below the URL ("train/cat/1.jpg"); the file's own name for a single-file URL
    path: str  # the filesystem's own path, for fs.open
    size: int
    version: str


@dataclass
class Listing:
    url: str
    is_dir: bool
    entries: list[Entry]
    fs: Any = field(repr=False)

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries)

    def fingerprint(self) -> str:
        doc = {"url": self.url, "dir": self.is_dir, "files": [[e.rel, e.size, e.version] for e in self.entries]}
        return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()


def _version(info: dict[str, Any]) -> str:
    for key in _VERSION_KEYS:
        if info.get(key) not in (None, ""):
            return f"{key}={info[key]}"
    return ""


def _safe_rel(rel: str) -> bool:
    """A relative path that can be recreated under a cache folder: no empty, '.' or '..' parts (object stores
    allow keys like ``a/../../b``), no backslashes or control characters."""
    parts = rel.split("/")
    return bool(rel) and all(p not in ("", ".", "..") for p in parts) and not any(
        c == "\\" or ord(c) < 32 for c in rel)


def list_url(url: str, root: str) -> Listing:
    """The files at ``url`` (normalised, allowed under ``root``).

    Raises DatasetURLError for what the policy refuses (a file that resolves outside a ``file://`` root, a
    name that cannot be copied safely, too many files) and DatasetUnreadable for what the filesystem refuses.
    """
    try:
        # a fresh instance: fsspec reuses filesystems per process and s3fs/gcsfs cache listings in them, so the
        # API would fingerprint a changed bucket by its old listing (found by tests/test_datasets_api.py on S3)
        fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True)
        info = fs.info(path)
        if info.get("type") == "directory":
            found = sorted(fs.find(path, withdirs=False, detail=True).items())
        else:
            found = [(path, info)]
    except FileNotFoundError:
        raise DatasetUnreadable(f"nothing is stored at {url}") from None
    except Exception as err:  # a driver's own errors (permissions, network, an unknown scheme): one line
        first = (str(err).splitlines() or [""])[0][:300]
        raise DatasetUnreadable(f"{url} could not be listed ({type(err).__name__}: {first})") from None
    is_dir = info.get("type") == "directory"
    if len(found) > MAX_FILES:
        raise DatasetURLError(f"{url} holds more than {MAX_FILES} files; pack them into WebDataset .tar shards")
    confine = local_path(root)
    entries = []
    base = path.rstrip("/") + "/"
    for p, i in found:
        rel = p[len(base):] if is_dir and p.startswith(base) else p.rsplit("/", 1)[-1]
        if not _safe_rel(rel):
            raise DatasetURLError(f"{url} holds a file named {rel!r}, which cannot be copied safely")
        if confine is not None and not confined(p, confine):
            raise DatasetURLError(f"{url} holds {rel!r}, a symbolic link to outside {root}")
        entries.append(Entry(rel, p, int(i.get("size") or 0), _version(i)))
    if not entries:
        raise DatasetUnreadable(f"{url} is an empty folder")
    return Listing(url, is_dir, entries, fs)
