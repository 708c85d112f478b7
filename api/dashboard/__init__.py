"""The jobs dashboard at ``/``: one static page and one script, no build step.

The page holds no data; the script calls the same JSON API as every other client, with the API key
(asked for once, on the first 401, and kept in the browser's localStorage) in the Authorization header.
Reports and downloads are fetched with that header too and handed to the browser as blobs, so a key
never appears in a URL or a log line.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

router = APIRouter(include_in_schema=False)

# Scripts only from this origin (no inline script), reports open as blobs, images inline or as blobs (compare).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
       "img-src 'self' data: blob:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


def _asset(name: str) -> str:
    return (files(__package__) / name).read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse)
def dashboard() -> HTMLResponse:
    return HTMLResponse(_asset("dashboard.html"), headers={"Content-Security-Policy": CSP,
                                                           "Cache-Control": "no-cache"})


@router.get("/dashboard.js")
def dashboard_js() -> Response:
    return Response(_asset("dashboard.js"), media_type="text/javascript; charset=utf-8",
                    headers={"Cache-Control": "no-cache"})


@router.get("/submit.js")
def submit_js() -> Response:
    return Response(_asset("submit.js"), media_type="text/javascript; charset=utf-8",
                    headers={"Cache-Control": "no-cache"})
