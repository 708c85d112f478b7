"""A latency target against FLOPs targets, on the runtime the model is served with (issue 12).

For each model, runtime and batch size: the model saved the way users save it (``torch.onnx.export`` for
onnxruntime and TensorRT, ``torch.jit.trace`` for torch), lifted, γ randomised (no training: this measures
speed, not accuracy), then pruned three ways and timed interleaved with the original on that runtime:

- ``prune.target: "latency"`` at each amount (the closed loop: its tries and its own measured ratio, and
  the ratio measured again afterwards on the applied plan);
- a ``flops`` target removing the same FLOPs as the latency plan did, ``round_to: 1``;
- the same ``flops`` target with Torch-Pruning-style fixed ``round_to: 8``.

Run alone (2 cores: any other process inflates times), e.g.
  .venv/bin/python bench/bench_latency_target.py --models resnet18,mobilenet_v2 --runtimes onnxruntime
GPU rows, where a GPU is lent: ``--device cuda --runtimes tensorrt,torch``.
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

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from slimcore.export import EXPORTERS  # noqa: E402
from slimcore.groups import build_groups  # noqa: E402
from slimcore.latency.job import LatencyJob  # noqa: E402
from slimcore.latency.runtime import hardware, open_runtime, ratio, resolve  # noqa: E402
from slimcore.lift import IMPORTERS, Imported  # noqa: E402
from slimcore.lift.bn_insert import reinsert_bn  # noqa: E402
from slimcore.measure import count_flops  # noqa: E402
from slimcore.pipeline import _load_plugins  # noqa: E402
from slimcore.prune import apply, plan  # noqa: E402
from slimcore.spec import LatencySpec, PruneSpec  # noqa: E402
from tests.zoo import make_model, save_model  # noqa: E402
from tests.zoo_models import BY_NAME  # noqa: E402


def build(name: str) -> tuple[nn.Module, int]:
    if name.startswith("yolo"):
        return BY_NAME[f"ultralytics/{name}"].model(), 320
    return make_model(name), 224


def lift(model: nn.Module, runtime: str, x: torch.Tensor, tmp: Path) -> Imported:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if runtime == "torch":  # TorchScript as most users save it; .pt2 for ultralytics (its heads do not trace)
            if not isinstance(model(x[:1]), torch.Tensor):
                return IMPORTERS.get("pt2")(save_model(model, "pt2", tmp / "m.pt2", x[:1]), None)
            path = tmp / "m.pt"
            torch.jit.save(torch.jit.trace(model, x[:1], strict=False), str(path))
            return IMPORTERS.get("torchscript")(path, tuple(x[:1].shape))
        path = tmp / "m.onnx"
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"],
                          dynamic_axes={"input": {0: "batch"}})
        imp = IMPORTERS.get("onnx")(path, None)
        reinsert_bn(imp.module, [x])
        return imp


def pruned(base: nn.Module, imp: Imported, x: torch.Tensor, spec: PruneSpec, job: LatencyJob | None) -> nn.Module:
    m = copy.deepcopy(base)
    gs = build_groups(m, x, [], imp.meta.get("unprunable"))
    p = plan(m, gs, spec, "max", x, latency=job)
    apply(m, gs, p.remove, None)
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,mobilenet_v2,efficientnet_b0,yolov8n")
    ap.add_argument("--runtimes", default="onnxruntime,torch")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--targets", default="0.3,0.5")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--noise", type=int, default=0,
                    help="instead of pruning: time the original against itself N times per model, runtime and "
                         "batch (an A/A test) and print the spread of the ratio, the machine's noise floor")
    ap.add_argument("--details", action="store_true", help="after each row: the alignment check and the loop's tries")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    _load_plugins()
    print(f"torch={torch.__version__} hardware={hardware(args.device)}")
    print("| model | runtime | batch | target | tries | loop ratio | measured again | FLOPs ratio | flops-target "
          "ratio (round_to 1) | flops-target ratio (round_to 8) | probes (s) | baseline ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model, size = build(name)
        for runtime in args.runtimes.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                x = torch.randn(2, 3, size, size)
                with tempfile.TemporaryDirectory() as d:
                    try:
                        imp = lift(model, runtime, x, Path(d))
                    except Exception as e:  # a model this runtime path cannot take: say so, go on
                        print(f"| {name} | {runtime} | {batch} | n/a: {str(e).splitlines()[0][:120]} |")
                        continue
                    base = imp.module.eval()

                    def export(m: nn.Module, dest: Path, imp: Imported = imp, x: torch.Tensor = x) -> Path:
                        EXPORTERS.get("onnx")(copy.deepcopy(m).cpu(), imp, dest, x)
                        return dest

                    settings = resolve(LatencySpec(runtime=runtime, device=args.device, batch_size=batch,
                                                   threads=args.threads), "onnx" if runtime != "torch" else "pt")
                    rt = open_runtime(settings)
                    if args.noise:
                        job = LatencyJob(settings, rt, export, x)
                        job.reference = base
                        # a fresh session of the same model each time, as the loop loads each candidate afresh
                        same = [ratio(*job.compare(job.load(copy.deepcopy(base)))) for _ in range(args.noise)]
                        print(f"| {name} | {runtime} | {batch} | A/A x{args.noise}: ratio {min(same):.3f} to "
                              f"{max(same):.3f}, median {sorted(same)[len(same) // 2]:.3f} |", flush=True)
                        continue
                    f0 = count_flops(base, x[:1])
                    for target in (float(t) for t in args.targets.split(",")):
                        job = LatencyJob(settings, rt, export, x)
                        job.reference = base
                        t0 = time.perf_counter()
                        m = pruned(base, imp, x, PruneSpec(target="latency", amount=target), job)
                        probe_s = job._table.seconds if job._table else 0.0
                        b, t = job.compare(m)
                        flops = count_flops(m, x[:1]) / f0
                        ratios = []
                        for rt_to in (1, 8):
                            twin = pruned(base, imp, x, PruneSpec(target="flops", amount=1 - flops, round_to=rt_to),
                                          None)
                            bb, tt = job.compare(twin)
                            ratios.append(ratio(bb, tt))
                        loop = job.target or {}
                        print(f"| {name} | {runtime} | {batch} | {1 - target:.2f} | {len(job.iterations)} | "
                              f"{loop.get('measured_ratio', float('nan')):.3f} | {ratio(b, t):.3f} | "
                              f"{flops:.3f} | {ratios[0]:.3f} | {ratios[1]:.3f} | {probe_s:.0f} | "
                              f"{b.median_ms:.2f} |  ({time.perf_counter() - t0:.0f} s)", flush=True)
                        if args.details:
                            print(json.dumps({"alignment": job.alignment, "tries": [
                                {k: it[k] for k in ("iteration", "aim", "predicted", "measured", "removed_channels")}
                                for it in job.iterations]}), flush=True)


if __name__ == "__main__":
    main()
