"""ultralytics YOLOv8n / YOLO11n (detect and classify), saved as users save them, through the importers.

Built from yaml with no download (``YOLO_OFFLINE=1``). In eval mode the detect model returns
``(predictions, raw dict)`` and the classify model ``(probabilities, logits)``; ultralytics' own exporter
sets ``export = True`` on the head (one tensor out), and users wrap the model to keep the first output.
The IndexError users met at import came from channel coupling through C2f's ``chunk`` (now followed by
:mod:`slimcore.coupling`), so each case also builds the channel groups.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from slimcore.errors import UnsupportedModel
from slimcore.groups import build_groups
from slimcore.lift.exported import import_pt2
from slimcore.lift.torchscript import import_torchscript

os.environ.setdefault("YOLO_OFFLINE", "1")
tasks = pytest.importorskip("ultralytics.nn.tasks")
heads = pytest.importorskip("ultralytics.nn.modules.head")
SHAPE = (1, 3, 64, 64)

torch.set_num_threads(1)  # two cores shared with other jobs (as test_onnx_node_cases does)


class FirstOutput(nn.Module):
    """What users write to serve the decoded predictions only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)[0]


def _yolo(cfg: str, export_head: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if "cls" in cfg:
        model = tasks.ClassificationModel(cfg, nc=10, verbose=False)
    else:
        model = tasks.DetectionModel(cfg, verbose=False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # γ and statistics away from their init, so parity means something
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        if export_head and isinstance(m, (heads.Detect, heads.Classify)):
            m.export, m.format = True, "torchscript"
    return model.eval()


def _x(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn((batch, *SHAPE[1:]), generator=torch.Generator().manual_seed(seed))


def _trace(model: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, _x(1), check_trace=False), str(path))  # its re-check trips on anchors
    return path


def _check(imported, model: nn.Module) -> None:
    x = _x(3)
    with torch.no_grad():
        want = model(x)
        got = imported.module(x)
    want = want[0] if isinstance(want, (tuple, list)) else want
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    gs = build_groups(imported.module, _x(2), [], imported.meta.get("unprunable"))
    assert len(gs.groups) > 10


@pytest.mark.parametrize("cfg, how", [("yolov8n.yaml", "wrapped"), ("yolov8n.yaml", "export_head"),
                                      ("yolov8n-cls.yaml", "wrapped"), ("yolov8n-cls.yaml", "export_head"),
                                      ("yolo11n.yaml", "wrapped")])
def test_yolo_traced_imports_with_parity(cfg: str, how: str, tmp_path: Path) -> None:
    model = _yolo(cfg, export_head=how == "export_head")
    upload = FirstOutput(model) if how == "wrapped" else model
    imported = import_torchscript(_trace(upload, tmp_path / "yolo.pt"), SHAPE)
    _check(imported, upload)
    if how == "wrapped":  # the wrapper's own names, m included
        assert any(n.startswith("m.m.model.0.") for n, _ in imported.module.named_modules())


def test_yolo_traced_in_training_mode_is_refused_clearly(tmp_path: Path) -> None:
    """Built models start in training mode; a trace before .eval() bakes batch statistics into every BN."""
    model = _yolo("yolov8n-cls.yaml").train()
    with pytest.raises(UnsupportedModel, match=r"BatchNorm node %\S+ runs in training mode.*\.eval\(\)"):
        import_torchscript(_trace(model, tmp_path / "train.pt"), SHAPE)


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml"])
def test_yolo_pt2_wrapper_imports_with_parity(cfg: str, tmp_path: Path) -> None:
    upload = FirstOutput(_yolo(cfg))
    path = tmp_path / "yolo.pt2"
    torch.export.save(torch.export.export(upload, (_x(1),)), str(path))
    _check(import_pt2(path, SHAPE), upload)


def test_yolo_pt2_eval_mode_program(tmp_path: Path) -> None:
    """The eval-mode program returns (predictions, {boxes, scores, feats}): lifted with the first output
    matching, or refused with a one-line UnsupportedModel naming the outputs; never an internal error."""
    model = _yolo("yolov8n.yaml")
    path = tmp_path / "yolo.pt2"
    torch.export.save(torch.export.export(model, (_x(1),)), str(path))
    try:
        imported = import_pt2(path, SHAPE)
    except UnsupportedModel as e:
        assert "returns 6 values" in str(e) and "\n" not in str(e)
        return
    x = _x(2)
    with torch.no_grad():
        got, want = imported.module(x), model(x)
    got = got[0] if isinstance(got, (tuple, list)) else got
    torch.testing.assert_close(got, want[0], rtol=1e-4, atol=1e-4)
