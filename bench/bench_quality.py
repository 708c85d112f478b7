"""Issue 11's quality benchmark: what a user gets with **no strength given**, per method and way of finding it.

For each model, method, strength search (``pilot``: short pilot runs first, the default; ``control``: steered
within the one run) and target (50% / 70% of channels, ``params: 0.9``): accuracy right after pruning, after
fine-tuning (with knowledge distillation from the original, the default), parameters and FLOPs removed, and
wall time ÷ a bare training loop of the same epochs, data and batch size measured in the same process.
Every model first runs one untimed job (a given strength): a worker process serves many jobs, and the first
one in a process pays one-time costs (lazy imports, torch.export's first trace) that sessions 8 and 9 charged
to whichever row ran first, the steered one (digits l1 c50: 1.36× the bare loop cold, against a warm profile
that put the steered and the given job within 1% of each other). ``--cold`` skips it.
Peer rows (``--peer``): Torch-Pruning's ``BNScalePruner`` (network slimming) and ``GrowingRegPruner`` (growing
regularization) in a hand-written loop on the same model, data and epochs (bench-only; installed as a dev
dependency), pruned to the same channel share.

Models: the digits CNN (scikit-learn digits, 8×8), ResNet-18 on digits upsampled to 3×32×32, and an MLP with
BatchNorm1d on scikit-learn's breast-cancer table (569 rows, 30 features): data sets a package ships; and
``signal``, a held-out task none of the defaults were tuned on (tests/zoo.py: a 1-D CNN of five Conv1d-BN
layers on 10 classes of noisy waveforms, uploaded as a traced TorchScript file with no ``input_shape``).
Run alone on the machine (bench/README.md): .venv/bin/python bench/bench_quality.py [--models digits,cancer]
[--methods l1,ista,polarization] [--searches pilot,control] [--targets c50,c70,p90] [--sparse 10] [--finetune 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_pipeline import bare_loop, digits32  # noqa: E402
from slimcore.pipeline import run_job  # noqa: E402
from slimcore.spec import parse_spec  # noqa: E402
from tests.zoo import (  # noqa: E402
    digits_npz,
    make_model,
    save_model,
    signal_npz,
    trained_digits_cnn,
    trained_signal_cnn,
)

TARGETS = {"c50": {"target": "channels", "amount": 0.5}, "c70": {"target": "channels", "amount": 0.7},
           "p90": {"target": "params", "amount": 0.9}}


class TableMLP(nn.Module):
    def __init__(self, d: int = 30, width: int = 64, classes: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU(),
                                 nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def cancer(d: Path) -> tuple[Path, Path, nn.Module]:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype("float32")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    x, y = x[order], y[order].astype("int64")
    npz = d / "cancer.npz"
    np.savez(npz, x=x[:450], y=y[:450], x_val=x[450:], y_val=y[450:])
    torch.manual_seed(0)
    model = TableMLP()
    bare_loop(model, torch.from_numpy(x[:450]), torch.from_numpy(y[:450]), 30, 32, 0.05)
    return npz, save_model(model.eval(), "pt2", d / "cancer.pt2", torch.zeros(1, 30)), model


def prepare(name: str, d: Path) -> tuple[Path, Path, nn.Module]:
    """(data, the uploaded .pt2, the eager model it was saved from: the bare loop and the peer train that)."""
    if name == "digits":
        npz = digits_npz(d / "digits.npz")
        model = trained_digits_cnn(npz)
        return npz, save_model(model, "pt2", d / "digits.pt2", torch.zeros(1, 1, 8, 8)), model
    if name == "cancer":
        return cancer(d)
    if name == "signal":  # traced TorchScript, no input_shape: the service reads it off the .npz
        npz = signal_npz(d / "signal.npz")
        model = trained_signal_cnn(npz)
        return npz, save_model(model, "trace", d / "signal.pt", torch.zeros(1, 1, 128)), model
    npz = digits32(d)
    data = np.load(npz)
    model = make_model(name)
    torch.manual_seed(0)
    bare_loop(model, torch.from_numpy(data["x"]), torch.from_numpy(data["y"]), 4, 64, 0.05)
    return npz, save_model(model.eval(), "pt2", d / f"{name}.pt2", torch.zeros(1, 3, 32, 32)), model


def bare_seconds(eager: nn.Module, npz: Path, epochs: int, bs: int) -> float:
    """A plain SGD loop over the same data, epochs and batch size, on a copy of the eager model."""
    model = copy.deepcopy(eager)
    data = np.load(npz)
    return bare_loop(model, torch.from_numpy(data["x"]), torch.from_numpy(data["y"]), epochs, bs, 0.01)


# label → (Torch-Pruning pruner, reg, delta_reg every 10 steps): growing regularization at its defaults and at the
# best of 1e-5 / 5e-4 / 1e-3 / 1e-2 on this job (2026-12-07: fine-tuned 0.985 / 0.987 / 0.997 / 0.997 at c70)
PEERS = {"Torch-Pruning BNScalePruner (λ 1e-4)": ("bnscale", 1e-4, 0.0),
         "Torch-Pruning GrowingRegPruner (defaults: λ 1e-5, +1e-5)": ("growingreg", 1e-5, 1e-5),
         "Torch-Pruning GrowingRegPruner (hand-tuned: λ 1e-2, +1e-2)": ("growingreg", 1e-2, 1e-2)}


def tp_peer(eager: nn.Module, npz: Path, amount: float, sparse: int, finetune: int, kind: str = "bnscale",
            reg: float = 1e-4, delta_reg: float = 0.0) -> dict:
    """Torch-Pruning with a hand-written loop: sparse training with its regularizer, one global prune to
    ``amount`` of channels, fine-tuning; same epochs, batch 64. ``bnscale``: network slimming (L1 on γ, ranked
    by |γ|); ``growingreg``: growing regularization (Wang et al. 2021), an L2 penalty on each group that grows
    by ``delta_reg`` × its standardised weakness every 10 steps, ranked by the groups' L2 norm."""
    import torch_pruning as tp

    data = np.load(npz)
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    xv, yv = torch.from_numpy(data["x_val"]), torch.from_numpy(data["y_val"])
    model = copy.deepcopy(eager)
    common = {"global_pruning": True, "pruning_ratio": amount, "ignored_layers": [model.head[-1]]}
    if kind == "growingreg":
        pruner = tp.pruner.GrowingRegPruner(model, torch.zeros(1, 1, 8, 8), reg=reg, delta_reg=delta_reg,
                                            importance=tp.importance.GroupMagnitudeImportance(p=2), **common)
    else:
        pruner = tp.pruner.BNScalePruner(model, torch.zeros(1, 1, 8, 8), reg=reg,
                                         importance=tp.importance.BNScaleImportance(), **common)
    steps = [0]

    def regularize() -> None:
        pruner.regularize(model)
        steps[0] += 1
        if kind == "growingreg" and steps[0] % 10 == 0:
            pruner.update_reg()

    t0 = time.perf_counter()
    _train(model, x, y, sparse, 0.01, regularize)
    base = sum(p.numel() for p in eager.parameters())
    pruner.step()
    acc_pruned = _acc(model, xv, yv)
    _train(model, x, y, finetune, 0.001, lambda: None)
    return {"pruned": acc_pruned, "finetuned": _acc(model, xv, yv), "seconds": time.perf_counter() - t0,
            "params_removed": 1 - sum(p.numel() for p in model.parameters()) / base}


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, after_backward) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        model.train()
        for i in range(0, len(x), 64):
            loss = nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            after_backward()
            opt.step()


