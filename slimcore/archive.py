"""Extract user-uploaded zip and tar archives without trusting a single byte of them.

Uploads come from strangers, so ``extractall`` is off the table: a member could name ``../../etc/x``,
plant a symlink that a later member writes through, create device nodes, or decompress to far more than
the disk holds. Every member is vetted before anything is written (so a bad archive leaves no trace),
and bytes are counted while writing because the sizes an archive declares are themselves user input.
"""

from __future__ import annotations

import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import SlimError

DEFAULT_MAX_BYTES = 2 * 1024**3
DEFAULT_MAX_FILES = 200_000
MAX_BYTES_ENV = "SLIM_MAX_EXTRACT_BYTES"
_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class _Member:
    """One vetted archive entry; ``open`` is deferred so the vetting pass never decompresses data."""

    name: str
    parts: tuple[str, ...]
    is_dir: bool
    size: int
    open: Callable[[], IO[bytes]]


def default_max_bytes() -> int:
    """Read the operator's override at call time so tests and deployments can change it without reloads."""
    raw = os.environ.get(MAX_BYTES_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_MAX_BYTES
    try:
        value = int(raw.strip())
    except ValueError:
        value = 0
    if value <= 0:
        raise SlimError(f"{MAX_BYTES_ENV} must be a positive whole number of bytes, got {raw!r}")
    return value


def _split_name(name: str) -> tuple[str, ...]:
    """Reject names that could land outside ``dest``; backslashes count as separators (Windows zips)."""
    norm = name.replace("\\", "/")
    if "\x00" in norm:
        raise SlimError(f"archive member {name!r} has a NUL byte in its name; refusing to extract")
    if norm.startswith("/") or _DRIVE.match(norm):
        raise SlimError(f"archive member {name!r} has an absolute path; refusing to extract")
    parts = tuple(p for p in norm.split("/") if p not in ("", "."))
    if ".." in parts:
        raise SlimError(f"archive member {name!r} escapes the archive root; refusing to extract")
    return parts


def _tar_members(tf: tarfile.TarFile) -> Iterator[_Member]:
    for info in tf:
        if info.issym() or info.islnk():
            kind = "symlink" if info.issym() else "hardlink"
            raise SlimError(f"archive member {info.name!r} is a {kind}; links are not allowed in uploads")
        if info.ischr() or info.isblk() or info.isfifo():
            raise SlimError(f"archive member {info.name!r} is a device or pipe; "
                            "only files and folders are allowed")
        if not (info.isreg() or info.isdir()):
            raise SlimError(f"archive member {info.name!r} is not a regular file or folder; "
                            "refusing to extract")
        # Bind ``info`` now: the loop variable moves on before extraction opens the member.
        yield _Member(info.name, _split_name(info.name), info.isdir(), 0 if info.isdir() else info.size,
                      lambda info=info: _tar_open(tf, info))


def _tar_open(tf: tarfile.TarFile, info: tarfile.TarInfo) -> IO[bytes]:
    f = tf.extractfile(info)
    if f is None:  # only for non-files, which vetting already refused
        raise SlimError(f"archive member {info.name!r} has no data; refusing to extract")
    return f


def _zip_members(zf: zipfile.ZipFile) -> Iterator[_Member]:
    for info in zf.infolist():
        mode = info.external_attr >> 16
        fmt = stat.S_IFMT(mode)
        if stat.S_ISLNK(mode):
            raise SlimError(f"archive member {info.filename!r} is a symlink; "
                            "links are not allowed in uploads")
        if fmt and fmt not in (stat.S_IFREG, stat.S_IFDIR):
            raise SlimError(f"archive member {info.filename!r} is not a regular file or folder; "
                            "refusing to extract")
        if info.flag_bits & 0x1:
            raise SlimError(f"archive member {info.filename!r} is encrypted; upload an unencrypted archive")
        yield _Member(info.filename, _split_name(info.filename), info.is_dir(),
                      0 if info.is_dir() else info.file_size, lambda info=info: zf.open(info))


@contextmanager
def _open_archive(archive: Path) -> Iterator[Iterator[_Member]]:
    """Pick the format by name first, then by content, so a misnamed upload still gets a clear verdict."""
    name = archive.name.lower()
    as_zip = name.endswith(".zip") or (
        not name.endswith((".tar", ".tar.gz", ".tgz")) and zipfile.is_zipfile(archive))
    try:
        if as_zip:
            with zipfile.ZipFile(archive) as zf:
                yield _zip_members(zf)
        else:
            with tarfile.open(archive, "r:*") as tf:
                yield _tar_members(tf)
    except SlimError:
        raise
    except FileNotFoundError:
        raise SlimError(f"archive {archive.name!r} does not exist") from None
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError, NotImplementedError,
            ValueError) as err:
        raise SlimError(f"archive {archive.name!r} is corrupt, truncated or not a zip/tar file ({err}); "
                        "re-create it and upload again") from None


