"""Data too large for memory: image folders, archives and WebDataset shards decoded lazily on loader
workers, the up-front check as a streaming pass, and the spec's preprocessing and augmentation — through
``slim run`` with files laid out the way users lay them out, and through the loader directly."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slimcore import io
from slimcore.data import load_dataset, make_loader
from slimcore.errors import SlimError
from slimcore.spec import DataSpec
from tests.conftest import run_slim, write_spec
from tests.zoo import save_model


def _digits_images(npz: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    d = np.load(npz)
    to8 = lambda a: np.clip(np.rint(a[:, 0] * 255), 0, 255).astype(np.uint8)  # noqa: E731
    return to8(d["x"]), d["y"], to8(d["x_val"]), d["y_val"]


def _folder(root: Path, npz: Path) -> Path:
    """The digits as an ImageFolder tree: train/<class>/<n>.png and val/<class>/<n>.png."""
    x, y, xv, yv = _digits_images(npz)
    for split, xs, ys in (("train", x, y), ("val", xv, yv)):
        for n, (img, label) in enumerate(zip(xs, ys, strict=True)):
            d = root / split / f"c{int(label)}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, "L").save(d / f"{n:05d}.png")
    return root


def _shards(root: Path, npz: Path, per_shard: int = 400) -> Path:
    """The digits as WebDataset shards: train-000.tar, … and val-000.tar with <key>.png + <key>.cls."""
    import io as _io

    x, y, xv, yv = _digits_images(npz)
    root.mkdir(parents=True)
    for split, xs, ys in (("train", x, y), ("val", xv, yv)):
        for s in range(0, len(xs), per_shard):
            with tarfile.open(root / f"digits-{split}-{s // per_shard:03d}.tar", "w") as tf:
                for n in range(s, min(s + per_shard, len(xs))):
                    buf = _io.BytesIO()
                    Image.fromarray(xs[n], "L").save(buf, format="PNG")
                    for name, data in ((f"{n:05d}.png", buf.getvalue()), (f"{n:05d}.cls", str(int(ys[n])).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tf.addfile(info, _io.BytesIO(data))
    return root


@pytest.fixture(scope="module")
def digit_tree(tmp_path_factory, digits) -> Path:
    return _folder(tmp_path_factory.mktemp("tree") / "digits", digits)


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory, digits) -> Path:
    return _shards(tmp_path_factory.mktemp("shards") / "digits", digits)


def test_large_folder_stays_lazy_and_matches_npz(digit_tree, digits, monkeypatch):
    monkeypatch.setenv("SLIM_DATA_IN_MEMORY_MB", "0")  # "too large for memory", whatever its size
    ds = load_dataset(digit_tree, task="classification", input_shape=(1, 1, 8, 8), options=DataSpec(workers=1))
    assert isinstance(ds.x_train, io.LazyInputs) and ds.source == "lazy" and ds.val_source == "val/"
    d = np.load(digits)
    assert io.num_rows(ds.x_train) == len(d["x"]) and ds.num_classes == 10
    # classes sort by folder name ("c0" … "c9"), so labels are the digits themselves
    want = torch.from_numpy(np.clip(np.rint(d["x"][:5] * 255), 0, 255) / 255).float()
    got = io.rows(ds.x_train, slice(0, 5))
    order = np.argsort([f"c{int(v)}" for v in d["y"]], kind="stable")
    torch.testing.assert_close(got, want[:0].new_tensor(np.clip(np.rint(d["x"][order[:5]] * 255), 0, 255) / 255))
    assert ds.y_train is not None and ds.y_train[:5].tolist() == d["y"][order[:5]].tolist()
    loader = make_loader(ds.x_train, ds.y_train, 64, shuffle=True, seed=0)
    assert loader.num_workers == 1 and loader.persistent_workers
    xb, yb = next(iter(loader))
    assert xb.shape == (64, 1, 8, 8) and yb.shape == (64,) and 0 <= float(xb.min()) <= float(xb.max()) <= 1
    batches = list(io.batches(ds.x_val, 100))
    assert sum(len(b) for b in batches) == io.num_rows(ds.x_val)


def test_small_folder_is_decoded_into_memory(digit_tree):
    ds = load_dataset(digit_tree, task="classification", input_shape=(1, 1, 8, 8))
    assert isinstance(ds.x_train, torch.Tensor) and ds.source == "memory"


def test_shards_with_a_val_shard(digit_shards, digits, monkeypatch):
    monkeypatch.setenv("SLIM_DATA_IN_MEMORY_MB", "0")
    ds = load_dataset(digit_shards, task="classification", input_shape=(1, 1, 8, 8), options=DataSpec(workers=0))
    d = np.load(digits)
    assert ds.val_source == "val shards" and io.num_rows(ds.x_val) == len(d["x_val"])
    assert ds.y_train is not None and ds.y_train.tolist() == d["y"].tolist()  # keys sort as written
    want = np.clip(np.rint(d["x"][:3] * 255), 0, 255) / 255
    torch.testing.assert_close(io.rows(ds.x_train, [0, 1, 2]), torch.from_numpy(want).float())


def test_bad_image_fails_up_front_by_name(tmp_path, digit_tree, monkeypatch):
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(digit_tree, tree)
    (tree / "train" / "c3" / "00100.png").write_bytes(b"not a png at all")
    monkeypatch.setenv("SLIM_DATA_IN_MEMORY_MB", "0")
    with pytest.raises(SlimError, match=r"could not read image 'train/c3/00100.png'"):
        load_dataset(tree, task="classification", input_shape=(1, 1, 8, 8), options=DataSpec(workers=1))


def test_shard_label_problems(tmp_path):
    import io as _io

    root = tmp_path / "s"
    root.mkdir()
    buf = _io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    with tarfile.open(root / "a-000.tar", "w") as tf:
        for name, data in (("k1.png", buf.getvalue()), ("k1.cls", b"seven"), ("k2.png", buf.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, _io.BytesIO(data))
    with pytest.raises(SlimError, match="not a class index"):
        load_dataset(root, task="classification", input_shape=(1, 1, 8, 8))
    # distillation needs no labels: the same shards are fine
    ds = load_dataset(root, task="distillation", input_shape=(1, 1, 8, 8))
    assert ds.y_train is None and io.num_rows(ds.x_train) + io.num_rows(ds.x_val) == 2


def test_augmentation_changes_training_samples_only(digits):
    opts = DataSpec(augment="standard", workers=0)
    ds = load_dataset(digits, task="classification", input_shape=(1, 1, 8, 8), options=opts)
    assert isinstance(ds.x_train, io.LazyInputs) and isinstance(ds.x_val, torch.Tensor)
    plain = load_dataset(digits, task="classification", input_shape=(1, 1, 8, 8))
    torch.testing.assert_close(ds.x_val, plain.x_val)  # evaluation is deterministic and untouched
    torch.testing.assert_close(io.rows(ds.x_train, slice(0, 4)), plain.x_train[:4])  # as is, unless training
    first = torch.stack([ds.x_train.sample(i, train=True) for i in range(64)])
    second = torch.stack([ds.x_train.sample(i, train=True) for i in range(64)])
    assert first.shape == (64, 1, 8, 8) and not torch.equal(first, plain.x_train[:64])
    assert not torch.equal(first, second)  # new crops every pass
    xb, yb = next(iter(make_loader(ds.x_train, ds.y_train, 32, shuffle=True, seed=0)))
    assert xb.shape == (32, 1, 8, 8) and yb.dtype == torch.int64


def test_normalisation_and_its_errors(digits):
    ds = load_dataset(digits, task="classification", input_shape=(1, 1, 8, 8),
                      options=DataSpec(mean=[0.5], std=[0.25]))
    plain = load_dataset(digits, task="classification", input_shape=(1, 1, 8, 8))
    torch.testing.assert_close(ds.x_train, (plain.x_train - 0.5) / 0.25)
    with pytest.raises(SlimError, match="one per channel"):
        load_dataset(digits, task="classification", input_shape=(1, 1, 8, 8),
                     options=DataSpec(mean=[0.5, 0.5, 0.5], std=[1, 1, 1]))
    with pytest.raises(ValueError, match="go together"):
        DataSpec(mean=[0.5])
    with pytest.raises(SlimError, match="data.resize applies to image files"):
        load_dataset(digits, task="classification", input_shape=(1, 1, 8, 8), options=DataSpec(resize=16))


SPEC = {"input_shape": [1, 1, 8, 8], "method": {"name": "l1", "strength": 3e-3},
        "sparse_training": {"epochs": 3, "batch_size": 64, "lr": 0.02},
        "prune": {"target": "channels", "amount": 0.3}, "finetune": {"epochs": 3, "batch_size": 64}}


@pytest.mark.parametrize("layout", ["tree", "shards"])
def test_slim_run_streams_a_folder(tmp_path, layout, digit_tree, digit_shards, digits_cnn, monkeypatch):
    """`slim run --data FOLDER` as a user runs it, on a TorchScript file traced the usual way, with the data
    forced lazy: the job trains from loader workers and keeps its accuracy."""
    monkeypatch.setenv("SLIM_DATA_IN_MEMORY_MB", "0")
    model = save_model(digits_cnn, "trace", tmp_path / "m.pt", torch.zeros(1, 1, 8, 8))
    spec = write_spec(tmp_path / "spec.json", **SPEC, data={"workers": 1})
    data = digit_tree if layout == "tree" else digit_shards
    r = run_slim("run", str(model), "--spec", str(spec), "--data", str(data), "-o", str(tmp_path / "out.pt"),
                 "--report", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["data"]["train"] == 1400 and report["data"]["val"] == 397
    assert report["stages"]["finetuned"]["accuracy"] > 0.9
    assert torch.jit.load(str(tmp_path / "out.pt"))(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_slim_run_missing_data_folder(tmp_path, digits_cnn):
    model = save_model(digits_cnn, "trace", tmp_path / "m.pt", torch.zeros(1, 1, 8, 8))
    spec = write_spec(tmp_path / "spec.json", **SPEC)
    r = run_slim("run", str(model), "--spec", str(spec), "--data", str(tmp_path / "nope"), "-o", str(tmp_path / "o"))
    assert r.returncode != 0 and "data file or folder not found" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("compressed", [False, True])
def test_large_npz_is_memory_mapped(tmp_path, digits, compressed, monkeypatch):
    """An npz over the in-memory limit is read row by row from the file (numpy.savez: mapped in place;
    savez_compressed: inflated once into the cache), checked in slices, and trains like the loaded one."""
    monkeypatch.setenv("SLIM_DATA_IN_MEMORY_MB", "0")
    monkeypatch.setenv("SLIM_CACHE_DIR", str(tmp_path / "cache"))
    d = dict(np.load(digits))
    d["x"] = np.clip(np.rint(d["x"] * 255), 0, 255).astype(np.uint8)  # pixels, as images are saved
    path = tmp_path / "big.npz"
    (np.savez_compressed if compressed else np.savez)(path, **d)
    ds = load_dataset(path, task="classification", input_shape=(1, 1, 8, 8), options=DataSpec(workers=0))
    assert isinstance(ds.x_train, io.LazyInputs) and ds.source == "lazy"
    assert isinstance(ds.x_train.arrays[0], np.memmap)
    torch.testing.assert_close(io.rows(ds.x_train, slice(0, 3)), torch.from_numpy(d["x"][:3] / 255).float())
    assert (tmp_path / "cache").exists() == compressed
    d["x"] = d["x"].astype(np.float32)
    d["x"][700, 0, 3, 3] = np.nan
    np.savez(path, **d)
    with pytest.raises(SlimError, match="NaN or infinite values \\(first in sample 700\\)"):
        load_dataset(path, task="classification", input_shape=(1, 1, 8, 8))


def test_service_job_streams_an_uploaded_zip(tmp_path, digit_tree, digits_cnn):
    """Through the embedded service: an ImageFolder zip uploaded with the job, read in place and decoded on
    loader worker processes inside the worker's (daemonic) task process."""
    import zipfile

    from api.client import SlimClient
    from tests.service_harness import Service

    archive = tmp_path / "digits.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(digit_tree.rglob("*.png")):
            zf.write(p, p.relative_to(digit_tree).as_posix())
    model = save_model(digits_cnn, "trace", tmp_path / "m.pt", torch.zeros(1, 1, 8, 8))
    svc = Service(tmp_path, {"SLIM_DATA_IN_MEMORY_MB": "0"}, embedded=True)
    try:
        svc.start_api()
        with SlimClient(svc.url) as c:
            job = c.wait(c.submit(model, {**SPEC, "data": {"workers": 1}}, archive)["id"], poll=0.5, timeout=600)
            assert job["status"] == "succeeded", (job, svc.logs())
            report = c.report(job["id"])
            assert report["data"]["source"] == "lazy" and report["data"]["loader_workers"] == 1
            assert report["data"]["train"] == 1400 and report["stages"]["finetuned"]["accuracy"] > 0.9
    finally:
        svc.close()


def test_zip_read_in_place_refuses_links_and_escapes(tmp_path):
    import zipfile

    link = zipfile.ZipInfo("train/a/x.png")
    link.external_attr = (0o120777 << 16)  # a symlink entry
    for name, info in (("link.zip", link), ("escape.zip", zipfile.ZipInfo("../train/a/x.png"))):
        with zipfile.ZipFile(tmp_path / name, "w") as zf:
            zf.writestr(info, b"/etc/passwd")
        with pytest.raises(SlimError, match="link or special file|escapes"):
            load_dataset(tmp_path / name, task="classification", input_shape=(1, 1, 8, 8))
