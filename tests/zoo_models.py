"""The zoo: torchvision, timm and ultralytics architectures built without weights, saved as users save them.

Each :class:`ZooEntry` builds its model with random weights (``pretrained=False`` / from a yaml; nothing is
downloaded), randomises every BatchNorm (tests/zoo.py ``randomize_bn``, so γ differ and rank) and knows its
input shape, its task and which upload formats apply. :func:`save` writes one format exactly the way a user
would (the plain one-liners; see ``SAVERS``). Shared by tests/test_zoo.py and bench/bench_zoo_time.py.

Formats:

- ``trace``  ``torch.jit.save(torch.jit.trace(m, x), f)`` (retried with ``strict=False`` for dict outputs,
  as torch's own error message tells users to)
- ``script`` ``torch.jit.save(torch.jit.script(m), f)``: only where the model scripts (timm with
  ``scriptable=True``); entries that do not script say so and the case is skipped
- ``pt2``    ``torch.export.save(torch.export.export(m, (x,)), f)``: batch 1 static, as the one-liner gives
- ``onnx``   ``torch.onnx.export(m, (x,), f)``: torch 2.13's default (dynamo) exporter, which may write the
  weights to ``f.data`` beside the file (external data). Cases pass the ``.onnx`` file only, as ``slim run``
  takes it; the ``.data`` file lies next to it.
- ``onnx_legacy`` ``torch.onnx.export(m, (x,), f, dynamo=False)``: one self-contained file (runs before
  external-data support lands).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tests.zoo import randomize_bn

os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics: never reach the network

FORMATS = ("trace", "script", "pt2", "onnx", "onnx_legacy")
NUM_CLASSES = 10
# what each format's file is detected as (detect_format), for loading the slimmed file back
KIND = {"trace": "torchscript", "script": "torchscript", "pt2": "pt2", "onnx": "onnx", "onnx_legacy": "onnx"}
SUFFIX = {"trace": ".pt", "script": ".pt", "pt2": ".pt2", "onnx": ".onnx", "onnx_legacy": ".onnx"}


@dataclass(frozen=True)
class ZooEntry:
    name: str
    source: str  # torchvision | timm | ultralytics
    family: str
    build: Callable[[bool], nn.Module]  # build(scriptable) → model with random weights
    shape: tuple[int, ...] = (1, 3, 64, 64)
    task: str = "classification"  # or "distillation" (detection, segmentation, pose: the teacher's outputs)
    formats: tuple[str, ...] = FORMATS
    no_script: str = ""  # why jit.script does not apply (empty: it is tried)
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def model(self, scriptable: bool = False, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return randomize_bn(self.build(scriptable), seed).eval()

    def applies(self, fmt: str) -> bool:
        return fmt in self.formats and not (fmt == "script" and self.no_script)


def _tv(name: str, **kw: object) -> Callable[[bool], nn.Module]:
    def build(scriptable: bool) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES, **kw)
    return build


def _tv_seg(name: str) -> Callable[[bool], nn.Module]:
    def build(scriptable: bool) -> nn.Module:
        import torchvision

        return getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=4)
    return build


def _timm(name: str, **kw: object) -> Callable[[bool], nn.Module]:
    def build(scriptable: bool) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, scriptable=scriptable, **kw)
    return build


def _yolo(yaml: str) -> Callable[[bool], nn.Module]:
    def build(scriptable: bool) -> nn.Module:
        from ultralytics.nn.tasks import ClassificationModel, DetectionModel, PoseModel, SegmentationModel

        if "-cls" in yaml:
            return ClassificationModel(yaml, nc=NUM_CLASSES, verbose=False)
        cls = SegmentationModel if "-seg" in yaml else PoseModel if "-pose" in yaml else DetectionModel
        return cls(yaml, verbose=False)
    return build


def _entries() -> list[ZooEntry]:
    tv = [("resnet18", "ResNet"), ("resnext50_32x4d", "ResNeXt"), ("mobilenet_v2", "MobileNetV2"),
          ("mobilenet_v3_small", "MobileNetV3"), ("efficientnet_b0", "EfficientNet"), ("densenet121", "DenseNet"),
          ("shufflenet_v2_x0_5", "ShuffleNetV2"), ("regnet_x_400mf", "RegNet"), ("mnasnet0_5", "MnasNet"),
          ("vgg11_bn", "VGG")]
    out = [ZooEntry(n, "torchvision", f, _tv(n)) for n, f in tv]
    out.append(ZooEntry("googlenet", "torchvision", "GoogLeNet", _tv("googlenet", aux_logits=False, init_weights=True),
                        notes="aux heads off (eval returns one tensor)"))
    for n in ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50"):
        out.append(ZooEntry(n, "torchvision", "segmentation", _tv_seg(n), task="distillation",
                            notes="segmentation: dict output {'out'(, 'aux')}"))
    timm_models = [
        ("cs3darknet_s", "CSP"), ("cspresnet50", "CSP"), ("res2net50_14w_8s", "Res2Net"), ("dpn48b", "DPN"),
        ("regnetx_002", "RegNet"), ("regnety_002", "RegNet"), ("repvgg_a0", "RepVGG"), ("mixnet_s", "MixNet"),
        ("ghostnet_100", "GhostNet"), ("hrnet_w18_small", "HRNet"), ("dla46_c", "DLA"),
        ("tf_efficientnet_b0", "TF-ported"), ("tf_mobilenetv3_small_100", "TF-ported"), ("tf_mixnet_s", "TF-ported"),
        ("rexnet_100", "ReXNet"), ("resnet18d", "ResNet-D"), ("seresnet18", "SE-ResNet"),
        ("efficientnet_lite0", "EfficientNet-Lite"), ("semnasnet_050", "MnasNet"), ("lcnet_050", "PP-LCNet"),
        ("hardcorenas_a", "HardCoReNAS"), ("fbnetc_100", "FBNet"), ("spnasnet_100", "SPNASNet"),
        ("tinynet_e", "TinyNet"), ("ese_vovnet19b_slim_dw", "VoVNet"), ("densenet121", "DenseNet"),
        ("gernet_s", "GENet"), ("resnest14d", "ResNeSt"), ("skresnet18", "SKNet"), ("ecaresnet26t", "ECA-ResNet"),
        ("mobileone_s0", "MobileOne"), ("ghostnetv2_100", "GhostNetV2"), ("repghostnet_050", "RepGhost"),
        ("mobilenetv3_small_050", "MobileNetV3"), ("resnet10t", "ResNet-T"),
    ]
    out += [ZooEntry(f"timm/{n}", "timm", f, _timm(n)) for n, f in timm_models]
    for y in ("yolov8n", "yolo11n"):
        for task, suffix in (("detect", ""), ("cls", "-cls"), ("seg", "-seg"), ("pose", "-pose")):
            out.append(ZooEntry(f"ultralytics/{y}{suffix}", "ultralytics", f"YOLO {task}", _yolo(f"{y}{suffix}.yaml"),
                                task="classification" if task == "cls" else "distillation",
                                no_script="ultralytics models do not script (dynamic attributes in the heads)",
                                notes="eval returns a tuple (tensor, extras); kept as-is"))
    return out


ENTRIES: list[ZooEntry] = _entries()
BY_NAME: dict[str, ZooEntry] = {e.name: e for e in ENTRIES}


def _trace(m: nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    try:
        return torch.jit.trace(m, x)
    except RuntimeError as e:  # dict/list outputs: torch's message says to pass strict=False
        if "strict" not in str(e) and "Dictionary" not in str(e):
            raise
    seq = getattr(m, "model", None)
    head = seq[-1] if isinstance(seq, nn.Sequential) else None
    if head is not None and hasattr(head, "export"):
        # ultralytics' eval heads return {boxes, scores, feats: [...]}, which trace cannot hold at all; its own
        # exporter (YOLO.export) sets head.export = True (one tensor, or (tensor, protos)): do the same, no fusing
        head.export = True
    return torch.jit.trace(m, x, strict=False)


def save(entry: ZooEntry, fmt: str, path: Path, model: nn.Module | None = None) -> Path:
    """Write ``entry`` in ``fmt`` to ``path`` as a user would; returns the path ``slim run`` gets."""
    x = torch.randn(entry.shape, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # (and the ONNX exporter's progress lines on stdout)
        if fmt == "script":
            torch.jit.save(torch.jit.script(model or entry.model(scriptable=True)), str(path))
            return path
        m = model or entry.model()
        if fmt == "trace":
            torch.jit.save(_trace(m, x), str(path))
        elif fmt == "pt2":
            torch.export.save(torch.export.export(m, (x,)), str(path))
        elif fmt == "onnx":
            torch.onnx.export(m, (x,), str(path))
        elif fmt == "onnx_legacy":
            torch.onnx.export(m, (x,), str(path), dynamo=False)
        else:
            raise ValueError(fmt)
    return path


def load(path: Path, fmt: str) -> Callable[[torch.Tensor], object]:
    """The saved (or slimmed) file as a callable, the way its format is run: jit.load, export.load, onnxruntime."""
    kind = KIND[fmt]
    if kind == "torchscript":
        m = torch.jit.load(str(path)).eval()
        return lambda x: m(x)
    if kind == "pt2":
        m = torch.export.load(str(path)).module()
        return lambda x: m(x)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x.numpy()})


def flatten(out: object, prefix: str = "") -> list[tuple[str, np.ndarray]]:
    """Outputs (tensor, tuple, list, dict, nested) as (path, array) pairs in a fixed order; a bare tensor's path
    is ``tensor``, a dict value's ``['key']``, a sequence item's ``[i]``."""
    if isinstance(out, dict):
        return [p for k in out for p in flatten(out[k], f"{prefix}[{k!r}]")]
    if isinstance(out, (list, tuple)):
        return [p for i, v in enumerate(out) for p in flatten(v, f"{prefix}[{i}]")]
    if isinstance(out, torch.Tensor):
        return [(prefix or "tensor", out.detach().float().numpy())]
    return [(prefix or "tensor", np.asarray(out, dtype="float32"))]


def structure(out: object) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in flatten(out)]


def write_data(entry: ZooEntry, path: Path, n: int = 40, seed: int = 0) -> Path:
    """A tiny .npz: ``x`` (n samples of the entry's input shape) and, for classification, ``y`` < classes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *entry.shape[1:])).astype("float32")
    arrays = {"x": x}
    if entry.task == "classification":
        arrays["y"] = (np.arange(n) % NUM_CLASSES).astype("int64")
    np.savez(path, **arrays)
    return path


def job_spec(entry: ZooEntry, amount: float = 0.4) -> dict:
    """1 epoch of sparse training, 40% of channels, 1 epoch of fine-tuning; strength given (no pilot runs)."""
    return {"input_shape": list(entry.shape), "task": entry.task,
            "method": {"name": "l1", "strength": 1e-4},
            "sparse_training": {"epochs": 1, "batch_size": 8, "lr": 0.01},
            "prune": {"target": "channels", "amount": amount},
            "finetune": {"epochs": 1, "batch_size": 8, "lr": 0.001}}
