"""Issue 5's comparison on real data: every sparsity method, and "no sparse training, prune by |γ|", at 50%
and 70% of channels removed — accuracy right after pruning (the number that tells methods apart), after
fine-tuning, parameters and FLOPs removed, and a text histogram of the final importances.

Models: the digits CNN (trained on scikit-learn digits, 8×8) and torchvision ResNet-18 trained briefly on
digits upsampled to 3×32×32. Same short schedule for every method (sparse 5 epochs, fine-tune 3), with
strengths picked for that short schedule (the papers' defaults assume 160 epochs), so the table compares
methods under equal budget, not their best settings.
With ``--pilot`` no strength is given: the pipeline's strength pilot picks it (slimcore/strength.py), and
the table adds the strength picked and the epoch sparse training stopped at.
Run: .venv/bin/python bench/bench_methods.py [--models digits,resnet18] [--sparse 5] [--finetune 3] [--pilot]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_pipeline import bare_loop, digits32  # noqa: E402
from slimcore.pipeline import run_job  # noqa: E402
from slimcore.spec import parse_spec  # noqa: E402
from tests.zoo import digits_npz, make_model, save_model, trained_digits_cnn  # noqa: E402

# Strengths for a ~100-step schedule: the total push Σ lr · strength · (per-method gain) is made comparable
# to |γ| itself (L1: λ·Σlr ≈ 0.5; ISTA: ρ·λ_l·Σlr ≈ 0.5 with λ_l ≈ 10; receding: κ·0.17·Σlr ≈ 2 on w).
METHODS = {"none (|γ| only)": None, "l1": {"name": "l1", "strength": 0.5},
           "group_lasso": {"name": "group_lasso", "strength": 0.5}, "ista": {"name": "ista", "strength": 0.05},
           "receding": {"name": "receding", "strength": 10.0}, "polarization": {"name": "polarization",
                                                                                 "strength": 0.5}}


def text_hist(values: list[float], bins: int = 10) -> str:
    v = np.asarray(values)
    counts, _ = np.histogram(v, bins=bins, range=(0, max(float(v.max()), 1e-8)))
    blocks = " ▁▂▃▄▅▆▇█"
    top = max(int(counts.max()), 1)
    return "".join(blocks[min(8, int(np.ceil(8 * c / top)))] for c in counts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="digits,resnet18")
    ap.add_argument("--sparse", type=int, default=5)
    ap.add_argument("--finetune", type=int, default=3)
    ap.add_argument("--pilot", action="store_true", help="give no strength: the strength pilot picks it")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    extra = " strength (pilot) | stopped at |" if args.pilot else ""
    print("| model | method | removed | acc before | acc pruned | acc fine-tuned | params removed | FLOPs removed "
          f"| final importances (0 → max) |{extra}")
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.pilot else ""))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for model_name in args.models.split(","):
            if model_name == "digits":
                npz = digits_npz(d / "digits.npz")
                path = save_model(trained_digits_cnn(npz), "pt2", d / "digits.pt2", torch.zeros(1, 1, 8, 8))
            else:
                npz = digits32(d)
                data = np.load(npz)
                model = make_model(model_name)
                torch.manual_seed(0)
                bare_loop(model, torch.from_numpy(data["x"]), torch.from_numpy(data["y"]), 4, 64, 0.05)
                path = save_model(model.eval(), "pt2", d / f"{model_name}.pt2", torch.zeros(1, 3, 32, 32))
            for label, method in METHODS.items():
                for amount in (0.5, 0.7):
                    spec = {"sparse_training": {"epochs": 0 if method is None else args.sparse, "lr": 0.02},
                            "prune": {"target": "channels", "amount": amount},
                            "finetune": {"epochs": args.finetune, "lr": 0.01}}
                    if method is not None:
                        spec["method"] = {k: v for k, v in method.items() if k != "strength" or not args.pilot}
                    r = run_job(path, parse_spec(json.dumps(spec)), npz, d / "out.pt2", device="cpu")
                    st = r["stages"]
                    imps = [v for lay in r["layers"] for v in _centers(lay["gamma_after"]["histogram"])]
                    print(f"| {model_name} | {label} | {amount:.0%} | {st['baseline']['accuracy']:.3f} "
                          f"| {st['pruned']['accuracy']:.3f} | {st['finetuned']['accuracy']:.3f} "
                          f"| {1 - st['finetuned']['params'] / st['baseline']['params']:.1%} "
                          f"| {1 - st['finetuned']['flops'] / st['baseline']['flops']:.1%} | `{text_hist(imps)}` |"
                          + (_pilot_cells(r) if args.pilot else ""), flush=True)


def _pilot_cells(r: dict) -> str:
    p = r.get("pilot") or {}
    if not p.get("used"):
        return " – | – |"
    stop = r.get("sparse_training_stopped_early_at")
    return f" {p['strength']:.3g} (reached {p.get('sparsity_reached', 0):.0%}) | {stop or 'end'} |"


def _centers(h: dict) -> list[float]:
    """Expand a report histogram back into bin-centre samples (enough for a shape plot)."""
    e, c = h["edges"], h["counts"]
    return [(e[i] + e[i + 1]) / 2 for i in range(len(c)) for _ in range(c[i])]


if __name__ == "__main__":

    main()
