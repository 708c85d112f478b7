"""User module names survive every importer: a model may call its own modules ``m`` or ``consts``.

The lifter keeps its modules under ``m.`` and the file's other tensors under ``consts.``; a user model
wrapping its network as ``self.m`` (as ultralytics blocks do) once lost its weights in the ``.pt2``
lift and came out renamed ``m_`` from TorchScript. The names in reports and ``prune.ignore`` globs are
the user's own module paths, whatever the format.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from slimcore.groups import BN_TYPES, CONV_TYPES, all_bns, public_name
from slimcore.lift.exported import import_pt2
from slimcore.lift.onnx_import import import_onnx
from slimcore.lift.torchscript import import_torchscript
from tests.conftest import run_slim, write_spec
from tests.zoo import randomize_bn, save_model

FORMATS = {"script": import_torchscript, "trace": import_torchscript, "pt2": import_pt2, "onnx": import_onnx}
LAYERS = CONV_TYPES + BN_TYPES + (nn.Linear,)

torch.set_num_threads(1)  # two cores shared with other jobs (as test_onnx_node_cases does)


class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.m = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.m(x)


class NamedLikeUs(nn.Module):
    """Digits-sized (1×8×8 → 10): top-level ``m`` and ``consts``, and ``m`` nested inside ``m``."""

    def __init__(self) -> None:
        super().__init__()
        self.m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), _Residual(8))
        self.consts = nn.Sequential(nn.Conv2d(8, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.consts(self.m(x)).mean((2, 3)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(NamedLikeUs()).eval()


def _save(model: nn.Module, fmt: str, path: Path) -> Path:
    x = torch.randn(1, 1, 8, 8)
    if fmt != "onnx":
        return save_model(model, fmt, path, x)
    buf = io.BytesIO()  # BatchNorm kept, so every layer's initializers carry the user's names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                          dynamic_axes={"input": {0: "batch"}}, input_names=["input"])
    onnx.save(onnx.load_from_string(buf.getvalue()), str(path))
    return path


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_user_names_survive_import(fmt: str, tmp_path: Path) -> None:
    model = _model()
    path = _save(model, fmt, tmp_path / f"model.{fmt}")
    imp = FORMATS[fmt](path, (1, 1, 8, 8))
    want = {n: type(mod) for n, mod in model.named_modules() if isinstance(mod, LAYERS)}
    got = {public_name(n): type(mod) for n, mod in imp.module.named_modules() if isinstance(mod, LAYERS)}
    assert got == want
    assert {n for n, _ in all_bns(imp.module)} == {"m.1", "m.3.m.1", "consts.1"}
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(imp.module(x), model(x), rtol=1e-5, atol=1e-5)
    # the user's weights, not a fresh init, sit at the user's paths
    assert torch.equal(imp.module.get_submodule("m.m.3.m.0").weight, model.m[3].m[0].weight)


def test_user_names_survive_a_dynamo_onnx_export(tmp_path: Path) -> None:
    """torch 2.x's default exporter folds BN and names each conv's weight after the user's conv."""
    model = _model()
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 1, 8, 8),), str(path), external_data=False)
    imp = import_onnx(path, (1, 1, 8, 8))
    got = {public_name(n) for n, mod in imp.module.named_modules() if isinstance(mod, CONV_TYPES + (nn.Linear,))}
    assert got == {"m.0", "m.3.m.0", "consts.0", "head"}


TINY = {"input_shape": [1, 1, 8, 8], "method": {"name": "l1", "strength": 1e-3, "pilot_runs": 0},
        "sparse_training": {"epochs": 1, "batch_size": 128, "lr": 0.02},
        "prune": {"target": "channels", "amount": 0.3, "ignore": ["m.3.*"]},
        "finetune": {"epochs": 1, "batch_size": 128, "lr": 0.01}}


@pytest.mark.parametrize("fmt", ["pt2", "trace", "onnx"])
def test_slim_run_reports_user_names(fmt: str, tmp_path: Path, digits: Path) -> None:
    """``slim run`` end to end: the report's layers are the user's BNs and ``ignore`` globs match them."""
    path = _save(_model(), fmt, tmp_path / f"model.{fmt}")
    sp = write_spec(tmp_path / "spec.json", **TINY)
    out, rep = tmp_path / f"slim.{fmt}", tmp_path / "report.json"
    r = run_slim("run", str(path), "--spec", str(sp), "--data", str(digits), "-o", str(out), "--report", str(rep))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(rep.read_text())
    layers = {lay["name"]: lay for lay in report["layers"]}
    assert set(layers) == {"m.1", "m.3.m.1", "consts.1"}
    # m.3.m.0 is ignored and m.1 shares its channels through the residual add: both stay whole
    assert layers["m.3.m.1"]["channels_after"] == layers["m.3.m.1"]["channels_before"] == 8
    assert layers["m.1"]["channels_after"] == 8
    assert layers["consts.1"]["channels_after"] < layers["consts.1"]["channels_before"]
    assert out.exists() and out.stat().st_size > 0
