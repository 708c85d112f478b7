"""Start the real service as users do (``slim serve``, ``slim worker``) in subprocesses, for e2e tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import closing
from pathlib import Path

import httpx
import pytest

SLIM = str(Path(sys.executable).with_name("slim"))


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def need_server(name: str, port: int) -> None:
    """Skip when a server is absent — except under CI, where its absence fails the run."""
    if not reachable("127.0.0.1", port):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not reachable on 127.0.0.1:{port} (required under CI)")
        pytest.skip(f"{name} is not reachable on 127.0.0.1:{port}")


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args, self.env, self.log = args, env, log
        self.p: subprocess.Popen | None = None

    def start(self) -> Proc:
        f = open(self.log, "ab")  # noqa: SIM115 (owned by the process)
        self.p = subprocess.Popen(self.args, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.p is not None and self.p.poll() is None:
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


class Service:
    """An API (and optionally its embedded worker) plus any number of separate workers."""

    def __init__(self, tmp: Path, env: dict[str, str], embedded: bool) -> None:
        self.tmp, self.port = tmp, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "SLIM_DATA_DIR": str(tmp / "var"), "PYTHONWARNINGS": "ignore",
                    "SLIM_HEARTBEAT_TIMEOUT_S": "4", "SLIM_CANCEL_GRACE_S": "10", **env}
        args = [SLIM, "serve", "--port", str(self.port)] + ([] if embedded else ["--no-worker"])
        self.api = Proc(args, self.env, tmp / "api.log")
        self.workers: list[Proc] = []

    def start_api(self) -> None:
        self.api.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("API did not start:\n" + self.api.log.read_text()[-3000:])

    def start_worker(self) -> Proc:
        w = Proc([SLIM, "worker"], self.env, self.tmp / f"worker{len(self.workers)}.log").start()
        self.workers.append(w)
        return w

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.api.stop()

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.tmp.glob("*.log")))


def wait_for(pred, timeout: float, what: str, poll: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def fresh_postgres_db() -> tuple[str, callable]:
    import psycopg

    name = f"slim_e2e_{uuid.uuid4().hex[:8]}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return f"postgresql://postgres@127.0.0.1:5432/{name}", drop
