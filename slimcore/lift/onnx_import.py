"""Lift an ONNX model into a prunable GraphModule.

The graph is rebuilt node by node by :mod:`.onnx_lift` (converters in ``onnx_ops``/``onnx_shapes``/
``onnx_pool``), then treated like the other importers' output: chunks and reshapes are un-baked or
fenced by :mod:`.reshapes`, :func:`.modularize.modularize` turns conv/BN/linear calls into modules, and
the result is checked against the uploaded file run in onnxruntime (the reference, also for parity
later). External tensor data (which has had path-traversal CVEs) is read only from checked files in the
model's own folder, by :mod:`slimcore.external_data`.

Most ONNX files have no BatchNorm left (both ``torch.onnx.export`` paths fold it into Conv in eval
mode); ``meta["bn_in_file"]`` says whether any survived so the pipeline can refuse BN-scale pruning of a
model that has no γ with a clear message rather than silently prune nothing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx

from .. import io
from ..errors import ParityError, SlimError, UnsupportedModel
from ..external_data import load_external_tensors
from ..shape_limits import check_input_shapes
from . import IMPORTERS, Imported
from .modularize import modularize
from .onnx_graph import Lifter, lift_graph
from .onnx_lift import DTYPES, MAX_OPSET, MIN_OPSET, default_opset
from .parity import check_parity
from .reshapes import unbake_chunks, unbake_views, unprunable_layers


@IMPORTERS.register("onnx")
def import_onnx(path: Path, input_shape: tuple[int, ...] | None) -> Imported:
    data_files: list[str] = []
    model = load_model(path, data_files)
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if not inputs or not graph.output:
        raise UnsupportedModel(f"the ONNX graph has {len(inputs)} inputs and {len(graph.output)} outputs; at least "
                               "one of each is needed")
    for v in (*inputs, *graph.output):
        if v.type.WhichOneof("value") != "tensor_type" or v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            kind = "input" if v in inputs else "output"
            raise UnsupportedModel(f"graph {kind} {v.name!r} is not a float32 tensor")
    given = io.as_shapes(input_shape)
    if given is not None and len(given) != len(inputs):
        raise SlimError(f"the ONNX model takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}) but the "
                        f"spec gives {len(given)} shapes; give one per input in input_shapes")
    all_dims = [_dims(i) for i in inputs]
    dims = all_dims[0]
    dynamic = not isinstance(dims[0], int) or dims[0] <= 0 if dims else False
    shapes = check_input_shapes(tuple(_resolve_shape(d, None if given is None else given[k], dynamic)
                                      for k, d in enumerate(all_dims)),
                                "input_shape" if input_shape else "the ONNX model's declared input")
    shape = shapes[0]
    original = OnnxRuntimeModel(path, [i.name for i in inputs], [o.name for o in graph.output])
    batch = 2 if dynamic else shape[0]  # batch 1 can hide batch-mixing bugs
    example = io.random_inputs(shapes, batch)
    try:
        io.call(original, example)
    except Exception as e:
        given_shapes = ", ".join(str(list(t.shape)) for t in io.args(example))
        raise SlimError(f"onnxruntime cannot run the model on inputs of shape {given_shapes}: "
                        f"{_ort_message(e)}") from None
    feeds = dict(zip((i.name for i in inputs), io.args(example), strict=True))
    gm = lift_single(model, feeds)
    modularize(gm, example)
    gm.eval()
    meta: dict[str, Any] = {
        "onnx_opset": default_opset(model),
        "onnx_ir_version": int(model.ir_version),
        "onnx_inputs": [_io(i) for i in inputs],
        "onnx_outputs": [_io(o) for o in graph.output],
        "onnx_metadata": {p.key: p.value for p in model.metadata_props},
        "onnx_producer": (model.producer_name, model.producer_version),
        # module path -> why; the pruner must leave every group containing one whole
        "unprunable": unprunable_layers(gm),
        "bn_in_file": any(n.op_type == "BatchNormalization" for n in graph.node),
        "onnx_external_data": data_files,  # written back with external data too when non-empty
    }
    imported = Imported(module=gm, fmt="onnx", original=original, input_shape=shape, input_name=inputs[0].name,
                        dynamic_batch=dynamic, meta=meta, input_shapes=shapes,
                        input_names=tuple(i.name for i in inputs), output_names=tuple(o.name for o in graph.output))
    try:
        check_parity(original, gm, example, rtol=1e-5, stage="onnx import")
    except ParityError:
        # again against the plain lifted graph, so the error names the first node that departs
        check_parity(original, gm, example, rtol=1e-5, stage="onnx import",
                     reference=lambda: Lifter(model, feeds).run())
        raise
    return imported


def lift_single(model: onnx.ModelProto, feeds: dict[str, torch.Tensor]) -> fx.GraphModule:
    """The lifted graph (example value per graph input), with reshapes un-baked/fenced (before modularize).

    It returns one tensor for one graph output, else a tuple in the graph's output order."""
    gm = Lifter(model, feeds).run()
    unbake_chunks(gm)
    unbake_views(gm)
    for n in gm.graph.nodes:
        n.meta.pop("val", None)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def load_model(path: Path, data_files: list[str] | None = None) -> onnx.ModelProto:
    """Parse an ONNX model, its external data read in (their file names appended to ``data_files``); refuse
    damaged files, unsafe or inconsistent data files and unchecked opsets."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError and friends: a truncated or non-ONNX upload
        raise SlimError(f"{Path(path).name} is not a readable ONNX model: {_first_line(e)}") from None
    if not model.HasField("graph") or not model.graph.node:
        raise SlimError(f"{Path(path).name} is not an ONNX model with a graph (damaged upload?)")
    # external data (torch's default export writes model.onnx.data): read from checked files beside the model
    used = load_external_tensors(_tensors(model.graph), Path(path))
    if data_files is not None:
        data_files.extend(used)
    if model.functions:  # model-local functions (some exporters wrap modules in them): inline their bodies
        from onnx import inliner

        model = inliner.inline_local_functions(model)
    opset = default_opset(model)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedModel(f"ONNX opset {opset} is not supported (supported: {MIN_OPSET}-{MAX_OPSET}); convert "
                               "it with onnx.version_converter")
    return model


def _tensors(g: onnx.GraphProto) -> Any:
    """Every tensor stored in a graph: initializers and constant attributes, subgraphs included."""
    yield from g.initializer
    for s in g.sparse_initializer:
        yield s.values
    for n in g.node:
        for a in n.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _tensors(sub)


def _dims(v: onnx.ValueInfoProto) -> list[int | str]:
    shape = v.type.tensor_type.shape
    return [d.dim_param if d.HasField("dim_param") else int(d.dim_value) if d.HasField("dim_value") and
            d.dim_value > 0 else -1 for d in shape.dim]


def _io(v: onnx.ValueInfoProto) -> dict[str, Any]:
    return {"name": v.name, "elem_type": int(v.type.tensor_type.elem_type), "dims": _dims(v)}


def _resolve_shape(dims: list[int | str], given: tuple[int, ...] | None, dynamic: bool) -> tuple[int, ...]:
    """Batch 1 when dynamic, the rest from the file, checked against (or completed by) ``input_shape``."""
    if not dims:
        raise UnsupportedModel("the graph input is a scalar or has no recorded shape; only (N, ...) tensors are "
                               "supported")
    if given is None:
        if any(not isinstance(d, int) or d <= 0 for d in dims[1:]):
            raise SlimError(f"the model's input has dynamic dims other than the batch ({dims}); give input_shape")
        return (1 if dynamic else int(dims[0]), *(int(d) for d in dims[1:]))
    given = tuple(int(d) for d in given)
    bad = len(given) != len(dims) or any(g <= 0 for g in given) or any(
        isinstance(d, int) and d > 0 and g != d for g, d in zip(given[1:], dims[1:], strict=False))
    if not dynamic and given and given[0] != dims[0]:
        bad = True
    if bad:
        want = ", ".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in dims)
        raise SlimError(f"input_shape {list(given)} does not match the ONNX model's input ({want})")
    return (1 if dynamic else given[0], *given[1:])


def _first_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
    return (lines[0] if lines else type(e).__name__)[:600]


def _ort_message(e: BaseException) -> str:
    """onnxruntime's error without its status prefix and C++ source location."""
    s = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", _first_line(e))
    if ".cc:" in s:
        s = s[s.index(".cc:"):]
        s = s[s.index(") ") + 2:] if ") " in s else s
    return s


