"""Lifting uploaded model files into a prunable ``torch.fx.GraphModule``.

Every importer returns an :class:`Imported`: a GraphModule whose convolutions, BatchNorms and linear
layers are real ``nn`` modules holding the original tensors (so Torch-Pruning's dependency graph and our
regularizers see them), while every other op stays a ``call_function`` of a ``torch.ops.aten`` overload.
Shapes are computed at run time from ``aten.size``/``sym_size`` wherever the source did, never baked,
so a flatten before a Linear keeps working after channels are removed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..registry import Registry


@dataclass
class Imported:
    module: torch.fx.GraphModule
    fmt: str  # "torchscript" | "pt2" | "onnx"
    # Runs the uploaded model as uploaded (eval mode); the reference for parity and distillation.
    original: Callable[[torch.Tensor], torch.Tensor]
    input_shape: tuple[int, ...]
    input_name: str = "x"
    dynamic_batch: bool = True
    # Format-specific facts the exporter needs (e.g. the pt2 program's dynamic dims, ONNX opset).
    meta: dict[str, Any] = field(default_factory=dict)


# An importer gets the file and the spec's input shape (None when the spec has none) and returns the
# lifted model. It raises SlimError / UnsupportedModel with a message naming the op and node at fault.
Importer = Callable[[Path, "tuple[int, ...] | None"], Imported]
IMPORTERS: Registry[Importer] = Registry("importer")
