"""(c) CPU latency of slimmed versus original models at 30/50/70% of channels removed, next to FLOPs.

Each torchvision model (γ randomised) is saved as a ``.pt2``, lifted by the real importer, pruned by
the real planner at each fraction, and timed against its own unpruned lifted module in the same
process (same execution path, so the ratio is the pruning's effect alone). Batch 1, median of N.
Run: .venv/bin/python bench/bench_latency.py [--size 224] [--archs resnet18,mobilenet_v2,vgg11_bn]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from slimcore.groups import build_groups  # noqa: E402
from slimcore.lift import IMPORTERS  # noqa: E402
from slimcore.measure import count_flops, count_params, cpu_latency_ms  # noqa: E402
from slimcore.pipeline import _load_plugins  # noqa: E402
from slimcore.prune import apply, plan  # noqa: E402
from slimcore.spec import PruneSpec  # noqa: E402
from tests.zoo import make_model, save_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--archs", default="resnet18,mobilenet_v2,vgg11_bn")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    _load_plugins()
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} input=1x3x{args.size}x{args.size}")
    print(f"{'arch':<14}{'removed':>8}{'params':>9}{'FLOPs':>9}{'latency':>9}   (ratios slimmed/original)")
    for arch in args.archs.split(","):
        x = torch.randn(2, 3, args.size, args.size)
        with tempfile.TemporaryDirectory() as d:
            f = save_model(make_model(arch), "pt2", Path(d) / "m.pt2", x[:1])
            base = IMPORTERS.get("pt2")(f, tuple(x[:1].shape)).module
        f0, p0 = count_flops(base, x[:1]), count_params(base)
        t0 = cpu_latency_ms(base, x, repeat=args.repeat)
        for frac in (0.3, 0.5, 0.7):
            m = copy.deepcopy(base)
            gs = build_groups(m, x, [])
            p = plan(m, gs, PruneSpec(target="channels", amount=frac), "max", x)
            apply(m, gs, p.remove, calib=[x])
            t = cpu_latency_ms(m, x, repeat=args.repeat)
            print(f"{arch:<14}{frac:>8.0%}{count_params(m) / p0:>9.3f}{count_flops(m, x[:1]) / f0:>9.3f}{t / t0:>9.3f}"
                  f"   ({t0:.2f} ms → {t:.2f} ms)")


if __name__ == "__main__":
    main()
