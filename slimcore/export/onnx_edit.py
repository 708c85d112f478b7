"""Edits the ONNX exporter makes to a written model: opset steps (18 → 17 by our own adapters, the rest by
onnx's converter; why, in :mod:`.onnx`) and renaming or rewiring values in a graph and its subgraphs."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import helper


def to_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Convert to ``opset``; from 18 down to 17 with our own adapters, the rest with onnx's converter."""
    if opset_of(model) >= 18 > opset:
        model = down_to_17(model)
    if opset_of(model) == opset:
        return model
    from onnx import version_converter

    converted = version_converter.convert_version(model, opset)
    if opset_of(converted) != opset:
        raise RuntimeError(f"opset conversion {opset_of(model)} → {opset} did not take")
    return converted


REDUCE_OPS = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
           "ReduceProd", "ReduceSumSquare"}


def down_to_17(model: onnx.ModelProto) -> onnx.ModelProto:
    """Opset 18 → 17 for the two op changes exporters emit (ReduceX axes input, Split ``num_outputs``).

    ``onnx.version_converter`` 1.23 cannot do it: its ReduceMean adapter leaves the opset-18-only
    ``noop_with_empty_axes`` attribute behind and it has no Split adapter. Any other op whose schema
    changed at 18 is refused rather than guessed.
    """
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
              for vi in (*g.value_info, *g.input, *g.output)}
    for n in all_nodes(g):
        if n.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: a for a in n.attribute}
        if n.op_type in REDUCE_OPS:
            axes = n.input[1] if len(n.input) > 1 else ""
            if axes and axes not in consts:
                raise RuntimeError(f"{n.op_type} {n.name} has run-time axes; opset 17 needs constant ones")
            if axes:
                n.attribute.append(helper.make_attribute("axes", [int(a) for a in consts[axes].ravel()]))
            elif "noop_with_empty_axes" in attrs and attrs["noop_with_empty_axes"].i:
                raise RuntimeError(f"{n.op_type} {n.name} with noop_with_empty_axes=1 has no opset 17 form")
            del n.input[1:]
            drop_attr(n, "noop_with_empty_axes")
        elif n.op_type == "Split" and "num_outputs" not in attrs:
            continue  # with a sizes input, Split-18 reads as Split-13
        elif n.op_type == "Split":
            axis = attrs["axis"].i if "axis" in attrs else 0
            shape = shapes.get(n.input[0]) or []
            size = shape[axis] if -len(shape) <= axis < len(shape) else None
            if size is None:
                raise RuntimeError(f"Split {n.name} splits a dynamic axis into equal parts; opset 17 needs sizes")
            k = len(n.output)
            part = -(-size // k)
            sizes = [part] * (k - 1) + [size - part * (k - 1)]
            name = fresh_name(g, f"{n.name or 'split'}_sizes")
            g.initializer.append(onnx.numpy_helper.from_array(np.asarray(sizes, dtype=np.int64), name))
            del n.input[1:]
            n.input.append(name)
            drop_attr(n, "num_outputs")
        elif onnx.defs.get_schema(n.op_type, 17).since_version != onnx.defs.get_schema(n.op_type, 18).since_version:
            raise RuntimeError(f"no opset 18 → 17 conversion for {n.op_type}")
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 17
    return model


def drop_attr(node: onnx.NodeProto, name: str) -> None:
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(keep)


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), -1)


def graphs(g: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield g
    for node in g.node:
        for a in node.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from graphs(sub)


def all_nodes(g: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    return (n for sub in graphs(g) for n in sub.node)


def value_infos(g: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    return (vi for sub in graphs(g) for vi in (*sub.input, *sub.output, *sub.value_info))


def value_names(g: onnx.GraphProto) -> set[str]:
    names = {vi.name for vi in value_infos(g)} | {i.name for sub in graphs(g) for i in sub.initializer}
    return names.union(*({*n.input, *n.output} for n in all_nodes(g)))


def fresh_name(g: onnx.GraphProto, base: str) -> str:
    names, name, i = value_names(g), base, 1
    while name in names:
        name, i = f"{base}_{i}", i + 1
    return name


def replace_refs(g: onnx.GraphProto, old: str, new: str, outputs: bool = True) -> None:
    for node in all_nodes(g):
        node.input[:] = [new if n == old else n for n in node.input]
        if outputs:
            node.output[:] = [new if n == old else n for n in node.output]


def rename_value(g: onnx.GraphProto, old: str, new: str) -> None:
    """Rename value ``old`` to ``new`` everywhere, first moving any other value called ``new`` aside."""
    if old == new:
        return
    if new in value_names(g):
        rename_value(g, new, fresh_name(g, new + "_0"))
    replace_refs(g, old, new)
    for item in (*value_infos(g), *(i for sub in graphs(g) for i in sub.initializer)):
        if item.name == old:
            item.name = new
