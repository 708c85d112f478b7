"""ONNX models whose weights live in separate data files: taking them in safely, giving them back alike.

torch 2.13's default ``torch.onnx.export`` (dynamo) writes ``model.onnx`` plus ``model.onnx.data`` even for
a ResNet-18, and users cannot be asked to re-export. Such a model arrives three ways: a ``.zip``/``.tar``
(``.gz``) bundle (extracted by :func:`slimcore.archive.safe_extract`, which refuses traversal, links, devices
and oversized archives), a folder (the service's multi-file upload, stored under checked names), or a
``.onnx`` file with its data files beside it (``slim run``). In every case a tensor's ``location`` is
resolved only in the model's own folder: a plain checked name, a regular file that is no link, with the
declared offset and length inside it and a length equal to what the tensor's dims and dtype need. The
bytes are read here (``O_NOFOLLOW``) into the in-memory model, so the lifter never follows a path itself.

The result keeps the upload's layout: a bundle comes back as the same kind of bundle (the ``.onnx`` under
its uploaded name plus ``NAME.data``), a model with data files beside it as ``OUT`` plus ``OUT.data``, and
a single file as a single file. The service delivers a multi-file upload's result as a zip bundle (one
download).
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .archive import safe_extract
from .errors import SlimError
from .formats import sniff
from .onnx_refs import name_problem

SUFFIX = ".data"
_PACKED = {16: 2, 17: 2, 21: 2, 22: 2, 23: 2}  # 4-bit types (INT4, UINT4, FLOAT4E2M1): two values a byte


@dataclass(frozen=True)
class ModelSource:
    """The file to import and, when the upload was a bundle, its kind (``zip``, ``tar`` or ``tar.gz``)."""

    path: Path
    bundle: str | None = None


def open_model(path: Path, workdir: Path | None) -> ModelSource:
    """The model file inside an upload: the upload itself, the one ``.onnx`` of a folder, or that of a bundle
    extracted into a fresh folder under ``workdir`` (under the system's temporary folder when None; the
    caller removes ``workdir``: ``slim run`` and the worker pass one they delete)."""
    path = Path(path)
    if path.is_dir():
        return ModelSource(_one_onnx(path, "the model folder"))
    kind = sniff(path)[1]
    if kind is None:
        return ModelSource(path)
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix="model-", dir=workdir))
    safe_extract(path, dest)
    return ModelSource(_one_onnx(dest, f"the {kind} bundle"), kind)


def _one_onnx(folder: Path, what: str) -> Path:
    found = sorted(p for p in folder.rglob("*") if p.name.lower().endswith(".onnx") and p.is_file()
                   and not p.is_symlink())
    if len(found) != 1:
        names = ", ".join(str(p.relative_to(folder)) for p in found[:5]) or "none"
        raise SlimError(f"{what} must hold exactly one .onnx model file, it holds {len(found)} ({names}); put one "
                        "model and its external data files in it")
    return found[0]


def load_external_tensors(tensors: Iterable[Any], model_path: Path) -> list[str]:
    """Read every external tensor's bytes into its ``raw_data`` after checking where they come from; returns
    the data file names used (none for a single-file model). Raises SlimError naming the tensor and file."""
    from onnx import TensorProto

    folder, used = Path(model_path).parent, {}
    for t in tensors:
        if t.data_location != TensorProto.EXTERNAL and not t.external_data:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        what = f"tensor {t.name!r} is stored in external data {loc!r}"
        bad = "it is the model file itself" if loc == Path(model_path).name else name_problem(loc)
        if bad:
            raise SlimError(f"{what}, which is refused: {bad}; external data must be plain file names beside the "
                            ".onnx file")
        need = _nbytes(t, what)
        offset, length = _whole(info.get("offset", "0"), what, "offset"), info.get("length")
        if length is not None and _whole(length, what, "length") != need:
            raise SlimError(f"{what} with length {length}, but its dims {list(t.dims)} need {need} bytes; the model "
                            "file and its data file do not belong together")
        t.raw_data = _read(folder / loc, offset, need, what)
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT
        used[loc] = None
    return list(used)


def _whole(raw: str, what: str, key: str) -> int:
    if not raw.isdigit():
        raise SlimError(f"{what} with {key} {raw!r}, which is not a whole number of bytes")
    return int(raw)


def _nbytes(t: Any, what: str) -> int:
    """Bytes the tensor's dims and dtype need (what its data file must provide)."""
    from onnx import TensorProto, helper

    n = 1
    for d in t.dims:
        n *= int(d)
    if t.data_type in _PACKED:
        return (n + 1) // 2
    if t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        raise SlimError(f"{what}, but its type {TensorProto.DataType.Name(t.data_type)} cannot be external data")
    try:
        return n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        raise SlimError(f"{what}, but its data type {t.data_type} is not one ONNX defines") from None


