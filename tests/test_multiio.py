"""Several inputs and structured outputs through ``slim run``, in every upload format.

The promise (CONTRACT.md, "Model files"): models may take several tensors and return a tensor, or a tuple,
list or dict of tensors; the slimmed model keeps the same names, order and structure. Each case saves a
small conv-BN model exactly as users do, slims it through the command, reloads the written file with the
format's own loader and compares it with the upload on fresh inputs at another batch size.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from slimcore import io as sio
from slimcore.cli import main as cli_main
from tests.conftest import run_slim, write_spec
from tests.multiio_models import (
    DetectNet,
    IsInstanceNet,
    LayerGetterNet,
    ListJoinNet,
    RepeatNet,
    SegNet,
    TwoInputNet,
    make,
)

FORMATS = ["script", "trace", "pt2", "onnx"]
SUFFIX = {"script": ".pt", "trace": ".pt", "pt2": ".pt2", "onnx": ".onnx"}
FAST = {"method": {"strength": 1e-3}, "sparse_training": {"epochs": 1, "batch_size": 16},
        "finetune": {"epochs": 1, "batch_size": 16}, "prune": {"amount": 0.3, "min_channels": 2}}
IMG = (3, 16, 16)


def save_as_user(model: nn.Module, fmt: str, example: tuple[torch.Tensor, ...], path: Path,
                 input_names: list[str], output_names: list[str]) -> Path:
    """The way users write these files: trace needs ``strict=False`` for dict/list outputs; ONNX gets a
    dynamic batch on every named input and output, single-file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "script":
            torch.jit.save(torch.jit.script(model), str(path))
        elif fmt == "trace":
            torch.jit.save(torch.jit.trace(model, example, strict=False), str(path))
        elif fmt == "pt2":
            batch = torch.export.Dim("batch", min=1, max=1024)
            ep = torch.export.export(model, example, dynamic_shapes=tuple({0: batch} for _ in example))
            torch.export.save(ep, str(path))
        else:
            torch.onnx.export(model, example, str(path), dynamo=False, external_data=False,
                              input_names=input_names, output_names=output_names,
                              dynamic_axes={n: {0: "batch"} for n in input_names + output_names})
    return path


def run_file(path: Path, fmt: str, xs: tuple[torch.Tensor, ...]) -> Any:
    """The file run by its own runtime: the output as that runtime returns it (ONNX: a name → array dict)."""
    if fmt == "onnx":
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs, strict=True)}
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True))
    m = torch.jit.load(str(path)) if fmt in ("script", "trace") else torch.export.load(str(path)).module()
    with torch.no_grad():
        return m(*xs)


def onnx_names(path: Path) -> tuple[list[str], list[str]]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]


def slim(tmp_path: Path, model_path: Path, data: Path, **spec: Any) -> tuple[Path, dict[str, Any]]:
    out, rep = tmp_path / ("slim" + model_path.suffix), tmp_path / "report.json"
    r = run_slim("run", str(model_path), "--spec", str(write_spec(tmp_path / "spec.json", **{**FAST, **spec})),
                 "--data", str(data), "-o", str(out), "--report", str(rep))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads(rep.read_text())


def images(path: Path, n: int = 48, **extra: np.ndarray) -> Path:
    """Unlabelled images (distillation needs no labels), seeded."""
    np.savez(path, x=np.random.default_rng(0).random((n, *IMG), dtype=np.float32), **extra)
    return path


def assert_same_form(fmt: str, got: Any, want: Any, out_names: list[str]) -> None:
    """Structure and every output's shape as the upload's (ONNX: the same output names, in order)."""
    if fmt == "onnx":
        assert list(got) == list(want) == out_names
        assert [v.shape for v in got.values()] == [v.shape for v in want.values()]
    else:
        assert sio.structure(got) == sio.structure(want) and type(got) is type(want)
        assert [t.shape for t in sio.leaves(got)] == [t.shape for t in sio.leaves(want)]


