"""Make the generated OpenAPI document say exactly what this service does (Schemathesis checks it).

FastAPI declares what the code *could* do: Bearer auth on every route with the key dependency even
when no keys are configured (the embedded default accepts anonymous requests), and nothing about the
hand-parsed multipart body. This pass runs once per app, with its settings.
"""

from __future__ import annotations

from typing import Any

from .jobs.models import STATUSES
from .settings import Settings

_STATUS = "|".join(STATUSES)
#: What ``parse_statuses`` accepts: blank, or statuses joined by commas, spaces around them allowed.
STATUS_PATTERN = f"^ *(({_STATUS}) *(, *({_STATUS}) *)*)?$"


def make_truthful(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    components = schema.setdefault("components", {})
    for path, ops in schema.get("paths", {}).items():
        for op in ops.values():
            if not isinstance(op, dict):
                continue
            if not settings.auth_enabled:  # no keys: no auth, and no 401 either
                op.pop("security", None)
                op.get("responses", {}).pop("401", None)
            for param in op.get("parameters", []):
                if path == "/jobs" and param.get("name") == "status":
                    _string_schema(param)["pattern"] = STATUS_PATTERN
    if not settings.auth_enabled:
        components.pop("securitySchemes", None)
    return schema


def _string_schema(param: dict[str, Any]) -> dict[str, Any]:
    """The string branch of an optional parameter's schema (FastAPI writes ``anyOf: [string, null]``)."""
    schema = param.setdefault("schema", {})
    for branch in schema.get("anyOf", []):
        if branch.get("type") == "string":
            return branch
    return schema