def _read(file: Path, offset: int, need: int, what: str) -> bytes:
    """Exactly ``need`` bytes at ``offset`` of a regular, unlinked file; never through a symbolic link."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise SlimError(f"{what}, which is missing: send it with the model (a .zip bundle, or the model form "
                        "field repeated for each file; slim submit does it for you) or put it beside the .onnx "
                        "file") from None
    except OSError as err:  # ELOOP: a symbolic link
        kind = "a symbolic link" if err.errno == errno.ELOOP else (err.strerror or "unreadable")
        raise SlimError(f"{what}, which is {kind}; only regular files beside the model are read") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SlimError(f"{what}, which is not a regular file (a folder, device or pipe)")
        if st.st_nlink > 1:
            raise SlimError(f"{what}, which has other hard links; upload a plain copy of the file")
        if offset + need > st.st_size:
            raise SlimError(f"{what} at bytes {offset}..{offset + need}, but the file has only {st.st_size} bytes "
                            "(truncated upload, or a data file of another model?)")
        data = os.pread(fd, need, offset)
    finally:
        os.close(fd)
    if len(data) != need:
        raise SlimError(f"{what}: could read only {len(data)} of {need} bytes")
    return data


def data_file(out: Path) -> Path:
    """Where a model written to ``out`` keeps its external data: ``OUT.data`` beside it."""
    return out.with_name(out.name + SUFFIX)


def save_onnx(model: Any, out: Path, external: bool) -> None:
    """Write ``model`` as one file, or as ``out`` plus ``OUT.data`` (any earlier ``OUT.data`` replaced: onnx
    appends to an existing data file)."""
    import onnx

    if external:
        data_file(out).unlink(missing_ok=True)
        onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_file(out).name, size_threshold=1024)
        os.chmod(data_file(out), out.stat().st_mode & 0o777)  # onnx creates it owner-only; match the model
    else:
        onnx.save_model(model, str(out), save_as_external_data=False)


def deliver(export: Callable[[Path], None], out: Path, *, external: bool, bundle: str | None, inner_name: str,
            workdir: Path | None) -> int:
    """Run ``export`` so that the result lands at ``out`` in the right layout; returns the bytes written.

    With ``bundle`` the model is exported into a fresh folder as ``inner_name`` (plus its data file) and
    packed into a bundle of that kind at ``out``; otherwise ``export`` writes ``out`` (and ``OUT.data``)."""
    if bundle is None:
        export(out)
        return upload_bytes(out, [data_file(out).name] if external and data_file(out).exists() else [])
    with tempfile.TemporaryDirectory(prefix="result-", dir=workdir) as tmp:
        inner = Path(tmp) / inner_name
        export(inner)
        pack([p for p in (inner, data_file(inner)) if p.exists()], out, bundle)
    return out.stat().st_size


def pack(files: list[Path], out: Path, kind: str) -> None:
    """A zip or tar(.gz) of ``files`` at its root, written beside ``out`` and renamed into place."""
    part = out.with_name(out.name + ".part")
    try:
        if kind == "zip":
            with zipfile.ZipFile(part, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                for f in files:
                    z.write(f, f.name)
        else:
            with tarfile.open(part, "w:gz" if kind == "tar.gz" else "w") as tf:
                for f in files:
                    tf.add(f, f.name, recursive=False)
        part.replace(out)
    finally:
        part.unlink(missing_ok=True)


def upload_bytes(path: Path, data_files: Iterable[str]) -> int:
    """The model's size on disk: the file (or folder) plus the data files beside it that it used."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size + sum((path.parent / n).stat().st_size for n in data_files)
