"""ONNX op converters for the layers and arithmetic of a CNN (shape, pooling and reduction ops live next door).

Each converter maps one ONNX node onto ``torch.ops.aten`` overload packets through :meth:`Lifter.call`,
which folds it to a constant when every input is one. Conv, BatchNormalization, Gemm and MatMul with
constant weights become ``aten.conv2d`` / ``aten.batch_norm`` / ``aten.linear`` reading buffers named after
the ONNX initializers, the calls :func:`.modularize.modularize` turns into modules Torch-Pruning can
resize; with weights computed at run time they stay plain calls. Numerics follow onnxruntime's
formulas where PyTorch's differ (HardSigmoid, integer Div), and version differences are handled where
the op's inputs or attributes changed (Clip-11; Softmax-13 and the Reduce ops' ``axes`` input in
:mod:`.onnx_reduce`).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import onnx
import torch
import torch.fx as fx

from .onnx_lift import Const, Dims, Lifter, op
from .reshapes import BARRIER

aten = torch.ops.aten
_CONV = {1: aten.conv1d, 2: aten.conv2d, 3: aten.conv3d}
_CONVT = {1: aten.conv_transpose1d, 2: aten.conv_transpose2d, 3: aten.conv_transpose3d}
Node = onnx.NodeProto


def arg(ins: list[Any], i: int) -> Any:
    """Input ``i`` of a node, None when absent or left empty."""
    return ins[i] if len(ins) > i else None


def geometry(b: Lifter, x: Any, a: dict[str, Any], kernel: list[int],
             ceil: bool = False) -> tuple[list[int], list[int], list[int], list[int]]:
    """Strides, dilations and begin/end pads of a sliding-window op, ``auto_pad`` resolved.

    ``SAME_*`` pads depend on the spatial size, which the spec's input shape fixes (pruning never
    changes it), so they are computed from the example once.
    """
    k = len(kernel)
    strides = list(a.get("strides", [1] * k))
    dil = list(a.get("dilations", [1] * k))
    auto = a.get("auto_pad", "NOTSET") or "NOTSET"
    if auto == "NOTSET":
        pads = list(a.get("pads", [0] * 2 * k))
        return strides, dil, pads[:k], pads[k:]
    if auto == "VALID":
        return strides, dil, [0] * k, [0] * k
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise b.fail(f"auto_pad {auto!r} is not supported")
    begin, end = [], []
    for size, kk, s, d in zip(b.shape(x)[2:], kernel, strides, dil, strict=True):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (kk - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return strides, dil, begin, end


def torch_pads(begin: list[Any], end: list[Any]) -> list[Any]:
    """ONNX (all begins, all ends) → torch's pad list, last dim first."""
    out: list[Any] = []
    for i in reversed(range(len(begin))):
        out += [begin[i], end[i]]
    return out


