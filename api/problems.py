"""RFC 9457 problem details for every error the API returns.

Clients branch on ``type`` (stable, ``urn:slim:problem:<kind>``; the same kinds as ``SlimError.kind``)
and show ``detail`` to a person. The worker uses :func:`problem` too, so a failed job's ``error`` has
the same shape as an HTTP error. Nothing here ever puts a traceback in a response.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:slim:problem:"

log = logging.getLogger("slim.api")


def problem(status: int, kind: str, detail: str, title: str | None = None, **extra: Any) -> dict[str, Any]:
    """A problem object; ``kind`` is a short slug such as ``invalid-spec`` or ``not-found``."""
    return {
        "type": TYPE_PREFIX + kind,
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        **extra,
    }


class ProblemError(Exception):
    """Raised anywhere below the endpoints to end the request with a problem response."""

    def __init__(self, status: int, kind: str, detail: str, *, title: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.body = problem(status, kind, detail, title, **extra)
        self.headers = headers or {}


def problem_response(body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=body["status"], media_type=PROBLEM_JSON, headers=headers)


_HTTP_KINDS = {401: "unauthorized", 404: "not-found", 405: "method-not-allowed", 413: "too-large"}


async def _on_problem(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(exc.body, exc.headers)


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = _HTTP_KINDS.get(exc.status_code, f"http-{exc.status_code}")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    if exc.status_code == 404 and detail == "Not Found":
        detail = "no such resource"
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(request))
    return problem_response(problem(exc.status_code, kind, detail), headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path: Starlette's own ``Allow`` names only the first route
    that matched the path (``OPTIONS /jobs`` said ``POST`` though ``GET /jobs`` exists too)."""
    routes = request.app.router.routes  # asked per method: FastAPI's included routers hide their routes
    return [m for m in _METHODS if any(r.matches({**request.scope, "method": m})[0] == Match.FULL for r in routes)]


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(p) for p in loc)


async def _on_validation(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{"field": _loc(e.get("loc", ())), "message": e.get("msg", "")} for e in exc.errors()]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
    return problem_response(problem(422, "invalid-request", detail, errors=errors))


async def _on_crash(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(problem(500, "internal", "internal error; the server log has the details"))


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(Exception, _on_crash)
