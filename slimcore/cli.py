"""``python -m slimcore run``: the local pipeline, no server. ``slim run`` execs into this.

Bad input ends with one line on stderr and exit status 2; an unexpected failure with one line and
status 1 (set ``SLIM_DEBUG=1`` for the traceback). Progress goes to stderr, so stdout stays clean.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any


def _progress(phase: str, frac: float, metrics: dict[str, Any]) -> None:
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    print(f"[{time.strftime('%H:%M:%S')}] {phase:<15} {frac:5.0%} {shown}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    from .errors import SlimError
    from .spec import parse_spec

    for p, what in ((args.model, "model"), (args.data, "data"), (args.spec, "spec")):
        if not (Path(p).is_file() or (what == "data" and Path(p).is_dir())):
            raise SlimError(f"{what} {'file or folder' if what == 'data' else 'file'} not found: {p}")
    spec = parse_spec(Path(args.spec).read_text())
    from .pipeline import run_job

    out = Path(args.output)
    if out.parent and not out.parent.exists():
        raise SlimError(f"output directory does not exist: {out.parent}")
    with tempfile.TemporaryDirectory(prefix="slim-run-") as scratch:  # extracted bundles and data archives
        report = run_job(Path(args.model), spec, Path(args.data), out, progress=_progress, device=args.device,
                         workdir=Path(scratch))
    text = json.dumps(report, indent=2)
    if args.report:
        Path(args.report).write_text(text)
    if args.plots:
        from .plots import write_plots

        write_plots(report, Path(args.plots))
    for w in report["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    st = report["stages"]
    print(json.dumps({
        "output": str(out), "params": [st["baseline"]["params"], st["finetuned"]["params"]],
        "flops": [st["baseline"]["flops"], st["finetuned"]["flops"]],
        "accuracy": [st["baseline"].get("accuracy"), st["pruned"].get("accuracy"), st["finetuned"].get("accuracy")],
        "warnings": len(report["warnings"]),
    }))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="slim", description="Slim a neural network by BatchNorm channel pruning")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="the whole pipeline locally, no server")
    run.add_argument("model", help="TorchScript file, torch.export .pt2 program, ONNX file (its external data "
                                   "files beside it) or a .zip/.tar.gz bundle of an ONNX file and its data files")
    run.add_argument("--spec", required=True, help="job spec JSON (version 1)")
    run.add_argument("--data", required=True, help=".npz; an ImageFolder tree (train/<class>/<image>) as a folder, "
                                                 ".zip, .tar or .tar.gz; or a folder of WebDataset .tar shards")
    run.add_argument("-o", "--output", required=True, help="where to write the slimmed model")
    run.add_argument("--report", help="where to write the gamma report JSON")
    run.add_argument("--plots", help="a directory for the report's PNG plots (gamma, channels, stages)")
    run.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.environ.get("SLIM_DEBUG"):
        warnings.filterwarnings("ignore")
    from .errors import SlimError

    try:
        return _run(args)
    except SlimError as e:
        print(f"slim: error: {e.detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slim: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: still one line unless debugging
        if os.environ.get("SLIM_DEBUG"):
            raise
        first = (str(e).splitlines() or [""])[0][:300]
        print(f"slim: internal error: {type(e).__name__}: {first} (SLIM_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
