"""Propagation rules: how each op moves, joins, splits or pins the channel atoms of its inputs.

An op with no rule pins every channel it sees (named in the report), so a new architecture degrades to
"left whole, with the reason", never to a corrupt model. Rules register by op name (see
:func:`.core.op_name`), one signature each.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx

from .core import RULES, ChanMap, Context, _flat_nodes, arg, op_of, set_map, shape

# Ops that act on each element (or each spatial window) and keep every dim's meaning.
UNARY = {
    "relu", "relu6", "leaky_relu", "gelu", "silu", "sigmoid", "hardsigmoid", "hardswish", "hardtanh", "tanh",
    "elu", "selu", "celu", "mish", "softplus", "clamp", "clamp_min", "clamp_max", "clip", "clone", "contiguous",
    "dropout", "alias", "detach", "identity", "_to_copy", "to", "type_as", "float", "abs", "neg", "exp", "log",
    "sqrt", "rsqrt", "reciprocal", "erf", "sign", "square", "threshold", "logsigmoid", "lift_fresh_copy",
    "feature_dropout", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
    "upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d", "upsample_trilinear3d",
    "_upsample_nearest_exact2d", "_upsample_bilinear2d_aa", "interpolate", "floor", "ceil", "round",
    "native_dropout", "max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_max_pool2d_with_indices",
    "reflection_pad1d", "reflection_pad2d", "replication_pad1d", "replication_pad2d", "sin", "cos",
    "masked_fill", "nan_to_num", "logical_not",
    # leaf modules of an eager model's symbolic trace
    "module:relu", "module:relu6", "module:leakyrelu", "module:gelu", "module:silu", "module:sigmoid",
    "module:hardsigmoid", "module:hardswish", "module:hardtanh", "module:tanh", "module:elu", "module:mish",
    "module:softplus", "module:identity", "module:dropout", "module:dropout2d", "module:maxpool1d",
    "module:maxpool2d", "module:maxpool3d", "module:avgpool1d", "module:avgpool2d", "module:avgpool3d",
    "module:adaptiveavgpool1d", "module:adaptiveavgpool2d", "module:adaptiveavgpool3d", "module:adaptivemaxpool2d",
    "module:upsample", "module:upsamplingnearest2d", "module:upsamplingbilinear2d",
}
# Element-wise with broadcasting: every tensor operand's channels must stay aligned.
BINARY = {"add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "maximum", "minimum", "where", "pow",
          "fmod", "remainder", "eq", "ne", "lt", "le", "gt", "ge", "addcmul", "addcdiv", "lerp", "atan2",
          "logical_and", "logical_or", "bitwise_and", "mul_tensor", "iadd", "imul", "truediv"}
REDUCE = {"mean", "sum", "amax", "amin", "var", "std", "norm", "logsumexp", "prod", "max", "min", "var_mean"}
VIEWS = {"view", "reshape", "_unsafe_view", "unflatten", "view_as", "reshape_as"}
SHAPE_ONLY = {"sym_size", "size", "sym_numel", "numel", "dim", "sym_stride", "stride", "_assert_scalar",
              "_assert_tensor_metadata", "sym_constrain_range", "sym_constrain_range_for_size", "_assert_async",
              "sym_float", "sym_int", "floordiv", "sym_not", "getattr", "_assert"}


@RULES.register("unary")
def unary(cx: Context, node: fx.Node) -> None:
    src = node.args[0] if node.args else None
    m, si, so = cx.map_of(src), shape(cx, src), cx.shape_of(node)
    if isinstance(m, ChanMap):
        first = so[0] if isinstance(so, list) and so and isinstance(so[0], torch.Size) else so
        if not isinstance(first, torch.Size) or si is None or len(first) != len(si) or first[m.dim] != si[m.dim]:
            cx.pin(m, f"{node.name} changes the channel dim")
            return
        set_map(cx, node, [m, m] if isinstance(so, list) else m)


@RULES.register("binary")
def binary(cx: Context, node: fx.Node) -> None:
    out = shape(cx, node)
    if out is None:
        return
    ops = [a for a in _flat_nodes(node.args, node.kwargs) if isinstance(cx.shape_of(a), torch.Size)]
    mapped = [(a, cx.map_of(a)) for a in ops if isinstance(cx.map_of(a), ChanMap)]
    if not mapped:
        return
    r = len(out)

    def aligned(a: fx.Node, cm: ChanMap) -> int:
        return cm.dim + r - len(cx.shape_of(a))

    d, first = aligned(*mapped[0]), mapped[0][1]
    why = f"{node.name} combines these channels with others it cannot align"
    if any(aligned(a, cm) != d or cm.atoms.size != first.atoms.size or cm.rep != first.rep for a, cm in mapped):
        for _, cm in mapped:
            cx.pin(cm, why)
        return
    for a in ops:
        cm = cx.map_of(a)
        if isinstance(cm, ChanMap):
            cx.union(cm.atoms, first.atoms)
            continue
        s = cx.shape_of(a)
        k = d - (r - len(s))
        if k < 0 or s[k] == 1:
            continue  # broadcast along the channels: no coupling
        if a.op == "get_attr" and s[k] == out[d]:
            cx.record("const", str(a.target), first, dim=k)  # a per-channel constant: sliced with the channels
            continue
        for _, cm in mapped:
            cx.pin(cm, why + f" ({a.name} has no prunable channels)")
        return
    set_map(cx, node, first.moved(d))


@RULES.register("cat")
def cat(cx: Context, node: fx.Node) -> None:
    xs = arg(node, 0, "tensors", [])
    if isinstance(xs, fx.Node):  # a list computed at run time: its members cannot be followed
        cx.pin_inputs(node, f"{node.name} concatenates a list built at run time")
        return
    xs = list(xs)
    dim = arg(node, 1, "dim", 0)
    out = shape(cx, node)
    if out is None or not xs:
        return
    dim %= len(out)
    maps = [cx.map_of(a) for a in xs]
    if not any(isinstance(m, ChanMap) for m in maps):
        return
    if all(isinstance(m, ChanMap) and m.dim == dim and m.rep == 1 for m in maps if m is not None) and \
            any(isinstance(m, ChanMap) and m.dim == dim for m in maps):
        parts = []
        for a, m in zip(xs, maps, strict=True):
            if isinstance(m, ChanMap):
                parts.append(m.atoms)
            else:
                fresh = cx.fresh(shape(cx, a)[dim])
                cx.pins.append((fresh, f"{node.name} concatenates them with channels that are not prunable"))
                parts.append(fresh)
        set_map(cx, node, ChanMap(dim, np.concatenate(parts)))
        return
    _cat_other_dim(cx, node, xs, maps)


def _cat_other_dim(cx: Context, node: fx.Node, xs: list[Any], maps: list[Any]) -> None:
    """Concatenation along another dim (anchors, tokens): the channel dims line up one to one."""
    ms = [m for m in maps if isinstance(m, ChanMap)]
    if len(ms) != len(xs) or any(m.dim != ms[0].dim or m.rep != ms[0].rep or m.atoms.size != ms[0].atoms.size
                                 for m in ms):
        for m in ms:
            cx.pin(m, f"{node.name} concatenates them with channels it cannot align")
        return
    for m in ms[1:]:
        cx.union(m.atoms, ms[0].atoms)
    set_map(cx, node, ms[0])


@RULES.register("stack")
def stack(cx: Context, node: fx.Node) -> None:
    xs = list(arg(node, 0, "tensors", []))
    out = shape(cx, node)
    maps = [cx.map_of(a) for a in xs]
    ms = [m for m in maps if isinstance(m, ChanMap)]
    if not ms or out is None:
        return
    dim = arg(node, 1, "dim", 0) % len(out)
    if len(ms) != len(xs) or any(m.dim != ms[0].dim or m.atoms.size != ms[0].atoms.size for m in ms):
        for m in ms:
            cx.pin(m, f"{node.name} stacks them with channels it cannot align")
        return
    for m in ms[1:]:
        cx.union(m.atoms, ms[0].atoms)
    set_map(cx, node, ms[0].moved(ms[0].dim + (1 if dim <= ms[0].dim else 0)))


@RULES.register("split")
def split(cx: Context, node: fx.Node) -> None:
    """split / split_with_sizes / chunk / unbind: pieces along the channel dim take their share of atoms."""
    src = node.args[0]
    m, si, outs = cx.map_of(src), shape(cx, src), cx.shape_of(node)
    if not isinstance(m, ChanMap) or si is None or not isinstance(outs, list):
        return
    name = str(getattr(node.target, "__name__", node.target))
    dim = (arg(node, 1, "dim", 0) if name.startswith("unbind") else arg(node, 2, "dim", 0)) % len(si)
    if dim != m.dim:
        set_map(cx, node, [m.moved(m.dim) for _ in outs])
        return
    if name.startswith("unbind") or m.rep != 1 or not cx.editable:
        cx.pin(m, f"{node.name} splits the channels in code that cannot be rewritten" if not cx.editable
               else f"{node.name} takes the channels apart one by one")
        return
    sizes = [int(o[dim]) for o in outs]
    bounds = np.cumsum([0] + sizes)
    pieces = [ChanMap(dim, m.atoms[bounds[i]:bounds[i + 1]]) for i in range(len(sizes))]
    cx.record("split", node.name, m, sizes=sizes)
    set_map(cx, node, pieces)


@RULES.register("getitem")
def getitem(cx: Context, node: fx.Node) -> None:
    src, idx = node.args[0], node.args[1]
    m = cx.map_of(src)
    if isinstance(m, list) and isinstance(idx, int):
        set_map(cx, node, m[idx] if -len(m) <= idx < len(m) else None)
    elif isinstance(m, ChanMap):  # indexing a tensor (eager code): not followed
        cx.pin(m, f"{node.name} indexes the tensor")


@RULES.register("slice")
def slice_(cx: Context, node: fx.Node) -> None:
    src = node.args[0]
    m, si = cx.map_of(src), shape(cx, src)
    if not isinstance(m, ChanMap) or si is None:
        return
    dim = arg(node, 1, "dim", 0) % len(si)
    if dim != m.dim:
        set_map(cx, node, m)
        return
    start, end, step = (_value(cx, v) for v in (arg(node, 2, "start", None), arg(node, 3, "end", None),
                                                 arg(node, 4, "step", 1)))
    n = si[dim]
    if not all(isinstance(v, (int, type(None))) for v in (start, end, step)) or step != 1 or m.rep != 1 \
            or not cx.editable:
        cx.pin(m, f"{node.name} slices the channels in a way that cannot be rewritten")
        return
    s, e, _ = slice(start, end).indices(n)
    cx.record("slice", node.name, m, start=s, end=max(s, e))
    set_map(cx, node, ChanMap(dim, m.atoms[s:max(s, e)]))


def _value(cx: Context, v: Any) -> Any:
    """A bound computed at run time (C2f's split as ONNX Slices of Shape arithmetic) as the int it was on
    the example: the removal writes the pruned bound as a literal, so the arithmetic is retired."""
    return cx.values.get(v.name, v) if isinstance(v, fx.Node) else v


@RULES.register("narrow")
def narrow(cx: Context, node: fx.Node) -> None:
    m = cx.map_of(node.args[0])
    if isinstance(m, ChanMap):
        dim = node.args[1] % len(shape(cx, node.args[0]))
        if dim == m.dim:
            cx.pin(m, f"{node.name} narrows the channels")
        else:
            set_map(cx, node, m)


@RULES.register("select")
def select(cx: Context, node: fx.Node) -> None:
    m, si = cx.map_of(node.args[0]), shape(cx, node.args[0])
    if isinstance(m, ChanMap) and si is not None:
        dim = node.args[1] % len(si)
        if dim == m.dim:
            cx.pin(m, f"{node.name} picks single channels")
        else:
            set_map(cx, node, m.moved(m.dim - (1 if dim < m.dim else 0)))


@RULES.register("index")
def index(cx: Context, node: fx.Node) -> None:
    """``x[i0, i1]`` with index tensors on leading dims (ONNX GatherND, the dynamo exporter's adaptive
    pooling): channels after the indexed dims keep their place counted from the end."""
    m, si, so = cx.map_of(node.args[0]), shape(cx, node.args[0]), shape(cx, node)
    if not isinstance(m, ChanMap) or si is None or so is None:
        return
    idx = node.args[1] if len(node.args) > 1 else []
    if node.target is not None and op_of(node).startswith("index_select"):
        dim = node.args[1] % len(si)
        if dim != m.dim:
            set_map(cx, node, m)
            return
    elif isinstance(idx, (list, tuple)) and all(i is not None for i in idx) and m.dim >= len(idx):
        nd = len(so) - (len(si) - m.dim)
        if 0 <= nd < len(so) and so[nd] == si[m.dim]:
            set_map(cx, node, m.moved(nd))
            return
    cx.pin(m, f"{node.name} indexes the channels")


@RULES.register("reduce")
def reduce(cx: Context, node: fx.Node) -> None:
    src = node.args[0]
    m, si, so = cx.map_of(src), shape(cx, src), cx.shape_of(node)
    if not isinstance(m, ChanMap) or si is None:
        return
    dims = arg(node, 1, "dim", None)
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        cx.pin(m, f"{node.name} reduces over the channels")
        return
    dims = [d % len(si) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if m.dim in dims:
        cx.pin(m, f"{node.name} reduces over the channels")
        return
    first = so[0] if isinstance(so, list) else so
    if not isinstance(first, torch.Size):
        return
    nd = m.dim if len(first) == len(si) else m.dim - sum(1 for d in dims if d < m.dim)
    set_map(cx, node, [m.moved(nd), m.moved(nd)] if isinstance(so, list) else m.moved(nd))


@RULES.register("softmax")
def softmax(cx: Context, node: fx.Node) -> None:
    m, si = cx.map_of(node.args[0]), shape(cx, node.args[0])
    if isinstance(m, ChanMap) and si is not None:
        dim = arg(node, 1, "dim", -1)
        if isinstance(dim, int) and dim % len(si) != m.dim:
            set_map(cx, node, m)
        else:
            cx.pin(m, f"{node.name} normalises across the channels")


@RULES.register("pad")
def pad(cx: Context, node: fx.Node) -> None:
    m, si = cx.map_of(node.args[0]), shape(cx, node.args[0])
    if not isinstance(m, ChanMap) or si is None:
        return
    pads = arg(node, 1, "pad", [])
    if not isinstance(pads, (list, tuple)) or not all(isinstance(p, int) for p in pads):
        pads = [1] * (2 * len(si))  # computed at run time: assume every dim it names is padded
    touched = {len(si) - 1 - i // 2 for i, p in enumerate(pads) if p}
    if m.dim in touched:
        cx.pin(m, f"{node.name} pads the channel dim")
    else:
        set_map(cx, node, m)


@RULES.register("expand")
def expand(cx: Context, node: fx.Node) -> None:
    m, si, so = cx.map_of(node.args[0]), shape(cx, node.args[0]), shape(cx, node)
    if isinstance(m, ChanMap) and si is not None and so is not None:
        nd = m.dim + len(so) - len(si)
        if so[nd] == si[m.dim]:
            set_map(cx, node, m.moved(nd))
        else:
            cx.pin(m, f"{node.name} repeats the channels")


def unknown(cx: Context, node: fx.Node, name: str) -> None:
    """No rule: every channel this op sees stays, and so does whatever it produces."""
    why = str(node.meta.get("slim_barrier") or f"they pass through {name} ({node.name}), which is not followed")
    cx.pin_inputs(node, why)
