"""Which callback URLs the service may call: only what the operator allows (``SLIM_WEBHOOK_ALLOWED_HOSTS``).

An entry is ``host`` (any port), ``host:port``, or ``*`` (any host whose addresses are all public). A host
named explicitly may resolve anywhere, loopback included (the operator said so); a host allowed only by
``*`` is refused at send time when it resolves to a private, loopback, link-local or reserved address, so
a job cannot make the service reach into its own network (server-side request forgery). Redirects are
never followed.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from ..problems import ProblemError

MAX_URL = 2048


def _entry_matches(entry: str, host: str, port: int) -> bool:
    if entry == "*":
        return True
    name, sep, p = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
    return name == host and (not sep or p == str(port))


def explicitly_allowed(host: str, port: int, allowed: tuple[str, ...]) -> bool:
    return any(e != "*" and _entry_matches(e, host, port) for e in allowed)


def check_url(url: str, allowed: tuple[str, ...]) -> str:
    """The URL if a job may use it, else a 422 naming what the operator allows."""
    url = url.strip()
    parts = urlsplit(url)
    if len(url) > MAX_URL or parts.scheme not in ("http", "https") or not parts.hostname or parts.username:
        raise ProblemError(422, "invalid-callback", "callback_url must be an http(s) URL without credentials, at "
                           f"most {MAX_URL} characters", fields=["callback_url"])
    host, port = parts.hostname.lower(), parts.port or (443 if parts.scheme == "https" else 80)
    if not any(_entry_matches(e, host, port) for e in allowed):
        known = ", ".join(allowed) or "none (SLIM_WEBHOOK_ALLOWED_HOSTS is empty)"
        raise ProblemError(422, "callback-not-allowed", f"callback_url host {host}:{port} is not allowed by this "
                           f"service; allowed: {known}", fields=["callback_url"])
    return url


def refused_address(url: str, allowed: tuple[str, ...]) -> str | None:
    """At send time: why this URL must not be called now (None: go ahead)."""
    parts = urlsplit(url)
    host, port = (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)
    if explicitly_allowed(host, port, allowed):
        return None
    if "*" not in allowed:
        return f"{host}:{port} is no longer allowed (SLIM_WEBHOOK_ALLOWED_HOSTS changed)"
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError as e:
        return f"{host} does not resolve ({e})"
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if not ip.is_global:
            return f"{host} resolves to {ip}, an internal address; list the host explicitly to allow it"
    return None
