"""Where the time goes before training starts: import, grouping and planning per zoo model.

For each zoo model (tests/zoo_models.py), saved in one format (default ``trace``), time the import
(``detect_format`` + the importer, as ``slim run`` does), the channel grouping
(``slimcore.groups.build_groups``) and the planning (``slimcore.prune.plan`` at 40% of channels), against the
number of nodes of the lifted fx graph; name the slowest step. Each model runs in its own subprocess with a
timeout (rexnet_100 once spent more than 15 minutes in grouping), recorded as ``timeout`` with the step it was
in. The same worker reports each model's BatchNorm coverage (the share of BN channels in a prunable group),
which tests/test_zoo.py uses for the README's coverage figure.

    PYTHONPATH=. OMP_NUM_THREADS=1 YOLO_OFFLINE=1 python -m bench.bench_zoo_time            # every model
    python -m bench.bench_zoo_time --models resnet18 timm/dla46_c --timeout 300 --out zoo_time.json
    python -m bench.bench_zoo_time --one resnet18 --fmt trace      # one model in this process, JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("save", "import", "grouping", "planning")


def bn_coverage(model, gs) -> dict:  # noqa: ANN001
    """Share of BatchNorm channels that belong to a prunable group (``gs.groups``)."""
    import torch

    from slimcore.groups import all_bns

    total = {id(m): int(m.num_features) for _, m in all_bns(model)}
    seen: dict[int, set[int]] = {}
    for g in gs.groups:
        for b in g.bns:
            seen.setdefault(id(b.module), set()).update(int(i) for i in torch.as_tensor(b.bn_idx).tolist())
    covered = sum(len(v) for k, v in seen.items() if k in total)
    n = sum(total.values())
    return {"bn_channels": n, "prunable_bn_channels": covered, "coverage": round(covered / n, 4) if n else None,
            "bn_layers": len(total), "prunable_bn_layers": len(seen), "skipped_groups": len(gs.skipped)}


def measure_one(name: str, fmt: str, model_file: Path | None = None) -> dict:
    """Run the steps in this process, printing a progress line per step on stderr (the parent reads the last)."""
    import torch

    from slimcore.formats import detect_format
    from slimcore.groups import build_groups
    from slimcore.lift import IMPORTERS
    from slimcore.pipeline import _load_plugins
    from slimcore.prune import plan
    from slimcore.spec import PruneSpec
    from tests.zoo_models import BY_NAME, KIND, SUFFIX, save

    torch.set_num_threads(1)
    entry = BY_NAME[name]
    row: dict = {"model": name, "format": fmt}

    def step(s: str) -> None:
        print(f"STEP {s}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        step("save")
        t = time.perf_counter()
        path = model_file or save(entry, fmt, Path(tmp) / f"model{SUFFIX[fmt]}")
        row["save_s"] = round(time.perf_counter() - t, 3)
        step("import")
        _load_plugins()
        t = time.perf_counter()
        kind = KIND[fmt] if model_file is None else detect_format(path)  # (the file name is ours: no guessing)
        imported = IMPORTERS.get(kind)(path, tuple(entry.shape))
        model = imported.module
        x = torch.randn((2, *entry.shape[1:]))
        if kind == "onnx":
            from slimcore.lift.bn_insert import reinsert_bn

            reinsert_bn(model, [x])
        row["import_s"] = round(time.perf_counter() - t, 3)
        row["fx_nodes"] = len(model.graph.nodes)
        step("grouping")
        t = time.perf_counter()
        gs = build_groups(model, x, [], imported.meta.get("unprunable"))
        row["grouping_s"] = round(time.perf_counter() - t, 3)
        row["groups"] = len(gs.groups)
        row.update(bn_coverage(model, gs))
        step("planning")
        t = time.perf_counter()
        p = plan(model, gs, PruneSpec(target="channels", amount=0.4, min_channels=1), "max", x)
        row["planning_s"] = round(time.perf_counter() - t, 3)
        row["removed_channels"] = p.removed_channels
    row["slowest"] = max(("import", "grouping", "planning"), key=lambda s: row[f"{s}_s"])
    row["status"] = "ok"
    return row


def run_isolated(name: str, fmt: str, timeout: float, model_file: Path | None = None) -> dict:
    """``measure_one`` in a subprocess with a timeout; a hang or crash becomes a row, never an exception."""
    cmd = [sys.executable, "-m", "bench.bench_zoo_time", "--one", name, "--fmt", fmt]
    if model_file is not None:
        cmd += ["--model-file", str(model_file)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "YOLO_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        steps = [ln[5:] for ln in err.splitlines() if ln.startswith("STEP ")]
        return {"model": name, "format": fmt, "status": "timeout", "slowest": steps[-1] if steps else "?",
                "reason": f"timeout after {timeout:.0f}s in {steps[-1] if steps else '?'}"}
    if r.returncode == 0 and r.stdout.strip():
        row = json.loads(r.stdout.strip().splitlines()[-1])
        row["wall_s"] = round(time.perf_counter() - t, 2)
        return row
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip() and not ln.startswith("STEP ")]
    steps = [ln[5:] for ln in r.stderr.splitlines() if ln.startswith("STEP ")]
    return {"model": name, "format": fmt, "status": "error", "step": steps[-1] if steps else "?",
            "reason": (lines[-1] if lines else f"exit {r.returncode}")[:300]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="zoo names (default: all)")
    ap.add_argument("--fmt", default="trace")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--model-file", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(measure_one(a.one, a.fmt, Path(a.model_file) if a.model_file else None)))
        return 0
    sys.path.insert(0, str(ROOT))
    from tests.zoo_models import BY_NAME, ENTRIES

    names = a.models or [e.name for e in ENTRIES]
    rows = []
    print(f"{'model':34s} {'nodes':>6s} {'import':>8s} {'group':>8s} {'plan':>8s}  slowest   coverage")
    for n in names:
        fmt = a.fmt if BY_NAME[n].applies(a.fmt) else "pt2"
        row = run_isolated(n, fmt, a.timeout)
        rows.append(row)
        if row["status"] == "ok":
            print(f"{n:34s} {row['fx_nodes']:6d} {row['import_s']:8.2f} {row['grouping_s']:8.2f} "
                  f"{row['planning_s']:8.2f}  {row['slowest']:9s} {row['coverage']:.0%}", flush=True)
        else:
            print(f"{n:34s} {row['status']}: {row['reason']}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
