"""(b) Per-step cost of the γ penalty: ours (one fused foreach step) versus Torch-Pruning 1.6.1's
``BNScalePruner.regularize`` (plain L1 and group-lasso mode), on torchvision ResNet-50, same process.

Prints milliseconds per call (median of N) and the ratio of each TP mode to ours.
Run: .venv/bin/python bench/bench_penalty.py [--steps 50] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch_pruning as tp
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from slimcore.groups import build_groups  # noqa: E402
from slimcore.methods import METHODS, MethodContext  # noqa: E402
from slimcore.spec import MethodSpec  # noqa: E402


def _time(fn, steps: int, device: torch.device) -> float:
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    dev = torch.device(args.device)
    model = torch.fx.symbolic_trace(torchvision.models.resnet50(num_classes=10)).to(dev)
    x = torch.randn(2, 3, 64, 64, device=dev)
    model(x).sum().backward()  # populate .grad
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    gs = build_groups(model, x, [])
    ours = METHODS.get("l1")(MethodSpec(name="l1", strength=1e-5), MethodContext(model, gs, bns))
    plain = tp.pruner.BNScalePruner(model, x, importance=tp.importance.BNScaleImportance(), reg=1e-5)
    glasso = tp.pruner.BNScalePruner(model, x, importance=tp.importance.BNScaleImportance(), reg=1e-5,
                                     group_lasso=True, ignored_layers=[model.fc])
    # TP 1.6.1's group-lasso mode crashes (None + float) on a group without BN, hence fc is ignored.
    for fn in (ours.after_backward, lambda: plain.regularize(model), lambda: glasso.regularize(model)):
        fn()  # warm-up
    t_ours = _time(ours.after_backward, args.steps, dev)
    t_plain = _time(lambda: plain.regularize(model), args.steps, dev)
    t_gl = _time(lambda: glasso.regularize(model), max(5, args.steps // 5), dev)
    print(f"device={dev} torch={torch.__version__} torch_pruning={tp.__version__} model=resnet50 bns={len(bns)}")
    print(f"ours (foreach L1)          {t_ours:8.3f} ms/step  ratio 1.00")
    print(f"TP BNScalePruner L1        {t_plain:8.3f} ms/step  ratio {t_plain / t_ours:.2f}")
    print(f"TP BNScalePruner grp-lasso {t_gl:8.3f} ms/step  ratio {t_gl / t_ours:.2f}")


if __name__ == "__main__":
    main()
