"""The ``datasets`` table: a new table, so ``create_all`` adds it to an existing database."""

from __future__ import annotations

import re
from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from ..db import Base, UTCDateTime, utcnow

UPLOAD, URL = "upload", "url"


class Dataset(Base):
    """One owner's registered dataset.

    ``sha256`` is the content's digest for an upload (its bytes live once in the artifact store, at
    ``datasets/<sha256>``, however many owners registered them) and, for a URL, the fingerprint of its
    listing at registration (``api.datasets.listing``), so a changed bucket is a new dataset. An owner has
    one record per sha256: registering the same thing again returns it.
    """

    __tablename__ = "datasets"
    __table_args__ = (
        UniqueConstraint("owner", "sha256", name="uq_datasets_owner_sha256"),
        Index("ix_datasets_owner_created", "owner", "created_at", "id"),
        Index("ix_datasets_sha256", "sha256"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), default="")
    name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(8))
    #: The upload's file name, or the URL's last segment: the worker's local copy has this name, and the data
    #: loader reads the format from its suffix.
    filename: Mapped[str] = mapped_column(String(255))
    url: Mapped[str | None] = mapped_column(String(2048), default=None)
    #: The allowed prefix the URL was registered under: a worker copying a ``file://`` tree confines it there.
    root: Mapped[str | None] = mapped_column(String(2048), default=None)
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    files: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


def file_name(name: str) -> str:
    """A name for the ``filename`` column and the worker's copy: the last segment in safe characters (the suffix
    kept: it is the format), never hidden or empty."""
    last = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]", "_", last).lstrip(".")[:255] or "dataset"
