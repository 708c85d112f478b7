"""Where sample files are read from, by index: a directory, a zip or an uncompressed tar, read in place.

Data sets run to a million files, so a store keeps its file table in flat arrays (one bytes blob of names
plus offsets, numpy offsets and sizes), not a million Python objects: DataLoader workers fork from the
training process, and touching Python objects' reference counts copies their pages into every worker.
Archives are read in place (zip: each member's compressed bytes inflated on demand; tar: ``pread`` at the
member's offset), so a registered data set is never copied or extracted per job. A ``.tar.gz`` cannot be
read at random, so it is extracted once into the cache (keyed by its content hash) and read as a directory.
Every read is bounded (:data:`MAX_MEMBER_BYTES`): a member's sizes are user input.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import struct
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..archive import _split_name, safe_extract
from ..cache import cache_root
from ..errors import SlimError

MAX_MEMBER_BYTES = 256 * 1024**2


class Names:
    """Many file names in two arrays (a UTF-8 blob and offsets) instead of a list of str."""

    def __init__(self, names: Sequence[str]) -> None:
        encoded = [n.encode() for n in names]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return (self[i] for i in range(len(self)))


class Store:
    """Files by index: ``names[i]`` (posix, relative) and ``read(i)`` (its bytes)."""

    names: Names
    label: str  # what the report and errors call it

    def read(self, i: int) -> bytes:
        raise NotImplementedError


class DirStore(Store):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.label = self.root.name
        found = []
        for base, dirs, files in os.walk(self.root, followlinks=False):
            dirs.sort()
            rel = Path(base).relative_to(self.root).as_posix()
            found += [f if rel == "." else f"{rel}/{f}" for f in sorted(files)]
        self.names = Names(found)

    def read(self, i: int) -> bytes:
        path = self.root / self.names[i]
        if path.is_symlink():
            raise SlimError(f"{self.names[i]!r} is a link; data folders may hold plain files only")
        size = path.stat().st_size
        if size > MAX_MEMBER_BYTES:
            raise SlimError(f"{self.names[i]!r} is {size} bytes, over the {MAX_MEMBER_BYTES}-byte limit for one sample")
        return path.read_bytes()


class _Pread:
    """One file descriptor per process: a descriptor inherited over fork would share its offset."""

    def __init__(self, path: Path) -> None:
        self.path, self._fd, self._pid = Path(path), -1, -1

    def read(self, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise SlimError(f"{self.path.name!r} is truncated: a member ends past the end of the file")
        return data

    def __getstate__(self) -> dict:
        return {"path": self.path, "_fd": -1, "_pid": -1}


class ZipStore(Store):
    def __init__(self, path: Path) -> None:
        self.label, self._file = Path(path).name, _Pread(path)
        names, rows = [], []
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                _split_name(info.filename)  # refuses absolute and escaping names, as extraction would
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode) or (stat.S_IFMT(mode) and not stat.S_ISREG(mode)):
                    raise SlimError(f"archive member {info.filename!r} is a link or special file; "
                                    "data archives may hold plain files and folders only")
                if info.flag_bits & 0x1:
                    raise SlimError(f"archive member {info.filename!r} is encrypted; upload an unencrypted archive")
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise SlimError(f"archive member {info.filename!r} uses a compression other than deflate; "
                                    "re-create the zip with the default compression")
                names.append(info.filename.replace("\\", "/"))
                rows.append((info.header_offset, info.compress_size, info.file_size, info.compress_type))
        self.names = Names(names)
        self.table = np.array(rows, dtype=np.int64).reshape(-1, 4)

    def read(self, i: int) -> bytes:
        header, packed, size, method = (int(v) for v in self.table[i])
        if size > MAX_MEMBER_BYTES:
            raise SlimError(f"{self.names[i]!r} is {size} bytes, over the {MAX_MEMBER_BYTES}-byte limit for one sample")
        local = self._file.read(header, 30)
        if local[:4] != b"PK\x03\x04":
            raise SlimError(f"{self.label!r} is corrupt at member {self.names[i]!r}; re-create the zip")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        raw = self._file.read(header + 30 + name_len + extra_len, packed)
        if method == zipfile.ZIP_STORED:
            return raw
        inflate = zlib.decompressobj(-15)
        try:
            data = inflate.decompress(raw, size + 1)
        except zlib.error as err:
            raise SlimError(f"member {self.names[i]!r} of {self.label!r} is corrupt ({err})") from None
        if len(data) != size:
            raise SlimError(f"member {self.names[i]!r} of {self.label!r} is not the size its header says")
        return data


class TarStore(Store):
    def __init__(self, path: Path) -> None:
        self.label, self._file = Path(path).name, _Pread(path)
        names, rows = [], []
        try:
            with tarfile.open(path, "r:") as tf:
                for info in tf:
                    if info.isdir():
                        continue
                    if not info.isreg():
                        raise SlimError(f"archive member {info.name!r} is a link or special file; "
                                        "data archives may hold plain files and folders only")
                    _split_name(info.name)
                    names.append(info.name)
                    rows.append((info.offset_data, info.size))
        except tarfile.ReadError as err:
            raise SlimError(f"{self.label!r} is not an uncompressed tar ({err}); use .tar, or .tar.gz "
                            "for a compressed one") from None
        self.names = Names(names)
        self.table = np.array(rows, dtype=np.int64).reshape(-1, 2)

    def read(self, i: int) -> bytes:
        offset, size = (int(v) for v in self.table[i])
        if size > MAX_MEMBER_BYTES:
            raise SlimError(f"{self.names[i]!r} is {size} bytes, over the {MAX_MEMBER_BYTES}-byte limit for one sample")
        return self._file.read(offset, size)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def extracted(path: Path) -> Path:
    """A compressed tar extracted once per content (``$SLIM_CACHE_DIR/extracted/<sha256>``); later jobs on
    the same bytes reuse it. Extraction goes to a temporary sibling renamed into place, so two workers
    extracting at once never see half a tree."""
    dest = cache_root() / "extracted" / file_digest(path)
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".part-", dir=dest.parent))
    try:
        safe_extract(path, tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another worker finished first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def open_store(path: Path) -> Store:
    """The store for a directory or archive upload (by name, then by content for a misnamed file)."""
    path = Path(path)
    if path.is_dir():
        return DirStore(path)
    name = path.name.lower()
    try:
        if name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
            return DirStore(extracted(path))
        if name.endswith(".zip") or (not name.endswith(".tar") and zipfile.is_zipfile(path)):
            return ZipStore(path)
        return TarStore(path)
    except SlimError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError, ValueError) as err:
        raise SlimError(f"archive {path.name!r} is corrupt, truncated or not a zip/tar file ({err}); "
                        "re-create it and upload again") from None
