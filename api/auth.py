"""Bearer-key auth and the bind check that keeps an unauthenticated service off the network.

A key maps to an owner; jobs are stored under their owner and a key sees only its owner's jobs. With
no keys configured the service is single-user and every job is visible, which is only safe on
loopback, hence :func:`check_bind`.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .problems import ProblemError
from .settings import Settings

_bearer = HTTPBearer(auto_error=False, description="one of the keys in SLIM_API_KEYS")


class InsecureBindError(RuntimeError):
    """Refusal to serve jobs to the network with no API keys."""


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name could resolve anywhere: treat it as public


def check_bind(host: str, settings: Settings) -> None:
    """Raise InsecureBindError when ``host`` is reachable from other machines and no keys are set."""
    if not settings.auth_enabled and not is_loopback(host):
        raise InsecureBindError(
            f"refusing to listen on {host!r} without API keys: anyone who can reach it could upload and "
            "download models. Set SLIM_API_KEYS (e.g. SLIM_API_KEYS=alice:$(openssl rand -hex 16)) "
            "or bind to 127.0.0.1."
        )


def owner_for_key(settings: Settings, presented: str) -> str | None:
    """The key's owner, comparing in constant time against every configured key."""
    found = None
    for key, owner in settings.api_keys.items():
        if hmac.compare_digest(key.encode(), presented.encode()):
            found = owner
    return found


def current_owner(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str | None:
    """The caller's owner name; None when auth is off (every job visible, new jobs owned by "")."""
    settings: Settings = request.app.state.settings
    if not settings.auth_enabled:
        return None
    challenge = {"WWW-Authenticate": 'Bearer realm="slim"'}
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ProblemError(401, "unauthorized", "send Authorization: Bearer <key> (a key from SLIM_API_KEYS)",
                           headers=challenge)
    owner = owner_for_key(settings, credentials.credentials)
    if owner is None:
        raise ProblemError(401, "unauthorized", "the API key is not valid", headers=challenge)
    return owner


Owner = Annotated[str | None, Depends(current_owner)]
