"""Per-epoch checkpoints, so a job whose worker died resumes where it was instead of starting over.

A checkpoint holds the stage it was taken in (the training stages write one per epoch), the epochs finished
there, the model and optimizer state, and every finished stage's outputs with what it added to the report
(the format and the resume rule: ``slimcore/stages/state.py``). The pruned structure is rebuilt by applying
the stored removal plan to the model as sparse training left it, so no pickled graph code ever needs to be
loaded back.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Protocol

import torch


class CheckpointStore(Protocol):
    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...


def dumps(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def loads(data: bytes) -> dict[str, Any]:
    # weights_only: a checkpoint is data (tensors, numbers, strings), never code
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class FileCheckpoints:
    """One file, replaced atomically (write to a temp name, then rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        return loads(self.path.read_bytes())

    def save(self, state: dict[str, Any]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(dumps(state))
        os.replace(tmp, self.path)
