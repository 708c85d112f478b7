"""Data loading and archive extraction: the contract's formats, every refusal, and no writes outside dest."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slimcore import archive as archive_mod
from slimcore.archive import safe_extract
from slimcore.data import load_dataset, make_loader
from slimcore.errors import SlimError

# --- npz ----------------------------------------------------------------------------------------------


def _npz(tmp_path: Path, name: str = "d.npz", **arrays: np.ndarray) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _xy(n: int = 10, shape: tuple[int, ...] = (1, 4, 4)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, *shape), dtype=np.float32), np.arange(n) % 3


def test_npz_with_x_val(tmp_path):
    x, y = _xy()
    xv, yv = _xy(4)
    ds = load_dataset(_npz(tmp_path, x=x, y=y, x_val=xv, y_val=yv), task="classification",
                      input_shape=(1, 1, 4, 4))
    assert ds.val_source == "x_val"
    assert ds.x_train.dtype == torch.float32 and ds.y_train is not None and ds.y_train.dtype == torch.int64
    torch.testing.assert_close(ds.x_train, torch.from_numpy(x))
    torch.testing.assert_close(ds.x_val, torch.from_numpy(xv))
    assert ds.y_val is not None and ds.y_val.tolist() == yv.tolist()
    assert ds.num_classes == 3 and ds.classes is None


def test_npz_split_is_recorded_and_seeded(tmp_path):
    x, y = _xy(10, (5,))
    path = _npz(tmp_path, x=x, y=y)
    a = load_dataset(path, task="classification", input_shape=None, seed=1)
    b = load_dataset(path, task="classification", input_shape=None, seed=1)
    c = load_dataset(path, task="classification", input_shape=None, seed=2)
    assert a.val_source == "split:0.2"
    assert (len(a.x_train), len(a.x_val)) == (8, 2)
    torch.testing.assert_close(a.x_val, b.x_val)
    assert not torch.equal(a.x_val, c.x_val)
    rows = {tuple(r) for r in torch.cat([a.x_train, a.x_val]).tolist()}
    assert rows == {tuple(r) for r in x.tolist()}  # a partition: nothing lost or duplicated
    assert a.y_train is not None and len(a.y_train) == 8


def test_split_keeps_at_least_one(tmp_path):
    x, y = _xy(2, (3,))
    ds = load_dataset(_npz(tmp_path, x=x, y=y), task="classification", input_shape=None)
    assert (len(ds.x_train), len(ds.x_val)) == (1, 1)


def test_npz_uint8_scaled_other_dtypes_as_is(tmp_path):
    x8 = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    xi = np.array([[0, 300], [-5, 7]], dtype=np.int16)
    y = np.array([0, 1])
    d8 = load_dataset(_npz(tmp_path, "a.npz", x=x8, y=y, x_val=x8, y_val=y), task="classification",
                      input_shape=None)
    torch.testing.assert_close(d8.x_train, torch.tensor([[0.0, 1.0], [0.2, 0.4]]))
    di = load_dataset(_npz(tmp_path, "b.npz", x=xi, y=y, x_val=xi, y_val=y), task="classification",
                      input_shape=None)
    torch.testing.assert_close(di.x_train, torch.tensor([[0.0, 300.0], [-5.0, 7.0]]))


def test_distillation_needs_no_labels_and_ignores_them(tmp_path):
    x, y = _xy(10, (6,))
    for path in (_npz(tmp_path, "a.npz", x=x), _npz(tmp_path, "b.npz", x=x, y=y)):
        ds = load_dataset(path, task="distillation", input_shape=(1, 6))
        assert ds.y_train is None and ds.y_val is None and ds.num_classes is None
        assert len(ds.x_train) + len(ds.x_val) == 10


def test_whole_number_float_labels_accepted(tmp_path):
    x, _ = _xy(4, (2,))
    ds = load_dataset(_npz(tmp_path, x=x, y=np.array([0.0, 1.0, 2.0, 1.0])), task="classification",
                      input_shape=None)
    assert ds.y_train is not None and ds.y_train.dtype == torch.int64 and ds.num_classes == 3


def _err(path: Path, task: str = "classification", shape: tuple[int, ...] | None = None) -> str:
    with pytest.raises(SlimError) as info:
        load_dataset(path, task=task, input_shape=shape)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_npz_errors(tmp_path):
    x, y = _xy(6, (1, 8, 8))
    assert "'x'" in _err(_npz(tmp_path, "no_x.npz", data=x, y=y))
    assert "'y'" in _err(_npz(tmp_path, "no_y.npz", x=x))
    assert "5 labels" in _err(_npz(tmp_path, "len.npz", x=x, y=y[:5]))
    assert "negative" in _err(_npz(tmp_path, "neg.npz", x=x, y=y - 1))
    assert "integer" in _err(_npz(tmp_path, "frac.npz", x=x, y=y + 0.5))
    assert "one-hot" in _err(_npz(tmp_path, "onehot.npz", x=x, y=np.eye(3)[y]))
    nan = x.copy()
    nan[3, 0, 0, 0] = np.nan
    assert "NaN" in _err(_npz(tmp_path, "nan.npz", x=nan, y=y)) and "sample 3" in _err(tmp_path / "nan.npz")
    inf = x.copy()
    inf[1, 0, 2, 2] = np.inf
    assert "infinite" in _err(_npz(tmp_path, "inf.npz", x=inf, y=y))
    big = x.astype(np.float64)
    big[0, 0, 0, 0] = 1e300  # overflows float32
    assert "infinite" in _err(_npz(tmp_path, "big.npz", x=big, y=y))
    assert "empty" in _err(_npz(tmp_path, "empty.npz", x=x[:0], y=y[:0]))
    assert "at least 2" in _err(_npz(tmp_path, "one.npz", x=x[:1], y=y[:1]))
    assert "x_val" in _err(_npz(tmp_path, "half_val.npz", x=x, y=y, x_val=x))
    assert "dtype" in _err(_npz(tmp_path, "str.npz", x=np.array([["a"], ["b"]]), y=y[:2]))
    assert _err(_npz(tmp_path, "shape.npz", x=x, y=y), shape=(1, 3, 32, 32)) == (
        "data samples have shape (1, 8, 8) but the model takes (3, 32, 32); "
        "reshape the data or fix input_shape")


def test_npz_val_shape_must_match(tmp_path):
    x, y = _xy(6, (1, 8, 8))
    assert "x_val" in _err(_npz(tmp_path, x=x, y=y, x_val=x[:, :, :4], y_val=y))


def test_file_level_errors(tmp_path):
    (tmp_path / "d.csv").write_text("1,2\n")
    msg = _err(tmp_path / "d.csv")
    assert ".npz" in msg and ".zip" in msg and ".tar.gz" in msg
    assert "does not exist" in _err(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip at all")
    assert "numpy.savez" in _err(tmp_path / "bad.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], dtype=object))
    assert "pickled" in _err(tmp_path / "obj.npz")
    x, y = _xy(4, (2,))
    assert "unknown task" in _err(_npz(tmp_path, x=x, y=y), task="regression")


def test_npz_inflation_is_bounded(tmp_path, monkeypatch):
    x, y = _xy(64, (16,))
    path = tmp_path / "packed.npz"
    np.savez_compressed(path, x=x, y=y)
    monkeypatch.setenv("SLIM_MAX_EXTRACT_BYTES", "1000")
    assert "limit" in _err(path)
    # numpy.savez stores members uncompressed: they are mapped in place, nothing inflates, no limit applies
    assert len(load_dataset(_npz(tmp_path, x=x, y=y), task="classification", input_shape=None).x_train) > 0
    monkeypatch.delenv("SLIM_MAX_EXTRACT_BYTES")
    with zipfile.ZipFile(tmp_path / "lie.npz", "w") as zf:  # header claims 10^12 floats; 8 bytes follow
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                      "shape": (10**12,)})
        zf.writestr("x.npy", header.getvalue() + b"\0" * 8)
    assert "corrupt" in _err(tmp_path / "lie.npz")


# --- ImageFolder archives -----------------------------------------------------------------------------

COLORS = {"cat": (200, 30, 30), "dog": (30, 30, 200)}


def _tree(root: Path, *, val: bool = True, n: int = 3) -> None:
    for split, count in (("train", n), ("val", 1)) if val else (("train", n),):
        for cls, color in COLORS.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (10, 10), color).save(root / split / cls / f"{i}.png")


def _pack(src: Path, out: Path) -> Path:
    if out.name.endswith(".zip"):
        with zipfile.ZipFile(out, "w") as zf:
            for p in sorted(src.rglob("*")):
                zf.write(p, p.relative_to(src).as_posix())
    else:
        with tarfile.open(out, "w:gz") as tf:
            for p in sorted(src.iterdir()):
                tf.add(p, p.name)
    return out


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder(tmp_path, fmt, channels, monkeypatch):
    _tree(tmp_path / "src")
    path = _pack(tmp_path / "src", tmp_path / f"imgs.{fmt}")
    cache = tmp_path / "cache"
    monkeypatch.setenv("SLIM_CACHE_DIR", str(cache))
    ds = load_dataset(path, task="classification", input_shape=(1, channels, 8, 8))
    assert ds.x_train.shape == (6, channels, 8, 8) and ds.x_val.shape == (2, channels, 8, 8)
    assert ds.x_train.dtype == torch.float32 and 0 <= ds.x_train.min() and ds.x_train.max() <= 1
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2 and ds.val_source == "val/"
    assert ds.y_train is not None and ds.y_train.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.y_val is not None and ds.y_val.tolist() == [0, 1]
    if channels == 3:
        torch.testing.assert_close(ds.x_train[0, :, 4, 4], torch.tensor([200, 30, 30]) / 255.0)
    if fmt == "zip":  # read in place: nothing extracted anywhere
        assert not cache.exists()
    else:  # a compressed tar cannot be read at random: extracted once per content, then reused
        (extracted,) = (cache / "extracted").iterdir()
        again = load_dataset(path, task="classification", input_shape=(1, channels, 8, 8))
        assert [p.name for p in (cache / "extracted").iterdir()] == [extracted.name]
        torch.testing.assert_close(again.x_val, ds.x_val)


def test_image_folder_split_wrapper_and_junk(tmp_path):
    _tree(tmp_path / "src" / "mydata", val=False, n=5)
    (tmp_path / "src" / "mydata" / "train" / "cat" / "._0.png").write_bytes(b"\0\5\26\7")  # macOS fork
    (tmp_path / "src" / "mydata" / "train" / "cat" / "notes.txt").write_text("ignored")
    (tmp_path / "src" / "__MACOSX").mkdir()
    ds = load_dataset(_pack(tmp_path / "src", tmp_path / "a.zip"), task="classification",
                      input_shape=(1, 1, 8, 8))
    assert ds.val_source == "split:0.2" and (len(ds.x_train), len(ds.x_val)) == (8, 2)
    dist = load_dataset(tmp_path / "a.zip", task="distillation", input_shape=(1, 1, 8, 8))
    assert dist.y_train is None and dist.classes is None and dist.num_classes is None


def test_image_folder_16_bit_grayscale_is_scaled(tmp_path):
    _tree(tmp_path / "src", val=False)
    Image.fromarray(np.full((10, 10), 32768, dtype=np.uint16)).save(tmp_path / "src/train/cat/0.png")
    ds = load_dataset(_pack(tmp_path / "src", tmp_path / "a.tgz"), task="classification",
                      input_shape=(1, 1, 8, 8))
    assert any(abs(float(v) - 0.5) < 0.01 for v in torch.cat([ds.x_train, ds.x_val])[:, 0, 0, 0])


def test_image_folder_errors(tmp_path):
    _tree(tmp_path / "ok")
    ok = _pack(tmp_path / "ok", tmp_path / "ok.zip")
    assert "input_shape" in _err(ok, shape=None)
    assert "C=1" in _err(ok, shape=(1, 2, 8, 8))

    _tree(tmp_path / "unk")
    (tmp_path / "unk/val/bird").mkdir()
    Image.new("L", (10, 10)).save(tmp_path / "unk/val/bird/0.png")
    assert "'bird'" in _err(_pack(tmp_path / "unk", tmp_path / "unk.zip"), shape=(1, 1, 8, 8))

    _tree(tmp_path / "bad")
    (tmp_path / "bad/train/dog/broken.jpg").write_bytes(b"definitely not a jpeg")
    bad = _pack(tmp_path / "bad", tmp_path / "bad.tar.gz")
    assert "'train/dog/broken.jpg'" in _err(bad, shape=(1, 3, 8, 8))

    (tmp_path / "flat/stuff").mkdir(parents=True)
    Image.new("L", (10, 10)).save(tmp_path / "flat/stuff/0.png")
    assert "no train/" in _err(_pack(tmp_path / "flat", tmp_path / "flat.zip"), shape=(1, 1, 8, 8))

    _tree(tmp_path / "empty", val=False)
    (tmp_path / "empty/train/owl").mkdir()
    (tmp_path / "empty/train/owl/readme.txt").write_text("no images")
    assert "'train/owl' has no images" in _err(_pack(tmp_path / "empty", tmp_path / "empty.zip"),
                                                shape=(1, 1, 8, 8))


# --- make_loader --------------------------------------------------------------------------------------


def test_make_loader_batches():
    x, y = torch.arange(11.0).unsqueeze(1), torch.arange(11)
    ordered = [b[1].tolist() for b in make_loader(x, y, 5, shuffle=False, seed=0)]
    assert ordered == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10]]
    xs_only = list(make_loader(x, None, 4, shuffle=False, seed=0))
    assert all(len(b) == 1 and b[0].shape[1:] == (1,) for b in xs_only)
    shuffled = make_loader(x, y, 5, shuffle=True, seed=3)
    assert len(shuffled) == 2  # a trailing batch of one would break BatchNorm: dropped
    e1, e2 = ([v for b in shuffled for v in b[1].tolist()] for _ in range(2))
    assert len(e1) == 10 and len(set(e1)) == 10 and e1 != e2
    again = make_loader(x, y, 5, shuffle=True, seed=3)
    assert [v for b in again for v in b[1].tolist()] == e1


# --- safe_extract -------------------------------------------------------------------------------------


def _snapshot(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _refuse(tmp_path: Path, archive: Path, match: str, **limits: int) -> None:
    """Refusal must name the problem and leave the disk exactly as it was (dest empty, nothing beside it)."""
    dest = tmp_path / "out" / "dest"
    dest.mkdir(parents=True, exist_ok=True)
    before = _snapshot(tmp_path)
    with pytest.raises(SlimError, match=match):
        safe_extract(archive, dest, **limits)
    assert _snapshot(tmp_path) == before
    assert not any(dest.iterdir())


def _tar(path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _zip(path: Path, *members: tuple[str | zipfile.ZipInfo, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def test_safe_extract_ok(tmp_path):
    good = _tar(tmp_path / "g.tar.gz", (_info("a/b/c.txt"), b"hello"), (_info("./d.txt"), b"x"))
    safe_extract(good, tmp_path / "out")
    assert (tmp_path / "out/a/b/c.txt").read_bytes() == b"hello" and (tmp_path / "out/d.txt").exists()


@pytest.mark.parametrize("name", ["/tmp/evil_abs", "C:/evil"])
def test_refuses_absolute(tmp_path, name):
    _refuse(tmp_path, _tar(tmp_path / "a.tar.gz", (_info("ok.txt"), b"1"), (_info(name), b"x")), "absolute")
    _refuse(tmp_path, _zip(tmp_path / "a.zip", ("ok.txt", b"1"), (zipfile.ZipInfo(name), b"x")), "absolute")
    assert not Path("/tmp/evil_abs").exists()


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "..\\evil"])
def test_refuses_parent_escape(tmp_path, name):
    msg = "escapes the archive root"
    _refuse(tmp_path, _tar(tmp_path / "a.tar.gz", (_info("ok.txt"), b"1"), (_info(name), b"x")), msg)
    _refuse(tmp_path, _zip(tmp_path / "a.zip", ("ok.txt", b"1"), (zipfile.ZipInfo(name), b"x")), msg)
    assert not (tmp_path / "out" / "evil").exists() and not (tmp_path / "evil").exists()


def test_refuses_links_and_devices(tmp_path):
    sym = _tar(tmp_path / "s.tar.gz", (_info("link", tarfile.SYMTYPE, str(tmp_path)), None),
               (_info("link/evil"), b"x"))
    _refuse(tmp_path, sym, "'link' is a symlink")
    hard = _tar(tmp_path / "h.tar.gz", (_info("f.txt"), b"1"), (_info("hl", tarfile.LNKTYPE, "f.txt"), None))
    _refuse(tmp_path, hard, "'hl' is a hardlink")
    dev = _tar(tmp_path / "d.tar.gz", (_info("null", tarfile.CHRTYPE), None))
    _refuse(tmp_path, dev, "device")
    zlink = zipfile.ZipInfo("zl")
    zlink.external_attr = (stat.S_IFLNK | 0o777) << 16
    zipped = _zip(tmp_path / "l.zip", ("ok.txt", b"1"), (zlink, b"/etc/passwd"))
    _refuse(tmp_path, zipped, "'zl' is a symlink")


def test_refuses_oversize_and_too_many(tmp_path, monkeypatch):
    big = _zip(tmp_path / "big.zip", ("a.bin", b"\0" * 600), ("b.bin", b"\0" * 600))
    _refuse(tmp_path, big, "more than 1000 bytes.*'b.bin'", max_bytes=1000)
    monkeypatch.setenv("SLIM_MAX_EXTRACT_BYTES", "1000")
    _refuse(tmp_path, big, "SLIM_MAX_EXTRACT_BYTES")
    monkeypatch.setenv("SLIM_MAX_EXTRACT_BYTES", "lots")
    _refuse(tmp_path, big, "positive whole number")
    monkeypatch.delenv("SLIM_MAX_EXTRACT_BYTES")
    many = _tar(tmp_path / "m.tar.gz", *((_info(f"f{i}"), b"") for i in range(6)))
    _refuse(tmp_path, many, "more than 5 entries", max_files=5)
    safe_extract(many, tmp_path / "fine", max_files=6)


def test_refuses_zip_with_lying_sizes(tmp_path):
    """A member declaring 10 bytes that inflates to 100 kB: never trusted, never written in full."""
    raw = bytearray(_zip(tmp_path / "z.zip", ("bomb.bin", b"\0" * 100_000)).read_bytes())
    raw[22:26] = (10).to_bytes(4, "little")  # local header's uncompressed size
    central = raw.find(b"PK\x01\x02")
    raw[central + 24:central + 28] = (10).to_bytes(4, "little")
    (tmp_path / "z.zip").write_bytes(bytes(raw))
    _refuse(tmp_path, tmp_path / "z.zip", "bomb.bin")


def test_counts_bytes_while_writing(tmp_path):
    """Even if a reader yielded more than declared, extraction stops at the declared size and the limit."""
    lying = archive_mod._Member("x.bin", ("x.bin",), False, 10, lambda: io.BytesIO(b"\0" * 5000))
    dest = tmp_path / "d"
    dest.mkdir()
    with pytest.raises(SlimError, match="declared size"):
        archive_mod._write([lying], dest, 10**9, [])
    honest = [archive_mod._Member(n, (n,), False, 600, lambda: io.BytesIO(b"\0" * 600)) for n in ("a", "b")]
    with pytest.raises(SlimError, match="more than 1000 bytes"):
        archive_mod._write(honest, tmp_path / "d", 1000, [])


def test_refuses_corrupt_and_clashing(tmp_path):
    (tmp_path / "junk.zip").write_bytes(b"PK\3\4 nope")
    _refuse(tmp_path, tmp_path / "junk.zip", "corrupt")
    clash = _tar(tmp_path / "c.tar.gz", (_info("a"), b"file"), (_info("a/b"), b"under a file"))
    _refuse(tmp_path, clash, "'a/b'")


def test_never_follows_links_already_in_dest(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", dest / "sub")
    with pytest.raises(SlimError, match="outside the extraction folder"):
        safe_extract(_tar(tmp_path / "a.tar.gz", (_info("sub/x.txt"), b"x")), dest)
    assert not any((tmp_path / "outside").iterdir())
