"""The API process: ``create_app`` wires settings, database, store, queue and routes.

Everything is built from one ``Settings`` and hung on ``app.state``, so a test (or a second app in the
same process) can run against its own database, broker folder and store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from slimcore.spec import JobSpec

from . import dashboard, system
from .auth import InsecureBindError, check_bind
from .counters import read_counters
from .datasets import endpoints as dataset_endpoints
from .datasets.repository import DatasetRepository
from .datasets.service import DatasetService
from .db import init_db, make_engine, make_session_factory
from .jobs import endpoints as jobs_endpoints
from .jobs.repository import JobRepository
from .jobs.schemas import Problem
from .jobs.service import JobService
from .metrics import LatencyMiddleware, Metrics
from .openapi import make_truthful
from .problems import install_problem_handlers
from .queue import make_celery, prepare_broker
from .settings import Settings, get_settings
from .storage import ArtifactStore
from .webhooks import endpoints as webhook_endpoints
from .webhooks.sender import WebhookSender

__all__ = ["InsecureBindError", "check_bind", "create_app"]

DESCRIPTION = """Upload a trained model, a job spec and data; get back a slimmed model and a gamma report.

Errors are `application/problem+json` (RFC 9457). With `SLIM_API_KEYS` set, `/jobs` and `/datasets` need
`Authorization: Bearer <key>`."""


def create_app(settings: Settings | None = None, *, host: str | None = None) -> FastAPI:
    """Build the app; with ``host`` given, first refuse (InsecureBindError) a public bind without keys.

    Tables are created here, not lazily, so a wrong ``SLIM_DATABASE_URL`` fails at start-up with the
    driver's message instead of on the first upload.
    """
    settings = settings or get_settings()
    if host is not None:
        check_bind(host, settings)
    engine = make_engine(settings.database_url)
    init_db(engine)
    repo = JobRepository(make_session_factory(engine), settings.heartbeat_timeout_s)
    store = ArtifactStore(settings.storage_url)
    prepare_broker(settings)
    celery = make_celery(settings)

    sender = WebhookSender(repo.sessions, settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        sender.start()  # webhooks go out from the API process, never from a worker
        yield
        sender.stop()
        engine.dispose()

    app = FastAPI(title="slim", version="1", description=DESCRIPTION, lifespan=lifespan, docs_url="/docs")
    app.state.settings = settings
    app.state.jobs = JobService(settings, repo, store, celery)
    app.state.datasets = DatasetService(settings, DatasetRepository(repo.sessions), store)
    app.state.webhooks = sender
    app.state.metrics = Metrics(repo.count_by_status, lambda: read_counters(repo.sessions))
    install_problem_handlers(app)
    app.include_router(system.router)
    app.include_router(dashboard.router)
    app.include_router(jobs_endpoints.router)
    app.include_router(webhook_endpoints.router)
    app.include_router(dataset_endpoints.router)
    app.add_middleware(LatencyMiddleware, metrics=app.state.metrics)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _openapi_with_spec(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _openapi_with_spec(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus JobSpec (the multipart ``spec`` part points at it) and Problem.

    The endpoint parses its multipart body itself to stream uploads, so FastAPI cannot see the spec
    model; adding ``slimcore.spec.JobSpec``'s own schema keeps that model the single source.
    """
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (JobSpec, Problem):
        doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(doc.pop("$defs", {}))
        components[model.__name__] = doc
    return make_truthful(schema, app.state.settings)