class OnnxRuntimeModel:
    """The uploaded file run in onnxruntime on the CPU: a tensor per graph input in, the graph's outputs out
    (one tensor, or a tuple in output order as the lifted graph returns them; on the input's device).

    Parity checks and distillation compare against this, not against our own lift of it. The session is
    rebuilt from the path after unpickling (sessions cannot be pickled).
    """

    def __init__(self, path: Path, input_names: str | list[str], output_names: str | list[str]) -> None:
        self.path = str(path)
        self.input_names = [input_names] if isinstance(input_names, str) else list(input_names)
        self.output_names = [output_names] if isinstance(output_names, str) else list(output_names)
        self._session: Any = None
        self.session()  # fail at import, not at first use

    def session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = max(1, torch.get_num_threads())
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            try:
                self._session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
            except Exception as e:
                raise SlimError(f"onnxruntime cannot load the model: {_ort_message(e)}") from None
        return self._session

    def __call__(self, *xs: torch.Tensor) -> Any:
        feed = {n: x.detach().to("cpu", torch.float32).numpy() for n, x in zip(self.input_names, xs, strict=True)}
        outs = [torch.from_numpy(np.ascontiguousarray(o)).to(xs[0].device)
                for o in self.session().run(self.output_names, feed)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_session": None}


__all__ = ["DTYPES", "OnnxRuntimeModel", "import_onnx", "lift_graph", "lift_single", "load_model"]
