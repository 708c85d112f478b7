"""Recognise an uploaded model file by its content and layout, never by its name.

TorchScript and torch.export programs are both zip archives whose members all sit under one root folder
(torch names it after the file). What tells them apart is what lies *directly* under that root, as
torch 2.13 writes it:

- TorchScript (``torch.jit.save``): ``ROOT/code/``, ``ROOT/constants.pkl``, ``ROOT/data.pkl``,
  ``ROOT/version`` (traced models add ``ROOT/traced_inputs.pkl``);
- torch.export (``torch.export.save``): ``ROOT/archive_format``, ``ROOT/models/``, ``ROOT/data/``;
- a ``torch.save`` checkpoint: ``ROOT/data.pkl`` without ``code/`` (refused with advice).

Deeper paths are never matched: a TorchScript file of a torchvision model holds
``ROOT/code/__torch__/torchvision/models/resnet.py``, and reading ``/models/`` anywhere as torch.export
refused every torchvision and timm TorchScript upload (FINDINGS). A zip or tar that is none of these but
holds ``.onnx`` files is an ONNX bundle (the model plus its external data files); ONNX itself is a
protobuf ``ModelProto`` whose first field is ``ir_version`` (tag 0x08).
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

from .errors import SlimError

FORMATS = ("torchscript", "pt2", "onnx")
_CHECKPOINT = ("the model file is a torch.save checkpoint (weights only, no graph); upload a TorchScript file "
               "(torch.jit.script/trace + torch.jit.save), a torch.export .pt2 program or an ONNX file")


def detect_format(path: Path) -> str:
    """``torchscript``, ``pt2`` or ``onnx`` (an ONNX bundle counts as ``onnx``), or a SlimError saying why not."""
    return sniff(path)[0]


def bundle_kind(path: Path) -> str | None:
    """``zip``, ``tar`` or ``tar.gz`` when ``path`` is an ONNX bundle (a model with its data files), else None."""
    return sniff(path)[1]


def sniff(path: Path) -> tuple[str, str | None]:
    """(format, bundle kind or None) from the file's first bytes and, for archives, their root layout."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(262)
    except OSError as e:
        raise SlimError(f"cannot read model file {path.name}: {e.strerror}") from None
    if not head:
        raise SlimError("the model file is empty")
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            raise SlimError("the model file is a damaged zip archive (truncated upload?)") from None
        fmt = _torch_layout(names)
        if fmt is not None:
            return fmt, None
        if _holds_onnx(names):
            return "onnx", "zip"
        raise SlimError("the model file is a zip archive but neither TorchScript, a torch.export program nor an "
                        "ONNX bundle (a .onnx file with its external data files)")
    if head.startswith(b"\x1f\x8b") or head[257:262] == b"ustar":
        return "onnx", _tar_bundle(path, gz=head.startswith(b"\x1f\x8b"))
    if head[0] == 0x08:
        return "onnx", None
    raise SlimError("unrecognised model file: expected TorchScript, a torch.export .pt2 program or ONNX")


def _torch_layout(names: list[str]) -> str | None:
    """What torch wrote, judged only by the entries directly under the archive's single root folder."""
    split = [n.replace("\\", "/").split("/") for n in names]
    roots = {parts[0] for parts in split}
    if len(roots) != 1 or any(len(parts) < 2 for parts in split):
        return None
    files = {parts[1] for parts in split if len(parts) == 2}
    folders = {parts[1] for parts in split if len(parts) > 2}
    if "code" in folders and files & {"constants.pkl", "data.pkl"}:
        return "torchscript"
    if "archive_format" in files or ("models" in folders and "code" not in folders):
        return "pt2"
    if "data.pkl" in files:
        raise SlimError(_CHECKPOINT)
    return None


def _holds_onnx(names: list[str]) -> bool:
    return any(n.lower().endswith(".onnx") for n in names)


def _tar_bundle(path: Path, gz: bool) -> str:
    """A tar(.gz) upload is only ever an ONNX bundle; its member names are read here, vetted on extraction."""
    try:
        with tarfile.open(path, "r:*") as tf:
            names = tf.getnames()
    except (tarfile.TarError, EOFError, OSError, ValueError):
        if gz:
            raise SlimError("the model file is gzip-compressed but not a readable .tar.gz (truncated upload?); "
                            "upload the model uncompressed, or a .zip/.tar.gz bundle of it") from None
        raise SlimError("the model file is a damaged or unreadable tar archive (truncated upload?)") from None
    if not _holds_onnx(names):
        raise SlimError("the model file is a tar archive without a .onnx file; a tar upload must be an ONNX "
                        "bundle (one .onnx file plus its external data files)")
    return "tar.gz" if gz else "tar"
