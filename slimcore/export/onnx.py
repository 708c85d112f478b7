"""ONNX out: a drop-in replacement for the uploaded file, proved by onnxruntime before it is handed back.

Drop-in is what serving code sees: the same input/output names (all of them, in the upload's order) and
dtypes, opset and IR version, the same symbolic dims (``dim_param`` names kept, fixed dims fixed) and the
upload's ``metadata_props``, as the ONNX importer recorded them in ``imported.meta`` (``onnx_opset``,
``onnx_ir_version``, ``onnx_inputs``, ``onnx_outputs``, ``onnx_metadata``, ``onnx_producer``,
``bn_in_file``). Without them (a
model uploaded in another format) the file gets opset 18, the lifted input's name, a symbolic batch, and
keeps the model's BNs. Several inputs or a tuple/list/dict output (another format's upload) become graph
inputs/outputs in forward/flattening order (``slimcore.io.leaves``), named after the upload's arguments and
output paths (``out``, ``aux``; ``output_0``, ``output_1_0`` for tuple positions; ``output`` for one).

Routes, measured on the ``tests/zoo.py`` torchvision models at 64×64 with torch 2.13:
1. the TorchScript exporter on ``torch.jit.script`` of the lifted graph: every opset 7–20 natively,
   0.3–4 s, keeps BatchNorm nodes on request. It cannot export ``aten::sym_size`` (the run-time sizes
   lifters put before reshapes; rewritten to the equivalent ``aten::size`` first), strided views with
   run-time strides (the pt2 lifter's channel shuffle), or adaptive pooling to a size that does not
   divide the input (VGG at 64×64);
2. else the dynamo exporter: handled every model tried, but writes opset ≥ 18 and takes 3–40 s. Opset 17
   is reached by our own 18 → 17 step for the two changes it emits (ReduceX axes, Split
   ``num_outputs``), which ``onnx.version_converter`` 1.23 gets wrong (a ReduceMean keeping an opset-18
   attribute) or refuses (Split); below 17, by that converter, whose down adapters are incomplete.
A route's file is kept only if it passes ``onnx.checker.check_model(full_check=True)`` and onnxruntime
reproduces the pruned module (relative error ≤ 1e-4) at batch 2 and 5, or at the upload's batch when that
is fixed; otherwise the next route is tried, and ``ParityError`` names every route's failure.

BatchNorm: the BNs :func:`slimcore.lift.bn_insert.reinsert_bn` added are folded back into their convs,
so an upload without BN comes back without BN. BNs that were in the file (``bn_in_file``) stay
BatchNormalization nodes: the file keeps the upload's structure and learned γ (it can be slimmed again),
and onnxruntime fuses Conv+BN at session load, so inference costs the same. (The dynamo fallback folds
Conv→BN regardless.)
External data: an upload whose weights were in a data file (``meta["onnx_external_data"]``) is written as
``OUT`` plus ``OUT.data`` (tensors over 1 KiB in the data file, like torch's exporter); other uploads as
one file. The checker then reads the data file through the path.
Dtypes: the module computes in float32; where the upload's input or output dtype differs, a Cast at the
graph's edge restores it (parity then allows that dtype's rounding, 2e-3 for float16).
Metadata: the upload's ``metadata_props`` are copied, plus ``slim.source_producer`` (its producer name
and version, since ``producer_name`` now says PyTorch wrote the file; kept if already there). Node
doc strings and metadata (exporter stack traces with this machine's paths) are dropped. Only batch
sizes are verified; other symbolic axes are declared as the upload declared them.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import TensorProto, helper
from torch import nn

from .. import io as slim_io
from ..errors import ParityError
from ..external_data import data_file, save_onnx
from ..lift import Imported
from ..lift.bn_insert import META_KEY, fold_bn
from . import EXPORTERS, rel_error
from .onnx_edit import all_nodes, fresh_name, rename_value, replace_refs, to_opset, value_infos
from .pt2 import _at_batch, _first_line

aten = torch.ops.aten
LEGACY_MAX_OPSET = 20
DYNAMO_MIN_OPSET = 18
_TOL = {TensorProto.FLOAT16: 2e-3, TensorProto.BFLOAT16: 1.6e-2}


@dataclass
class Target:
    """What the written file must look like, from the importer's record of the upload."""

    opset: int
    # one per graph input/output, in order: {"name", "elem_type", "dims": [int | str]}; a str dim is a
    # dim_param, "" an unnamed dim
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    ir_version: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    keep_bn: bool = True


