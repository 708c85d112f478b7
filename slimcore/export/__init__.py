"""Exporters: write a pruned lifted model in a user-facing format, then prove the file is right.

One signature: ``(module, imported, out_path, example) -> None``. Every exporter reloads what it wrote
and compares it with the pruned module (relative error ≤ 1e-4) at the example batch and, when the
upload's batch was dynamic, at another batch size; it raises ``ParityError`` rather than hand back a
file that computes something else.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..lift import Imported
from ..registry import Registry

Exporter = Callable[[nn.Module, Imported, Path, torch.Tensor], None]
EXPORTERS: Registry[Exporter] = Registry("exporter")


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a − b| / max|b|: one number for 'same function' checks, scale-free."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
