"""A registered dataset as a local path on this worker: copied once into a cache keyed by content, then read in
place by every job that names it (never copied into a job's folder).

Layout: ``$SLIM_CACHE_DIR/datasets/<sha256>/<file name>``: the file of an upload or a single-file URL, or a
folder mirroring a folder URL's tree (an ImageFolder ``train/<class>/<image>``, or WebDataset shards).
``$SLIM_CACHE_DIR`` defaults to ``~/.cache/slim``, where the latency probes are cached too. A copy is written
under a temporary name in the same folder and renamed into place once complete, so workers filling the same
entry at once never see each other's half: a second rename replaces a file with the same bytes, or finds the
folder already in place and drops its own copy. What the cache holds is therefore complete; nothing evicts
it (entries are only ever read by content, so the operator may delete old ones at any time).

An upload's bytes are checked against its sha256 as they are copied. A URL is listed again and its fingerprint
must equal the registered one: data changed since registration fails the job (register the URL again for a
new dataset), and a ``file://`` tree stays confined to the prefix it was registered under.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from api.datasets.listing import DatasetUnreadable, Listing, list_url
from api.datasets.models import UPLOAD, Dataset, file_name
from api.datasets.policy import DatasetURLError
from api.storage import CHUNK, ArtifactStore
from slimcore.cache import cache_root as slim_cache
from slimcore.errors import SlimError


def cache_root() -> Path:
    return slim_cache() / "datasets"


def local_copy(ds: Dataset, artifacts: ArtifactStore, root: Path | None = None) -> Path:
    """The cached copy of ``ds`` (made now if this worker has none): a file or a folder to hand the loader."""
    folder = (root or cache_root()) / ds.sha256
    final = folder / file_name(ds.filename)
    if final.exists():
        return final
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".part-{uuid.uuid4().hex}"
    try:
        if ds.kind == UPLOAD:
            _copy_upload(ds, artifacts, tmp)
        else:
            _copy_url(ds, tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # a folder another worker put in place first
            if not final.exists():
                raise
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return final


def _copy_upload(ds: Dataset, artifacts: ArtifactStore, dest: Path) -> None:
    digest = hashlib.sha256()
    try:
        with artifacts.open_dataset(ds.sha256) as src, open(dest, "wb") as out:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
    except FileNotFoundError:
        raise SlimError(f"the stored bytes of dataset {ds.id} are missing; register the file again",
                        kind="dataset-gone") from None
    if digest.hexdigest() != ds.sha256:
        raise SlimError(f"the stored bytes of dataset {ds.id} do not match its sha256 (damaged storage); register "
                        "the file again", kind="dataset-damaged")


def _copy_url(ds: Dataset, dest: Path) -> None:
    try:
        listing = list_url(ds.url or "", ds.root or "")
    except (DatasetURLError, DatasetUnreadable) as err:
        raise SlimError(f"dataset {ds.id}: {err}", kind="dataset-unreadable") from None
    if listing.fingerprint() != ds.sha256:
        raise SlimError(f"the data at {ds.url} has changed since it was registered as dataset {ds.id} ({ds.files} "
                        f"files, {ds.bytes} bytes then; {len(listing.entries)} files, {listing.total_bytes} bytes "
                        "now); register the URL again for a new dataset", kind="dataset-changed")
    if not listing.is_dir:
        _copy_file(listing, listing.entries[0].path, listing.entries[0].size, dest)
        return
    for entry in listing.entries:
        target = dest / entry.rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy_file(listing, entry.path, entry.size, target)


def _copy_file(listing: Listing, path: str, size: int, dest: Path) -> None:
    fs: Any = listing.fs
    try:
        with fs.open(path, "rb") as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
    except OSError as err:
        raise SlimError(f"{listing.url}: {path} could not be read ({err})", kind="dataset-unreadable") from None
    if dest.stat().st_size != size:
        raise SlimError(f"the data at {listing.url} changed while it was copied ({path}); try again",
                        kind="dataset-changed")
