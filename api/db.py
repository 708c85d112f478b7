"""Database plumbing shared by the API and the worker.

Job state lives in the database, not in the broker (FINDINGS: Redis redelivers long tasks and the
filesystem transport loses messages taken by a dead worker), so both processes open the same database
through :func:`make_engine`. SQLite is the embedded default; PostgreSQL is for real deployments.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Engine, create_engine, event
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from .settings import Settings


class Base(DeclarativeBase):
    pass


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend.

    SQLite has no time zones and returns naive values; storing naive UTC there (and aware values in
    PostgreSQL) keeps comparisons in SQL correct and hands callers aware datetimes either way.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the API read while a worker writes; busy_timeout turns lock contention into waiting.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(database_url: str) -> Engine:
    """An engine for ``Settings.database_url`` (already mapped to psycopg 3 for PostgreSQL)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # Rows outlive their session (repository functions return them), so nothing may expire on commit.
    return sessionmaker(engine, expire_on_commit=False)


def init_db(engine: Engine) -> None:
    from . import counters  # noqa: F401  (registers the tables on Base.metadata)
    from .jobs import models  # noqa: F401
    from .webhooks import models as _webhooks  # noqa: F401

    Base.metadata.create_all(engine)


def session_factory_from_settings(settings: Settings) -> sessionmaker[Session]:
    """The one call the worker needs: engine, tables and a session factory for the configured database."""
    engine = make_engine(settings.database_url)
    init_db(engine)
    return make_session_factory(engine)
