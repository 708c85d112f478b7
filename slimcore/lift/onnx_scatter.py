"""ONNX scatter converters: writes into a tensor at given indices.

Exporters write ``ScatterND`` for Python slice assignment in a model's forward (``y[:, 2::3] = ...``):
ultralytics' pose head decodes its keypoints that way, and both torch exporters turn it into
``ScatterND`` with constant or computed indices. It becomes ``aten.index_put``, one index tensor per
leading dimension, so it runs at any batch size and the coupling analysis sees an ordinary op (which
pins the channels it touches, a head's output in practice).
"""

from __future__ import annotations

from typing import Any

import onnx
import torch

from .onnx_lift import Const, Lifter, op

aten = torch.ops.aten
Node = onnx.NodeProto


@op("ScatterND")
def scatter_nd(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    data, idx, updates = ins[:3]
    reduction = a.get("reduction", "none") or "none"
    if isinstance(reduction, bytes):
        reduction = reduction.decode()
    if reduction not in ("none", "add"):
        # index_put can only overwrite or add; mul/max/min would need a per-element reduce no exporter writes
        raise b.fail(f"ScatterND reduction {reduction!r} is not supported (only 'none' and 'add')")
    idx = b.tensor(idx)  # sizes computed from shapes become a constant or a stacked run-time tensor
    if isinstance(idx, Const):
        t = idx.t.to(torch.int64)
        dims = b.shape(data)[: t.shape[-1]]
        # negative indices count from the end, as in Python; made explicit so constant indices read plainly
        comps = [torch.where(t[..., k] < 0, t[..., k] + dims[k], t[..., k]) for k in range(t.shape[-1])]
        parts: list[Any] = [None if c is None else Const(c.contiguous()) for c in _batch_free(comps, dims[0])]
    else:
        if b.dtype(idx) != torch.int64:
            idx = b.call(aten._to_copy.default, idx, dtype=torch.int64)
        parts = [b.call(aten.select.int, idx, -1, k) for k in range(b.shape(idx)[-1])]
    return b.call(aten.index_put.default, data, parts, updates, reduction == "add")


def _batch_free(comps: list[torch.Tensor], batch: int) -> list[torch.Tensor | None]:
    """Constant indices that enumerate the whole batch dimension, with that dimension left open.

    The legacy exporter folds the batch into the indices (``[[0, k] for k in ...]`` at batch 1), so as
    written the scatter only fits the exported batch size. When the first component is ``arange(batch)``
    along the index grid's first axis and the others do not vary along it, the same write at any batch
    is ``index_put`` with no index on dimension 0 and the grid's first axis dropped.
    """
    if len(comps) < 2 or comps[0].dim() < 1 or comps[0].shape[0] != batch:
        return list(comps)
    grid = comps[0].shape
    ramp = torch.arange(batch).reshape(batch, *([1] * (len(grid) - 1))).expand(grid)
    if not torch.equal(comps[0], ramp) or not all(torch.equal(c, c[:1].expand_as(c)) for c in comps[1:]):
        return list(comps)
    return [None, *(c[0] for c in comps[1:])]
