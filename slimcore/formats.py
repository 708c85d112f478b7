"""Recognise an uploaded model file by its content, never by its name.

TorchScript and torch.export programs are both zip archives: TorchScript holds ``code/`` with the
serialized TorchScript, a ``.pt2`` holds ``models/*.json`` and ``archive_format``. A plain
``torch.save`` state dict (``data.pkl`` without ``code/``) is neither, and is refused with advice.
ONNX is a protobuf ``ModelProto``: its first field is ``ir_version`` (tag 0x08).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from .errors import SlimError

FORMATS = ("torchscript", "pt2", "onnx")


def detect_format(path: Path) -> str:
    try:
        head = path.read_bytes()[:8] if path.stat().st_size < 8 else path.open("rb").read(8)
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
        if any(n.endswith("archive_format") for n in names) or any("/models/" in n for n in names):
            return "pt2"
        if any("/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            raise SlimError("the model file is a torch.save checkpoint (weights only, no graph); upload a "
                            "TorchScript file (torch.jit.script/trace + torch.jit.save), a torch.export "
                            ".pt2 program or an ONNX file")
        raise SlimError("the model file is a zip archive but neither TorchScript nor a torch.export program")
    if head[0] == 0x08:
        return "onnx"
    raise SlimError("unrecognised model file: expected TorchScript, a torch.export .pt2 program or ONNX")
