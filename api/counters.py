"""Service-wide event counters kept in the database, for ``/metrics``.

Re-sends happen in the workers' reconcilers and dropped deliveries in the Celery children, while
``/metrics`` is served by the API: an in-process Prometheus counter would only ever show the API's
own (zero) share. One row per counter, bumped with a single ``UPDATE … SET value = value + n`` so
concurrent processes never lose an increment. A new table (not a new column) so ``create_all``
adds it to an existing database.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, String, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from .db import Base

#: Counter names: ``requeued:<reason>`` (see ``api.redispatch``) and dropped deliveries.
DROPPED = "deliveries_dropped"


def requeued(reason: str) -> str:
    return f"requeued:{reason}"


class CounterRow(Base):
    __tablename__ = "slim_counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


def bump(sessions: sessionmaker[Session], name: str, n: int = 1) -> None:
    """Add ``n`` to a counter, creating it on first use (a racing creator makes us retry the update)."""
    for _ in range(3):
        with sessions.begin() as s:
            done = s.execute(update(CounterRow).where(CounterRow.name == name)
                             .values(value=CounterRow.value + n)
                             .execution_options(synchronize_session=False)).rowcount
        if done:
            return
        try:
            with sessions.begin() as s:
                s.add(CounterRow(name=name, value=n))
            return
        except IntegrityError:
            continue


def read_counters(sessions: sessionmaker[Session]) -> dict[str, int]:
    with sessions() as s:
        return {name: int(value) for name, value in s.execute(select(CounterRow.name, CounterRow.value))}
