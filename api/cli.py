"""The ``slim`` command. Torch-free: ``slim run`` execs into ``python -m slimcore`` and ``slim worker``
into ``python -m worker``, so this process (and the API it can start) never imports torch, and client
commands start instantly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

USAGE = """usage: slim <command> [options]

commands:
  run MODEL --spec SPEC.json --data DATA -o OUT [--report R.json]   the whole pipeline locally, no server
  serve [--host 127.0.0.1] [--port 8000]                            API plus a local worker (embedded default)
  worker                                                            a Celery worker for the configured broker
  submit MODEL --spec SPEC.json --data DATA [--wait] [-o OUT]       submit a job to a running service (an ONNX
         [--callback-url URL]                                       model's external data files go with it;
                                                                    status changes POSTed to URL, signed)
  submit MODEL --spec SPEC.json --dataset-id ID [...]               the same with a registered dataset
  status ID | cancel ID | download ID [-o OUT]                      one job on a running service
  datasets add FILE_OR_URL [--name NAME] | ls | show ID | rm ID     register (upload once, or a URL the service
                                                                    may read), list, show, delete datasets
"""


def _serve(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="slim serve")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere)")
    args = ap.parse_args(argv)
    import uvicorn

    from .app import check_bind
    from .settings import get_settings

    settings = get_settings()
    try:
        check_bind(args.host, settings)
    except Exception as e:
        print(f"slim: error: {e}", file=sys.stderr)
        return 2
    worker = None
    if not args.no_worker:
        worker = subprocess.Popen([sys.executable, "-m", "worker"], env=os.environ.copy())
    try:
        uvicorn.run("api.app:create_app", factory=True, host=args.host, port=args.port, log_level="info")
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0


def _server_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--url", default=os.environ.get("SLIM_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--api-key", default=os.environ.get("SLIM_API_KEY"))


def _with_client(args: argparse.Namespace, body: Callable[[Any], int]) -> int:
    """Run ``body(client)``; the server's problems, an unreachable server and local file errors each end in
    one line on stderr and status 2, never a traceback."""
    import httpx

    from .client import SlimAPIError, SlimClient

    try:
        with SlimClient(args.url, args.api_key) as c:
            return body(c)
    except SlimAPIError as e:
        print(f"slim: error: {e}", file=sys.stderr)
    except httpx.HTTPError as e:
        print(f"slim: error: cannot reach {args.url}: {e}", file=sys.stderr)
    except OSError as e:
        print(f"slim: error: {e}", file=sys.stderr)
    return 2


def _result_name(job: dict[str, Any], output: str | None) -> Path:
    return Path(output or (job.get("summary") or {}).get("filename") or f"slim-{job['id']}")


def _submit(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="slim submit")
    ap.add_argument("model")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--data", help="the data file, sent with the job")
    ap.add_argument("--dataset-id", help="instead of --data: a dataset registered with `slim datasets add`")
    ap.add_argument("--wait", action="store_true",
                    help="follow the job's progress until it ends, print a summary, download the result")
    ap.add_argument("-o", "--output", help="where to download the slimmed model (implies --wait; default: the "
                                           "server's suggested name in the current directory)")
    ap.add_argument("--callback-url", help="POST every status change here (Standard Webhooks; the service's "
                                           "operator must allow the host)")
    _server_options(ap)
    args = ap.parse_args(argv)
    from .progress import ProgressView, summary_table

    if (args.data is None) == (args.dataset_id is None):
        print("slim: error: give the data as --data FILE or --dataset-id ID (one of the two)", file=sys.stderr)
        return 2
    for p in (args.model, args.data, args.spec):
        if p is not None and not Path(p).is_file():
            print(f"slim: error: file not found: {p}", file=sys.stderr)
            return 2

    def body(c: Any) -> int:
        job = c.submit(Path(args.model), Path(args.spec), Path(args.data) if args.data else None,
                       dataset_id=args.dataset_id, callback_url=args.callback_url)
        print(f"job {job['id']} {job['status']}", file=sys.stderr)
        if not (args.wait or args.output):
            print(json.dumps(job))
            return 0
        view = ProgressView()
        job = c.wait(job["id"], on_update=view.update)
        view.finish(job)
        if job["status"] != "succeeded":
            err = job.get("error") or {}
            print(f"slim: error: job {job['id']} {job['status']}: {err.get('detail', '')}".rstrip(": "),
                  file=sys.stderr)
            return 1
        print(summary_table(job), file=sys.stderr)
        dest = c.download(job["id"], _result_name(job, args.output))
        print(f"downloaded {dest}", file=sys.stderr)
        kind = next((k for k in (".zip", ".tar.gz", ".tar") if _result_name(job, None).name.endswith(k)), None)
        if kind and not dest.name.endswith(kind):  # -o slim.onnx for a model with external data
            print(f"note: {dest} is a {kind} bundle of the .onnx model and its external data file",
                  file=sys.stderr)
        print(json.dumps(job))
        return 0

    return _with_client(args, body)


def _job_command(cmd: str, argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=f"slim {cmd}")
    ap.add_argument("job_id")
    if cmd == "download":
        ap.add_argument("-o", "--output", help="file to write (default: the server's suggested name)")
    _server_options(ap)
    args = ap.parse_args(argv)

    def body(c: Any) -> int:
        if cmd == "status":
            print(json.dumps(c.get(args.job_id), indent=2))
        elif cmd == "cancel":
            print(json.dumps(c.cancel(args.job_id)))
        else:
            print(str(c.download(args.job_id, _result_name(c.get(args.job_id), args.output))))
        return 0

    return _with_client(args, body)


def _datasets(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="slim datasets")
    sub = ap.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="register a local file (uploaded once) or a URL the service may read")
    add.add_argument("source", metavar="FILE_OR_URL")
    add.add_argument("--name", help="a name for people (default: the file name)")
    sub.add_parser("ls", help="your datasets, newest first")
    for action in ("show", "rm"):
        sub.add_parser(action).add_argument("dataset_id")
    for p in sub.choices.values():
        _server_options(p)
    args = ap.parse_args(argv)
    if args.action == "add" and "://" not in args.source and not Path(args.source).is_file():
        print(f"slim: error: {args.source} is neither a file nor a URL (scheme://…)", file=sys.stderr)
        return 2

    def body(c: Any) -> int:
        if args.action == "add":
            is_url = "://" in args.source
            ds = c.add_dataset(None if is_url else Path(args.source), url=args.source if is_url else None,
                               name=args.name)
            print(f"dataset {ds['id']} ({ds['kind']}, {ds['bytes']} bytes)", file=sys.stderr)
            print(json.dumps(ds))
        elif args.action == "ls":
            found = c.datasets()
            if not found:
                print("no datasets yet: slim datasets add FILE_OR_URL", file=sys.stderr)
            for ds in found:
                print(f"{ds['id']}  {ds['kind']:6}  {ds['bytes']:>14}  {ds['jobs_active']:>3} active  "
                      f"{ds['created_at'][:19]}  {ds['url'] or ds['name']}")
        elif args.action == "show":
            print(json.dumps(c.dataset(args.dataset_id), indent=2))
        else:
            c.delete_dataset(args.dataset_id)
            print(f"deleted dataset {args.dataset_id}", file=sys.stderr)
        return 0

    return _with_client(args, body)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        os.execv(sys.executable, [sys.executable, "-m", "slimcore", *argv])
    if cmd == "worker":
        os.execv(sys.executable, [sys.executable, "-m", "worker", *rest])
    if cmd == "serve":
        return _serve(rest)
    if cmd == "submit":
        return _submit(rest)
    if cmd in ("status", "cancel", "download"):
        return _job_command(cmd, rest)
    if cmd == "datasets":
        return _datasets(rest)
    print(f"slim: error: unknown command {cmd!r}\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
