"""The one place that says where a worker keeps what it can reuse across jobs: ``$SLIM_CACHE_DIR``, else
``$XDG_CACHE_HOME/slim``, else ``~/.cache/slim``. Latency probes (``latency/``), registered datasets
(``datasets/``), extracted ``.tar.gz`` data (``extracted/``) and inflated npz arrays (``npy/``) live below
it, each keyed by content, so an operator may delete any of it at any time."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SLIM_CACHE_DIR"


def cache_root() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slim")
    return Path(base)