STRUCTURED = [
    pytest.param(SegNet, ["image"], ["out", "aux"], id="dict"),
    pytest.param(DetectNet, ["images"], ["decoded", "p3", "p4"], id="tuple-of-tensor-and-list"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("cls", "in_names", "out_names"), STRUCTURED)
def test_structured_outputs_keep_their_form(tmp_path, cls, in_names, out_names, fmt):
    """Segmentation-style {"out", "aux"} and YOLO-style (tensor, [tensor, tensor]) outputs: distillation on
    unlabelled images matches every output, and the slimmed file returns the same structure and shapes."""
    model = make(cls)
    x = (torch.rand(2, *IMG),)
    path = save_as_user(model, fmt, x, tmp_path / ("model" + SUFFIX[fmt]), in_names, out_names)
    spec: dict[str, Any] = {"task": "distillation"}
    if fmt in ("script", "trace"):
        spec["input_shape"] = [1, *IMG]
    out, report = slim(tmp_path, path, images(tmp_path / "x.npz"), **spec)

    fresh = (torch.rand(5, *IMG, generator=torch.Generator().manual_seed(3)),)
    got, want = run_file(out, fmt, fresh), run_file(path, fmt, fresh)
    assert_same_form(fmt, got, want, out_names)
    if fmt == "onnx":
        assert onnx_names(out) == onnx_names(path) == (in_names, out_names)
    base, fin = report["stages"]["baseline"], report["stages"]["finetuned"]
    assert fin["params"] < base["params"] and report["removed_channels"] > 0
    # per output: names (ONNX: the file's), shapes, and the distance from the original on held-out images
    names = out_names if fmt == "onnx" else sio.names(want)
    assert [o["name"] for o in report["outputs"]] == names
    assert [o["shape"] for o in report["outputs"]] == [list(t.shape[1:]) for t in (
        [torch.from_numpy(v) for v in want.values()] if fmt == "onnx" else sio.leaves(want))]
    per = fin["distillation_error_per_output"]
    assert list(per) == names and all(0 <= v < 1 for v in per.values())
    assert set(report["output_deviation_per_output"]) == set(names)
    assert report["output_deviation"] == pytest.approx(
        max(v["max_abs"] for v in report["output_deviation_per_output"].values()))
    assert list(report["output_error_finetuned"]) == names


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_inputs_from_x0_x1(tmp_path, fmt):
    """forward(image, depth): data as x0/x1 (+ y), input_shapes for TorchScript, shapes read from the file
    otherwise; the slimmed file takes the same two inputs, by name, and classifies as before."""
    model = make(TwoInputNet)
    ex = (torch.rand(2, *IMG), torch.rand(2, 1, 16, 16))
    path = save_as_user(model, fmt, ex, tmp_path / ("model" + SUFFIX[fmt]), ["image", "depth"], ["logits"])
    rng = np.random.default_rng(0)
    data = tmp_path / "two.npz"
    np.savez(data, x0=rng.random((64, *IMG), dtype=np.float32), x1=rng.random((64, 1, 16, 16), dtype=np.float32),
             y=rng.integers(0, 4, 64))
    spec: dict[str, Any] = {"task": "classification"}
    if fmt in ("script", "trace"):
        spec["input_shapes"] = [[1, *IMG], [1, 1, 16, 16]]
    out, report = slim(tmp_path, path, data, **spec)

    fresh = (torch.rand(3, *IMG), torch.rand(3, 1, 16, 16))
    got = run_file(out, fmt, fresh)
    if fmt == "onnx":
        assert onnx_names(out) == onnx_names(path) == (["image", "depth"], ["logits"])
        assert got["logits"].shape == (3, 4)
    else:
        assert isinstance(got, torch.Tensor) and got.shape == (3, 4)
    if fmt in ("script", "trace"):
        args = [a.name for a in torch.jit.load(str(out)).forward.schema.arguments[1:]]
        assert args == ["image", "depth"]
    elif fmt == "pt2":
        ep = torch.export.load(str(out))
        assert ep.module_call_graph[0].signature.forward_arg_names == ["image", "depth"]
    assert [i["name"] for i in report["inputs"]] == ["image", "depth"]
    assert [i["shape"] for i in report["inputs"]] == [list(IMG), [1, 16, 16]]
    assert report["stages"]["finetuned"]["params"] < report["stages"]["baseline"]["params"]
    assert report["stages"]["finetuned"]["accuracy"] is not None


class LogitsAndFeatures(nn.Module):
    """A classifier that also returns its feature map: classification uses the one 2-d output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x)
        return self.fc(f.mean((2, 3))), f


def test_classification_uses_the_single_2d_output(tmp_path):
    model = make(LogitsAndFeatures)
    path = save_as_user(model, "script", (torch.rand(2, *IMG),), tmp_path / "m.pt", ["x"], [])
    data = images(tmp_path / "x.npz", 64, y=np.random.default_rng(1).integers(0, 4, 64))
    out, report = slim(tmp_path, path, data, input_shape=[1, *IMG])
    assert report["stages"]["finetuned"]["accuracy"] is not None
    got = run_file(out, "script", (torch.rand(3, *IMG),))
    assert isinstance(got, tuple) and got[0].shape == (3, 4) and got[1].shape[0] == 3 and got[1].shape[2:] == (16, 16)


def _bad(tmp_path: Path, model: Path, spec: dict[str, Any], data: Path) -> str:
    """The ``slim run`` entry point in-process (no torch import per case); exactly one error line, exit 2."""
    sp = write_spec(tmp_path / "bad.json", **spec)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli_main(["run", str(model), "--spec", str(sp), "--data", str(data), "-o", str(tmp_path / "o.bin")])
    text = err.getvalue()
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("[")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("slim: error: "), text
    assert "Traceback" not in text and not (tmp_path / "o.bin").exists()
    return lines[0]


def test_two_inputs_with_a_flops_target(tmp_path):
    """The planner measures FLOPs on every input: a flops target on a two-input model is reached."""
    path = save_as_user(make(TwoInputNet), "pt2", (torch.rand(2, *IMG), torch.rand(2, 1, 16, 16)),
                        tmp_path / "two.pt2", ["image", "depth"], ["logits"])
    rng = np.random.default_rng(0)
    data = tmp_path / "two.npz"
    np.savez(data, x0=rng.random((48, *IMG), dtype=np.float32), x1=rng.random((48, 1, 16, 16), dtype=np.float32),
             y=rng.integers(0, 4, 48))
    _, report = slim(tmp_path, path, data, task="classification", prune={"target": "flops", "amount": 0.3})
    assert report["target"]["kind"] == "flops" and report["target"]["achieved"] >= 0.3 - 0.02
    assert report["stages"]["finetuned"]["flops"] <= 0.72 * report["stages"]["baseline"]["flops"]


def test_bad_multi_io_input_is_one_line(tmp_path):
    two = save_as_user(make(TwoInputNet), "script", (torch.rand(2, *IMG), torch.rand(2, 1, 16, 16)),
                       tmp_path / "two.pt", [], [])
    seg = save_as_user(make(SegNet), "pt2", (torch.rand(2, *IMG),), tmp_path / "seg.pt2", [], [])
    xy = images(tmp_path / "xy.npz", 16, y=np.zeros(16, dtype=np.int64))
    shapes = {"input_shapes": [[1, *IMG], [1, 1, 16, 16]]}
    assert "takes 2 inputs but the spec gives 1" in _bad(tmp_path, two, {"input_shape": [1, *IMG]}, xy)
    assert "needs arrays x0, x1" in _bad(tmp_path, two, shapes, xy)
    assert "not both" in _bad(tmp_path, two, {**shapes, "input_shape": [1, *IMG]}, xy)
    assert "share the batch size" in _bad(tmp_path, two, {"input_shapes": [[1, *IMG], [2, 1, 16, 16]]}, xy)
    msg = _bad(tmp_path, seg, {"task": "classification"}, xy)
    assert "one (batch, classes) output" in msg and "out (2, 3, 16, 16)" in msg and "aux" in msg


@pytest.mark.heavy
def test_torchvision_lraspp_dict_output(tmp_path):
    """torchvision's LRASPP MobileNetV3 (returns {"out": ...}), traced as users must (strict=False), slimmed
    by distillation at a small input; the slimmed file returns the same dict and shapes."""
    import torchvision

    from tests.zoo import randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3)).eval()
    path = save_as_user(model, "trace", (torch.rand(2, 3, 64, 64),), tmp_path / "lraspp.pt", [], [])
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).random((24, 3, 64, 64), dtype=np.float32))
    out, report = slim(tmp_path, path, tmp_path / "x.npz", task="distillation", input_shape=[1, 3, 64, 64],
                       prune={"amount": 0.2, "min_channels": 8})
    fresh = (torch.rand(3, 3, 64, 64),)
    got, want = run_file(out, "trace", fresh), run_file(path, "trace", fresh)
    assert_same_form("trace", got, want, [])
    assert list(got) == list(want) == ["out"] and got["out"].shape == (3, 3, 64, 64)
    assert report["stages"]["finetuned"]["params"] < report["stages"]["baseline"]["params"]
    assert list(report["stages"]["finetuned"]["distillation_error_per_output"]) == ["out"]


def test_npz_inputs_x0_x1_with_their_own_validation_arrays(tmp_path):
    from slimcore.data import load_dataset
    from slimcore.errors import SlimError

    rng = np.random.default_rng(0)
    a, b, y = rng.random((10, 3, 4, 4), dtype=np.float32), rng.random((10, 5), dtype=np.float32), np.arange(10) % 2
    shapes = ((1, 3, 4, 4), (1, 5))
    path = tmp_path / "v.npz"
    np.savez(path, x0=a, x1=b, y=y, x0_val=a[:4], x1_val=b[:4], y_val=y[:4])
    ds = load_dataset(path, task="classification", input_shape=shapes)
    assert isinstance(ds.x_train, tuple) and [t.shape for t in ds.x_train] == [(10, 3, 4, 4), (10, 5)]
    assert torch.equal(ds.x_val[1], torch.from_numpy(b[:4])) and ds.val_source == "x*_val"
    np.savez(path, x0=a, x1=b[:9], y=y)
    with pytest.raises(SlimError, match="'x1' has 9 samples but 'x0' has 10"):
        load_dataset(path, task="classification", input_shape=shapes)
    np.savez(path, x0=a, x1=b, y=y, x0_val=a[:4], y_val=y[:4])
    with pytest.raises(SlimError, match="has x0_val but no x1_val"):
        load_dataset(path, task="classification", input_shape=shapes)
    np.savez(path, x0=a, x1=b[:, :4], y=y)
    with pytest.raises(SlimError, match=r"x1 samples have shape \(4,\) but the model takes \(5,\)"):
        load_dataset(path, task="classification", input_shape=shapes)
    split = load_dataset(path, task="distillation", input_shape=((1, 3, 4, 4), (1, 4)))
    assert [sio.num_rows(split.x_train), sio.num_rows(split.x_val)] == [8, 2] and split.y_train is None


def test_distillation_loss_weights_outputs_by_size_not_scale():
    """The README's weights: one output is plain MSE; with several, the same relative error costs the same
    per element whatever an output's scale (boxes in pixels next to scores in [0, 1])."""
    from slimcore.train import distill_loss

    g = torch.Generator().manual_seed(0)
    ref_small, ref_big = torch.rand(4, 10, generator=g), 1000 * torch.rand(4, 30, generator=g)
    out_small = ref_small * 1.1
    assert distill_loss(out_small, ref_small) == pytest.approx(float(((out_small - ref_small) ** 2).mean()))
    exact = {"scores": ref_small, "boxes": ref_big}
    only_small = float(distill_loss({"scores": out_small, "boxes": ref_big}, exact))
    only_big = float(distill_loss({"scores": ref_small, "boxes": ref_big * 1.1}, exact))
    # the big output has 3× the elements and the same relative error: 3× the loss, not 10⁶×
    assert only_big / only_small == pytest.approx(3, rel=1e-4)
    both = float(distill_loss({"scores": out_small, "boxes": ref_big * 1.1}, exact))
    assert both == pytest.approx(only_small + only_big, rel=1e-5)
    # scale-free: the same relative errors on outputs 1000× larger cost the same (no divergence at default lr)
    big = {k: 1000 * v for k, v in exact.items()}
    scaled = float(distill_loss({"scores": 1000 * out_small, "boxes": 1000 * ref_big * 1.1}, big))
    assert scaled == pytest.approx(both, rel=1e-4)


def test_classification_passes_over_probabilities_beside_the_logits():
    """ultralytics' classifiers return (softmax, logits) in eval mode: the logits are the classifier output."""
    logits = torch.randn(4, 10)
    assert sio.classifier_output((logits.softmax(1), logits))[0] == 1
    assert sio.classifier_output((logits, logits.softmax(1)))[0] == 0
    index, why = sio.classifier_output((logits, logits + 1))  # two sets of logits: still ambiguous
    assert index is None and "exactly one" in why


def test_onnx_output_listed_twice(tmp_path):
    """The legacy exporter lists a tensor returned twice under one name twice (ultralytics seg): the slimmed
    file lists it twice too, under the same name, never renaming the first listing aside."""
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(make(RepeatNet), (torch.rand(1, *IMG),), str(path), dynamo=False)
    _, outs = onnx_names(path)
    assert len(outs) == 4 and outs[1] == outs[3]
    out, _ = slim(tmp_path, path, images(tmp_path / "x.npz"), task="distillation")
    assert onnx_names(out) == onnx_names(path)
    x = torch.rand(1, *IMG, generator=torch.Generator().manual_seed(3)).numpy()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {onnx_names(out)[0][0]: x})
    assert [g.shape for g in got] == [w.shape for w in ort.InferenceSession(
        str(path), providers=["CPUExecutionProvider"]).run(None, {onnx_names(path)[0][0]: x})]
    assert np.array_equal(got[1], got[3])


