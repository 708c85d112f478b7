"""(a) The whole ``slim run`` pipeline versus a bare PyTorch loop doing the same epochs on the same model
and data, in one process. Goal: ratio ≤ 1.10.

Model: torchvision ResNet-18 (10 classes, γ randomised) as a ``.pt2``; data: scikit-learn digits
upsampled to 3×32×32. The bare loop trains the eager torchvision model for sparse+fine-tune epochs with
the same optimizer, batch size and loss; the pipeline adds import, evaluation at four stages, pruning,
export and its checks (and fine-tunes a smaller model, which works in its favour).
Run: .venv/bin/python bench/bench_pipeline.py [--epochs 4] [--arch resnet18]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from slimcore.pipeline import run_job  # noqa: E402
from slimcore.spec import parse_spec  # noqa: E402
from tests.zoo import digits_npz, make_model, save_model  # noqa: E402


def digits32(d: Path) -> Path:
    src = np.load(digits_npz(d / "digits8.npz"))
    out = {}
    for k in ("x", "x_val"):
        t = torch.from_numpy(src[k])
        out[k] = F.interpolate(t, size=(32, 32), mode="bilinear").repeat(1, 3, 1, 1).numpy()
    np.savez(d / "digits32.npz", x=out["x"], y=src["y"], x_val=out["x_val"], y_val=src["y_val"])
    return d / "digits32.npz"


def bare_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, bs: int, lr: float) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), bs):
            b = perm[i:i + bs]
            if len(b) < 2:
                continue
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4, help="per phase: sparse training and fine-tuning each")
    ap.add_argument("--arch", default="resnet18")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        npz = digits32(d)
        data = np.load(npz)
        x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
        model = make_model(args.arch)
        path = save_model(model, "pt2", d / "m.pt2", x[:1])
        spec = parse_spec(json.dumps({
            "method": {"name": "l1", "strength": 1e-4},
            "sparse_training": {"epochs": args.epochs, "batch_size": 64, "lr": 0.01},
            "prune": {"target": "channels", "amount": 0.5},
            "finetune": {"epochs": args.epochs, "batch_size": 64, "lr": 0.01}}))
        t0 = time.perf_counter()
        report = run_job(path, spec, npz, d / "out.pt2", workdir=d, device="cpu")
        t_job = time.perf_counter() - t0
        t_bare = bare_loop(make_model(args.arch), x, y, 2 * args.epochs, 64, 0.01)
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} arch={args.arch} "
          f"samples={len(x)} epochs={args.epochs}+{args.epochs}")
    print(f"slim run: {t_job:.1f} s   bare loop: {t_bare:.1f} s   ratio {t_job / t_bare:.3f} (goal ≤ 1.10)")
    print("stages:", {k: round(v.get("accuracy") or 0, 3) for k, v in report["stages"].items()})


if __name__ == "__main__":
    main()
