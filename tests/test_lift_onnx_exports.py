"""ONNX files as real exporters write them, lifted with parity against onnxruntime.

The legacy (TorchScript-based) exporter computes sizes with op chains at run time: YOLOv8's Detect
head builds its anchor grid with ``Range`` over the feature map's size, timm's TF-ported nets pad
"same" with ``Pad`` amounts from ``Shape``/``Ceil``/``Clip`` and a Reshape/Slice/Transpose of the pad
list, ``F.interpolate(size=other.shape[-2:])`` is a ``Resize`` with sizes from ``Shape``, and
``expand`` goes through ``Where(Equal(shape, -1), …)``. The dynamo exporter folds most of that.
Files are saved single-file (``external_data=False``).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimcore.export import rel_error
from slimcore.lift.onnx_import import import_onnx

os.environ.setdefault("YOLO_OFFLINE", "1")

torch.set_num_threads(1)  # two cores shared with other jobs (as test_onnx_node_cases does)


def _export(model: nn.Module, x: torch.Tensor, path: Path, dynamo: bool, spatial: bool = False) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), str(path), external_data=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
        else:
            axes = {0: "batch", 2: "height", 3: "width"} if spatial else {0: "batch"}
            buf = io.BytesIO()
            torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["images"],
                              dynamic_axes={"images": axes})
            onnx.save(onnx.load_from_string(buf.getvalue()), str(path))
    return path


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _parity(imported, shapes: list[tuple[int, ...]], scripted: bool = False) -> None:
    model = torch.jit.script(imported.module) if scripted else imported.module
    for i, shape in enumerate(shapes):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            assert rel_error(imported.original(x), model(x)) <= 1e-4, shape


def _yolo_for_onnx() -> nn.Module:
    """YOLOv8n as ultralytics' exporter prepares it: one output tensor, C2f's split form."""
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    modules = pytest.importorskip("ultralytics.nn.modules")
    torch.manual_seed(0)
    model = tasks.DetectionModel("yolov8n.yaml", verbose=False).eval()
    for m in model.modules():
        if isinstance(m, modules.Detect):
            m.export, m.format, m.dynamic = True, "onnx", True
        if isinstance(m, modules.C2f):
            m.forward = m.forward_split
    return model


@pytest.mark.parametrize("dynamo", [False, True])
def test_yolov8n_onnx(dynamo: bool, tmp_path: Path) -> None:
    path = _export(_yolo_for_onnx(), torch.randn(1, 3, 64, 64), tmp_path / "yolo.onnx", dynamo, spatial=not dynamo)
    if not dynamo:
        assert {"Range", "Expand", "Split", "Softmax", "Resize", "Slice"} <= _ops(path)
    imported = import_onnx(path, (1, 3, 64, 64))
    shapes = [(2, 3, 64, 64)] if dynamo else [(2, 3, 64, 64), (1, 3, 96, 64)]  # the anchor grid follows the size
    _parity(imported, shapes)


@pytest.mark.parametrize("dynamo", [False, True])
def test_tf_same_padding_timm_onnx(dynamo: bool, tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("tf_mobilenetv3_small_100", pretrained=False, num_classes=10).eval()
    path = _export(model, torch.randn(1, 3, 64, 64), tmp_path / "tf.onnx", dynamo)
    if not dynamo:
        assert {"Pad", "Ceil", "Clip", "Transpose"} <= _ops(path)
    imported = import_onnx(path, (1, 3, 64, 64))
    pads = [n for n in imported.module.graph.nodes if "constant_pad_nd" in str(n.target)]
    assert dynamo or pads and all(any(isinstance(a, torch.fx.Node) for a in n.args[1]) for n in pads)
    _parity(imported, [(3, 3, 64, 64)], scripted=True)


class ExporterOps(nn.Module):
    """Resize to another tensor's size and by scale, an uneven Split, channel Slices, Where, a softmax
    over a DFL-style bin axis and an Expand to a shape read from the tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.c3 = nn.Sequential(nn.Conv2d(48, 24, 1, bias=False), nn.BatchNorm2d(24), nn.SiLU())
        self.head = nn.Conv2d(24, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c1(x)
        b = self.c2(a)
        up = F.interpolate(b, size=a.shape[-2:], mode="nearest") + F.interpolate(b, scale_factor=2.0,
                                                                                mode="bilinear")
        p, q = torch.cat([a, up], 1).split([16, 32], 1)
        y = torch.cat([q[:, :16], p, q[:, 16:]], 1)
        y = torch.where(y > 0, y, 0.1 * y)
        z = self.head(self.c3(y))
        n, _, h, w = z.shape
        z = z.view(n, 4, 4, h * w).softmax(2)
        bins = torch.arange(4, dtype=z.dtype).view(1, 1, 4, 1).expand(n, 4, -1, h * w)
        return (z * bins).sum(2)


@pytest.mark.parametrize("dynamo", [False, True])
def test_exporter_size_chains(dynamo: bool, tmp_path: Path) -> None:
    path = _export(ExporterOps().eval(), torch.randn(1, 3, 32, 32), tmp_path / "ops.onnx", dynamo,
                   spatial=not dynamo)
    if not dynamo:
        assert {"Resize", "Split", "Slice", "Where", "Equal", "Expand", "Softmax", "Shape"} <= _ops(path)
    imported = import_onnx(path, (1, 3, 32, 32))
    _parity(imported, [(3, 3, 32, 32)] if dynamo else [(3, 3, 32, 32), (2, 3, 48, 40)], scripted=True)
    # the uneven channel split and the channel slices are followed: c1's and c2's channels can go
    assert imported.meta["unprunable"] == {}
    from slimcore.coupling import analyze, prune

    gm, x = imported.module, torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = gm(x).shape
    cp = analyze(gm, x)
    convs = [r for r in cp.records if r.kind == "out"][:2]
    assert all(int(lb) not in cp.pinned for r in convs for lb in cp.label[r.atoms])
    prune(gm, cp, [int(cp.label[convs[0].atoms[1]]), int(cp.label[convs[1].atoms[5]])])
    with torch.no_grad():
        assert gm(x).shape == want


class KeypointHead(nn.Module):
    """A pose head's decode: slice assignment into a conv's output (both exporters write ``ScatterND``)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.kpt = nn.Conv2d(8, 9, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kpt(self.c(x)).flatten(2)
        y[:, 2::3] = y[:, 2::3].sigmoid()
        return y


@pytest.mark.parametrize("dynamo", [False, True])
def test_scatter_nd_from_slice_assignment(dynamo: bool, tmp_path: Path) -> None:
    """Lifted as ``index_put``; the legacy exporter folds batch 1 into the indices, and the lifted graph
    still runs any batch (checked against the eager model, since the static upload only takes batch 1)."""
    model = KeypointHead().eval()
    path = tmp_path / "kpt.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 16, 16),), str(path), dynamo=dynamo, external_data=False)
    assert "ScatterND" in _ops(path)
    imported = import_onnx(path, (1, 3, 16, 16))
    assert any(n.target is torch.ops.aten.index_put.default for n in imported.module.graph.nodes)
    for b in (1, 3):
        x = torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            assert rel_error(model(x), imported.module(x)) <= 1e-5, b