@EXPORTERS.register("onnx")
def export_onnx(module: nn.Module, imported: Imported, out: Path, example: slim_io.Inputs) -> None:
    module = module.cpu().float().eval()
    example = slim_io.apply(example, lambda t: t.cpu().float() if t.is_floating_point() else t.cpu())
    target = target_of(imported, module, example)
    prepared = _prepare(module, imported)
    b0 = target.inputs[0]["dims"][0]  # batch 2 and 5 when symbolic: a file that baked the batch passes only one
    checks = [_at_batch(example, b0)] if isinstance(b0, int) else [_at_batch(example, 2), _at_batch(example, 5)]
    external = bool(imported.meta.get("onnx_external_data"))  # the upload kept its weights in a data file
    failures: list[str] = []
    for name, route in ROUTES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = route(prepared, checks[0], target)
            model = to_opset(model, target.opset)
            _conform(model, target)
            save_onnx(model, out, external)
            verify(out, module, checks, target, external)
            return
        except Exception as e:  # every route's reason goes into the one error the user sees
            failures.append(f"{name}: {_first_line(e)}")
    out.unlink(missing_ok=True)
    if external:
        data_file(out).unlink(missing_ok=True)
    raise ParityError("could not write an ONNX model equivalent to the pruned one (" + "; ".join(failures) + ")")


def target_of(imported: Imported, module: nn.Module, example: slim_io.Inputs) -> Target:
    """The upload's interface from ``imported.meta``, or a plain float32/batch-symbolic one without it."""
    meta = imported.meta
    ins, outs = meta.get("onnx_inputs"), meta.get("onnx_outputs")
    xs = slim_io.args(example)
    with torch.no_grad():
        ys = slim_io.leaves(slim_io.call(module, example))
    if ins is not None and len(ins) != len(xs) or outs is not None and len(outs) != len(ys):
        raise ParityError(f"the upload has {len(ins or [])} inputs and {len(outs or [])} outputs; the lifted "
                          f"model has {len(xs)} and {len(ys)}")
    batch: int | str = "batch" if imported.dynamic_batch else int(xs[0].shape[0])
    if ins is None:
        names = list(imported.input_names) if len(imported.input_names) == len(xs) else [f"input{i}" for i in
                                                                                       range(len(xs))]
        ins = [{"name": n, "elem_type": TensorProto.FLOAT, "dims": None} for n in names]
    # an upload without shapes: declare what the model takes
    ins = [v if v.get("dims") else {**v, "dims": [batch, *(int(d) for d in x.shape[1:])]} for v, x in
           zip(ins, xs, strict=True)]
    if outs is None:
        with torch.no_grad():
            names = [n for n, _ in slim_io.named_leaves(slim_io.call(module, example), imported.output_names)]
        outs = [{"name": _onnx_name(n, len(ys)), "elem_type": TensorProto.FLOAT,
                 "dims": [batch, *(int(d) for d in y.shape[1:])]} for n, y in zip(names, ys, strict=True)]
    md = {str(k): str(v) for k, v in (meta.get("onnx_metadata") or {}).items()}
    producer = meta.get("onnx_producer")
    if producer and any(producer):
        md.setdefault("slim.source_producer", " ".join(str(p) for p in producer if p))
    return Target(opset=int(meta.get("onnx_opset") or DYNAMO_MIN_OPSET), inputs=[dict(v) for v in ins],
                  outputs=[dict(v) for v in outs], ir_version=meta.get("onnx_ir_version"), metadata=md,
                  keep_bn=bool(meta.get("bn_in_file", True)))


def _onnx_name(path: str, n: int) -> str:
    """An output path (``slimcore.io.names``) as an ONNX value name: ``out``, ``output_1_0``, ``output``."""
    if n == 1:
        return "output"
    flat = path.replace(".", "_")
    return f"output_{flat}" if flat[:1].isdigit() else flat


def _prepare(module: nn.Module, imported: Imported) -> nn.Module:
    """A copy to export, with the BNs that ``reinsert_bn`` added folded back into their convs."""
    which = set(getattr(module, "meta", {}).get(META_KEY, set())) | set(imported.meta.get(META_KEY, ()))
    if not isinstance(module, fx.GraphModule) or not which:
        return module
    gm = copy.deepcopy(module)
    fold_bn(gm, which)
    return gm.eval()


