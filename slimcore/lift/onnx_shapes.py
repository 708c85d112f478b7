"""ONNX converters for shape arithmetic and layout ops: Shape/Gather/Concat chains, Reshape, Slice, Pad...

Exporters compute reshape targets at run time from ``Shape`` (the batch size, sometimes every dim)
and the lifter keeps them that way: ``Shape`` of a computed tensor gives :class:`Dims` items that are
``aten.sym_size`` nodes, and Gather/Concat/Unsqueeze/Squeeze/Slice/Cast/arithmetic on them stay lists
of ints and fx nodes, so nothing read off the example becomes a constant. ``Reshape`` resolves
``0`` (copy a dim) and ``-1`` (infer) into live sizes as well; :func:`.reshapes.unbake_views` afterwards
replaces the remaining constants that a flatten's channel count was baked into.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from .onnx_lift import DTYPES, Const, Dims, Lifter, op
from .onnx_ops import Node, arg, fence, torch_pads

aten = torch.ops.aten
_I64_MAX = 2 ** 63 - 1


def _rank(b: Lifter, x: Any) -> int:
    return len(b.shape(x))


def _axes(b: Lifter, ins: list[Any], a: dict[str, Any], ver: int, since: int, i: int = 1) -> list[int] | None:
    """``axes`` from the attribute (before ``since``) or the input ``i`` (from ``since``)."""
    if ver < since:
        return list(a["axes"]) if "axes" in a else None
    v = arg(ins, i)
    return None if v is None else [int(t) for t in b.items(v, "axes")]


@op("Shape")
def shape(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    x = ins[0]
    if isinstance(x, Dims):
        full: list[Any] = [] if x.scalar else [len(x.items)]
    elif isinstance(x, Const):
        full = list(x.t.shape)
    else:
        full = [b.call(aten.sym_size, x, i) for i in range(_rank(b, x))]
    r = len(full)
    start, end = int(a.get("start", 0)), a.get("end")
    start = min(max(start + r if start < 0 else start, 0), r)
    stop = r if end is None else min(max(int(end) + r if int(end) < 0 else int(end), 0), r)
    return Dims(full[start:stop])


@op("Size")
def size(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    x = ins[0]
    if isinstance(x, fx.Node):
        return Dims([b.call(aten.sym_numel, x)], scalar=True)
    return Dims([int(b.value(x).numel())], scalar=True)


@op("Cast", "CastLike")
def cast(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    x = ins[0]
    if n.op_type == "Cast":
        if int(a["to"]) not in DTYPES:
            raise b.fail(f"cast to element type {a['to']} is not supported")
        dt = DTYPES[int(a["to"])]
    else:
        dt = b.dtype(ins[1])
    if isinstance(x, Dims):
        if dt.is_floating_point:
            return Dims([b.call(float, i) for i in x.items], x.scalar, floating=True, shape=x.shape)
        if dt in (torch.int64, torch.int32):
            return Dims([b.call(int, i) for i in x.items] if x.floating else x.items, x.scalar, shape=x.shape)
        x = b.tensor(x)
    return b.call(aten._to_copy, x, dtype=dt)


@op("Constant")
def constant(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    if "value" in a:
        return Const(a["value"])
    if "value_float" in a:
        return Const(torch.tensor(float(a["value_float"]), dtype=torch.float32))
    if "value_floats" in a:
        return Const(torch.tensor(list(a["value_floats"]), dtype=torch.float32))
    if "value_int" in a:
        return Const(torch.tensor(int(a["value_int"]), dtype=torch.int64))
    if "value_ints" in a:
        return Const(torch.tensor(list(a["value_ints"]), dtype=torch.int64))
    raise b.fail(f"Constant with attribute {next(iter(a), '?')} is not supported")


@op("ConstantOfShape")
def constant_of_shape(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    val = a.get("value", torch.zeros(1, dtype=torch.float32))
    sizes = b.items(ins[0])
    if all(isinstance(i, int) for i in sizes):
        return Const(torch.full(sizes, val.reshape(()).item(), dtype=val.dtype))
    # new_full on a graph input keeps the device of the module's buffers/inputs
    ref = next(iter(b.graph.find_nodes(op="placeholder")))
    return b.call(aten.new_full, ref, sizes, val.reshape(()).item(), dtype=val.dtype)


@op("Range")
def range_(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    """Constant bounds fold; bounds from ``Shape`` (YOLO's anchor grid over the feature map) or computed
    tensors give an ``aten.arange`` at run time, on the input's device."""
    if all(isinstance(v, Const) for v in ins):
        start, limit, delta = (v.t.reshape(()) for v in ins)
        return Const(torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype))
    dt = b.dtype(ins[0])
    bounds = [_scalar(b, v, "a Range bound") for v in ins]
    ref = next(iter(b.graph.find_nodes(op="placeholder")))
    return b.call(aten.arange, *bounds, dtype=dt, device=b.call(getattr, ref, "device"))


