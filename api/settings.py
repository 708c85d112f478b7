"""Service configuration, read once from the environment.

The API and the worker must agree on the database, broker and artifact store, so both build their
``Settings`` with :meth:`Settings.from_env` from the same ``SLIM_*`` variables. Defaults give the
embedded mode of ``slim serve``: SQLite, kombu's filesystem transport and a local artifact folder,
all under ``SLIM_DATA_DIR``, so nothing but this machine is needed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .datasets.policy import DatasetURLError, normalize_url

#: A job longer than this would be redelivered by Redis while still running (FINDINGS: late ack plus
#: visibility timeout loops), so it is set far above any job we expect.
VISIBILITY_TIMEOUT_S = 24 * 3600

DEFAULT_MAX_UPLOAD_BYTES = 2 * 1024**3
DEFAULT_DISPATCH_TIMEOUT_S = 3600.0


class SettingsError(ValueError):
    """A ``SLIM_*`` variable has a value the service cannot use; the message names it."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{name} must be positive, got {value}")
    return value


def normalize_database_url(url: str) -> str:
    """Send plain ``postgresql://`` URLs to psycopg 3, the only PostgreSQL driver we install."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def owner_for_bare_key(key: str) -> str:
    """A stable owner name for a key given without one; never the key itself, which would leak into rows."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def parse_api_keys(raw: str) -> dict[str, str]:
    """``owner:key`` pairs or bare keys, comma-separated, into ``{key: owner}``."""
    keys: dict[str, str] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        owner, sep, key = item.partition(":")
        if not sep:
            owner, key = owner_for_bare_key(item), item
        owner, key = owner.strip(), key.strip()
        if not owner or not key:
            raise SettingsError(f"SLIM_API_KEYS entry {item!r} needs the form owner:key or key")
        if key in keys and keys[key] != owner:
            raise SettingsError("SLIM_API_KEYS gives the same key to two owners")
        keys[key] = owner
    return keys


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    broker_url: str
    broker_transport_options: dict[str, Any]
    storage_url: str
    api_keys: dict[str, str] = field(default_factory=dict, repr=False)
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_attempts: int = 3
    heartbeat_timeout_s: float = 120.0
    #: How long a queued job's message may go unseen before it is re-sent, on brokers that cannot be
    #: inspected (see ``api.redispatch``); long, because waiting in a queue is not losing.
    dispatch_timeout_s: float = DEFAULT_DISPATCH_TIMEOUT_S
    #: Where ``callback_url`` may point (``api.webhooks.policy``): hosts or host:port, ``*`` for any public
    #: address. Empty (the default): callbacks are refused, so no job makes the service call anywhere.
    webhook_allowed_hosts: tuple[str, ...] = ()
    webhook_max_attempts: int = 8
    webhook_backoff_s: float = 2.0  # first retry after this, doubling, at most an hour apart
    webhook_timeout_s: float = 5.0
    #: Where ``POST /datasets`` may register a URL (``api.datasets.policy``): normalised fsspec URL prefixes, each
    #: a folder boundary. Empty (the default): URL registration is refused, so no request makes the service read
    #: from anywhere.
    dataset_url_prefixes: tuple[str, ...] = ()

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @property
    def uses_filesystem_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        data_dir = Path(env.get("SLIM_DATA_DIR", "").strip() or "./var").expanduser().resolve()
        database_url = normalize_database_url(env.get("SLIM_DATABASE_URL", "").strip()
                                              or f"sqlite:///{data_dir / 'slim.db'}")
        broker_url = env.get("SLIM_BROKER_URL", "").strip() or "filesystem://"
        options: dict[str, Any] = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
        if broker_url.startswith("filesystem://"):
            options.update(filesystem_broker_options(data_dir / "broker"))
        storage_url = env.get("SLIM_STORAGE_URL", "").strip() or str(data_dir / "artifacts")
        return cls(
            data_dir=data_dir,
            database_url=database_url,
            broker_url=broker_url,
            broker_transport_options=options,
            storage_url=storage_url,
            api_keys=parse_api_keys(env.get("SLIM_API_KEYS", "")),
            max_upload_bytes=_int(env, "SLIM_MAX_UPLOAD_BYTES", DEFAULT_MAX_UPLOAD_BYTES),
            max_attempts=_int(env, "SLIM_MAX_ATTEMPTS", 3),
            heartbeat_timeout_s=_float(env, "SLIM_HEARTBEAT_TIMEOUT_S", 120.0),
            dispatch_timeout_s=_float(env, "SLIM_DISPATCH_TIMEOUT_S", DEFAULT_DISPATCH_TIMEOUT_S),
            webhook_allowed_hosts=tuple(h.strip().lower() for h in env.get("SLIM_WEBHOOK_ALLOWED_HOSTS", "").split(",")
                                        if h.strip()),
            webhook_max_attempts=_int(env, "SLIM_WEBHOOK_MAX_ATTEMPTS", 8),
            webhook_backoff_s=_float(env, "SLIM_WEBHOOK_BACKOFF_S", 2.0),
            webhook_timeout_s=_float(env, "SLIM_WEBHOOK_TIMEOUT_S", 5.0),
            dataset_url_prefixes=_prefixes(env.get("SLIM_DATASET_URL_PREFIXES", "")),
        )


def _prefixes(raw: str) -> tuple[str, ...]:
    out = []
    for item in (p.strip() for p in raw.split(",")):
        if not item:
            continue
        try:
            out.append(normalize_url(item))
        except DatasetURLError as err:
            raise SettingsError(f"SLIM_DATASET_URL_PREFIXES entry {item!r}: {err}") from None
    return tuple(out)


def filesystem_broker_options(root: Path) -> dict[str, Any]:
    """One folder for both directions: the API writes where the worker reads (single host only)."""
    queue = str(root / "queue")
    return {
        "data_folder_in": queue,
        "data_folder_out": queue,
        "processed_folder": str(root / "processed"),
        "control_folder": str(root / "control"),
        "store_processed": False,
    }


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests build their own ``Settings`` instead of patching this."""
    return Settings.from_env()