def _sizes_as_size(module: nn.Module) -> nn.Module:
    """A copy calling ``aten.size`` where ``module`` calls ``aten.sym_size`` (same value), for the TorchScript
    exporter, which knows only the former. Not for torch.export: there ``aten.size`` pins the batch."""
    def is_sym(n: fx.Node) -> bool:
        return n.op == "call_function" and getattr(n.target, "overloadpacket", n.target) is aten.sym_size

    if not isinstance(module, fx.GraphModule) or not any(is_sym(n) for n in module.graph.nodes):
        return module
    gm = copy.deepcopy(module)
    for node in filter(is_sym, gm.graph.nodes):
        node.target = aten.size
    gm.recompile()
    return gm


def _edge_names(t: Target) -> tuple[list[str], list[str]]:
    """Placeholder names for the exporters (``_conform`` gives the upload's names afterwards)."""
    return [f"input{i}" for i in range(len(t.inputs))], [f"output{i}" for i in range(len(t.outputs))]


def _export_torchscript(module: nn.Module, x: slim_io.Inputs, t: Target) -> onnx.ModelProto:
    ins, outs = _edge_names(t)
    axes = {**{n: _symbolic_axes(v) for n, v in zip(ins, t.inputs, strict=True)},
            **{n: _symbolic_axes(v) for n, v in zip(outs, t.outputs, strict=True)}}
    buf = io.BytesIO()
    mode = torch.onnx.TrainingMode.PRESERVE if t.keep_bn else torch.onnx.TrainingMode.EVAL
    torch.onnx.export(torch.jit.script(_sizes_as_size(module)), slim_io.args(x), buf, dynamo=False, training=mode,
                      opset_version=min(t.opset, LEGACY_MAX_OPSET), input_names=ins, output_names=outs,
                      dynamic_axes=axes)
    return onnx.load_from_string(buf.getvalue())


def _export_dynamo(module: nn.Module, x: slim_io.Inputs, t: Target) -> onnx.ModelProto:
    # the batch must stay symbolic; other axes the upload left symbolic stay so where the model allows
    batch = torch.export.Dim("d0", min=1)
    shapes = tuple({i: batch if i == 0 else torch.export.Dim.AUTO for i in _symbolic_axes(v)} or None
                   for v in t.inputs)
    ins, outs = _edge_names(t)
    program = torch.onnx.export(module, slim_io.args(x), dynamo=True, verbose=False,
                                dynamic_shapes=shapes if any(shapes) else None,
                                opset_version=max(t.opset, DYNAMO_MIN_OPSET), input_names=ins, output_names=outs)
    if program is None:
        raise RuntimeError("the dynamo exporter returned nothing")
    return program.model_proto


# Tried in order; the first whose file passes every check is kept (tests replace entries to force a route).
ROUTES: list[tuple[str, Callable[[nn.Module, slim_io.Inputs, Target], onnx.ModelProto]]] = [
    ("torchscript exporter", _export_torchscript), ("dynamo exporter", _export_dynamo)]


def _symbolic_axes(value: dict[str, Any]) -> dict[int, str]:
    dims = value.get("dims") or []
    return {i: (d or f"dim{i}") for i, d in enumerate(dims) if not isinstance(d, int)}


