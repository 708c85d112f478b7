"""ONNX: import time, and onnxruntime latency of original versus slimmed models next to the FLOPs ratio.

Each torchvision model (γ randomised) is exported the way most users do (``torch.onnx.export`` in eval
mode, BatchNorm folded, dynamic batch), imported, given BatchNorms back, pruned by the global |γ|
threshold at 30/50/70% of channels (no training: this measures speed, not accuracy), exported, and both
files are timed in onnxruntime (CPU, batch 1, median of N) in the same process.
Run: .venv/bin/python bench/bench_onnx.py [--size 224] [--archs resnet18,mobilenet_v2,vgg11_bn]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from slimcore.export import EXPORTERS  # noqa: E402
from slimcore.groups import build_groups  # noqa: E402
from slimcore.lift import IMPORTERS  # noqa: E402
from slimcore.lift.bn_insert import reinsert_bn  # noqa: E402
from slimcore.measure import count_flops  # noqa: E402
from slimcore.pipeline import _load_plugins  # noqa: E402
from slimcore.prune import apply, plan  # noqa: E402
from slimcore.spec import PruneSpec  # noqa: E402
from tests.zoo import make_model  # noqa: E402


def ort_ms(path: Path, x: np.ndarray, repeat: int) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for _ in range(3):
        sess.run(None, {name: x})
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--archs", default="resnet18,mobilenet_v2,vgg11_bn")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--round-to", type=int, default=1, help="prune.round_to: keep channel counts multiples of N")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    _load_plugins()
    print(f"torch={torch.__version__} onnxruntime={ort.__version__} threads={torch.get_num_threads()} "
          f"input=1x3x{args.size}x{args.size} round_to={args.round_to}")
    print(f"{'arch':<14}{'import s':>9}{'removed':>8}{'FLOPs':>8}{'ORT latency':>12}   (ratios slimmed/original)")
    for arch in args.archs.split(","):
        x = torch.randn(2, 3, args.size, args.size)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "m.onnx"
            torch.onnx.export(make_model(arch), (x,), str(src), dynamo=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
            t0 = time.perf_counter()
            imp = IMPORTERS.get("onnx")(src, None)
            t_import = time.perf_counter() - t0
            base = imp.module
            reinsert_bn(base, [x])
            f0 = count_flops(base, x[:1])
            t_orig = ort_ms(src, x[:1].numpy(), args.repeat)
            for frac in (0.3, 0.5, 0.7):
                m = copy.deepcopy(base)
                gs = build_groups(m, x, [], imp.meta.get("unprunable"))
                spec = PruneSpec(target="channels", amount=frac, round_to=args.round_to)
                apply(m, gs, plan(m, gs, spec, "max", x).remove, [x])
                out = Path(tmp) / f"s{frac}.onnx"
                EXPORTERS.get("onnx")(m.eval(), imp, out, x)
                t = ort_ms(out, x[:1].numpy(), args.repeat)
                print(f"{arch:<14}{t_import:>9.2f}{frac:>8.0%}{count_flops(m, x[:1]) / f0:>8.3f}{t / t_orig:>12.3f}"
                      f"   ({t_orig:.2f} ms → {t:.2f} ms)")


if __name__ == "__main__":
    main()
