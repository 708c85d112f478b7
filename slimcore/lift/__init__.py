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
    # Runs the uploaded model as uploaded (eval mode); the reference for parity and distillation. Called
    # like the lifted module (``slimcore.io.call``): one tensor per input; returns the upload's output
    # structure (a tensor, or a tuple/list/dict of tensors).
    original: Callable[..., Any]
    input_shape: tuple[int, ...]  # the first input's (all of them: ``input_shapes``)
    input_name: str = "x"
    dynamic_batch: bool = True
    # Format-specific facts the exporter needs (e.g. the pt2 program's dynamic dims, ONNX opset).
    meta: dict[str, Any] = field(default_factory=dict)
    # Several inputs: every input's shape and name, in forward order (filled from the above when one).
    input_shapes: tuple[tuple[int, ...], ...] = ()
    input_names: tuple[str, ...] = ()
    # A name per output leaf (slimcore.io order) where the format has them (ONNX); else io.names() applies.
    output_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # one input: input_shape/input_name are the truth (``dataclasses.replace(imp, input_name=...)``
        # keeps working); several: they mirror the first entry
        if len(self.input_shapes) <= 1:
            self.input_shapes = (tuple(self.input_shape),)
        else:
            self.input_shape = tuple(self.input_shapes[0])
        if len(self.input_names) <= 1:
            self.input_names = (self.input_name,)
        else:
            self.input_name = self.input_names[0]


# An importer gets the file and the spec's input shape (None when the spec has none; a tuple of shapes,
# one per input, when the spec gives ``input_shapes``; ``slimcore.io.as_shapes`` reads both) and returns
# the lifted model. It raises SlimError / UnsupportedModel with a message naming the op and node at fault.
Importer = Callable[[Path, "tuple[int, ...] | None"], Imported]
IMPORTERS: Registry[Importer] = Registry("importer")
