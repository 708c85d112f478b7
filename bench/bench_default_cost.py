"""Issue 11's time goal, measured so that the machine's drift cannot decide it: a default job (no strength given,
the strength steered within the one run) against a bare loop of the same epochs and against the same job with
the strength given (the one the steered run ended at).

Why alternations: on this 2-vCPU host one timing of the same job spreads ±10–20% minutes apart, and the
quality sweep's single-row ratios (one bare loop per row) spread from 0.84 to 1.26. Here each alternation times
bare → steered → given back to back, ``--rounds`` times, after one untimed warm-up of each; the figures are
the ratio of the medians and the median of the per-alternation ratios (each pair timed within seconds of
each other), plus the median of each stage's wall time from the reports' ``stage_seconds``.

Run alone on the machine: .venv/bin/python bench/bench_default_cost.py [--methods l1,group_lasso]
[--target c50] [--rounds 7] [--model digits]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_quality import TARGETS, bare_seconds, prepare  # noqa: E402
from slimcore.pipeline import run_job  # noqa: E402
from slimcore.spec import parse_spec  # noqa: E402


def timed(path: Path, spec: dict[str, Any], npz: Path, out: Path) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    report = run_job(path, parse_spec(json.dumps(spec)), npz, out, device="cpu")
    return time.perf_counter() - t0, report


def stages(rows: list[dict[str, float]]) -> str:
    """Each stage's median wall time over the alternations, those of 50 ms or more."""
    meds = {k: statistics.median(x[k] for x in rows) for k in rows[0]}
    return ", ".join(f"{k} {v:.2f}" for k, v in meds.items() if v >= 0.05)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="digits")
    ap.add_argument("--methods", default="l1,ista,group_lasso,polarization,receding")
    ap.add_argument("--target", default="c50", choices=sorted(TARGETS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--sparse", type=int, default=10)
    ap.add_argument("--finetune", type=int, default=5)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    bs = 32 if args.model == "cancer" else 64
    print("| method | bare (s) | steered (s) | given (s) | steered ÷ bare: medians; per pair "
          "| steered ÷ given: medians; per pair | steered stages (s) | given stages (s) |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        npz, path, eager = prepare(args.model, d)
        for method in args.methods.split(","):
            base = {"sparse_training": {"epochs": args.sparse, "batch_size": bs}, "prune": TARGETS[args.target],
                    "finetune": {"epochs": args.finetune, "batch_size": bs}}
            steered = {**base, "method": {"name": method, "search": "control"}}
            _, r = timed(path, steered, npz, d / "out.pt2")  # warm-up; it also gives the strength to give
            given = {**base, "method": {"name": method, "strength": r["strength_control"]["final_strength"]}}
            timed(path, given, npz, d / "out.pt2")
            bare_seconds(eager, npz, args.sparse + args.finetune, bs)
            b, s, g, s_st, g_st = [], [], [], [], []
            for _ in range(args.rounds):
                b.append(bare_seconds(eager, npz, args.sparse + args.finetune, bs))
                t, r = timed(path, steered, npz, d / "out.pt2")
                s.append(t)
                s_st.append(r["stage_seconds"])
                t, r = timed(path, given, npz, d / "out.pt2")
                g.append(t)
                g_st.append(r["stage_seconds"])
            med = statistics.median

            print(f"| {method} | {med(b):.2f} | {med(s):.2f} | {med(g):.2f} "
                  f"| {med(s) / med(b):.2f}; {med(x / y for x, y in zip(s, b, strict=True)):.2f} "
                  f"| {med(s) / med(g):.2f}; {med(x / y for x, y in zip(s, g, strict=True)):.2f} "
                  f"| {stages(s_st)} | {stages(g_st)} |", flush=True)


if __name__ == "__main__":
    main()
