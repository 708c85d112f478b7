"""Which URLs ``POST /datasets`` may register: only what the operator lists in ``SLIM_DATASET_URL_PREFIXES``.

A URL is judged by its text, and a ``file://`` one also by where its path resolves on this machine, before
fsspec opens anything: a refused URL is never fetched. The rules:

- URLs and prefixes are normalised alike: lower-case scheme and host; no credentials, query, fragment or
  chained (``a::b``) URL; no ``.``/``..`` or empty path segments, raw or percent-encoded; no backslashes or
  control characters; no trailing slash. A URL that breaks a rule is refused, never repaired, so what was
  checked is exactly what is read (fsspec would read ``file://localhost/x`` as the relative path
  ``localhost/x``, for one).
- A prefix is a folder boundary: ``s3://bucket/imagenet/`` allows ``s3://bucket/imagenet`` and everything
  below it, never ``s3://bucket/imagenet2``.
- ``file://`` URLs must also resolve, symlinks followed, inside the resolved prefix, and so must every file
  found below them when they are listed (:func:`confined`), at registration and again when a worker copies them.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit

MAX_URL = 2048
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")


class DatasetURLError(ValueError):
    """A URL that cannot be registered; the message says why, for a person."""


def normalize_url(raw: str) -> str:
    """``scheme://host/path`` in the one spelling the allow-list compares, or DatasetURLError."""
    url = raw.strip()
    if not url or len(url) > MAX_URL:
        raise DatasetURLError(f"a dataset URL has 1 to {MAX_URL} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in url) or "\\" in url:
        raise DatasetURLError("the URL holds control characters or backslashes")
    if "::" in url:
        raise DatasetURLError("chained URLs (a::b) are not accepted")
    parts = urlsplit(url)
    scheme, netloc = parts.scheme.lower(), parts.netloc.lower()
    if not _SCHEME.match(scheme) or not url[len(scheme):].startswith("://"):
        raise DatasetURLError("give a URL of the form scheme://location/path, e.g. s3://bucket/data/ or "
                              "file:///srv/data/")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise DatasetURLError("the URL may not have a query or a fragment")
    if "@" in netloc:
        raise DatasetURLError("the URL may not carry credentials; the operator configures them on the servers")
    if scheme == "file" and netloc:
        raise DatasetURLError("a file URL names no host: file:///absolute/path")
    if scheme != "file" and not netloc:
        raise DatasetURLError(f"a {scheme}:// URL needs a bucket or host")
    segments = parts.path.split("/")
    if segments[-1] == "" and len(segments) > 1:
        segments.pop()  # one trailing slash: the same folder
    for seg in segments[1:]:
        if seg in ("", ".", "..") or unquote(seg) in (".", "..") or "/" in unquote(seg):
            raise DatasetURLError("the URL's path may not have empty, '.' or '..' segments (or encoded ones)")
    path = "/".join(segments)
    if path and not path.startswith("/"):
        raise DatasetURLError("the URL's path must be absolute")
    if scheme == "file" and not path:
        path = "/"
    return f"{scheme}://{netloc}{path}"


def within(url: str, prefix: str) -> bool:
    """``url`` is ``prefix`` or below it (both normalised): whole path segments, never a partial name."""
    return url == prefix or url.startswith(prefix if prefix.endswith("/") else prefix + "/")


def local_path(url: str) -> str | None:
    """The filesystem path of a normalised ``file://`` URL, else None."""
    return url[len("file://"):] if url.startswith("file://") else None


def confined(path: str, root: str) -> bool:
    """``path`` resolves (every symlink followed) inside ``root`` resolved: a link cannot lead out."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return real == real_root or real.startswith(real_root.rstrip("/") + "/")


def allowed_root(raw: str, prefixes: tuple[str, ...]) -> tuple[str, str]:
    """(the normalised URL, the prefix that allows it), or DatasetURLError saying why not."""
    if not prefixes:
        raise DatasetURLError("this service registers no dataset URLs (its operator has not set "
                              "SLIM_DATASET_URL_PREFIXES); upload the file instead")
    url = normalize_url(raw)
    root = next((p for p in prefixes if within(url, p)), None)
    if root is None:
        raise DatasetURLError(f"{url} is not under a prefix this service may read; allowed: {', '.join(prefixes)}")
    path, root_path = local_path(url), local_path(root)
    if path is not None and root_path is not None and not confined(path, root_path):
        raise DatasetURLError(f"{url} resolves through a symbolic link to outside {root}")
    return url, root
