"""ONNX with external data through ``slim run``: torch 2.13's default export (``model.onnx`` + ``model.onnx.data``)
taken as users have it (data file beside the model, or a .zip/.tar.gz bundle), written back in the same
layout, and every unsafe or inconsistent data file or bundle refused in one line before anything runs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from slimcore.cli import main as cli_main
from tests.conftest import run_slim, write_spec
from tests.zoo import make_model

SPEC = {"method": {"name": "l1", "strength": 3e-3}, "sparse_training": {"epochs": 2, "lr": 0.02},
        "prune": {"target": "channels", "amount": 0.3}, "finetune": {"epochs": 1, "lr": 0.01}}


def default_export(folder: Path, name: str = "model.onnx") -> Path:
    """``torch.onnx.export(model, (x,), path)`` with no options, as users call it (dynamo, external data)."""
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(make_model("smallcnn"), (torch.zeros(1, 1, 8, 8),), str(folder / name), verbose=False)
    assert (folder / f"{name}.data").is_file()  # what this test is about: torch wrote a data file
    return folder / name


def locations(path: Path) -> set[str]:
    m = onnx.load(str(path), load_external_data=False)
    return {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}


def run_ort(path: Path) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 1, 8, 8), np.float32)})[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return default_export(tmp_path_factory.mktemp("export"))


def _slim(tmp_path: Path, model: Path, out: Path, digits: Path) -> dict:
    rep = tmp_path / "report.json"
    r = run_slim("run", str(model), "--spec", str(write_spec(tmp_path / "spec.json", **SPEC)), "--data", str(digits),
                 "-o", str(out), "--report", str(rep))
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(rep.read_text())


def test_data_file_beside_the_model_comes_back_beside_the_result(tmp_path, exported, digits):
    report = _slim(tmp_path, exported, tmp_path / "slim.onnx", digits)
    assert report["format"] == {"in": "onnx", "out": "onnx", "external_data": True, "bundle": None}
    assert locations(tmp_path / "slim.onnx") == {"slim.onnx.data"}
    onnx.checker.check_model(str(tmp_path / "slim.onnx"), full_check=True)
    assert run_ort(tmp_path / "slim.onnx").shape == (1, 10)
    both = (tmp_path / "slim.onnx").stat().st_size + (tmp_path / "slim.onnx.data").stat().st_size
    assert report["model_bytes"]["after"] == both
    assert report["model_bytes"]["before"] == exported.stat().st_size + Path(f"{exported}.data").stat().st_size
    assert report["model_bytes"]["after"] < report["model_bytes"]["before"]


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_bundle_in_gives_the_same_kind_of_bundle_out(tmp_path, exported, digits, kind):
    bundle = tmp_path / f"mine.{kind}"
    files = [exported, Path(f"{exported}.data")]
    if kind == "zip":
        with zipfile.ZipFile(bundle, "w") as z:
            for f in files:
                z.write(f, f"resnet/{f.name}")  # a folder inside the bundle is fine
    else:
        with tarfile.open(bundle, "w:gz") as t:
            for f in files:
                t.add(f, f.name)
    out = tmp_path / f"slim.{kind}"
    report = _slim(tmp_path, bundle, out, digits)
    assert report["format"]["bundle"] == kind and report["format"]["external_data"]
    dest = tmp_path / "unpacked"
    if kind == "zip":
        assert zipfile.is_zipfile(out)
        zipfile.ZipFile(out).extractall(dest)
    else:
        with tarfile.open(out, "r:gz") as t:
            t.extractall(dest, filter="data")
    assert sorted(os.listdir(dest)) == ["model.onnx", "model.onnx.data"]
    assert locations(dest / "model.onnx") == {"model.onnx.data"}
    assert run_ort(dest / "model.onnx").shape == (1, 10)


def _refused(tmp_path: Path, model: Path, digits: Path) -> str:
    """The ``slim run`` entry point in-process (what the command execs into): one ``slim: error:`` line, exit 2,
    no output written."""
    err, out = io.StringIO(), tmp_path / "out.onnx"
    with contextlib.redirect_stderr(err):
        code = cli_main(["run", str(model), "--spec", str(write_spec(tmp_path / "spec.json", **SPEC)),
                         "--data", str(digits), "-o", str(out)])
    lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip() and not ln.startswith("[")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("slim: error: "), err.getvalue()
    assert not out.exists() and not Path(f"{out}.data").exists()
    return lines[0]


def _relocate(src: Path, dest: Path, location: str, length: int | None = None) -> Path:
    """A copy of the model whose first external tensor names ``location`` (and, if given, ``length``)."""
    m = onnx.load(str(src), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.external_data)
    for e in t.external_data:
        if e.key == "location":
            e.value = location
        if e.key == "length" and length is not None:
            e.value = str(length)
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(m, str(dest))
    return dest


def test_unsafe_or_wrong_data_files_are_one_line_errors(tmp_path, exported, digits):
    data = Path(f"{exported}.data")
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "model.onnx.data").write_bytes(data.read_bytes())
    (tmp_path / "secret.data").write_bytes(data.read_bytes())  # a readable file one level up
    cases = {
        "../secret.data": "has a folder in it",
        "/etc/passwd": "has a folder in it",
        "model.onnx": "the model file itself",
        ".hidden": "not starting with .",
        "absent.data": "which is missing",
    }
    for loc, needle in cases.items():
        msg = _refused(tmp_path, _relocate(exported, folder / "model.onnx", loc), digits)
        assert needle in msg and repr(loc) in msg, (loc, msg)

    # a symbolic link to a real data file, and a hard link, in the model's folder
    link = tmp_path / "linked"
    link.mkdir()
    _relocate(exported, link / "model.onnx", "model.onnx.data")
    (link / "model.onnx.data").symlink_to(data)
    assert "symbolic link" in _refused(tmp_path, link / "model.onnx", digits)
    (link / "model.onnx.data").unlink()
    os.link(tmp_path / "secret.data", link / "model.onnx.data")
    assert "hard links" in _refused(tmp_path, link / "model.onnx", digits)

    # a data file shorter than the tensors it should hold (a truncated upload)
    short = tmp_path / "short"
    short.mkdir()
    _relocate(exported, short / "model.onnx", "model.onnx.data")
    (short / "model.onnx.data").write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    assert "truncated upload" in _refused(tmp_path, short / "model.onnx", digits)

    # a length that does not match the tensor's dims × dtype
    (folder / "model.onnx.data").write_bytes(data.read_bytes())
    msg = _refused(tmp_path, _relocate(exported, folder / "model.onnx", "model.onnx.data", length=4), digits)
    assert "do not belong together" in msg
    assert (tmp_path / "secret.data").read_bytes() == data.read_bytes()  # nothing outside was touched


def _zip(path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, blob in members.items():
            z.writestr(name, blob)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
    return path


def test_unsafe_bundles_are_one_line_errors(tmp_path, exported, digits):
    model, data = exported.read_bytes(), Path(f"{exported}.data").read_bytes()
    work = tmp_path / "w"
    work.mkdir()
    cases = {
        "escapes the archive root": _zip(work / "a.zip", {"model.onnx": model, "../model.onnx.data": data}),
        "absolute path": _zip(work / "b.zip", {"model.onnx": model, "/tmp/model.onnx.data": data}),
        "symlink": _zip(work / "c.zip", {"model.onnx": model}, link="model.onnx.data"),
        "exactly one .onnx": _zip(work / "d.zip", {"a.onnx": model, "b.onnx": model, "model.onnx.data": data}),
        "which is missing": _zip(work / "e.zip", {"model.onnx": model}),
        "truncated upload": _zip(work / "f.zip", {"model.onnx": model, "model.onnx.data": data[:1000]}),
    }
    for needle, bundle in cases.items():
        assert needle in _refused(work, bundle, digits), needle
    assert not (tmp_path / "model.onnx.data").exists()  # the traversal wrote nothing outside
    assert sorted(p.name for p in work.iterdir()) == sorted([*(p.name for p in cases.values()), "spec.json"])