def _scalar(b: Lifter, v: Any, what: str) -> Any:
    """A one-element value as a Python number or a run-time scalar node."""
    if isinstance(v, Const):
        return v.t.reshape(()).item()
    if isinstance(v, Dims):
        if len(v.items) != 1:
            raise b.fail(f"{what} has {len(v.items)} elements, not one")
        return v.items[0]
    return b.call(aten.item, v)


@op("Gather")
def gather(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    x, idx = ins
    axis = int(a.get("axis", 0))
    if isinstance(x, Dims) and isinstance(idx, Const):
        items = x.items
        picked = [items[int(i)] for i in idx.t.flatten().tolist()]
        if idx.t.dim() > 1:
            raise b.fail("gathering sizes with a multi-dimensional index is not supported")
        return Dims(picked, scalar=idx.t.dim() == 0)
    x = b.tensor(x) if isinstance(x, Dims) else x
    r = _rank(b, x)
    axis %= r
    if isinstance(idx, Dims):
        idx = b.tensor(idx)
    if isinstance(idx, Const):
        dim = b.shape(x)[axis]
        t = torch.where(idx.t < 0, idx.t + dim, idx.t)
        if t.dim() == 0:
            return _channel(b.call(aten.select, x, axis, int(t)), axis, r, "a channel Gather")
        y = b.call(aten.index_select, x, axis, Const(t.flatten().to(torch.int64)))
        y = y if t.dim() == 1 else b.call(aten.unflatten, y, axis, list(t.shape))
        return _channel(y, axis, r, "a channel Gather")
    flat = b.call(aten.reshape, idx, [-1])
    flat = b.call(aten.remainder, flat, b.call(aten.sym_size, x, axis))  # negative indices count from the end
    y = b.call(aten.index_select, x, axis, flat)
    ishape = b.shape(idx)
    if len(ishape) != 1:
        y = b.call(aten.squeeze, y, [axis]) if not ishape else b.call(aten.unflatten, y, axis, list(ishape))
    return _channel(y, axis, r, "a channel Gather")


def _channel(y: Any, axis: int, rank: int, why: str) -> Any:
    """Fence an op that selects along dim 1 (channels or features) of an (N, C, ...) tensor."""
    return fence(y, why) if axis == 1 and rank >= 2 else y


@op("GatherND")
def gather_nd(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    """Leading-dims gather with a constant index (the dynamo exporter's adaptive pooling uses one)."""
    x, idx = ins
    if int(a.get("batch_dims", 0)):
        raise b.fail("batch_dims > 0 is not supported")
    t = b.const(idx, "the GatherND index").to(torch.int64)
    dims = b.shape(x)[: t.shape[-1]]
    parts = [Const(torch.where(t[..., k] < 0, t[..., k] + dims[k], t[..., k]).contiguous())
             for k in range(t.shape[-1])]
    return b.call(aten.index, x, parts)


@op("Concat")
def concat(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    vals = [v for v in ins if v is not None]
    if any(isinstance(v, Dims) for v in vals) and not any(isinstance(v, fx.Node) for v in vals):
        items: list[Any] = []
        for v in vals:
            items += b.items(v)
        return Dims(items, floating=any(isinstance(v, Dims) and v.floating for v in vals))
    vals = [b.tensor(v) if isinstance(v, Dims) else v for v in vals]
    return b.call(aten.cat, vals, int(a["axis"]))


@op("Split")
def split(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    """Split sizes: an attribute before opset 13, an input after, ``num_outputs`` from 18.

    Equal pieces become ``aten.chunk`` so :func:`.reshapes.unbake_chunks` can compute them at run time.
    """
    x = ins[0]
    r = _rank(b, x)
    axis = int(a.get("axis", 0)) % r
    total = b.shape(x)[axis]
    count = len(n.output)
    given = a.get("split") if ver < 13 else (b.items(ins[1], "split") if arg(ins, 1) is not None else None)
    if given:
        sizes = [int(s) for s in given]
    elif "num_outputs" in a:
        count = int(a["num_outputs"])
        piece = -(-total // count)
        sizes = [piece] * (count - 1) + [total - piece * (count - 1)]
    else:
        sizes = [total // count] * count
    if len(set(sizes)) == 1 and sizes[0] * len(sizes) == total:
        parts = b.call(aten.chunk, x, len(sizes), axis)
    else:
        parts = b.call(aten.split_with_sizes, x, sizes, axis)  # slimcore.coupling rewrites the sizes
    if isinstance(parts, list):
        return parts
    return [b.call(operator.getitem, parts, i) for i in range(len(sizes))]


@op("Slice")
def slice_(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    x = ins[0]
    starts, ends = b.items(ins[1], "starts"), b.items(ins[2], "ends")
    axes = b.items(ins[3], "axes") if arg(ins, 3) is not None else list(range(len(starts)))
    steps = b.items(ins[4], "steps") if arg(ins, 4) is not None else [1] * len(starts)
    if isinstance(x, Dims):
        if x.scalar or any(not isinstance(v, int) for v in starts + ends + steps + axes):
            raise b.fail("slicing sizes with computed bounds is not supported")
        idx = np.arange(len(x.items)).reshape(x.shape or (len(x.items),))
        for st, en, ax, sp in zip(starts, ends, axes, steps, strict=True):
            ax = int(ax) % idx.ndim
            idx = idx[(slice(None),) * ax + (slice(st, min(en, _I64_MAX), sp),)]
        return _rearranged(x, idx)
    r = _rank(b, x)
    for st, en, ax, sp in zip(starts, ends, axes, steps, strict=True):
        ax = int(ax) % r
        if isinstance(st, int) and isinstance(en, int) and st == 0 and en >= 2 ** 31 and sp == 1:
            continue  # "from the start to the end" (exporters write INT64_MAX): no-op, whatever the size
        if sp > 0:
            x = b.call(aten.slice, x, ax, st, en, sp)  # constant bounds: slimcore.coupling rewrites them
            continue
        if not isinstance(st, int) or not isinstance(en, int):
            raise b.fail("a negative step with computed bounds is not supported")
        dim = b.shape(x)[ax]  # a reversed slice needs the size; only spatial/static dims are reversed in practice
        s = min(max(st + dim if st < 0 else st, 0), dim - 1)
        e = min(max(en + dim if en < 0 else en, -1), dim - 1)
        x = b.call(aten.slice, b.call(aten.flip, x, [ax]), ax, dim - 1 - s, dim - 1 - e, -sp)
        x = _channel(x, ax, r, "a reversed channel Slice")
    return x


@op("Reshape")
def reshape(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    x, target = ins
    want = b.items(target, "the target shape")
    allowzero = int(a.get("allowzero", 0))
    if isinstance(x, Dims):
        count = len(x.items)
        if want in ([], [1]) and count == 1 or want in ([-1], [count]):
            return Dims(x.items, scalar=not want, floating=x.floating)
        if all(isinstance(s, int) for s in want):
            have = x.shape or (() if x.scalar else (count,))
            fixed = [have[i] if s == 0 and not allowzero else s for i, s in enumerate(want)]
            return _rearranged(x, np.arange(count).reshape(fixed))
        x = b.tensor(x)
    sizes: list[Any] = []
    for i, s in enumerate(want):
        sizes.append(b.call(aten.sym_size, x, i) if isinstance(s, int) and s == 0 and not allowzero else s)
    if isinstance(x, fx.Node) and any(isinstance(s, int) and s == -1 for s in sizes):
        known: Any = 1  # -1 becomes numel // (product of the others), computed at run time
        for s in sizes:
            if not (isinstance(s, int) and s == -1):
                known = b.call(operator.mul, known, s)
        rest = b.call(operator.floordiv, b.call(aten.sym_numel, x), known)
        sizes = [rest if isinstance(s, int) and s == -1 else s for s in sizes]
    return b.call(aten.reshape, x, sizes)


def _rearranged(x: Dims, idx: np.ndarray) -> Dims:
    """The items of ``x`` picked by an index array (a reshape, transpose or slice of their positions)."""
    items = [x.items[int(i)] for i in idx.reshape(-1)]
    return Dims(items, scalar=idx.ndim == 0, floating=x.floating, shape=tuple(idx.shape) if idx.ndim > 1 else None)


@op("Flatten")
def flatten(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    x = ins[0]
    r = _rank(b, x)
    axis = int(a.get("axis", 1))
    axis = axis + r if axis < 0 else axis
    if axis == 0:
        return b.call(aten.reshape, x, [1, b.call(aten.sym_numel, x) if isinstance(x, fx.Node) else -1])
    y = b.call(aten.flatten, x, 0, axis - 1) if axis > 1 else x
    return b.call(aten.flatten, y, 1) if axis < r else b.call(aten.unsqueeze, y, 1)


@op("Transpose")
def transpose(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    x = ins[0]
    if isinstance(x, Dims):
        if not x.shape:
            return x
        perm = list(a.get("perm", reversed(range(len(x.shape)))))
        return _rearranged(x, np.arange(len(x.items)).reshape(x.shape).transpose(perm))
    perm = list(a.get("perm", reversed(range(_rank(b, x)))))
    return b.call(aten.permute, x, perm)


@op("Squeeze")
def squeeze(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    x = ins[0]
    axes = _axes(b, ins, a, ver, 13)
    if isinstance(x, Dims):
        if len(x.items) != 1:
            raise b.fail("squeezing a multi-element size list")
        return Dims(x.items, scalar=True, floating=x.floating)
    r = _rank(b, x)
    dims = [i for i, d in enumerate(b.shape(x)) if d == 1] if axes is None else sorted(int(i) % r for i in axes)
    return b.call(aten.squeeze, x, dims) if dims else x


@op("Unsqueeze")
def unsqueeze(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    x = ins[0]
    axes = _axes(b, ins, a, ver, 13) or []
    if isinstance(x, Dims) and x.scalar and len(axes) == 1:
        return Dims(x.items, floating=x.floating)
    x = b.tensor(x) if isinstance(x, Dims) else x
    r = _rank(b, x) + len(axes)
    for ax in sorted(int(i) % r for i in axes):
        x = b.call(aten.unsqueeze, x, ax)
    return x


@op("Expand")
def expand(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    """Bidirectional broadcast to a shape: a 1 in the shape keeps the tensor's own size (``-1``)."""
    x = b.tensor(ins[0]) if isinstance(ins[0], Dims) else ins[0]
    want = b.items(ins[1], "the target shape")
    have = b.shape(x)
    sizes: list[Any] = []
    for i, s in enumerate(want):
        j = i - (len(want) - len(have))
        sizes.append(-1 if j >= 0 and isinstance(s, int) and s == 1 else s)
    if len(have) > len(want):
        sizes = [-1] * (len(have) - len(want)) + sizes
    return b.call(aten.expand, x, sizes)


@op("Tile")
def tile(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    return b.call(aten.repeat, ins[0], b.items(ins[1], "repeats"))


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


@op("Pad")
def pad(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    """Pads: an attribute before opset 11, then an input; an ``axes`` input from 18; ``wrap`` from 19."""
    x = ins[0]
    r = _rank(b, x)
    mode = a.get("mode", "constant")
    if mode not in _PAD_MODES:
        raise b.fail(f"pad mode {mode!r} is not supported")
    if ver < 11:
        pads, value = list(a["pads"]), float(a.get("value", 0.0))
    else:
        pads = b.items(ins[1], "pads")
        cv = arg(ins, 2)
        value = b.const(cv, "the pad value").reshape(-1)[0].item() if cv is not None and b.value(cv).numel() else 0
    axes = [int(i) % r for i in b.items(ins[3], "axes")] if ver >= 18 and arg(ins, 3) is not None \
        else list(range(r))
    begin, end = [0] * r, [0] * r
    for k, ax in enumerate(axes):
        begin[ax], end[ax] = pads[k], pads[k + len(axes)]
    lead = 0
    while lead < r and _zero(begin[lead]) and _zero(end[lead]):
        lead += 1
    tp = torch_pads(begin[lead:], end[lead:])
    if not tp:
        return x
    if mode == "constant":
        return b.call(aten.constant_pad_nd, x, tp, value)
    if len(tp) // 2 > 3 or len(tp) // 2 >= r:
        raise b.fail(f"{mode} padding of {len(tp) // 2} leading dims is not supported")
    return b.call(aten.pad, x, tp, _PAD_MODES[mode])


def _zero(v: Any) -> bool:
    return isinstance(v, int) and v == 0