def _vet(members: Iterator[_Member], max_bytes: int, max_files: int) -> list[_Member]:
    """Check every entry before the first write, stopping early so a million-entry archive costs little."""
    vetted: list[_Member] = []
    total = 0
    for m in members:
        if len(vetted) >= max_files:
            raise SlimError(f"archive has more than {max_files} entries (at {m.name!r}); "
                            "split the data set or upload fewer files")
        total += m.size
        if total > max_bytes:
            raise SlimError(f"archive expands to more than {max_bytes} bytes (at member {m.name!r}); "
                            f"upload less data (operators can raise {MAX_BYTES_ENV})")
        vetted.append(m)
    return vetted


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _write(members: list[_Member], dest: Path, max_bytes: int, created: list[Path]) -> None:
    root = dest.resolve()
    written = 0
    for m in members:
        if not m.parts:  # the archive's own root entry, e.g. "./"
            continue
        target = root.joinpath(*m.parts)
        folder = target if m.is_dir else target.parent
        # dest may hold the caller's own links; never follow one out of the extraction root.
        if not _inside(folder.resolve(), root):
            raise SlimError(f"archive member {m.name!r} would be written outside the extraction folder; "
                            "refusing to extract")
        try:
            missing = [p for p in [folder, *folder.parents] if _inside(p, root) and not p.exists()]
            for p in reversed(missing):
                p.mkdir()
                created.append(p)
            if m.is_dir:
                continue
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            raise SlimError(f"could not extract archive member {m.name!r} ({err.strerror or err}); "
                            "is a file and a folder of the same name in the archive?") from None
        created.append(target)
        own = 0
        with os.fdopen(fd, "wb") as out, m.open() as src:
            while chunk := src.read(_CHUNK):
                own += len(chunk)
                written += len(chunk)
                if own > m.size:
                    raise SlimError(f"archive member {m.name!r} expands beyond its declared size of {m.size} "
                                    "bytes (a zip bomb?); refusing to extract")
                if written > max_bytes:
                    raise SlimError(f"archive expands to more than {max_bytes} bytes (at member {m.name!r}); "
                                    f"upload less data (operators can raise {MAX_BYTES_ENV})")
                try:
                    out.write(chunk)
                except OSError as err:  # disk full and the like: ours, not the archive's fault
                    raise SlimError(f"could not write archive member {m.name!r} to disk "
                                    f"({err.strerror or err}); free space or upload less data") from None


def _remove(created: list[Path]) -> None:
    """Undo a refused extraction so half an archive never looks like a usable data set."""
    for p in reversed(created):
        try:
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink()
        except OSError:
            pass


def safe_extract(archive: Path, dest: Path, *, max_bytes: int | None = None,
                 max_files: int | None = None) -> None:
    """Extract a zip or tar(.gz/.bz2/.xz) upload into ``dest`` or raise SlimError naming the bad member.

    Nothing is created outside ``dest``; on refusal, whatever this call created inside it is removed.
    File modes, owners and timestamps from the archive are ignored: they are not ours to trust.
    """
    limit_bytes = default_max_bytes() if max_bytes is None else max_bytes
    limit_files = DEFAULT_MAX_FILES if max_files is None else max_files
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    created: list[Path] = []
    try:
        with _open_archive(archive) as members:
            vetted = _vet(members, limit_bytes, limit_files)
            _write(vetted, dest, limit_bytes, created)
    except BaseException:
        _remove(created)
        raise