@op("Conv")
def conv(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    x, w, bias = ins[0], ins[1], arg(ins, 2)
    k = len(b.shape(w)) - 2
    if k not in _CONV:
        raise b.fail(f"{k}-d convolution is not supported")
    kernel = list(a.get("kernel_shape", b.shape(w)[2:]))
    strides, dil, begin, end = geometry(b, x, a, kernel)
    if begin != end:  # PyTorch convolutions pad symmetrically; pad asymmetric cases explicitly
        x = b.call(aten.constant_pad_nd, x, torch_pads(begin, end), 0.0)
        begin = [0] * k
    return b.call(_CONV[k], x, w, bias, strides, begin, dil, int(a.get("group", 1)))


@op("ConvTranspose")
def conv_transpose(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    """A transposed convolution, left as a call (not prunable): output_shape/auto_pad resolved to pads."""
    x, w, bias = ins[0], ins[1], arg(ins, 2)
    k = len(b.shape(w)) - 2
    if k not in _CONVT:
        raise b.fail(f"{k}-d transposed convolution is not supported")
    kernel = list(a.get("kernel_shape", b.shape(w)[2:]))
    strides = list(a.get("strides", [1] * k))
    dil = list(a.get("dilations", [1] * k))
    outpad = list(a.get("output_padding", [0] * k))
    group = int(a.get("group", 1))
    auto = a.get("auto_pad", "NOTSET") or "NOTSET"
    sizes = b.shape(x)[2:]
    natural = [(i - 1) * s + (kk - 1) * d + 1 for i, s, kk, d in zip(sizes, strides, kernel, dil, strict=True)]
    if "output_shape" in a or auto in ("SAME_UPPER", "SAME_LOWER"):
        want = list(a["output_shape"])[-k:] if "output_shape" in a else [i * s for i, s in zip(sizes, strides,
                                                                                             strict=True)]
        total = [nat + op_ - o for nat, op_, o in zip(natural, outpad, want, strict=True)]
        upper = auto == "SAME_UPPER"
        begin = [t // 2 if upper else t - t // 2 for t in total]
        end = [t - t // 2 if upper else t // 2 for t in total]
    elif auto == "VALID":
        begin, end = [0] * k, [0] * k
    else:
        pads = list(a.get("pads", [0] * 2 * k))
        begin, end = pads[:k], pads[k:]
    if begin == end and min(begin) >= 0 and all(o < max(s, d) for o, s, d in zip(outpad, strides, dil, strict=True)):
        return _fence(b.call(_CONVT[k], x, w, bias, strides, begin, outpad, group, dil))
    # General case: the full ("natural") output, then crop the begin pads and pad/crop the end.
    y = _fence(b.call(_CONVT[k], x, w, None, strides, [0] * k, [0] * k, group, dil))
    y = b.call(aten.constant_pad_nd, y, torch_pads([-p for p in begin],
                                                   [o - e for o, e in zip(outpad, end, strict=True)]), 0.0)
    if bias is not None:
        shape = [-1] + [1] * k
        bias = Const(bias.t.reshape(shape)) if isinstance(bias, Const) else b.call(aten.reshape, bias, shape)
        y = b.call(aten.add, y, bias)
    return y


def fence(y: Any, why: str) -> Any:
    """Mark an op Torch-Pruning would misread so the layers whose channels reach it are reported unprunable.

    TP takes any functional op it does not know for an element-wise one: it would group the channels on
    the two sides of a transposed conv or a matmul as if they were the same, and it maps a channel slice or
    uneven split by the constants of the example, which pruning then invalidates. The mark is read by
    :func:`.reshapes.unprunable_layers`, as for channel-mixing reshapes.
    """
    if isinstance(y, fx.Node):
        y.meta[BARRIER] = f"its channels pass through {why} ({y.name}), which pruning cannot resize"
    return y


def _fence(y: Any) -> Any:
    return fence(y, "a transposed convolution")


@op("BatchNormalization")
def batch_norm(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    if int(a.get("training_mode", 0)):
        raise b.fail("training_mode=1 (batch statistics) is not supported; export the model in eval mode")
    momentum = round(1.0 - float(a.get("momentum", 0.9)), 6)  # ONNX keeps the old value's weight
    return b.call(aten.batch_norm, ins[0], ins[1], ins[2], ins[3], ins[4], False, momentum,
                  float(a.get("epsilon", 1e-5)), False)


@op("Gemm")
def gemm(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    """``alpha·A'·B' + beta·C``; a constant B becomes ``aten.linear``'s weight and a row-vector C its bias."""
    A, B, C = ins[0], ins[1], arg(ins, 2)
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    if int(a.get("transA", 0)):
        A = b.call(aten.permute, A, [1, 0])
    tb = int(a.get("transB", 0))
    if isinstance(B, Const) and B.t.dim() == 2 and (C is None or isinstance(C, Const)):
        W = B if tb and alpha == 1.0 else Const(((B.t if tb else B.t.t()) * alpha).contiguous(), B.name)
        units = W.t.shape[0]
        bias, post = None, None
        if C is not None and beta != 0.0:
            ct = C.t * beta if beta != 1.0 else C.t
            if ct.numel() == 1:
                bias = Const(ct.reshape(1).expand(units).contiguous())
            elif ct.numel() == units and tuple(ct.shape) in ((units,), (1, units)):
                bias = Const(ct.reshape(units), C.name if beta == 1.0 else None)
            else:
                post = Const(ct)
        y = b.call(aten.linear, A, W, bias)
        return y if post is None else b.call(aten.add, y, post)
    y = fence(b.call(aten.mm, A, b.call(aten.permute, B, [1, 0]) if tb else B), "a matrix product")
    if alpha != 1.0:
        y = b.call(aten.mul, y, alpha)
    if C is not None and beta != 0.0:
        y = b.call(aten.add, y, C if beta == 1.0 else b.call(aten.mul, C, beta))
    return y


@op("MatMul")
def matmul(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    """A constant 2-D right operand becomes a linear layer; a following ``Add`` of a vector its bias."""
    A, B = ins
    if not (isinstance(B, Const) and B.t.dim() == 2 and isinstance(A, fx.Node) and len(b.shape(A)) >= 2):
        return fence(b.call(aten.matmul, A, B), "a matrix product")
    W = Const(B.t.t().contiguous(), B.name)
    out = n.output[0]
    users = b.consumers.get(out, [])
    outputs = {o.name for o in b.model.graph.output}
    bias, add = None, None
    if len(users) == 1 and users[0].op_type == "Add" and out not in outputs and list(users[0].input).count(out) == 1:
        add = users[0]
        other = b.env.get(next(i for i in add.input if i != out))
        if isinstance(other, Const) and tuple(other.t.shape) == (W.t.shape[0],) and other.t.dtype == W.t.dtype:
            bias = other
    y = b.call(aten.linear, A, W, bias)
    if bias is not None and add is not None:
        b.fused[add.output[0]] = y
    return y


_UNARY = {"Relu": aten.relu, "Sigmoid": aten.sigmoid, "Tanh": aten.tanh, "Exp": aten.exp, "Log": aten.log,
          "Sqrt": aten.sqrt, "Neg": aten.neg, "Abs": aten.abs, "Floor": aten.floor, "Ceil": aten.ceil,
          "Sign": aten.sign, "Reciprocal": aten.reciprocal, "Not": aten.logical_not, "HardSwish": aten.hardswish,
          "Softplus": aten.softplus}


@op(*_UNARY)
def unary(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    """On sizes (TF "same" padding computes ``ceil(size / stride)``), item by item at run time."""
    x = ins[0]
    if isinstance(x, Dims) and n.op_type in _DIMS_UNARY:
        return Dims([b.call(_DIMS_UNARY[n.op_type], i) for i in x.items], x.scalar, x.floating, x.shape)
    return b.call(_UNARY[n.op_type], b.tensor(x) if isinstance(x, Dims) else x)


def _ceil(v: float) -> float:
    """ONNX Ceil/Floor keep the float type; ``math.ceil`` gives an int."""
    return float(math.ceil(v))


def _floor(v: float) -> float:
    return float(math.floor(v))


_DIMS_UNARY = {"Ceil": _ceil, "Floor": _floor, "Neg": operator.neg, "Abs": abs}


@op("Identity", "Dropout")
def identity(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    """Identity, and Dropout at inference (its mask output is refused if anything reads it)."""
    training = arg(ins, 2) if n.op_type == "Dropout" else None
    if training is not None and bool(b.const(training, "Dropout's training_mode").reshape(-1)[0]):
        raise b.fail("Dropout in training mode is not supported")
    return ins[0]


@op("LeakyRelu")
def leaky_relu(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    return b.call(aten.leaky_relu, ins[0], float(a.get("alpha", 0.01)))


@op("Elu", "Selu")
def elu(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    if n.op_type == "Elu":
        return b.call(aten.elu, ins[0], float(a.get("alpha", 1.0)))
    return b.call(aten.elu, ins[0], float(a.get("alpha", 1.67326319217681884765625)),
                  float(a.get("gamma", 1.05070102214813232421875)))


@op("Gelu")
def gelu(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    return b.call(aten.gelu, ins[0], approximate=a.get("approximate", "none"))


@op("HardSigmoid")
def hard_sigmoid(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    """``max(0, min(1, alpha·x + beta))`` as onnxruntime computes it (PyTorch's hardsigmoid is (x+3)/6)."""
    y = b.call(aten.add, b.call(aten.mul, ins[0], float(a.get("alpha", 0.2))), float(a.get("beta", 0.5)))
    return b.call(aten.clamp, y, 0.0, 1.0)


@op("Clip")
def clip(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    """Clip-6 bounds are attributes; from Clip-11 they are optional inputs (ReLU6 exports as Clip(0, 6))."""
    x = ins[0]
    if ver < 11:
        lo, hi = a.get("min"), a.get("max")
    else:
        lo, hi = arg(ins, 1), arg(ins, 2)
        if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
            lo, hi = (Const(v.t.reshape(())) if isinstance(v, Const) else v for v in (lo, hi))
            return b.call(aten.clamp, x, lo, hi)
        lo, hi = (None if v is None else b.const(v, "a Clip bound").reshape(()).item() for v in (lo, hi))
    if lo is None and hi is None:
        return x
    if isinstance(x, Dims):  # on sizes: max/min item by item, in the sizes' own type
        cast = float if x.floating else int
        items = [i if lo is None else b.call(max, i, cast(lo)) for i in x.items]
        items = [i if hi is None else b.call(min, i, cast(hi)) for i in items]
        return Dims(items, x.scalar, x.floating, x.shape)
    return b.call(aten.clamp, x, lo, hi)


_BINARY = {"Add": (aten.add, operator.add), "Sub": (aten.sub, operator.sub), "Mul": (aten.mul, operator.mul),
           "Div": (aten.div, operator.floordiv), "Pow": (aten.pow, operator.pow), "Equal": (aten.eq, operator.eq),
           "Less": (aten.lt, operator.lt), "LessOrEqual": (aten.le, operator.le), "Greater": (aten.gt, operator.gt),
           "GreaterOrEqual": (aten.ge, operator.ge), "And": (aten.logical_and, None),
           "Or": (aten.logical_or, None), "Xor": (aten.logical_xor, None), "Max": (aten.maximum, max),
           "Min": (aten.minimum, min), "Sum": (aten.add, operator.add), "Mean": (aten.add, operator.add),
           "Mod": (None, None)}


@op(*_BINARY)
def binary(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    """Element-wise ops with numpy broadcasting; on sizes (``Shape`` chains) item by item at run time."""
    fn, pyfn = _BINARY[n.op_type]
    if n.op_type == "Mod":
        fn = aten.fmod if int(a.get("fmod", 0)) else aten.remainder
    y = ins[0]
    for z in ins[1:]:
        y = _pair(b, n, fn, pyfn, y, z)
    if n.op_type == "Mean" and len(ins) > 1:
        y = b.call(aten.div, y, float(len(ins)))
    return y


def _pair(b: Lifter, n: Node, fn: Any, pyfn: Any, x: Any, y: Any) -> Any:
    if (isinstance(x, Dims) or isinstance(y, Dims)) and pyfn is not None and not (
            isinstance(x, fx.Node) or isinstance(y, fx.Node)):
        return _dims_pair(b, pyfn, x, y)
    x, y = (b.tensor(v) if isinstance(v, Dims) else v for v in (x, y))
    if n.op_type == "Div" and not b.dtype(x).is_floating_point and not b.dtype(y).is_floating_point:
        return b.call(aten.div, x, y, rounding_mode="trunc")  # ONNX integer division truncates
    out = b.call(fn, x, y)
    if fn is aten.pow and b.dtype(out) != b.dtype(x):  # ONNX Pow keeps the base's type
        out = b.call(aten._to_copy, out, dtype=b.dtype(x))
    return out


def _dims_pair(b: Lifter, pyfn: Any, x: Any, y: Any) -> Dims:
    fx_, fy = (v.floating if isinstance(v, Dims) else b.dtype(v).is_floating_point for v in (x, y))
    floating = fx_ or fy
    if floating and pyfn is operator.floordiv:
        pyfn = operator.truediv
    xs, ys = b.items(x), b.items(y)
    if len(xs) == 1 and len(ys) > 1:
        xs = xs * len(ys)
    if len(ys) == 1 and len(xs) > 1:
        ys = ys * len(xs)
    if len(xs) != len(ys):
        raise b.fail(f"sizes of lengths {len(xs)} and {len(ys)} do not broadcast")
    scalar = all(isinstance(v, Dims) and v.scalar or isinstance(v, Const) and v.t.dim() == 0 for v in (x, y))
    out = [b.call(pyfn, i, j) for i, j in zip(xs, ys, strict=True)]
    return Dims(out, scalar=scalar, floating=floating and pyfn not in (operator.eq, operator.lt, operator.le,
                                                                          operator.gt, operator.ge))


@op("Where")
def where(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    """On sizes (the legacy exporter's ``expand``: ``Where(Equal(shape, -1), 1, shape)``), item by item."""
    c, x, y = ins
    if isinstance(c, Dims) and (isinstance(x, Dims) or isinstance(y, Dims)) and not (
            isinstance(x, fx.Node) or isinstance(y, fx.Node)):
        xs, ys = b.items(x), b.items(y)
        k = len(c.items)
        xs, ys = (v * k if len(v) == 1 else v for v in (xs, ys))
        picked = [(i if t else j) if isinstance(t, bool) else b.call(pick, t, i, j)
                  for t, i, j in zip(c.items, xs, ys, strict=True)]
        floating = any(isinstance(v, Dims) and v.floating for v in (x, y))
        return Dims(picked, scalar=c.scalar, floating=floating)
    c, x, y = (b.tensor(v) if isinstance(v, Dims) else v for v in (c, x, y))
    if isinstance(ins[0], Dims):
        c = b.call(aten._to_copy, c, dtype=torch.bool)  # sizes compared are held as int64
    return b.call(aten.where, c, x, y)


def pick(cond: bool, a: int, b: int) -> int:
    """``a if cond else b`` on run-time sizes, as a call fx can record and TorchScript can compile."""
    return a if cond else b