def test_scripted_dict_filled_in_a_loop(tmp_path):
    """torchvision's scripted segmentation models build their features dict with ``_set_item`` in a loop and
    slice ``x.shape[-2:]``: both are followed at lift time (they once failed as 'internal error: high')."""
    path = save_as_user(make(LayerGetterNet), "script", (torch.rand(2, *IMG),), tmp_path / "model.pt", [], [])
    out, _ = slim(tmp_path, path, images(tmp_path / "x.npz"), task="distillation", input_shape=[1, *IMG])
    fresh = (torch.rand(3, *IMG, generator=torch.Generator().manual_seed(3)),)
    got, want = run_file(out, "script", fresh), run_file(path, "script", fresh)
    assert list(got) == list(want) == ["out"] and got["out"].shape == want["out"].shape


def test_scripted_list_joined_with_plus(tmp_path):
    """``[x] + children`` under jit.script is joined at lift time, and the concat's channels are followed
    (it once ended in 'internal error: Node object is not iterable')."""
    path = save_as_user(make(ListJoinNet), "script", (torch.rand(2, *IMG),), tmp_path / "model.pt", [], [])
    out, report = slim(tmp_path, path, images(tmp_path / "x.npz"), task="distillation", input_shape=[1, *IMG])
    assert report["removed_channels"] > 0 and report["prunable_bn_channels"]["share"] == 1.0
    fresh = (torch.rand(3, *IMG, generator=torch.Generator().manual_seed(3)),)
    assert run_file(out, "script", fresh).shape == run_file(path, "script", fresh).shape


def test_scripted_isinstance_folds_at_lift_time(tmp_path):
    """``isinstance`` on a Union argument is decided at lift time and the ``if`` on it folds (timm DenseNet
    under jit.script once stopped at 'unsupported TorchScript op prim::isinstance')."""
    path = save_as_user(make(IsInstanceNet), "script", (torch.rand(2, *IMG),), tmp_path / "model.pt", [], [])
    out, report = slim(tmp_path, path, images(tmp_path / "x.npz"), task="distillation", input_shape=[1, *IMG])
    assert report["removed_channels"] > 0
    fresh = (torch.rand(3, *IMG, generator=torch.Generator().manual_seed(3)),)
    assert run_file(out, "script", fresh).shape == run_file(path, "script", fresh).shape