def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="digits,cancer")
    ap.add_argument("--methods", default="l1,group_lasso,ista,receding,polarization")
    ap.add_argument("--searches", default="pilot,control",
                    help="pilot, control, given (the strength the control row of the same method and target "
                         "ended at, given in the spec: the same job with a strength given; run after control)")
    ap.add_argument("--targets", default="c50,c70,p90")
    ap.add_argument("--sparse", type=int, default=10)
    ap.add_argument("--finetune", type=int, default=5)
    ap.add_argument("--peer", action="store_true", help="add Torch-Pruning's BNScalePruner rows (digits only)")
    ap.add_argument("--bare-each", action="store_true",
                    help="time the bare loop again right before each row (the machine's speed drifts: the same "
                         "digits job read 1.10 and 1.47 x a bare loop timed once, minutes apart)")
    ap.add_argument("--cold", action="store_true", help="no untimed warm-up job per model (module docstring)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="run each row with spec seeds 0..N-1 (data order, initial strength checks) and print the "
                         "mean: on the digits' 360 held-out samples one sample is 0.28 points")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print("| model | method | search | target | acc base | acc pruned | acc fine-tuned | params removed "
          "| FLOPs removed | near zero reached | time ÷ bare loop |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for model_name in args.models.split(","):
            npz, path, eager = prepare(model_name, d)
            bs = 32 if model_name == "cancer" else 64
            if not args.cold:
                for how in ({"strength": 1e-4}, {"search": "control"}):  # both paths' first calls
                    warm = {"method": {"name": "l1", **how}, "sparse_training": {"epochs": 1, "batch_size": bs},
                            "prune": TARGETS["c50"], "finetune": {"epochs": 1, "batch_size": bs}}
                    run_job(path, parse_spec(json.dumps(warm)), npz, d / "warm.pt2", device="cpu")
            bare = bare_seconds(eager, npz, args.sparse + args.finetune, bs)
            found_strength: dict[tuple[str, str], float] = {}
            control_ratio: dict[tuple[str, str], float] = {}  # ÷ its bare loop: the machine's speed drifts
            for method in args.methods.split(","):
                for search in args.searches.split(","):
                    for tkey in args.targets.split(","):
                        how: dict = {"search": search}
                        if search == "given":
                            if (method, tkey) not in found_strength:
                                continue
                            how = {"strength": found_strength[method, tkey]}
                        spec = {"method": {"name": method, **how},
                                "sparse_training": {"epochs": args.sparse, "batch_size": bs},
                                "prune": TARGETS[tkey], "finetune": {"epochs": args.finetune, "batch_size": bs}}
                        if args.bare_each:
                            bare = bare_seconds(eager, npz, args.sparse + args.finetune, bs)
                        rows, secs, failed = [], 0.0, None
                        for seed in range(args.seeds):
                            t0 = time.perf_counter()
                            try:
                                rows.append(run_job(path, parse_spec(json.dumps({**spec, "seed": seed})), npz,
                                                    d / "out.pt2", device="cpu"))
                            except Exception as e:  # a refusal is a row too
                                failed = str(e)[:80]
                                break
                            secs += (time.perf_counter() - t0) / args.seeds
                        if failed is not None:
                            print(f"| {model_name} | {method} | {search} | {tkey} | {failed} |", flush=True)
                            continue
                        r = rows[0]
                        found = r["strength_control"] if search == "control" else r["pilot"]
                        near = found.get("near_zero_reached", found.get("sparsity_reached"))
                        if search == "control":
                            found_strength[method, tkey] = found["final_strength"]
                            control_ratio[method, tkey] = secs / bare
                        stopped = r.get("sparse_training_stopped_early_at")
                        vs_given = (f" (÷ given {control_ratio[method, tkey] / (secs / bare):.2f}"
                                    f"{f'; given stopped sparse training at epoch {stopped}' if stopped else ''})"
                                    if search == "given" else "")

                        def mean(stage: str, key: str, rows: list = rows) -> float:
                            return float(np.mean([x["stages"][stage][key] for x in rows]))

                        ft = [x["stages"]["finetuned"]["accuracy"] for x in rows]
                        spread = f" ({min(ft):.3f}–{max(ft):.3f})" if len(rows) > 1 else ""
                        print(f"| {model_name} | {method} | {search} | {tkey} | {mean('baseline', 'accuracy'):.3f} "
                              f"| {mean('pruned', 'accuracy'):.3f} | {mean('finetuned', 'accuracy'):.3f}{spread} "
                              f"| {1 - mean('finetuned', 'params') / r['stages']['baseline']['params']:.1%} "
                              f"| {1 - mean('finetuned', 'flops') / r['stages']['baseline']['flops']:.1%} "
                              f"| {'–' if near is None else f'{near:.0%}'} | {secs / bare:.2f}{vs_given} |", flush=True)
            if args.peer and model_name == "digits":
                for label, (kind, reg, delta) in PEERS.items():
                    for amount in (0.5, 0.7):
                        p = tp_peer(eager, npz, amount, args.sparse, args.finetune, kind, reg, delta)
                        print(f"| digits | {label} | hand loop | c{int(amount * 100)} | – "
                              f"| {p['pruned']:.3f} | {p['finetuned']:.3f} | {p['params_removed']:.1%} | – | – "
                              f"| {p['seconds'] / bare:.2f} |", flush=True)


if __name__ == "__main__":
    main()