def _conform(model: onnx.ModelProto, t: Target) -> None:
    """Give the exported graph the upload's names, dims, dtypes, IR version and metadata, in place."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    outputs = list(g.output)
    if len(inputs) != len(t.inputs) or len(outputs) != len(t.outputs):
        raise RuntimeError(f"exported graph has {len(inputs)} inputs and {len(outputs)} outputs, expected "
                           f"{len(t.inputs)} and {len(t.outputs)}")
    edges = list(zip(inputs, t.inputs, strict=True)) + list(zip(outputs, t.outputs, strict=True))
    for node in all_nodes(g):
        node.doc_string = ""
        del node.metadata_props[:]
    renames: dict[str, str] = {}
    for vi, want in edges:
        got = list(vi.type.tensor_type.shape.dim)
        dims = want.get("dims")
        if dims and len(got) != len(dims):
            raise RuntimeError(f"{want['name']!r} has rank {len(got)}, the upload's has rank {len(dims)}")
        for d, w in zip(got, dims or [], strict=False):
            if d.dim_param and isinstance(w, str) and w:
                renames.setdefault(d.dim_param, w)  # the input's naming wins
    for vi in value_infos(g):
        for d in vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []:
            if d.dim_param in renames:  # never assign to others: dim_param and dim_value are a oneof
                d.dim_param = renames[d.dim_param]
    # an upload may list one value twice among its outputs (ultralytics' seg head, legacy exporter): the
    # repeats become copies of the first listing, never a rename that moves the first one aside
    first = {}
    dup = {j: first.setdefault(str(w["name"]), j) for j, w in enumerate(t.outputs)}
    dup = {j: i for j, i in dup.items() if i != j}
    for k, (vi, want) in enumerate(edges):
        if k - len(inputs) not in dup:
            rename_value(g, vi.name, str(want["name"]))
    for vi, want in zip(inputs, t.inputs, strict=True):
        _cast_input(g, vi, want)
    for j, (vi, want) in enumerate(zip(outputs, t.outputs, strict=True)):
        if j not in dup:
            _cast_output(g, vi, want)
    for vi, want in edges:
        for d, w in zip(vi.type.tensor_type.shape.dim, want.get("dims") or [], strict=False):
            d.Clear()  # exactly the upload's: its dim_param names, its fixed sizes
            if isinstance(w, int) or w:
                setattr(d, "dim_value" if isinstance(w, int) else "dim_param", w)
    for j, i in dup.items():
        g.output[j].CopyFrom(g.output[i])
    if t.ir_version:
        model.ir_version = int(t.ir_version)
    del model.metadata_props[:]
    for k, v in t.metadata.items():
        model.metadata_props.add(key=k, value=v)


def _cast_input(g: onnx.GraphProto, inp: onnx.ValueInfoProto, want: dict[str, Any]) -> None:
    """Cast from the upload's input dtype where the exported one differs (the module computes in float32)."""
    want_in = want.get("elem_type")
    if want_in and inp.type.tensor_type.elem_type != want_in:
        inner = fresh_name(g, inp.name + "_cast")
        replace_refs(g, inp.name, inner, outputs=False)
        g.node.insert(0, helper.make_node("Cast", [inp.name], [inner], to=inp.type.tensor_type.elem_type))
        inp.type.tensor_type.elem_type = int(want_in)


def _cast_output(g: onnx.GraphProto, outp: onnx.ValueInfoProto, want: dict[str, Any]) -> None:
    """Cast to the upload's output dtype where the exported one differs."""
    want_out = want.get("elem_type")
    if want_out and outp.type.tensor_type.elem_type != want_out:
        inner = fresh_name(g, outp.name + "_uncast")
        replace_refs(g, outp.name, inner)
        g.node.append(helper.make_node("Cast", [inner], [outp.name], to=int(want_out)))
        outp.type.tensor_type.elem_type = int(want_out)


def verify(path: Path, module: nn.Module, batches: list[slim_io.Inputs], t: Target, external: bool = False) -> None:
    """Check the written file: ONNX checker (full), interface as the upload's (every input and output, by
    name and order), onnxruntime parity on every output; its external data, if any, only in ``PATH.data``
    (the checker is given the path so that it reads it)."""
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(str(path) if external else model, full_check=True)
    places = {e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"}
    if places - ({data_file(path).name} if external else set()):
        raise ParityError(f"the written ONNX file refers to external data {sorted(places)}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    si, so = [v.name for v in sess.get_inputs()], [v.name for v in sess.get_outputs()]
    want_in, want_out = [v["name"] for v in t.inputs], [v["name"] for v in t.outputs]
    if (si, so) != (want_in, want_out):
        raise ParityError(f"written ONNX names {si} → {so} differ from the upload's {want_in} → {want_out}")
    in_np = [helper.tensor_dtype_to_np_dtype(int(v.get("elem_type") or TensorProto.FLOAT)) for v in t.inputs]
    for xb in batches:
        feeds = [x.numpy().astype(d) for x, d in zip(slim_io.args(xb), in_np, strict=True)]
        with torch.no_grad():
            refs = slim_io.leaves(slim_io.call(module, slim_io.pack(
                [torch.from_numpy(np.asarray(f)).to(x.dtype) for f, x in zip(feeds, slim_io.args(xb), strict=True)])))
        gots = sess.run(so, dict(zip(si, feeds, strict=True)))
        for v, got, ref in zip(t.outputs, gots, refs, strict=True):
            want = v.get("dims") or []
            if want and (len(got.shape) != len(want) or any(isinstance(w, int) and w != g
                                                            for w, g in zip(want, got.shape, strict=True))):
                raise ParityError(f"onnxruntime output {v['name']!r} shape {tuple(got.shape)} does not fit the "
                                  f"upload's {want}")
            tol = _TOL.get(int(v.get("elem_type") or TensorProto.FLOAT), 1e-4)
            err = rel_error(torch.from_numpy(np.asarray(got, dtype=np.float64)), ref.double())
            if not err <= tol:
                raise ParityError(f"onnxruntime output {v['name']!r} differs from the pruned model at batch "
                                  f"{slim_io.num_rows(xb)} (relative error {err:.2e} > {tol:g})")
