"""Format recognition from the archive's own layout, on files saved exactly as users save them.

TorchScript files of torchvision and timm models hold ``ROOT/code/__torch__/torchvision/models/…``;
recognising torch.export by ``/models/`` anywhere in a member path refused all of them. Each file here is
recognised by ``detect_format`` and goes through a short ``slim run``.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision

from slimcore.errors import SlimError
from slimcore.formats import detect_format
from tests.conftest import run_slim, write_spec
from tests.zoo import randomize_bn

X = torch.zeros(1, 3, 32, 32)
SPEC = {"input_shape": [1, 3, 32, 32], "method": {"name": "l1", "strength": 1e-4},
        "sparse_training": {"epochs": 1, "batch_size": 8}, "prune": {"target": "channels", "amount": 0.2},
        "finetune": {"epochs": 0}}


def _resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()


def _timm_resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_bn(timm.create_model("resnet18", pretrained=False, num_classes=10)).eval()


def _save(kind: str, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "trace":
            torch.jit.save(torch.jit.trace(_resnet18(), X), str(path))
        elif kind == "script":
            torch.jit.save(torch.jit.script(_resnet18()), str(path))
        elif kind == "timm":
            torch.jit.save(torch.jit.trace(_timm_resnet18(), X), str(path))
        else:
            torch.export.save(torch.export.export(_resnet18(), (X,)), str(path))
    return path


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(path, x=rng.standard_normal((24, 3, 32, 32)).astype("float32"), y=rng.integers(0, 10, 24),
             x_val=rng.standard_normal((8, 3, 32, 32)).astype("float32"), y_val=rng.integers(0, 10, 8))
    return path


@pytest.mark.parametrize("kind, fmt, package", [("trace", "torchscript", "torchvision"),
                                                ("script", "torchscript", "torchvision"),
                                                ("timm", "torchscript", "timm"), ("pt2", "pt2", None)])
def test_real_files_are_recognised_and_slimmed(tmp_path: Path, small_data: Path, kind: str, fmt: str,
                                               package: str | None) -> None:
    f = _save(kind, tmp_path / ("model.pt2" if fmt == "pt2" else "model.pt"))
    names = zipfile.ZipFile(f).namelist()
    if package:  # the trap: the package's own module path, with "/models/" in it, is inside the archive
        assert any(f"/code/__torch__/{package}/models/" in n for n in names), names[:20]
    assert detect_format(f) == fmt
    out, rep = tmp_path / f"slim{f.suffix}", tmp_path / "report.json"
    r = run_slim("run", str(f), "--spec", str(write_spec(tmp_path / "spec.json", **SPEC)), "--data", str(small_data),
                 "-o", str(out), "--report", str(rep))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(rep.read_text())
    assert report["format"]["in"] == report["format"]["out"] == fmt
    assert report["removed_channels"] > 0
    assert detect_format(out) == fmt
    reloaded = torch.jit.load(str(out)) if fmt == "torchscript" else torch.export.load(str(out)).module()
    assert reloaded(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_names_deep_inside_an_archive_do_not_decide(tmp_path: Path) -> None:
    """A TorchScript file carrying extra files named like torch.export's markers is still TorchScript; a
    zip with those markers below the root is neither, and a checkpoint keeps its advice."""
    m = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).eval())
    ts = tmp_path / "extra.pt"
    torch.jit.save(m, str(ts), _extra_files={"archive_format": b"pt2", "models/model.json": b"{}"})
    assert any(n.endswith("/extra/archive_format") for n in zipfile.ZipFile(ts).namelist())
    assert detect_format(ts) == "torchscript"

    deep = tmp_path / "deep.pt2"
    with zipfile.ZipFile(deep, "w") as z:
        z.writestr("root/sub/archive_format", "pt2")
        z.writestr("root/sub/models/model.json", "{}")
    with pytest.raises(SlimError, match="neither TorchScript"):
        detect_format(deep)

    ck = tmp_path / "weights.pt"
    torch.save(_resnet18().state_dict(), ck)
    with pytest.raises(SlimError, match="torch.save checkpoint"):
        detect_format(ck)


def test_archives_that_hold_no_model_say_why(tmp_path: Path) -> None:
    import gzip
    import tarfile

    gz = tmp_path / "model.onnx.gz"
    gz.write_bytes(gzip.compress(b"\x08\x07" * 100))
    with pytest.raises(SlimError, match="gzip-compressed but not a readable .tar.gz"):
        detect_format(gz)
    tar = tmp_path / "photos.tar"
    (tmp_path / "cat.jpg").write_bytes(b"\xff\xd8")
    with tarfile.open(tar, "w") as t:
        t.add(tmp_path / "cat.jpg", "cat.jpg")
    with pytest.raises(SlimError, match="tar archive without a .onnx file"):
        detect_format(tar)
    bundle = tmp_path / "b.zip"
    with zipfile.ZipFile(bundle, "w") as z:
        z.writestr("model.onnx", b"\x08\x07")
    assert detect_format(bundle) == "onnx"
