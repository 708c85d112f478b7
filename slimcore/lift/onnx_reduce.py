"""ONNX converters for reductions: Softmax/LogSoftmax and the Reduce ops, whose signatures changed across
opsets (Softmax-13 stopped flattening from ``axis`` on; ``axes`` moved from an attribute to an input at
ReduceSum-13 and the others at 18). On sizes (``Shape`` chains) ReduceProd multiplies the items at run time.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from .onnx_lift import Dims, Lifter, op
from .onnx_ops import Node, arg

aten = torch.ops.aten


@op("Softmax", "LogSoftmax")
def softmax(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    """Before opset 13 the op flattened everything from ``axis`` on into one dim (default axis 1)."""
    x = ins[0]
    fn = aten.softmax if n.op_type == "Softmax" else aten.log_softmax
    r = len(b.shape(x))
    axis = int(a.get("axis", -1 if ver >= 13 else 1)) % max(r, 1)
    if ver >= 13 or axis == r - 1:
        return b.call(fn, x, axis)
    y = b.call(fn, b.call(aten.flatten, x, axis), axis)
    return b.call(aten.reshape, y, [b.call(aten.sym_size, x, i) for i in range(r)])


_REDUCE = {"ReduceMean": (aten.mean, 18), "ReduceSum": (aten.sum, 13), "ReduceMax": (aten.amax, 18),
           "ReduceMin": (aten.amin, 18), "ReduceProd": (aten.prod, 18)}


@op(*_REDUCE)
def reduce(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    """Reductions; ``axes`` moved from an attribute to an input (ReduceSum-13, the others at 18)."""
    fn, since = _REDUCE[n.op_type]
    x = ins[0]
    keep = bool(int(a.get("keepdims", 1)))
    if ver >= since:
        axes = b.items(arg(ins, 1), "axes") if arg(ins, 1) is not None else []
        if not axes and int(a.get("noop_with_empty_axes", 0)):
            return x
    else:
        axes = list(a.get("axes", []))
    if isinstance(x, Dims) and n.op_type == "ReduceProd":
        v: Any = 1
        for i in x.items:
            v = b.call(operator.mul, v, i)
        return Dims([v], scalar=not keep)
    if isinstance(x, Dims):
        x = b.tensor(x)
    r = len(b.shape(x))
    dims = sorted({int(i) % r for i in axes}) if axes else list(range(r))
    if fn is aten.prod:
        for d in reversed(dims):
            x = b.call(aten.prod, x, d, keep)
        return x
    return b.call(fn, x, dims, keep)
