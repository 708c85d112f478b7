"""The Celery app the API sends with and the worker registers ``slim.run_job`` on.

Torch-free and side-effect free at import: building a Celery app only records configuration. The
broker is only a doorbell; the job row (written before the message is sent) holds the state, so a
lost or duplicated message costs nothing but a re-enqueue or a refused claim.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_init

from .settings import Settings, get_settings

TASK_NAME = "slim.run_job"


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings``; one per Settings so tests can point at their own broker folder."""
    app = Celery("slim", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        broker_transport_options=dict(settings.broker_transport_options),
        # Late ack + reject on worker loss: a job whose worker dies is redelivered (FINDINGS).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        # Results and progress live in the jobs table; a result backend would only be a second truth.
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        # Fail a send within seconds when the broker is down instead of hanging the HTTP request.
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5,
                                   "interval_max": 2.0},
        broker_connection_timeout=5,
    )
    return app


def prepare_broker(settings: Settings) -> None:
    """Create the filesystem transport's folders (kombu does not); a no-op for other brokers."""
    if settings.uses_filesystem_broker:
        for key in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
            Path(settings.broker_transport_options[key]).mkdir(parents=True, exist_ok=True)


def enqueue(job_id: str, app: Celery | None = None) -> None:
    """Ring the doorbell for a job already written to the database; the task id is the job id."""
    (app or celery_app).send_task(TASK_NAME, args=[job_id], task_id=job_id)


#: The process-wide app built from the environment; the worker imports this one.
celery_app = make_celery(get_settings())


@worker_init.connect
def _prepare_on_worker_start(sender: Any = None, **_kwargs: Any) -> None:
    app = getattr(sender, "app", None)
    if app is celery_app:
        prepare_broker(get_settings())
