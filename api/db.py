"""Database plumbing shared by the API and the worker.

Job state lives in the database, not in the broker (FINDINGS: Redis redelivers long tasks and the
filesystem transport loses messages taken by a dead worker), so both processes open the same database
through :func:`make_engine`. SQLite is the embedded default; PostgreSQL is for real deployments.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Engine, Select, and_, create_engine, event, inspect, or_, text
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import DBAPIError
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


def newest_first(query: Select[Any], model: Any, limit: int, before: tuple[datetime, str] | None) -> Select[Any]:
    """A page of ``model`` rows ordered newest first by (created_at, id), starting after ``before`` (the last row
    of the previous page): keyset pages stay stable while rows are added, unlike offsets."""
    if before is not None:
        t, i = before
        query = query.where(or_(model.created_at < t, and_(model.created_at == t, model.id < i)))
    return query.order_by(model.created_at.desc(), model.id.desc()).limit(limit)


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
    from .datasets import models as _datasets  # noqa: F401
    from .jobs import models  # noqa: F401
    from .webhooks import models as _webhooks  # noqa: F401

    Base.metadata.create_all(engine)
    add_missing_columns(engine)


def add_missing_columns(engine: Engine) -> None:
    """Add the nullable columns a newer version declares to tables an older version created.

    ``create_all`` makes missing tables, never missing columns, and a deployment upgrades in place (the
    API and the workers all call :func:`init_db` at start). Only nullable columns are added, so old rows
    stay valid; indexes over an added column follow. Two processes adding the same column race: the
    loser's statement fails and it checks that the column is there now.
    """
    prep = engine.dialect.identifier_preparer
    for table in Base.metadata.sorted_tables:
        have = _names(engine, table.name, "columns")
        missing = [c for c in table.columns if c.name not in have]
        for column in missing:
            if not column.nullable:
                raise RuntimeError(f"cannot add NOT NULL column {table.name}.{column.name} to an existing table")
            ddl = text(f"ALTER TABLE {prep.format_table(table)} ADD COLUMN {prep.format_column(column)} "
                       f"{column.type.compile(dialect=engine.dialect)}")
            try:
                with engine.begin() as conn:
                    conn.execute(ddl)
            except DBAPIError:
                if column.name not in _names(engine, table.name, "columns"):
                    raise
        added = {c.name for c in missing}
        for index in table.indexes:
            if added & {c.name for c in index.columns}:
                try:
                    index.create(engine, checkfirst=True)
                except DBAPIError:
                    if index.name not in _names(engine, table.name, "indexes"):
                        raise


def _names(engine: Engine, table: str, what: str) -> set[str]:
    found = inspect(engine).get_columns(table) if what == "columns" else inspect(engine).get_indexes(table)
    return {str(x["name"]) for x in found}


def session_factory_from_settings(settings: Settings) -> sessionmaker[Session]:
    """The one call the worker needs: engine, tables and a session factory for the configured database."""
    engine = make_engine(settings.database_url)
    init_db(engine)
    return make_session_factory(engine)
